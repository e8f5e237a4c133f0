//! Test fixtures: hand-built snapshots (the model is written in parallel, so tests do not
//! go through it).
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::*;

pub const NODE: &str = "test-node";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad IP {s}: {e}"))
}
pub fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("bad CIDR {s}: {e}"))
}

/// Every address of the scenarios' node (FORMAT.md section 3) plus loopback.
pub fn node_ips() -> Vec<IpAddr> {
    [
        "192.168.0.2",
        "192.168.1.2",
        "192.168.99.11",
        "2001:db8::1",
        "2001:db8:1::2",
        "127.0.0.1",
        "::1",
    ]
    .into_iter()
    .map(ip)
    .collect()
}

/// Node settings of one family: NodePorts on `nodeport_ips`, pods in `cluster_cidrs`
/// (empty: detect-local-mode None).
pub fn network(
    family: IpFamily,
    nodeport_ips: &[&str],
    cluster_cidrs: &[&str],
    service_cidrs: &[&str],
) -> NodeNetwork {
    NodeNetwork {
        family,
        node_name: NODE.to_string(),
        primary_ip: Some(ip(if family == IpFamily::V4 {
            "192.168.0.2"
        } else {
            "2001:db8::1"
        })),
        node_port_ips: NodePortIps::Addresses(nodeport_ips.iter().map(|s| ip(s)).collect()),
        local_detector: if cluster_cidrs.is_empty() {
            LocalDetector::None
        } else {
            LocalDetector::ClusterCidr(cluster_cidrs.iter().map(|s| net(s)).collect())
        },
        masquerade_all: false,
        service_cidrs: service_cidrs.iter().map(|s| net(s)).collect(),
    }
}

pub fn v4_network() -> NodeNetwork {
    network(
        IpFamily::V4,
        &["192.168.0.2"],
        &["10.0.0.0/8"],
        &["172.30.0.0/16"],
    )
}

pub fn port(
    ns: &str,
    name: &str,
    port_name: &str,
    protocol: Protocol,
    cluster_ip: &str,
    port: u16,
) -> ServicePort {
    let cip = ip(cluster_ip);
    ServicePort {
        name: ServicePortName {
            service: ServiceKey {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            port: port_name.to_string(),
            protocol,
        },
        family: IpFamily::of(&cip),
        cluster_ip: cip,
        port,
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        affinity_timeout_seconds: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        traffic_distribution: None,
    }
}

/// A ready endpoint; local when `node` is this node.
pub fn ep(ip_: &str, port: u16, node: Option<&str>) -> Endpoint {
    Endpoint {
        ip: ip(ip_),
        port,
        ready: true,
        serving: true,
        terminating: false,
        is_local: node == Some(NODE),
        node_name: node.map(str::to_string),
        zone: None,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    }
}

/// kube-proxy's CategorizeEndpoints without topology: ready endpoints, else the serving
/// terminating ones; only for the policies the port uses.
pub fn state(port: ServicePort, endpoints: Vec<Endpoint>) -> ServicePortState {
    let pick = |eps: Vec<&Endpoint>| -> Vec<Endpoint> {
        let ready: Vec<Endpoint> = eps
            .iter()
            .filter(|e| e.ready)
            .map(|e| (*e).clone())
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        eps.iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| (*e).clone())
            .collect()
    };
    let uses_cluster = !port.internal_policy_local || port.externally_accessible();
    let uses_local =
        port.internal_policy_local || (port.external_policy_local && port.externally_accessible());
    let all = pick(endpoints.iter().collect());
    let cluster = if uses_cluster {
        all.clone()
    } else {
        Vec::new()
    };
    let local = if uses_local {
        pick(endpoints.iter().filter(|e| e.is_local).collect())
    } else {
        Vec::new()
    };
    ServicePortState {
        has_any_endpoints: !all.is_empty(),
        port,
        endpoints,
        cluster_endpoints: cluster,
        local_endpoints: local,
    }
}

pub fn snapshot(network: NodeNetwork, states: Vec<ServicePortState>) -> Snapshot {
    let services: BTreeMap<ServicePortName, ServicePortState> = states
        .into_iter()
        .map(|s| (s.port.name.clone(), s))
        .collect();
    Snapshot { network, services }
}
