//! PURE: which address lives where in the lab for one scenario (LAB-NOTES.md topology).
//!
//! * node: the node under test; its uplink to the router carries the lab's own primary addresses
//!   ([`LAB_V4`], [`LAB_V6`], added first so masquerade picks them) and then every node address;
//! * pods: one namespace per local pod IP (local endpoints and in-cluster client sources);
//! * node2: remote endpoints, whose default route points back through the node under test;
//! * router: routes everything cluster-ish to the node; a policy table makes packets the node
//!   forwarded back un-DNATed land in a local sink instead of looping;
//! * ext: external clients behind the router.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Result;
use ipnet::IpNet;

use crate::scenario::{Expectation, Protocol, Scenario};

/// Node uplink primary addresses no packet uses as its source, so node masquerade is visible.
/// IPv6: a ULA so RFC 6724 rule 6 (label match) prefers it for pod destinations.
pub const LAB_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 255, 1);
pub const LAB_V6: Ipv6Addr = Ipv6Addr::new(0xfdff, 0x1ab, 0, 0, 0, 0, 0, 1);
/// External client addresses the self-test probes from.
pub const LAB_EXT_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 250);
pub const LAB_EXT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x250);
/// Port of the self-test listeners (node and sink).
pub const LAB_PORT: u16 = 9;

