//! Per-family node facts: primary IP, NodePort addresses, local-traffic detector, service
//! CIDRs. Mirrors kube-proxy's node IP detection (GetNodeHostIPs), NodePortAddresses
//! (pkg/proxy/util/nodeport_addresses.go) and the nftables proxier's use of them.
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use super::validate::{
    LABEL_TOPOLOGY_ZONE, invalid, object_ref, parse_cidr, parse_ip, require_identity,
};
use super::{
    DetectLocal, IpFamily, Kind, LocalDetector, ModelError, NodeConfig, NodeNetwork, NodePortIps,
};

/// What shunt keeps of its own Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// status.addresses of type InternalIP, in order.
    pub internal_ips: Vec<IpAddr>,
    /// status.addresses of type ExternalIP, in order.
    pub external_ips: Vec<IpAddr>,
    /// Label topology.kubernetes.io/zone.
    pub zone: Option<String>,
}

impl NodeInfo {
    /// First InternalIP of the family, else first ExternalIP (GetNodeHostIPs orders
    /// internal addresses before external ones and takes the first of each family).
    pub fn primary_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.internal_ips
            .iter()
            .chain(&self.external_ips)
            .find(|ip| IpFamily::of(ip) == family)
            .copied()
    }
}

/// Read a Node object. Addresses of other types (Hostname, InternalDNS, ...) are not IPs and
/// are not used.
pub fn parse_node(node: &Node) -> Result<NodeInfo, ModelError> {
    let obj = object_ref(Kind::Node, &node.metadata);
    require_identity(&obj, false)?;
    let mut info = NodeInfo {
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
            .cloned(),
        ..NodeInfo::default()
    };
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        let list = match a.type_.as_str() {
            "InternalIP" => &mut info.internal_ips,
            "ExternalIP" => &mut info.external_ips,
            _ => continue,
        };
        list.push(parse_ip(
            &obj,
            &format!("status.addresses[{i}].address"),
            &a.address,
        )?);
    }
    Ok(info)
}

/// Read a ServiceCIDR's spec.cidrs.
pub fn parse_service_cidr(sc: &ServiceCIDR) -> Result<Vec<IpNet>, ModelError> {
    let obj = object_ref(Kind::ServiceCidr, &sc.metadata);
    require_identity(&obj, false)?;
    let cidrs = sc.spec.as_ref().and_then(|s| s.cidrs.as_ref());
    let mut out = Vec::new();
    for (i, text) in cidrs.into_iter().flatten().enumerate() {
        out.push(parse_cidr(&obj, &format!("spec.cidrs[{i}]"), text)?);
    }
    if out.is_empty() {
        return Err(invalid(&obj, "spec.cidrs", "empty"));
    }
    Ok(out)
}

