//! PURE: which UDP conntrack entries are stale, judged from the kernel's entries and the
//! current desired state only (kube-proxy's pkg/proxy/conntrack/cleanup.go,
//! `CleanStaleEntries`, releases 1.31+).
//!
//! UDP has no connection teardown, so an entry DNATing a client to an endpoint that is gone
//! keeps blackholing that client, and an entry created while a Service had no endpoints (no
//! DNAT: its reply source is the Service address itself) keeps bypassing the Service once it
//! has some. TCP needs none of this: a connection to a vanished endpoint is reset or times
//! out, and a new one is a new conntrack entry.
//!
//! The rule (upstream's): a UDP entry is stale when its original destination is a frontend of
//! a UDP service port that has serving endpoints — `ClusterIP:port`, `externalIP:port`,
//! `loadBalancerIP:port`, or the NodePort on a NodePort address — and its reply source is not
//! one of that service port's serving endpoints. Nothing here depends on what was programmed
//! before, so the first sync after a restart deletes exactly what is stale and leaves every
//! healthy established flow alone (the previous, diff-based approach had no "before" after a
//! restart and flushed every UDP Service's flows).
//!
//! Deliberate details, each documented where it is decided:
//! - Which endpoints count: every endpoint of the service port from every slice that is serving
//!   (or ready), whatever the traffic policies, topology or terminating state say — upstream
//!   ignores those so that a policy change does not break existing flows, as for TCP.
//! - Service ports without any such endpoint are left alone: their traffic is rejected anyway.
//! - The reply source is compared by address only, as upstream does.
//! - A NodePort entry must be addressed to a NodePort address (upstream matches the port on
//!   any destination, which also deletes unrelated flows that happen to use that port).
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Changed, IpFamily, NodeNetwork, NodePortIps, Protocol, Snapshot};

/// One conntrack entry as the kernel lists it (the fields the rule reads).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConntrackEntry {
    pub family: IpFamily,
    /// IANA protocol number (17 for UDP).
    pub protocol: u8,
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    /// Who answers: the endpoint after DNAT, the original destination without it.
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// A deletion matching every UDP entry with this original destination address and port and
/// this reply source (upstream's `filterForIPPortNAT`). The rule decides from exactly these
/// fields, so every entry the filter matches is stale — also one created between listing
/// and deleting — and one filter covers all clients of one stale endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConntrackFilter {
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
}

impl ConntrackFilter {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.orig_dst)
    }
    pub fn matches(&self, e: &ConntrackEntry) -> bool {
        e.protocol == Protocol::Udp.number()
            && e.orig_dst == self.orig_dst
            && e.orig_dport == self.orig_dport
            && e.reply_src == self.reply_src
    }
}

impl From<&ConntrackEntry> for ConntrackFilter {
    fn from(e: &ConntrackEntry) -> Self {
        ConntrackFilter {
            orig_dst: e.orig_dst,
            orig_dport: e.orig_dport,
            reply_src: e.reply_src,
        }
    }
}

/// The endpoint addresses each UDP frontend of one family accepts as reply sources. An empty
/// set means the frontend exists but has no serving endpoint: its entries are left alone.
struct Frontends<'a> {
    network: &'a NodeNetwork,
    /// (service address, service port) of ClusterIPs, externalIPs and load-balancer IPs.
    vips: BTreeMap<(IpAddr, u16), BTreeSet<IpAddr>>,
    node_ports: BTreeMap<u16, BTreeSet<IpAddr>>,
    /// Every ClusterIP of the snapshot (any protocol): never a local, NodePort address.
    cluster_ips: BTreeSet<IpAddr>,
}

