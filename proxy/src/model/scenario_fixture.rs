//! TEST ONLY: the conformance scenarios (../shared/scenarios, FORMAT.md) as model input, for
//! every test that checks a plan or the model against them.
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{Value, json};

use super::{DetectLocal, IpFamily, NodeConfig, Object, Snapshot, Tracker};

/// The scenario files, sorted: `$SHUNT_SCENARIOS`, else `shared/scenarios` beside the
/// repository (where CI's fresh clone has it, and where `cargo xtask conformance` looks).
/// None when there is no such directory: callers skip, saying so.
pub(crate) fn scenario_files() -> Option<Vec<PathBuf>> {
    let dir = std::env::var_os("SHUNT_SCENARIOS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // proxy/ -> the repository -> its parent, which holds shared/.
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/scenarios")
        });
    let entries = std::fs::read_dir(&dir).ok()?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenario files in {}", dir.display());
    Some(files)
}

/// The scenarios of one file.
pub(crate) fn scenarios(file: &std::path::Path) -> Vec<Value> {
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    doc["scenarios"].as_array().cloned().unwrap_or_default()
}

/// A scenario manifest as the object the sources would send.
pub(crate) fn to_object(kind: &str, v: &Value) -> Object {
    match kind {
        "Service" => Object::Service(Box::new(serde_json::from_value(v.clone()).unwrap())),
        _ => Object::EndpointSlice(Box::new(serde_json::from_value(v.clone()).unwrap())),
    }
}

/// The scenario's world through the real model (a Tracker fed as main.rs feeds it: the Node,
/// the ServiceCIDR `kubernetes`, the node's addresses, the Services and EndpointSlices), and
/// every node address.
pub(crate) fn scenario_snapshot(sc: &Value) -> (Snapshot, Vec<IpAddr>) {
    let id = sc["id"].as_str().unwrap_or("?");
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
    let mut t = Tracker::new(NodeConfig {
        node_name: sc["node"]["name"].as_str().unwrap().into(),
        families: vec![family],
        detect_local: match cl["detect_local_mode"].as_str().unwrap() {
            "ClusterCIDR" => DetectLocal::ClusterCidr(nets(&cl["cluster_cidrs"])),
            _ => DetectLocal::None,
        },
        masquerade_all: cl["masquerade_all"].as_bool().unwrap_or(false),
        node_port_addresses: nets(&cl["node_port_addresses"]),
    });
    let node_addrs: Vec<IpAddr> = ["ipv4", "ipv6"]
        .iter()
        .flat_map(|f| sc["node"][f].as_array().cloned().unwrap_or_default())
        .map(|s| s.as_str().unwrap().parse().unwrap())
        .collect();
    // The Node object: its first address of each family is the primary IP.
    let mut addresses = Vec::new();
    for f in ["ipv4", "ipv6"] {
        if let Some(a) = sc["node"][f].as_array().and_then(|a| a.first()) {
            addresses.push(json!({"type": "InternalIP", "address": a}));
        }
    }
    t.apply(Object::Node(Box::new(
        serde_json::from_value(json!({"metadata": {"name": sc["node"]["name"]},
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
    for (kind, key) in [("Service", "services"), ("EndpointSlice", "endpointslices")] {
        for s in sc[key].as_array().into_iter().flatten() {
            t.apply(to_object(kind, s))
                .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
    }
    t.take_update();
    (t.snapshots()[0].clone(), node_addrs)
}
