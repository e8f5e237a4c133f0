//! The model against the conformance scenarios (/work/shared/scenarios, converted from
//! upstream's nftables packet-flow tests): for every packet whose fate is decided by the
//! model (which endpoint set a destination selects), the endpoint set the Tracker computes
//! must be exactly the one upstream asserts. Masquerade and verdict mechanics are the plan's
//! business and are not checked here. Skips (printing why) when the directory is absent.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde_json::{Value, json};

use super::{
    DetectLocal, IpFamily, LocalDetector, NodeConfig, NodePortIps, Object, Protocol, Snapshot,
    Tracker,
};

const SCENARIO_DIR: &str = "/work/shared/scenarios";

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

fn to_object(kind: &str, v: &Value) -> Object {
    match kind {
        "Service" => Object::Service(Box::new(serde_json::from_value(v.clone()).unwrap())),
        "EndpointSlice" => {
            Object::EndpointSlice(Box::new(serde_json::from_value(v.clone()).unwrap()))
        }
        other => panic!("{other}"),
    }
}

#[test]
fn scenarios_select_upstream_endpoints() {
    let dir = Path::new(SCENARIO_DIR);
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!("skipping: {SCENARIO_DIR} not present");
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut checked = 0usize;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        for sc in doc["scenarios"].as_array().into_iter().flatten() {
            let id = sc["id"].as_str().unwrap();
            let cl = &sc["cluster"];
            let family = match cl["ip_family"].as_str().unwrap() {
                "IPv4" => IpFamily::V4,
                _ => IpFamily::V6,
            };
            let nets = |v: &Value| -> Vec<IpNet> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().unwrap().parse().unwrap())
                    .collect()
            };
            let config = NodeConfig {
                node_name: sc["node"]["name"].as_str().unwrap().into(),
                families: vec![family],
                detect_local: match cl["detect_local_mode"].as_str().unwrap() {
                    "ClusterCIDR" => DetectLocal::ClusterCidr(nets(&cl["cluster_cidrs"])),
                    _ => DetectLocal::None,
                },
                masquerade_all: cl["masquerade_all"].as_bool().unwrap_or(false),
                node_port_addresses: nets(&cl["node_port_addresses"]),
            };
            let node_addrs: Vec<IpAddr> = ["ipv4", "ipv6"]
                .iter()
                .flat_map(|f| sc["node"][f].as_array().cloned().unwrap_or_default())
                .map(|s| s.as_str().unwrap().parse().unwrap())
                .collect();
            let mut t = Tracker::new(config);
            // The Node object: its first address of each family is the primary IP.
            let mut addresses = Vec::new();
            for f in ["ipv4", "ipv6"] {
                if let Some(a) = sc["node"][f].as_array().and_then(|a| a.first()) {
                    addresses.push(json!({"type": "InternalIP", "address": a}));
                }
            }
            t.apply(Object::Node(Box::new(
                serde_json::from_value(json!({
                    "metadata": {"name": sc["node"]["name"]},
                    "status": {"addresses": addresses}}))
                .unwrap(),
            )))
            .unwrap();
            t.apply(Object::ServiceCidr(Box::new(
                serde_json::from_value(json!({"metadata": {"name": "kubernetes"},
                    "spec": {"cidrs": cl["service_cidrs"]}}))
                .unwrap(),
            )))
            .unwrap();
            t.set_local_addresses(node_addrs.clone());
            for s in sc["services"].as_array().into_iter().flatten() {
                t.apply(to_object("Service", s))
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
            }
            for s in sc["endpointslices"].as_array().into_iter().flatten() {
                t.apply(to_object("EndpointSlice", s))
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
            }
            t.take_update();
            let snap = &t.snapshots()[0];
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