impl<'a> Frontends<'a> {
    fn of(snapshot: &'a Snapshot) -> Self {
        let mut f = Frontends {
            network: &snapshot.network,
            vips: BTreeMap::new(),
            node_ports: BTreeMap::new(),
            cluster_ips: BTreeSet::new(),
        };
        for s in snapshot.services.values() {
            f.cluster_ips.insert(s.port.cluster_ip);
            if s.port.name.protocol != Protocol::Udp {
                continue;
            }
            // Upstream counts the endpoints that are serving, ignoring traffic policies,
            // topology and terminating state: "Changes to the service should not affect
            // existing flows" (cleanup.go). Ready is counted too: the EndpointSlice
            // controller never writes ready without serving, and a flow DNATed to an endpoint
            // that new flows are still sent to is not stale.
            let eps: BTreeSet<IpAddr> = s
                .endpoints
                .iter()
                .filter(|e| e.serving || e.ready)
                .map(|e| e.ip)
                .collect();
            let p = &s.port;
            // Two service ports can claim one frontend only by misconfiguration (an
            // externalIP equal to another Service's address); the union keeps any flow one of
            // them could have made.
            for vip in std::iter::once(&p.cluster_ip)
                .chain(&p.external_ips)
                .chain(&p.load_balancer_ips)
            {
                f.vips
                    .entry((*vip, p.port))
                    .or_default()
                    .extend(eps.iter().copied());
            }
            if let Some(np) = p.node_port {
                f.node_ports
                    .entry(np)
                    .or_default()
                    .extend(eps.iter().copied());
            }
        }
        f
    }

    /// Whether `dst` takes NodePort traffic, as the nft plan matches it: the listed
    /// --nodeport-addresses, or any local address but loopback. Which addresses are local is
    /// not known here, so in the latter case anything but loopback and the Service CIDRs
    /// (ClusterIPs are never local addresses) counts, as upstream's port-only match does.
    fn is_node_port_destination(&self, dst: &IpAddr) -> bool {
        if dst.is_loopback() {
            return false;
        }
        match &self.network.node_port_ips {
            NodePortIps::Addresses(ips) => ips.contains(dst),
            NodePortIps::AllLocal => {
                !self.cluster_ips.contains(dst)
                    && !self.network.service_cidrs.iter().any(|n| n.contains(dst))
            }
        }
    }

    fn is_stale(&self, e: &ConntrackEntry) -> bool {
        if e.protocol != Protocol::Udp.number() || e.family != self.network.family {
            return false;
        }
        // A Service address wins over a NodePort on the same address and port: the nft plan
        // looks the destination up in the service-ips map before the NodePort check.
        let serving = match self.vips.get(&(e.orig_dst, e.orig_dport)) {
            Some(eps) => eps,
            None => match self.node_ports.get(&e.orig_dport) {
                Some(eps) if self.is_node_port_destination(&e.orig_dst) => eps,
                _ => return false,
            },
        };
        !serving.is_empty() && !serving.contains(&e.reply_src)
    }
}

/// The entries of `entries` that are stale for `snapshot` (one family; entries of the other
/// family, of other protocols, and of traffic that is not addressed to a UDP service frontend
/// are never returned).
pub fn stale_udp_entries(snapshot: &Snapshot, entries: &[ConntrackEntry]) -> Vec<ConntrackEntry> {
    let f = Frontends::of(snapshot);
    entries.iter().filter(|e| f.is_stale(e)).cloned().collect()
}