fn is_zero_cidr(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// Which addresses accept NodePort traffic for one family.
///
/// * `--nodeport-addresses` empty: kube-proxy's nftables default `primary`, the node's primary
///   IP of this family. Without a known primary IP nothing matches (upstream would fall back
///   to loopback, on which nftables NodePorts are not supported).
/// * No CIDR of this family, or a zero CIDR (`0.0.0.0/0`, `::/0`): every local address
///   (NewNodePortAddresses adds the zero CIDR for a family left without CIDRs).
/// * Otherwise the local addresses inside one of the CIDRs, without loopback addresses
///   (the nftables proxier does not support localhost NodePorts).
pub fn node_port_ips(
    config: &NodeConfig,
    family: IpFamily,
    primary_ip: Option<IpAddr>,
    local_addresses: &[IpAddr],
) -> NodePortIps {
    if config.node_port_addresses.is_empty() {
        return NodePortIps::Addresses(primary_ip.into_iter().collect());
    }
    let cidrs: Vec<&IpNet> = config
        .node_port_addresses
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .collect();
    if cidrs.is_empty() || cidrs.iter().any(|n| is_zero_cidr(n)) {
        return NodePortIps::AllLocal;
    }
    let mut ips: Vec<IpAddr> = local_addresses
        .iter()
        .filter(|ip| IpFamily::of(ip) == family && !ip.is_loopback())
        .filter(|ip| cidrs.iter().any(|n| n.contains(*ip)))
        .copied()
        .collect();
    ips.sort();
    ips.dedup();
    NodePortIps::Addresses(ips)
}

/// The local-traffic detector for one family: the cluster CIDRs of this family, or none
/// (kube-proxy uses its no-op detector for a family without a cluster CIDR).
pub fn local_detector(config: &NodeConfig, family: IpFamily) -> LocalDetector {
    match &config.detect_local {
        DetectLocal::None => LocalDetector::None,
        DetectLocal::ClusterCidr(cidrs) => {
            let mine: Vec<IpNet> = cidrs
                .iter()
                .filter(|n| IpFamily::of_net(n) == family)
                .map(|n| n.trunc())
                .collect();
            if mine.is_empty() {
                LocalDetector::None
            } else {
                LocalDetector::ClusterCidr(mine)
            }
        }
    }
}

/// Everything per-node for one family.
pub fn node_network<'a>(
    config: &NodeConfig,
    family: IpFamily,
    node: Option<&NodeInfo>,
    service_cidrs: impl IntoIterator<Item = &'a IpNet>,
    local_addresses: &[IpAddr],
) -> NodeNetwork {
    let primary_ip = node.and_then(|n| n.primary_ip(family));
    let mut cidrs: Vec<IpNet> = service_cidrs
        .into_iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .copied()
        .collect();
    cidrs.sort();
    cidrs.dedup();
    NodeNetwork {
        family,
        node_name: config.node_name.clone(),
        primary_ip,
        node_port_ips: node_port_ips(config, family, primary_ip, local_addresses),
        local_detector: local_detector(config, family),
        masquerade_all: config.masquerade_all,
        service_cidrs: cidrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn config(npa: &[&str], detect: DetectLocal) -> NodeConfig {
        NodeConfig {
            node_name: "me".into(),
            families: vec![IpFamily::V4, IpFamily::V6],
            detect_local: detect,
            masquerade_all: false,
            node_port_addresses: npa.iter().map(|s| net(s)).collect(),
        }
    }

    #[test]
    fn parse_node_table() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "me", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "me.example"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "192.168.0.2"},
                {"type": "InternalIP", "address": "2001:db8::2"},
                {"type": "InternalIP", "address": "192.168.1.2"},
                {"type": "ExternalIP", "address": "2001:db8:ff::9"},
            ]}
        }))
        .unwrap();
        let info = parse_node(&node).unwrap();
        assert_eq!(info.zone.as_deref(), Some("zone-a"));
        let cases = [
            (IpFamily::V4, Some("192.168.0.2")),
            (IpFamily::V6, Some("2001:db8::2")),
        ];
        for (f, want) in cases {
            assert_eq!(info.primary_ip(f), want.map(ip), "{f:?}");
        }
        // ExternalIP is used only when the family has no InternalIP.
        let only_external = NodeInfo {
            internal_ips: vec![ip("192.168.0.2")],
            external_ips: vec![ip("203.0.113.5"), ip("2001:db8:ff::9")],
            zone: None,
        };
        assert_eq!(
            only_external.primary_ip(IpFamily::V6),
            Some(ip("2001:db8:ff::9"))
        );
        assert_eq!(NodeInfo::default().primary_ip(IpFamily::V4), None);

        let bad: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"metadata": {"name": "me"}, "status": {"addresses": [
                    {"type": "InternalIP", "address": "192.168.0.2"},
                    {"type": "InternalIP", "address": "bogus"}]}}),
                "status.addresses[1].address",
            ),
            (json!({"metadata": {}}), "metadata.name"),
        ];
        for (j, want) in bad {
            let n: Node = serde_json::from_value(j.clone()).unwrap();
            match parse_node(&n) {
                Err(ModelError::Invalid { field, .. }) => assert_eq!(field, want, "{j}"),
                other => panic!("{j}: {other:?}"),
            }
        }
    }

    #[test]
    fn parse_service_cidr_table() {
        let cases: Vec<(serde_json::Value, Result<Vec<&str>, &str>)> = vec![
            (
                json!({"metadata": {"name": "kubernetes"},
                    "spec": {"cidrs": ["10.96.0.0/16", "fd00:10:96::/112"]}}),
                Ok(vec!["10.96.0.0/16", "fd00:10:96::/112"]),
            ),
            (
                json!({"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/99"]}}),
                Err("spec.cidrs[0]"),
            ),
            (
                json!({"metadata": {"name": "kubernetes"}, "spec": {}}),
                Err("spec.cidrs"),
            ),
            (
                json!({"metadata": {}, "spec": {"cidrs": ["10.0.0.0/8"]}}),
                Err("metadata.name"),
            ),
        ];
        for (j, want) in cases {
            let sc: ServiceCIDR = serde_json::from_value(j.clone()).unwrap();
            let got = parse_service_cidr(&sc)
                .map(|v| v.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .map_err(|e| match e {
                    ModelError::Invalid { field, .. } => field,
                });
            let want = want
                .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(|s| s.to_string());
            assert_eq!(got, want, "{j}");
        }
    }

    #[test]
    fn node_port_ips_table() {
        let local = [
            ip("127.0.0.1"),
            ip("192.168.0.2"),
            ip("192.168.1.2"),
            ip("192.168.99.11"),
            ip("::1"),
            ip("2001:db8::1"),
            ip("2001:db8:1::2"),
        ];
        let addrs = |v: &[&str]| NodePortIps::Addresses(v.iter().map(|s| ip(s)).collect());
        // (nodeport-addresses, family, primary ip, want)
        let cases: Vec<(Vec<&str>, IpFamily, Option<&str>, NodePortIps)> = vec![
            (
                vec![],
                IpFamily::V4,
                Some("192.168.0.2"),
                addrs(&["192.168.0.2"]),
            ),
            (
                vec![],
                IpFamily::V6,
                Some("2001:db8::1"),
                addrs(&["2001:db8::1"]),
            ),
            (vec![], IpFamily::V4, None, addrs(&[])),
            (
                vec!["0.0.0.0/0"],
                IpFamily::V4,
                Some("192.168.0.2"),
                NodePortIps::AllLocal,
            ),
            (vec!["::/0"], IpFamily::V6, None, NodePortIps::AllLocal),
            (
                vec!["192.168.0.0/24", "0.0.0.0/0"],
                IpFamily::V4,
                None,
                NodePortIps::AllLocal,
            ),
            // Only IPv4 CIDRs given: IPv6 gets the zero CIDR.
            (
                vec!["192.168.0.0/24"],
                IpFamily::V6,
                None,
                NodePortIps::AllLocal,
            ),
            (
                vec!["192.168.0.0/24"],
                IpFamily::V4,
                Some("192.168.0.2"),
                addrs(&["192.168.0.2"]),
            ),
            (
                vec!["192.168.0.0/16", "::/0"],
                IpFamily::V4,
                None,
                addrs(&["192.168.0.2", "192.168.1.2", "192.168.99.11"]),
            ),
            (
                vec!["192.168.1.0/24", "192.168.99.0/24", "2001:db8:1::/64"],
                IpFamily::V4,
                None,
                addrs(&["192.168.1.2", "192.168.99.11"]),
            ),
            (
                vec!["192.168.1.0/24", "2001:db8:1::/64"],
                IpFamily::V6,
                None,
                addrs(&["2001:db8:1::2"]),
            ),
            // Loopback is never a NodePort address in nftables mode.
            (vec!["127.0.0.0/8"], IpFamily::V4, None, addrs(&[])),
            (vec!["::1/128"], IpFamily::V6, None, addrs(&[])),
            // A CIDR matching no local address.
            (vec!["10.0.0.0/8"], IpFamily::V4, None, addrs(&[])),
        ];
        for (npa, family, primary, want) in cases {
            let cfg = config(&npa, DetectLocal::None);
            let got = node_port_ips(&cfg, family, primary.map(ip), &local);
            assert_eq!(got, want, "{npa:?} {family:?}");
        }
    }

    #[test]
    fn local_detector_table() {
        let cases: Vec<(DetectLocal, IpFamily, LocalDetector)> = vec![
            (DetectLocal::None, IpFamily::V4, LocalDetector::None),
            (
                DetectLocal::ClusterCidr(vec![net("10.0.0.0/8"), net("fd00::/48")]),
                IpFamily::V4,
                LocalDetector::ClusterCidr(vec![net("10.0.0.0/8")]),
            ),
            (
                DetectLocal::ClusterCidr(vec![net("10.0.0.0/8"), net("fd00::/48")]),
                IpFamily::V6,
                LocalDetector::ClusterCidr(vec![net("fd00::/48")]),
            ),
            (
                DetectLocal::ClusterCidr(vec![net("10.0.0.0/8")]),
                IpFamily::V6,
                LocalDetector::None,
            ),
        ];
        for (d, f, want) in cases {
            let cfg = config(&[], d.clone());
            assert_eq!(local_detector(&cfg, f), want, "{d:?} {f:?}");
        }
    }

    #[test]
    fn node_network_table() {
        let node = NodeInfo {
            internal_ips: vec![ip("192.168.0.2"), ip("2001:db8::1")],
            external_ips: vec![],
            zone: None,
        };
        let scidrs = [
            net("10.96.0.0/16"),
            net("fd00:10:96::/112"),
            net("10.97.0.0/16"),
        ];
        let mut cfg = config(
            &[],
            DetectLocal::ClusterCidr(vec![net("10.0.0.0/8"), net("fd00::/48")]),
        );
        cfg.masquerade_all = true;
        let cases = [
            (
                IpFamily::V4,
                Some(&node),
                NodeNetwork {
                    family: IpFamily::V4,
                    node_name: "me".into(),
                    primary_ip: Some(ip("192.168.0.2")),
                    node_port_ips: NodePortIps::Addresses(vec![ip("192.168.0.2")]),
                    local_detector: LocalDetector::ClusterCidr(vec![net("10.0.0.0/8")]),
                    masquerade_all: true,
                    service_cidrs: vec![net("10.96.0.0/16"), net("10.97.0.0/16")],
                },
            ),
            (
                IpFamily::V6,
                Some(&node),
                NodeNetwork {
                    family: IpFamily::V6,
                    node_name: "me".into(),
                    primary_ip: Some(ip("2001:db8::1")),
                    node_port_ips: NodePortIps::Addresses(vec![ip("2001:db8::1")]),
                    local_detector: LocalDetector::ClusterCidr(vec![net("fd00::/48")]),
                    masquerade_all: true,
                    service_cidrs: vec![net("fd00:10:96::/112")],
                },
            ),
            (
                IpFamily::V4,
                None,
                NodeNetwork {
                    family: IpFamily::V4,
                    node_name: "me".into(),
                    primary_ip: None,
                    node_port_ips: NodePortIps::Addresses(vec![]),
                    local_detector: LocalDetector::ClusterCidr(vec![net("10.0.0.0/8")]),
                    masquerade_all: true,
                    service_cidrs: vec![net("10.96.0.0/16"), net("10.97.0.0/16")],
                },
            ),
        ];
        for (f, n, want) in cases {
            assert_eq!(node_network(&cfg, f, n, &scidrs, &[]), want, "{f:?}");
        }
    }
}