/// Pod networks by convention (FORMAT.md section 7) used to recognise client pods when a
/// scenario runs with `detect_local_mode: None` and so lists no cluster CIDR.
const POD_CONVENTION: [&str; 2] = ["10.0.0.0/8", "fd00:10::/64"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Node,
    Pod(usize),
    Remote,
    External,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The scenario's single IP family is IPv6.
    pub ipv6: bool,
    pub node_ips: Vec<IpAddr>,
    /// Local pod IPs, one namespace each (index = `Role::Pod`).
    pub pods: Vec<IpAddr>,
    /// Remote endpoint IPs, all on node2.
    pub remotes: Vec<IpAddr>,
    /// External client IPs in the ext namespace.
    pub externals: Vec<IpAddr>,
    /// Prefixes the router sends to the node.
    pub to_node: Vec<IpNet>,
    /// Prefixes the router delivers locally (to the sink) when they come back from the node.
    pub sink_prefixes: Vec<IpNet>,
    /// Endpoint servers: IP -> (protocol, port).
    pub servers: BTreeMap<IpAddr, BTreeSet<(Protocol, u16)>>,
    pub node_listen: BTreeSet<(Protocol, SocketAddr)>,
    pub sink_listen: BTreeSet<(Protocol, SocketAddr)>,
    /// Address the self-test uses to prove the sink answers.
    pub sink_probe: Option<SocketAddr>,
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

impl Plan {
    pub fn new(s: &Scenario) -> Result<Plan> {
        let node_ips = s.node.ips();
        let eps = s.endpoints()?;
        let mut pods = BTreeSet::new();
        let mut remotes = BTreeSet::new();
        let mut servers: BTreeMap<IpAddr, BTreeSet<(Protocol, u16)>> = BTreeMap::new();
        for e in &eps {
            if e.node_name.as_deref() == Some(s.node.name.as_str()) {
                pods.insert(e.ip);
            } else {
                remotes.insert(e.ip);
            }
            servers
                .entry(e.ip)
                .or_default()
                .extend(e.ports.iter().copied());
        }
        // Expected endpoints always get a server, even if a slice port were missing.
        for p in &s.packets {
            if let Expectation::Endpoints { set, .. } = p.expect.resolve()? {
                for ep in set {
                    if !pods.contains(&ep.ip()) && !remotes.contains(&ep.ip()) {
                        remotes.insert(ep.ip());
                    }
                    servers
                        .entry(ep.ip())
                        .or_default()
                        .insert((p.protocol, ep.port()));
                }
            }
        }
        let mut pod_ranges: Vec<IpNet> = s.cluster.cluster_cidrs.clone();
        pod_ranges.extend(
            POD_CONVENTION
                .iter()
                .map(|c| c.parse::<IpNet>().expect("valid constant")),
        );
        let mut externals: BTreeSet<IpAddr> =
            [IpAddr::V4(LAB_EXT_V4), IpAddr::V6(LAB_EXT_V6)].into();
        for p in &s.packets {
            let src = p.source_ip;
            if node_ips.contains(&src) || pods.contains(&src) || remotes.contains(&src) {
                continue;
            }
            if pod_ranges.iter().any(|r| r.contains(&src)) {
                pods.insert(src);
            } else {
                externals.insert(src);
            }
        }

        let known =
            |ip: &IpAddr| node_ips.contains(ip) || pods.contains(ip) || remotes.contains(ip);
        let mut sink_prefixes: BTreeSet<IpNet> = s.cluster.service_cidrs.iter().copied().collect();
        sink_prefixes.extend(
            s.service_vips()
                .into_iter()
                .filter(|ip| !known(ip))
                .map(host),
        );
        sink_prefixes.extend(
            s.packets
                .iter()
                .map(|p| p.dest_ip)
                .filter(|ip| !known(ip))
                .map(host),
        );

        let mut to_node: BTreeSet<IpNet> = sink_prefixes.clone();
        to_node.extend(node_ips.iter().copied().map(host));
        to_node.extend(pods.iter().copied().map(host));
        to_node.extend(remotes.iter().copied().map(host));

        let mut node_ports: BTreeSet<(Protocol, u16)> = s.node_ports().into_iter().collect();
        let mut node_listen = BTreeSet::new();
        let mut sink_listen = BTreeSet::new();
        for p in &s.packets {
            if node_ips.contains(&p.dest_ip) {
                node_ports.insert((p.protocol, p.dest_port));
            } else if !known(&p.dest_ip) {
                sink_listen.insert((p.protocol, p.dest()));
            }
        }
        node_ports.insert((Protocol::TCP, LAB_PORT));
        node_ports.insert((Protocol::UDP, LAB_PORT));
        for &ip in &node_ips {
            for &(proto, port) in &node_ports {
                node_listen.insert((proto, SocketAddr::new(ip, port)));
            }
        }
        let sink_probe = s.cluster.service_cidrs.first().and_then(|net| {
            let ip = match net {
                IpNet::V4(n) if n.prefix_len() <= 24 => {
                    IpAddr::V4(Ipv4Addr::from(n.network().to_bits() | 250))
                }
                IpNet::V6(n) if n.prefix_len() <= 120 => {
                    IpAddr::V6(Ipv6Addr::from(n.network().to_bits() | 250))
                }
                _ => return None,
            };
            Some(SocketAddr::new(ip, LAB_PORT))
        });
        if let Some(sp) = sink_probe {
            sink_listen.insert((Protocol::TCP, sp));
        }

        Ok(Plan {
            ipv6: s.cluster.ip_family == crate::scenario::IpFamily::IPv6,
            node_ips,
            pods: pods.into_iter().collect(),
            remotes: remotes.into_iter().collect(),
            externals: externals.into_iter().collect(),
            to_node: to_node.into_iter().collect(),
            sink_prefixes: sink_prefixes.into_iter().collect(),
            servers,
            node_listen,
            sink_listen,
            sink_probe,
        })
    }

    pub fn role(&self, ip: IpAddr) -> Role {
        if self.node_ips.contains(&ip) {
            Role::Node
        } else if let Some(i) = self.pods.iter().position(|p| *p == ip) {
            Role::Pod(i)
        } else if self.remotes.contains(&ip) {
            Role::Remote
        } else {
            Role::External
        }
    }

    /// The external client of a family the self-test probes from.
    pub fn lab_external(v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(LAB_EXT_V6)
        } else {
            IpAddr::V4(LAB_EXT_V4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenarios() -> Vec<Scenario> {
        crate::scenario::load(&crate::conformance::default_paths(&[])).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn basic_clusterip_plan() {
        let s = scenarios()
            .into_iter()
            .find(|s| s.id == "basic_clusterip/base")
            .unwrap();
        let p = Plan::new(&s).unwrap();
        // 10.180.0.1 is local (nodeName test-node), 10.180.0.2 is a client pod, 10.180.2.1 remote.
        assert_eq!(p.pods, vec![ip("10.180.0.1"), ip("10.180.0.2")]);
        assert_eq!(p.remotes, vec![ip("10.180.2.1")]);
        assert_eq!(p.role(ip("10.180.0.2")), Role::Pod(1));
        assert_eq!(p.role(ip("192.168.0.2")), Role::Node);
        assert_eq!(p.role(ip("203.0.113.2")), Role::External);
        let srv = &p.servers[&ip("10.180.2.1")];
        assert!(srv.contains(&(Protocol::TCP, 5353)) && srv.contains(&(Protocol::UDP, 53)));
        assert!(srv.contains(&(Protocol::SCTP, 53)));
        // The unallocated ClusterIP is answered by the sink, inside the service CIDR.
        assert!(
            p.sink_listen
                .contains(&(Protocol::TCP, "172.30.0.50:80".parse().unwrap()))
        );
        assert!(p.sink_prefixes.contains(&"172.30.0.0/16".parse().unwrap()));
        assert_eq!(p.sink_probe, Some("172.30.0.250:9".parse().unwrap()));
    }

    #[test]
    fn external_ip_that_is_a_node_ip_is_not_sunk() {
        let s = scenarios()
            .into_iter()
            .find(|s| s.id == "no_endpoints_reject/base")
            .unwrap();
        let p = Plan::new(&s).unwrap();
        let node_ip: IpNet = "192.168.99.11/32".parse().unwrap();
        assert!(!p.sink_prefixes.contains(&node_ip));
        assert!(p.to_node.contains(&node_ip));
        assert!(
            p.sink_prefixes
                .contains(&"198.51.100.4/32".parse().unwrap())
        );
        assert!(
            p.node_listen
                .contains(&(Protocol::TCP, "192.168.99.11:80".parse().unwrap()))
        );
        assert!(
            p.node_listen
                .contains(&(Protocol::TCP, "192.168.1.2:3001".parse().unwrap()))
        );
        assert!(p.externals.contains(&ip("203.0.113.2")));
        assert_eq!(p.pods, vec![ip("10.0.0.2")]);
    }

    #[test]
    fn ipv6_plan() {
        let s = scenarios()
            .into_iter()
            .find(|s| s.id == "nodeport/ipv6")
            .unwrap();
        let p = Plan::new(&s).unwrap();
        assert_eq!(p.pods, vec![ip("fd00:10::2"), ip("fd00:10:180::2:1")]);
        assert_eq!(p.remotes, vec![ip("fd00:10:180::1")]);
        assert!(p.externals.contains(&ip("2001:db8:ff::1")));
        // ClusterIP outside the service CIDR still reaches the node (host route).
        assert!(p.to_node.contains(&"fd00:172:30::41/128".parse().unwrap()));
    }
}
