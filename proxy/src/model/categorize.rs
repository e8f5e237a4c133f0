//! kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go): which endpoints Cluster and
//! Local traffic policy may use on this node, with topology hints and the fallback to
//! serving-terminating endpoints.
//!
//! Follows the version where trafficDistribution works only through the hints the
//! EndpointSlice controller writes (the Service's field is not read here): node hints
//! (PreferSameNode, feature PreferSameTrafficDistribution, on by default since 1.34) are
//! tried first, then zone hints (PreferSameZone / PreferClose / topology-mode Auto).
use super::{Endpoint, ServicePort, ServicePortState};

impl ServicePort {
    /// True if this port ever sends traffic by the Cluster policy: internal traffic is
    /// Cluster, or it accepts external traffic at all (even with eTP Local, Cluster
    /// endpoints serve the short-circuit of pod/node-originated traffic).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }
    /// True if this port ever sends traffic by the Local policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }
}

/// Which hints the Cluster endpoints are filtered by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    /// No filtering.
    None,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

/// The result of categorizing one service port's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Empty when the port never uses Cluster policy.
    pub cluster: Vec<Endpoint>,
    /// Empty when the port never uses Local policy.
    pub local: Vec<Endpoint>,
    /// Some usable (ready, or serving and terminating) endpoint exists anywhere.
    pub has_any_endpoints: bool,
}

/// Decide the topology mode from the hints of the ready endpoints: node hints if every
/// ready endpoint has one and one names this node; otherwise zone hints if every ready
/// endpoint has one and one names this node's zone; otherwise none. A partially hinted set
/// is ignored entirely, so that an endpoint without hints is never starved of traffic.
pub fn topology_mode(endpoints: &[Endpoint], node_name: &str, zone: Option<&str>) -> TopologyMode {
    let zone = zone.unwrap_or("");
    let mut any_ready = false;
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == node_name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if ep.zone_hints.iter().any(|z| z == zone) {
            for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && for_node {
        TopologyMode::SameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::SameZone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node_name: &str, zone: &str) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => ep.node_hints.iter().any(|n| n == node_name),
        TopologyMode::SameZone => ep.zone_hints.iter().any(|z| z == zone),
    }
}

/// CategorizeEndpoints. `zone` is this node's topology.kubernetes.io/zone label.
pub fn categorize(
    endpoints: &[Endpoint],
    port: &ServicePort,
    node_name: &str,
    zone: Option<&str>,
) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    if port.uses_cluster_endpoints() {
        let mode = topology_mode(endpoints, node_name, zone);
        let z = zone.unwrap_or("");
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node_name, z))
            .cloned()
            .collect();
        // No ready endpoint for us: the topology mode was already dropped if nothing ready
        // matched it, so there is no ready endpoint anywhere. Fall back to endpoints that
        // are terminating but still serving, so that connections drain gracefully.
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
        }
        out.has_any_endpoints = !out.cluster.is_empty();
    }
    if !port.uses_local_endpoints() {
        return out;
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for e in endpoints {
        if e.ready {
            out.has_any_endpoints = true;
            local_ready |= e.is_local;
        } else if e.serving && e.terminating {
            out.has_any_endpoints = true;
            local_serving_terminating |= e.is_local;
        }
    }
    if local_ready {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect();
    } else if local_serving_terminating {
        out.local = endpoints
            .iter()
            .filter(|e| e.is_local && e.serving && e.terminating)
            .cloned()
            .collect();
    }
    out
}

