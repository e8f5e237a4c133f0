//! Stale UDP conntrack entries (kube-proxy pkg/proxy/conntrack/cleanup.go, the per-change
//! variant): UDP has no connection end, so an entry keeps sending a flow to an endpoint that
//! is gone, or keeps a flow "not NATed" that started while the Service had no endpoints.
//!
//! * An endpoint that a UDP service port no longer uses: delete the entries DNATed to it for
//!   each of the port's VIPs (ClusterIP, externalIPs, LB IPs) and for its NodePort.
//! * A UDP service port that went from no usable endpoints to some: delete the entries to
//!   each VIP:port and to the NodePort, which were created while packets were refused.
use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::{IpFamily, Protocol, ServicePortState, Snapshot};

/// One `conntrack -D` filter (always `-p udp`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConntrackDelete {
    pub family: IpFamily,
    /// Original destination address; None for NodePorts (any local address).
    pub orig_dst: Option<IpAddr>,
    /// Original destination port.
    pub port: u16,
    /// Only entries DNATed to this endpoint: the reply comes from it. (`--reply-src`, not
    /// `--dst-nat`: the latter also requires the IPS_DST_NAT status bit, which entries
    /// created by other means than the nat table, e.g. restored by conntrackd, lack.)
    pub reply_src: Option<IpAddr>,
}

impl ConntrackDelete {
    /// Arguments for the `conntrack` tool.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-D".into()];
        if self.family == IpFamily::V6 {
            a.extend(["-f".into(), "ipv6".into()]);
        }
        a.extend(["-p".into(), "udp".into()]);
        if let Some(ip) = self.orig_dst {
            a.extend(["--orig-dst".into(), ip.to_string()]);
        }
        a.extend(["--dport".into(), self.port.to_string()]);
        if let Some(ip) = self.reply_src {
            a.extend(["--reply-src".into(), ip.to_string()]);
        }
        a
    }
}

fn used_endpoints(st: &ServicePortState) -> BTreeSet<IpAddr> {
    st.cluster_endpoints
        .iter()
        .chain(st.local_endpoints.iter())
        .map(|e| e.ip)
        .collect()
}

/// (address, port) pairs of every VIP of a port.
fn vips(st: &ServicePortState) -> Vec<(Option<IpAddr>, u16)> {
    let sp = &st.port;
    let mut v: Vec<(Option<IpAddr>, u16)> = std::iter::once(sp.cluster_ip)
        .chain(sp.external_ips.iter().copied())
        .chain(sp.load_balancer_ips.iter().copied())
        .map(|ip| (Some(ip), sp.port))
        .collect();
    if let Some(np) = sp.node_port {
        v.push((None, np));
    }
    v
}

/// Deletions needed going from `prev` to `next` (one family).
pub fn stale_udp(prev: &Snapshot, next: &Snapshot) -> BTreeSet<ConntrackDelete> {
    let family = next.network.family;
    let mut out = BTreeSet::new();
    for (name, old) in &prev.services {
        if name.protocol != Protocol::Udp {
            continue;
        }
        let now = next
            .services
            .get(name)
            .map(used_endpoints)
            .unwrap_or_default();
        for gone in used_endpoints(old).difference(&now) {
            for (orig_dst, port) in vips(old) {
                out.insert(ConntrackDelete {
                    family,
                    orig_dst,
                    port,
                    reply_src: Some(*gone),
                });
            }
        }
    }
    for (name, new) in &next.services {
        if name.protocol != Protocol::Udp || used_endpoints(new).is_empty() {
            continue;
        }
        let had = prev
            .services
            .get(name)
            .is_some_and(|old| !used_endpoints(old).is_empty());
        if !had {
            for (orig_dst, port) in vips(new) {
                out.insert(ConntrackDelete {
                    family,
                    orig_dst,
                    port,
                    reply_src: None,
                });
            }
        }
    }
    out
}

/// The count in conntrack's summary line ("N flow entries have been deleted.").
pub fn parse_deleted(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let (_, rest) = l.split_once("): ").unwrap_or(("", l));
        let n = rest.strip_suffix(" flow entries have been deleted.")?;
        n.trim().parse().ok()
    })
}