/// The same decision as deletion filters, deduplicated and sorted: one per (frontend, stale
/// reply source) instead of one per client.
pub fn stale_udp_filters(snapshot: &Snapshot, entries: &[ConntrackEntry]) -> Vec<ConntrackFilter> {
    let f = Frontends::of(snapshot);
    entries
        .iter()
        .filter(|e| f.is_stale(e))
        .map(ConntrackFilter::from)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Whether a sync can have made UDP entries stale, so that listing the conntrack table is
/// worth it (upstream runs the cleanup only when a UDP service port's endpoints changed).
/// A full resync always can; a partial one only if a changed Service has a UDP port now —
/// entries of a Service without UDP ports (or deleted) are never stale by the rule.
pub fn cleanup_needed(changed: &Changed, snapshots: &[Snapshot]) -> bool {
    match changed {
        Changed::All => true,
        Changed::Services(keys) => keys.iter().any(|k| {
            snapshots
                .iter()
                .any(|s| s.ports_of(k).any(|p| p.port.name.protocol == Protocol::Udp))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceKey};
    use crate::plan::nft::fixtures::*;

    const UDP: u8 = 17;
    const TCP: u8 = 6;

    /// ns1/dns: UDP 53 on ClusterIP 172.30.0.10, externalIP 192.168.99.11, LB 198.51.100.4,
    /// NodePort 30053; and its TCP 53 twin with the same endpoints.
    fn dns(eps: Vec<Endpoint>) -> Snapshot {
        let mut p = port("ns1", "dns", "dns", Protocol::Udp, "172.30.0.10", 53);
        p.node_port = Some(30053);
        p.external_ips = vec![ip("192.168.99.11")];
        p.load_balancer_ips = vec![ip("198.51.100.4")];
        let tcp = port("ns1", "dns", "dns-tcp", Protocol::Tcp, "172.30.0.10", 53);
        let other = port("ns2", "other", "", Protocol::Udp, "172.30.0.20", 53);
        snapshot(
            v4_network(),
            vec![
                state(p, eps.clone()),
                state(tcp, eps),
                state(other, vec![ep("10.180.9.9", 53, None)]),
            ],
        )
    }

    /// A client 10.0.0.2:`sport` talking UDP to `dst`:`dport`, answered by `reply`.
    fn flow(dst: &str, dport: u16, reply: &str, sport: u16) -> ConntrackEntry {
        ConntrackEntry {
            family: IpFamily::of(&ip(dst)),
            protocol: UDP,
            orig_src: ip("10.0.0.2"),
            orig_dst: ip(dst),
            orig_sport: sport,
            orig_dport: dport,
            reply_src: ip(reply),
            reply_sport: 53,
        }
    }

    fn two_endpoints() -> Vec<Endpoint> {
        vec![ep("10.180.0.1", 53, None), ep("10.180.0.2", 53, Some(NODE))]
    }

    /// Healthy flows to every frontend of both endpoints, plus traffic the rule must ignore.
    fn healthy_and_unrelated() -> Vec<ConntrackEntry> {
        let mut v = Vec::new();
        for (i, ep) in ["10.180.0.1", "10.180.0.2"].into_iter().enumerate() {
            let s = 40000 + i as u16;
            v.push(flow("172.30.0.10", 53, ep, s));
            v.push(flow("192.168.99.11", 53, ep, s));
            v.push(flow("198.51.100.4", 53, ep, s));
            v.push(flow("192.168.0.2", 30053, ep, s));
        }
        // Another Service's flow, a direct pod-to-pod flow, DNS to the outside world.
        v.push(flow("172.30.0.20", 53, "10.180.9.9", 40100));
        v.push(flow("10.180.0.1", 53, "10.180.0.1", 40101));
        v.push(flow("8.8.8.8", 53, "8.8.8.8", 40102));
        v
    }

    #[test]
    fn restart_with_healthy_flows_deletes_nothing() {
        let snap = dns(two_endpoints());
        assert_eq!(stale_udp_entries(&snap, &healthy_and_unrelated()), vec![]);
        assert_eq!(stale_udp_filters(&snap, &healthy_and_unrelated()), vec![]);
    }

    #[test]
    fn removed_endpoint_loses_exactly_its_flows_on_every_frontend() {
        let entries = healthy_and_unrelated();
        let snap = dns(vec![ep("10.180.0.2", 53, Some(NODE))]);
        let got = stale_udp_entries(&snap, &entries);
        let want: Vec<ConntrackEntry> = entries
            .iter()
            .filter(|e| e.reply_src == ip("10.180.0.1") && e.orig_dst != ip("10.180.0.1"))
            .cloned()
            .collect();
        assert_eq!(want.len(), 4);
        assert_eq!(got, want);
        let gone = ip("10.180.0.1");
        assert_eq!(
            stale_udp_filters(&snap, &entries),
            vec![
                ConntrackFilter {
                    orig_dst: ip("172.30.0.10"),
                    orig_dport: 53,
                    reply_src: gone
                },
                ConntrackFilter {
                    orig_dst: ip("192.168.0.2"),
                    orig_dport: 30053,
                    reply_src: gone
                },
                ConntrackFilter {
                    orig_dst: ip("192.168.99.11"),
                    orig_dport: 53,
                    reply_src: gone
                },
                ConntrackFilter {
                    orig_dst: ip("198.51.100.4"),
                    orig_dport: 53,
                    reply_src: gone
                },
            ]
        );
        // Every filter matches only entries the rule calls stale.
        for f in stale_udp_filters(&snap, &entries) {
            for e in entries.iter().filter(|e| f.matches(e)) {
                assert!(got.contains(e), "{f:?} would delete {e:?}");
            }
        }
    }

    #[test]
    fn not_serving_endpoint_is_stale_but_serving_terminating_and_remote_ones_are_not() {
        let entries = healthy_and_unrelated();
        let mut eps = two_endpoints();
        // 10.180.0.2 is terminating but still serving, 10.180.0.1 is neither ready nor
        // serving any more.
        eps[1].ready = false;
        eps[1].terminating = true;
        eps[0].ready = false;
        eps[0].serving = false;
        let mut snap = dns(eps);
        // Traffic policies do not matter: 10.180.0.2 is the only local endpoint, and a Local
        // policy would not use the remote 10.180.0.1 — its flows are kept while it serves.
        let got = stale_udp_entries(&snap, &entries);
        assert!(got.iter().all(|e| e.reply_src == ip("10.180.0.1")));
        assert_eq!(got.len(), 4);
        for s in snap.services.values_mut() {
            s.port.external_policy_local = true;
            s.port.internal_policy_local = true;
            s.endpoints[0].serving = true;
        }
        assert_eq!(stale_udp_entries(&snap, &entries), vec![]);
    }

    #[test]
    fn service_gaining_endpoints_loses_its_un_nated_flows() {
        // Flows made while ns1/dns had no endpoint were never DNATed: the reply comes from
        // the address the client sent to.
        let un_nated = vec![
            flow("172.30.0.10", 53, "172.30.0.10", 41000),
            flow("192.168.99.11", 53, "192.168.99.11", 41001),
            flow("198.51.100.4", 53, "198.51.100.4", 41002),
            flow("192.168.0.2", 30053, "192.168.0.2", 41003),
        ];
        // While it has none they are left alone (the rules reject that traffic anyway).
        assert_eq!(stale_udp_entries(&dns(vec![]), &un_nated), vec![]);
        let mut all = un_nated.clone();
        all.extend(healthy_and_unrelated());
        assert_eq!(stale_udp_entries(&dns(two_endpoints()), &all), un_nated);
    }

    #[test]
    fn node_port_flows_need_a_node_port_address() {
        let snap = dns(vec![ep("10.180.0.2", 53, None)]);
        let entries = vec![
            // Stale: to the NodePort on a NodePort address, answered by a removed endpoint.
            flow("192.168.0.2", 30053, "10.180.0.1", 42000),
            // Port 30053 on another host (a pod talking to a remote node's NodePort): not ours.
            flow("203.0.113.7", 30053, "203.0.113.7", 42001),
            // Port 30053 on loopback: NodePorts are never served there.
            flow("127.0.0.1", 30053, "127.0.0.1", 42002),
        ];
        assert_eq!(stale_udp_entries(&snap, &entries), vec![entries[0].clone()]);

        // With every local address taking NodePorts, only loopback and ClusterIPs are known
        // not to be local.
        let mut all_local = snap.clone();
        all_local.network.node_port_ips = NodePortIps::AllLocal;
        let more = vec![
            entries[0].clone(),
            entries[1].clone(),
            entries[2].clone(),
            flow("172.30.0.20", 30053, "172.30.0.20", 42003),
            flow("172.30.5.5", 30053, "172.30.5.5", 42004),
        ];
        assert_eq!(
            stale_udp_entries(&all_local, &more),
            vec![entries[0].clone(), entries[1].clone()]
        );
    }

    #[test]
    fn service_address_wins_over_a_node_port_on_the_same_port() {
        // ns3/ext has externalIP 192.168.0.2 port 30053, the same as ns1/dns's NodePort on
        // that address: its own endpoint answers, so the flow is healthy.
        let mut snap = dns(vec![ep("10.180.0.2", 53, None)]);
        let mut p = port("ns3", "ext", "", Protocol::Udp, "172.30.0.30", 30053);
        p.external_ips = vec![ip("192.168.0.2")];
        let s = state(p, vec![ep("10.180.7.7", 53, None)]);
        snap.services.insert(s.port.name.clone(), s);
        let entries = vec![
            flow("192.168.0.2", 30053, "10.180.7.7", 43000),
            flow("192.168.0.2", 30053, "10.180.0.1", 43001),
        ];
        assert_eq!(stale_udp_entries(&snap, &entries), vec![entries[1].clone()]);
    }

    #[test]
    fn tcp_other_family_and_tcp_only_services_are_untouched() {
        let snap = dns(vec![ep("10.180.0.2", 53, None)]);
        let mut tcp = flow("172.30.0.10", 53, "10.180.0.1", 44000);
        tcp.protocol = TCP;
        let mut v6 = flow("fd00:10:96::10", 53, "fd00::1", 44001);
        v6.family = IpFamily::V6;
        // A TCP-only Service's address with a UDP flow to it: not a UDP frontend.
        let mut snap2 = snap.clone();
        let web = port("ns4", "web", "", Protocol::Tcp, "172.30.0.40", 80);
        let s = state(web, vec![ep("10.180.4.4", 80, None)]);
        snap2.services.insert(s.port.name.clone(), s);
        let udp_to_tcp_svc = flow("172.30.0.40", 80, "172.30.0.40", 44002);
        let entries = vec![tcp, v6, udp_to_tcp_svc];
        assert_eq!(stale_udp_entries(&snap2, &entries), vec![]);
        // An IPv6 snapshot ignores IPv4 entries even on a port-only (AllLocal) NodePort match.
        let mut net6 = network(IpFamily::V6, &["2001:db8::1"], &[], &["fd00:10:96::/112"]);
        net6.node_port_ips = NodePortIps::AllLocal;
        let mut p = port("ns1", "dns", "dns", Protocol::Udp, "fd00:10:96::10", 53);
        p.node_port = Some(30053);
        let snap6 = snapshot(net6, vec![state(p, vec![ep("fd00::2", 53, None)])]);
        let v4_np = flow("192.168.0.2", 30053, "10.180.0.1", 44003);
        let v6_np = ConntrackEntry {
            family: IpFamily::V6,
            orig_src: ip("2001:db8::9"),
            orig_dst: ip("2001:db8::1"),
            reply_src: ip("fd00::1"),
            ..v4_np.clone()
        };
        assert_eq!(
            stale_udp_entries(&snap6, &[v4_np, v6_np.clone()]),
            vec![v6_np]
        );
    }

    #[test]
    fn cleanup_is_needed_for_full_syncs_and_changed_udp_services() {
        let snaps = vec![dns(two_endpoints())];
        let key = |ns: &str, n: &str| ServiceKey {
            namespace: ns.to_string(),
            name: n.to_string(),
        };
        assert!(cleanup_needed(&Changed::All, &snaps));
        assert!(cleanup_needed(
            &Changed::Services([key("ns2", "other")].into()),
            &snaps
        ));
        // A deleted Service, or one with TCP ports only, cannot make anything stale.
        let mut with_web = snaps.clone();
        let web = port("ns4", "web", "", Protocol::Tcp, "172.30.0.40", 80);
        let s = state(web, vec![]);
        with_web[0].services.insert(s.port.name.clone(), s);
        assert!(!cleanup_needed(
            &Changed::Services([key("ns4", "web"), key("ns9", "gone")].into()),
            &with_web
        ));
        assert!(!cleanup_needed(&Changed::Services(BTreeSet::new()), &snaps));
    }
}
