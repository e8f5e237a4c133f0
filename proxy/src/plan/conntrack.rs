//! PURE: which UDP conntrack entries a sync makes stale (kube-proxy's
//! pkg/proxy/conntrack/cleanup.go with the endpoints change tracker's
//! detectStaleConntrackEntries).
//!
//! UDP has no connection teardown, so an entry DNATing a client to an endpoint that is gone
//! keeps blackholing that client, and an entry created while a Service had no endpoints (no
//! DNAT) keeps bypassing the Service once it has some. TCP needs none of this: a connection to
//! a vanished endpoint is reset or times out, and a new one is a new conntrack entry.
use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::{IpFamily, Protocol, ServicePortState, Snapshot};

/// One deletion, always for UDP entries of one family.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConntrackFilter {
    /// Every entry whose original destination is this address.
    OrigDst(IpAddr),
    /// Every entry whose original destination port is this (a NodePort, on any address).
    OrigDstPort(IpFamily, u16),
    /// Entries sent to `orig_dst` and DNATed to `reply_src` (the endpoint answers).
    Nat { orig_dst: IpAddr, reply_src: IpAddr },
    /// Entries sent to NodePort `port` and DNATed to `reply_src`.
    PortNat {
        family: IpFamily,
        port: u16,
        reply_src: IpAddr,
    },
}

fn serving_count(s: Option<&ServicePortState>) -> usize {
    s.map_or(0, |s| s.endpoints.iter().filter(|e| e.serving).count())
}

/// Deletions for one family, from the snapshot programmed before (None on the first sync
/// after start, when upstream's old maps are empty too) and the one just programmed.
pub fn stale_udp(prev: Option<&Snapshot>, new: &Snapshot) -> Vec<ConntrackFilter> {
    let mut out: BTreeSet<ConntrackFilter> = BTreeSet::new();
    let family = new.network.family;

    if let Some(prev) = prev {
        for (name, old) in &prev.services {
            if name.protocol != Protocol::Udp {
                continue;
            }
            match new.services.get(name) {
                // A deleted UDP service port: its ClusterIP may be reused by another Service.
                None => {
                    out.insert(ConntrackFilter::OrigDst(old.port.cluster_ip));
                }
                Some(cur) => {
                    // Serving endpoints we may have sent traffic to that are gone or stopped
                    // serving: their flows must move to a live endpoint.
                    for ep in old.endpoints.iter().filter(|e| e.serving) {
                        let still = cur
                            .endpoints
                            .iter()
                            .any(|e| e.ip == ep.ip && e.port == ep.port && e.serving);
                        if still {
                            continue;
                        }
                        let p = &cur.port;
                        if let Some(node_port) = p.node_port {
                            out.insert(ConntrackFilter::PortNat {
                                family,
                                port: node_port,
                                reply_src: ep.ip,
                            });
                        }
                        for vip in std::iter::once(&p.cluster_ip)
                            .chain(p.external_ips.iter())
                            .chain(p.load_balancer_ips.iter())
                        {
                            out.insert(ConntrackFilter::Nat {
                                orig_dst: *vip,
                                reply_src: ep.ip,
                            });
                        }
                    }
                }
            }
        }
    }

    // Service ports going from no serving endpoint to some: flows created meanwhile were
    // rejected/dropped without DNAT and would keep missing the Service.
    for (name, cur) in &new.services {
        if name.protocol != Protocol::Udp {
            continue;
        }
        let before = serving_count(prev.and_then(|p| p.services.get(name)));
        if before == 0 && serving_count(Some(cur)) > 0 {
            let p = &cur.port;
            out.insert(ConntrackFilter::OrigDst(p.cluster_ip));
            for ip in p.external_ips.iter().chain(p.load_balancer_ips.iter()) {
                out.insert(ConntrackFilter::OrigDst(*ip));
            }
            if let Some(node_port) = p.node_port {
                out.insert(ConntrackFilter::OrigDstPort(family, node_port));
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::ConntrackFilter::*;
    use super::*;
    use crate::model::Endpoint;
    use crate::plan::nft::fixtures::*;

    fn udp_snapshot(eps: Vec<Endpoint>) -> Snapshot {
        let mut p = port("ns1", "dns", "dns", Protocol::Udp, "172.30.0.10", 53);
        p.node_port = Some(3053);
        p.external_ips = vec![ip("192.168.99.11")];
        p.load_balancer_ips = vec![ip("198.51.100.4")];
        let tcp = port("ns1", "dns", "dns-tcp", Protocol::Tcp, "172.30.0.10", 53);
        let tcp_eps = eps.clone();
        snapshot(v4_network(), vec![state(p, eps), state(tcp, tcp_eps)])
    }

    #[test]
    fn removed_or_unserving_udp_endpoint_loses_its_nat_flows() {
        let before = udp_snapshot(vec![ep("10.180.0.1", 53, None), ep("10.180.0.2", 53, None)]);
        let after = udp_snapshot(vec![ep("10.180.0.2", 53, None)]);
        let gone = ip("10.180.0.1");
        let want = vec![
            Nat {
                orig_dst: ip("172.30.0.10"),
                reply_src: gone,
            },
            Nat {
                orig_dst: ip("192.168.99.11"),
                reply_src: gone,
            },
            Nat {
                orig_dst: ip("198.51.100.4"),
                reply_src: gone,
            },
            PortNat {
                family: IpFamily::V4,
                port: 3053,
                reply_src: gone,
            },
        ];
        let mut got = stale_udp(Some(&before), &after);
        got.sort();
        let mut w = want.clone();
        w.sort();
        assert_eq!(got, w);

        // Still listed but no longer serving counts as gone.
        let mut unserving = before.clone();
        for s in unserving.services.values_mut() {
            s.endpoints[0].serving = false;
            s.endpoints[0].ready = false;
        }
        let mut got = stale_udp(Some(&before), &unserving);
        got.sort();
        assert_eq!(got, w);
        // The TCP port of the same Service never produces anything.
        assert!(got.iter().all(|f| !matches!(f, OrigDstPort(_, 53))));
    }

    #[test]
    fn udp_service_gaining_its_first_endpoint_flushes_its_addresses() {
        let before = udp_snapshot(vec![]);
        let after = udp_snapshot(vec![ep("10.180.0.1", 53, None)]);
        let want = vec![
            OrigDst(ip("172.30.0.10")),
            OrigDst(ip("192.168.99.11")),
            OrigDst(ip("198.51.100.4")),
            OrigDstPort(IpFamily::V4, 3053),
        ];
        assert_eq!(stale_udp(Some(&before), &after), want);
        // After a restart nothing is known, so every UDP service with endpoints is newly
        // active (upstream starts from empty maps too).
        assert_eq!(stale_udp(None, &after), want);
        // Nothing changed: nothing to delete.
        assert!(stale_udp(Some(&after), &after).is_empty());
        // Losing every endpoint: flows to the last one are deleted; nothing else.
        let lost = stale_udp(Some(&after), &before);
        assert!(
            lost.iter()
                .all(|f| matches!(f, Nat { .. } | PortNat { .. }))
                && lost.len() == 4
        );
    }

    #[test]
    fn deleted_udp_service_frees_its_cluster_ip() {
        let before = udp_snapshot(vec![ep("10.180.0.1", 53, None)]);
        let after = snapshot(v4_network(), vec![]);
        assert_eq!(
            stale_udp(Some(&before), &after),
            vec![OrigDst(ip("172.30.0.10"))]
        );
    }
}