/// A service port with its endpoints, categorized.
pub fn port_state(
    port: ServicePort,
    endpoints: Vec<Endpoint>,
    node_name: &str,
    zone: Option<&str>,
) -> ServicePortState {
    let c = categorize(&endpoints, &port, node_name, zone);
    ServicePortState {
        port,
        endpoints,
        cluster_endpoints: c.cluster,
        local_endpoints: c.local,
        has_any_endpoints: c.has_any_endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{IpFamily, Protocol, ServiceKey, ServicePortName};
    use std::net::IpAddr;

    /// Compact endpoint spec for tables: "10.0.0.1" + flags.
    #[derive(Clone, Copy)]
    struct E {
        ip: &'static str,
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
        zones: &'static [&'static str],
        nodes: &'static [&'static str],
    }

    const fn ep(ip: &'static str) -> E {
        E {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            zones: &[],
            nodes: &[],
        }
    }
    impl E {
        const fn local(mut self) -> E {
            self.local = true;
            self
        }
        /// Terminating and still serving.
        const fn term(mut self) -> E {
            self.ready = false;
            self.terminating = true;
            self
        }
        /// Terminating, no longer serving.
        const fn gone(mut self) -> E {
            self.ready = false;
            self.serving = false;
            self.terminating = true;
            self
        }
        /// Not ready, not terminating (e.g. failing readiness probe).
        const fn unready(mut self) -> E {
            self.ready = false;
            self.serving = false;
            self
        }
        const fn zones(mut self, z: &'static [&'static str]) -> E {
            self.zones = z;
            self
        }
        const fn nodes(mut self, n: &'static [&'static str]) -> E {
            self.nodes = n;
            self
        }
        fn build(self) -> Endpoint {
            Endpoint {
                ip: self.ip.parse().unwrap(),
                port: 80,
                ready: self.ready,
                serving: self.serving,
                terminating: self.terminating,
                is_local: self.local,
                node_name: Some(if self.local { "me" } else { "other" }.into()),
                zone: None,
                zone_hints: self.zones.iter().map(|s| s.to_string()).collect(),
                node_hints: self.nodes.iter().map(|s| s.to_string()).collect(),
            }
        }
    }

    #[derive(Clone, Copy)]
    struct Policy {
        itp_local: bool,
        etp_local: bool,
        external: bool,
    }
    const CLUSTER: Policy = Policy {
        itp_local: false,
        etp_local: false,
        external: false,
    };
    const ITP_LOCAL: Policy = Policy {
        itp_local: true,
        etp_local: false,
        external: false,
    };
    const ETP_LOCAL: Policy = Policy {
        itp_local: false,
        etp_local: true,
        external: true,
    };
    const BOTH_LOCAL: Policy = Policy {
        itp_local: true,
        etp_local: true,
        external: true,
    };
    const ITP_LOCAL_EXTERNAL_CLUSTER: Policy = Policy {
        itp_local: true,
        etp_local: false,
        external: true,
    };

    fn port(p: Policy) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                service: ServiceKey {
                    namespace: "ns".into(),
                    name: "svc".into(),
                },
                port: "".into(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::V4,
            cluster_ip: "172.30.0.1".parse().unwrap(),
            port: 80,
            node_port: p.external.then_some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            affinity_timeout_seconds: None,
            external_policy_local: p.etp_local,
            internal_policy_local: p.itp_local,
            health_check_node_port: None,
            traffic_distribution: None,
        }
    }

    fn ips(eps: &[Endpoint]) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = eps.iter().map(|e| e.ip).collect();
        v.sort();
        v
    }
    fn want(v: &[&str]) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = v.iter().map(|s| s.parse().unwrap()).collect();
        v.sort();
        v
    }

    struct Case {
        name: &'static str,
        policy: Policy,
        zone: Option<&'static str>,
        endpoints: Vec<E>,
        cluster: &'static [&'static str],
        local: &'static [&'static str],
        has_any: bool,
    }

    #[test]
    fn categorize_table() {
        let cases = vec![
            Case {
                name: "no endpoints",
                policy: CLUSTER,
                zone: None,
                endpoints: vec![],
                cluster: &[],
                local: &[],
                has_any: false,
            },
            Case {
                name: "cluster policy: all ready, no local set",
                policy: CLUSTER,
                zone: None,
                endpoints: vec![
                    ep("10.0.0.1"),
                    ep("10.0.0.2").local(),
                    ep("10.0.0.3").unready(),
                ],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "cluster policy: ready preferred over serving-terminating",
                policy: CLUSTER,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").term()],
                cluster: &["10.0.0.1"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "cluster policy: fall back to serving-terminating",
                policy: CLUSTER,
                zone: None,
                endpoints: vec![
                    ep("10.0.0.1").term(),
                    ep("10.0.0.2").gone(),
                    ep("10.0.0.3").unready(),
                ],
                cluster: &["10.0.0.1"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "cluster policy: only unusable endpoints",
                policy: CLUSTER,
                zone: None,
                endpoints: vec![ep("10.0.0.2").gone(), ep("10.0.0.3").unready()],
                cluster: &[],
                local: &[],
                has_any: false,
            },
            Case {
                name: "iTP Local: only local set, remote endpoints still count for has_any",
                policy: ITP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local()],
                cluster: &[],
                local: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "iTP Local: no local endpoints but remote ones",
                policy: ITP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1")],
                cluster: &[],
                local: &[],
                has_any: true,
            },
            Case {
                name: "iTP Local: local falls back to serving-terminating",
                policy: ITP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local().term()],
                cluster: &[],
                local: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "iTP Local: remote serving-terminating counts for has_any",
                policy: ITP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1").term()],
                cluster: &[],
                local: &[],
                has_any: true,
            },
            Case {
                name: "iTP Local: nothing usable",
                policy: ITP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1").local().gone(), ep("10.0.0.2").unready()],
                cluster: &[],
                local: &[],
                has_any: false,
            },
            Case {
                name: "eTP Local: both sets",
                policy: ETP_LOCAL,
                zone: None,
                endpoints: vec![
                    ep("10.0.0.1"),
                    ep("10.0.0.2").local(),
                    ep("10.0.0.3").local(),
                ],
                cluster: &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                local: &["10.0.0.2", "10.0.0.3"],
                has_any: true,
            },
            Case {
                name: "eTP Local: fallbacks are independent (cluster ready, local terminating)",
                policy: ETP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local().term()],
                cluster: &["10.0.0.1"],
                local: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "eTP Local: local ready beats local terminating",
                policy: ETP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1").local(), ep("10.0.0.2").local().term()],
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                has_any: true,
            },
            Case {
                name: "eTP Local: all terminating",
                policy: ETP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1").term(), ep("10.0.0.2").local().term()],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "eTP Local: local endpoint not serving is never used",
                policy: ETP_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local().gone()],
                cluster: &["10.0.0.1"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "eTP Local without external access behaves as Cluster",
                policy: Policy {
                    itp_local: false,
                    etp_local: true,
                    external: false,
                },
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local()],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "iTP Local and external Cluster: both sets",
                policy: ITP_LOCAL_EXTERNAL_CLUSTER,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local()],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "both Local: both sets (external access needs cluster for short-circuit)",
                policy: BOTH_LOCAL,
                zone: None,
                endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2").local()],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.2"],
                has_any: true,
            },
            // Topology.
            Case {
                name: "zone hints all present, one for our zone",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]),
                    ep("10.0.0.2").zones(&["zone-b"]),
                    ep("10.0.0.3").zones(&["zone-a", "zone-c"]),
                ],
                cluster: &["10.0.0.1", "10.0.0.3"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "zone hints: one ready endpoint without hints disables topology",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![ep("10.0.0.1").zones(&["zone-a"]), ep("10.0.0.2")],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "zone hints: unready endpoint without hints does not matter",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]),
                    ep("10.0.0.2").zones(&["zone-b"]),
                    ep("10.0.0.3").unready(),
                ],
                cluster: &["10.0.0.1"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "zone hints: none for our zone disables topology",
                policy: CLUSTER,
                zone: Some("zone-c"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]),
                    ep("10.0.0.2").zones(&["zone-b"]),
                ],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "zone hints: node without zone label disables topology",
                policy: CLUSTER,
                zone: None,
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]),
                    ep("10.0.0.2").zones(&["zone-b"]),
                ],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "node hints preferred over zone hints",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]).nodes(&["me"]),
                    ep("10.0.0.2").zones(&["zone-a"]).nodes(&["other"]),
                    ep("10.0.0.3").zones(&["zone-b"]).nodes(&["third"]),
                ],
                cluster: &["10.0.0.1"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "node hints not for us: fall back to zone hints",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]).nodes(&["n1"]),
                    ep("10.0.0.2").zones(&["zone-a"]).nodes(&["n2"]),
                    ep("10.0.0.3").zones(&["zone-b"]).nodes(&["n3"]),
                ],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "partial node hints: fall back to zone hints",
                policy: CLUSTER,
                zone: Some("zone-b"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]).nodes(&["me"]),
                    ep("10.0.0.2").zones(&["zone-b"]),
                ],
                cluster: &["10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "topology: hinted endpoint for us is not ready -> no ready endpoint in zone, fall back",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]).term(),
                    ep("10.0.0.2").zones(&["zone-b"]),
                ],
                // Only ready endpoints decide the mode: none ready for zone-a, so no topology.
                cluster: &["10.0.0.2"],
                local: &[],
                has_any: true,
            },
            Case {
                name: "topology does not filter the local set",
                policy: ETP_LOCAL,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]),
                    ep("10.0.0.2").zones(&["zone-b"]).local(),
                ],
                cluster: &["10.0.0.1"],
                local: &["10.0.0.2"],
                has_any: true,
            },
            Case {
                name: "topology: no ready endpoints at all, serving-terminating ignore hints",
                policy: CLUSTER,
                zone: Some("zone-a"),
                endpoints: vec![
                    ep("10.0.0.1").zones(&["zone-a"]).term(),
                    ep("10.0.0.2").zones(&["zone-b"]).term(),
                ],
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &[],
                has_any: true,
            },
        ];
        for c in cases {
            let eps: Vec<Endpoint> = c.endpoints.iter().map(|e| e.build()).collect();
            let got = categorize(&eps, &port(c.policy), "me", c.zone);
            assert_eq!(ips(&got.cluster), want(c.cluster), "{}: cluster", c.name);
            assert_eq!(ips(&got.local), want(c.local), "{}: local", c.name);
            assert_eq!(got.has_any_endpoints, c.has_any, "{}: has_any", c.name);
        }
    }

    #[test]
    fn topology_mode_table() {
        let cases: Vec<(&str, Vec<E>, Option<&str>, TopologyMode)> = vec![
            ("no endpoints", vec![], Some("z"), TopologyMode::None),
            (
                "no ready endpoints",
                vec![ep("10.0.0.1").zones(&["z"]).term()],
                Some("z"),
                TopologyMode::None,
            ),
            (
                "zone",
                vec![ep("10.0.0.1").zones(&["z"])],
                Some("z"),
                TopologyMode::SameZone,
            ),
            (
                "node",
                vec![ep("10.0.0.1").nodes(&["me"])],
                Some("z"),
                TopologyMode::SameNode,
            ),
            (
                "node hints elsewhere, no zone hints",
                vec![ep("10.0.0.1").nodes(&["n1"])],
                Some("z"),
                TopologyMode::None,
            ),
            (
                "empty zone label never matches an empty-looking hint set",
                vec![ep("10.0.0.1").zones(&["z"])],
                None,
                TopologyMode::None,
            ),
        ];
        for (name, eps, zone, want_mode) in cases {
            let eps: Vec<Endpoint> = eps.iter().map(|e| e.build()).collect();
            assert_eq!(topology_mode(&eps, "me", zone), want_mode, "{name}");
        }
    }

    #[test]
    fn uses_endpoints_table() {
        // (policy, uses cluster, uses local)
        let cases = [
            (CLUSTER, true, false),
            (ITP_LOCAL, false, true),
            (ETP_LOCAL, true, true),
            (BOTH_LOCAL, true, true),
            (ITP_LOCAL_EXTERNAL_CLUSTER, true, true),
            (
                Policy {
                    itp_local: false,
                    etp_local: true,
                    external: false,
                },
                true,
                false,
            ),
        ];
        for (i, (p, c, l)) in cases.into_iter().enumerate() {
            let sp = port(p);
            assert_eq!(
                (sp.uses_cluster_endpoints(), sp.uses_local_endpoints()),
                (c, l),
                "case {i}"
            );
        }
    }

    #[test]
    fn port_state_fills_every_field() {
        let eps: Vec<Endpoint> = vec![ep("10.0.0.1").build(), ep("10.0.0.2").local().build()];
        let s = port_state(port(ETP_LOCAL), eps.clone(), "me", None);
        assert_eq!(s.endpoints, eps);
        assert_eq!(ips(&s.cluster_endpoints), want(&["10.0.0.1", "10.0.0.2"]));
        assert_eq!(ips(&s.local_endpoints), want(&["10.0.0.2"]));
        assert!(s.has_any_endpoints);
        assert_eq!(ips(s.external_endpoints()), want(&["10.0.0.2"]));
        assert_eq!(ips(s.internal_endpoints()), want(&["10.0.0.1", "10.0.0.2"]));
    }
}
