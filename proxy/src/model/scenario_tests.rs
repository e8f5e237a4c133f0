//! The model against the conformance scenarios (../shared/scenarios, converted from
//! upstream's nftables packet-flow tests): for every packet whose fate is decided by the
//! model (which endpoint set a destination selects), the endpoint set the Tracker computes
//! must be exactly the one upstream asserts. Masquerade and verdict mechanics are the plan's
//! business and are not checked here. Skips (printing why) when the directory is absent.
use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::Value;

use super::scenario_fixture::{scenario_files, scenario_snapshot, scenarios};
use super::{LocalDetector, NodePortIps, Protocol, Snapshot};

/// What the model says a packet reaches.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A service port matched: these endpoints are candidates (empty: reject/drop).
    Endpoints(BTreeSet<String>),
    /// No service port matched.
    Nothing,
}

fn protocol(s: &str) -> Protocol {
    match s {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => panic!("unknown protocol {other}"),
    }
}

/// kube-proxy's classification: traffic from a pod (by the local detector) or from the node
/// itself is "internal-ish" and short-circuits eTP Local to the Cluster endpoints.
fn target(snap: &Snapshot, node_addrs: &[IpAddr], p: &Value) -> Target {
    let src: IpAddr = p["source_ip"].as_str().unwrap().parse().unwrap();
    let dst: IpAddr = p["dest_ip"].as_str().unwrap().parse().unwrap();
    let port = p["dest_port"].as_u64().unwrap() as u16;
    let proto = protocol(p["protocol"].as_str().unwrap());
    let from_pod = match &snap.network.local_detector {
        LocalDetector::None => false,
        LocalDetector::ClusterCidr(c) => c.iter().any(|n| n.contains(&src)),
    };
    let from_node = node_addrs.contains(&src);
    let set = |eps: &[super::Endpoint]| -> Target {
        Target::Endpoints(eps.iter().map(|e| e.addr().to_string()).collect())
    };
    for st in snap.services.values() {
        let sp = &st.port;
        if sp.name.protocol != proto {
            continue;
        }
        if sp.cluster_ip == dst && sp.port == port {
            return set(st.internal_endpoints());
        }
        let external_vip = (sp.external_ips.contains(&dst) || sp.load_balancer_ips.contains(&dst))
            && sp.port == port;
        let node_port = sp.node_port == Some(port)
            && match &snap.network.node_port_ips {
                NodePortIps::AllLocal => node_addrs.contains(&dst),
                NodePortIps::Addresses(a) => a.contains(&dst),
            };
        if external_vip || node_port {
            if sp.external_policy_local && (from_pod || from_node) {
                return set(&st.cluster_endpoints);
            }
            return set(st.external_endpoints());
        }
    }
    Target::Nothing
}

#[test]
fn scenarios_select_upstream_endpoints() {
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let mut checked = 0usize;
    for file in files {
        for sc in scenarios(&file) {
            let id = sc["id"].as_str().unwrap();
            let (snap, node_addrs) = scenario_snapshot(&sc);
            let snap = &snap;
            for p in sc["packets"].as_array().into_iter().flatten() {
                let name = format!("{id}: {}", p["name"].as_str().unwrap());
                let got = target(snap, &node_addrs, p);
                let expect = &p["expect"];
                if let Some(eps) = expect["endpoints"].as_array() {
                    let want: BTreeSet<String> = eps
                        .iter()
                        .map(|e| e.as_str().unwrap().to_string())
                        .collect();
                    assert_eq!(got, Target::Endpoints(want), "{name}");
                } else {
                    match expect["verdict"].as_str().unwrap() {
                        // Nothing to DNAT to: either a service port with no usable
                        // endpoints, or no service port at all (wrong port on a ClusterIP,
                        // unallocated address in a service CIDR).
                        "drop" | "reject" => assert!(
                            matches!(&got, Target::Nothing)
                                || matches!(&got, Target::Endpoints(s) if s.is_empty()),
                            "{name}: {got:?}"
                        ),
                        "passthrough" => assert_eq!(got, Target::Nothing, "{name}"),
                        other => panic!("{name}: verdict {other}"),
                    }
                }
                checked += 1;
            }
        }
    }
    eprintln!("checked {checked} packets");
    assert!(checked > 0, "scenario files held no packets");
}
