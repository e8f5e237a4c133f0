//! v1 Service -> one `ServicePort` per (port, IP family), as kube-proxy's
//! ServiceChangeTracker / newBaseServiceInfo build them (pkg/proxy/serviceport.go,
//! pkg/api/v1/service helpers ExternalPolicyLocal / InternalPolicyLocal / NeedsHealthCheck).
//!
//! kube-proxy trusts the API server's validation; shunt may also read manifests from a
//! directory, so every field it uses is checked and a bad one makes the whole Service invalid
//! (skipped, as if absent) with the field named.
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

use super::validate::{
    LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, Parsed, has_label, invalid, object_ref, parse_cidr,
    parse_ip, parse_port, parse_protocol, require_identity,
};
use super::{
    IpFamily, Kind, ModelError, ServiceKey, ServicePort, ServicePortName, TrafficDistribution,
};

/// Default ClientIP affinity timeout (v1.DefaultClientIPServiceAffinitySeconds, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;
/// Largest timeout the API accepts (v1.MaxClientIPServiceAffinitySeconds, 1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86400;

/// The key of a Service (namespace/name).
pub fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
    }
}

/// Read a Service into its service ports (all families; each carries its family).
///
/// `Ignored` for objects kube-proxy never programs: labelled for another proxy or headless
/// (its informers filter those labels out), type ExternalName, or without a ClusterIP
/// (`None` or empty: proxyutil.ShouldSkipService).
pub fn parse_service(svc: &Service) -> Result<Parsed<Vec<ServicePort>>, ModelError> {
    let obj = object_ref(Kind::Service, &svc.metadata);
    if has_label(&svc.metadata, LABEL_SERVICE_PROXY_NAME) {
        return Ok(Parsed::Ignored(
            "labelled service.kubernetes.io/service-proxy-name",
        ));
    }
    if has_label(&svc.metadata, LABEL_HEADLESS) {
        return Ok(Parsed::Ignored("labelled service.kubernetes.io/headless"));
    }
    require_identity(&obj, true)?;
    let Some(spec) = svc.spec.as_ref() else {
        return Err(invalid(&obj, "spec", "missing"));
    };

    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    match type_ {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        "ExternalName" => return Ok(Parsed::Ignored("type ExternalName")),
        other => {
            return Err(invalid(
                &obj,
                "spec.type",
                format!("unknown type {other:?}"),
            ));
        }
    }

    // spec.clusterIPs is authoritative; old objects may only have spec.clusterIP.
    let (cluster_ip_texts, cluster_ip_field): (Vec<&str>, &str) = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => {
            (ips.iter().map(String::as_str).collect(), "spec.clusterIPs")
        }
        _ => (
            spec.cluster_ip.as_deref().into_iter().collect(),
            "spec.clusterIP",
        ),
    };
    match cluster_ip_texts.first() {
        None | Some(&"") | Some(&"None") => return Ok(Parsed::Ignored("headless (no ClusterIP)")),
        Some(_) => {}
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for (i, text) in cluster_ip_texts.iter().enumerate() {
        let field = if cluster_ip_field == "spec.clusterIPs" {
            format!("spec.clusterIPs[{i}]")
        } else {
            cluster_ip_field.to_string()
        };
        let ip = parse_ip(&obj, &field, text)?;
        if cluster_ips
            .iter()
            .any(|c| IpFamily::of(c) == IpFamily::of(&ip))
        {
            return Err(invalid(&obj, field, "two ClusterIPs of the same family"));
        }
        cluster_ips.push(ip);
    }

    let mut external_ips = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(parse_ip(&obj, &format!("spec.externalIPs[{i}]"), text)?);
    }

    // Only VIP-style load balancers are programmed: ingress with ipMode Proxy (or anything
    // but VIP) is reached through the LB's own proxy, and hostname-only ingress has no IP
    // (proxyutil.IsVIPMode; newBaseServiceInfo).
    let mut load_balancer_ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(text) = ing.ip.as_deref().filter(|t| !t.is_empty()) else {
            continue;
        };
        let ip = parse_ip(&obj, &format!("status.loadBalancer.ingress[{i}].ip"), text)?;
        match ing.ip_mode.as_deref() {
            None | Some("VIP") => load_balancer_ips.push(ip),
            Some(_) => {}
        }
    }

    // API validation tolerates whitespace padding here, and kube-proxy trims it.
    let mut source_ranges = Vec::new();
    for (i, text) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        source_ranges.push(parse_cidr(
            &obj,
            &format!("spec.loadBalancerSourceRanges[{i}]"),
            text.trim(),
        )?);
    }

    let affinity_timeout_seconds = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                Some(t) if t > 0 && (t as u32) <= MAX_AFFINITY_TIMEOUT_SECONDS => Some(t as u32),
                Some(t) => {
                    return Err(invalid(
                        &obj,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is not in 1-{MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(invalid(
                &obj,
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?}"),
            ));
        }
    };

    let etp_local = match spec.external_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(invalid(
                &obj,
                "spec.externalTrafficPolicy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    let internal_policy_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(invalid(
                &obj,
                "spec.internalTrafficPolicy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    // apiservice.ExternalPolicyLocal: eTP only means something for Services that accept
    // external traffic (NodePort, LoadBalancer, or any with externalIPs).
    let external_policy_local =
        etp_local && (type_ == "NodePort" || type_ == "LoadBalancer" || !external_ips.is_empty());
    // apiservice.NeedsHealthCheck: LoadBalancer with eTP Local.
    let health_check_node_port = if type_ == "LoadBalancer" && external_policy_local {
        match spec.health_check_node_port {
            None | Some(0) => None,
            Some(p) => Some(parse_port(&obj, "spec.healthCheckNodePort", p)?),
        }
    } else {
        None
    };

    let traffic_distribution = spec.traffic_distribution.as_deref().map(|t| match t {
        "PreferClose" => TrafficDistribution::PreferClose,
        "PreferSameZone" => TrafficDistribution::PreferSameZone,
        "PreferSameNode" => TrafficDistribution::PreferSameNode,
        other => TrafficDistribution::Other(other.to_string()),
    });

    let key = service_key(svc);
    let mut seen = BTreeSet::new();
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = parse_port(&obj, &format!("spec.ports[{i}].port"), p.port)?;
        let protocol = parse_protocol(
            &obj,
            &format!("spec.ports[{i}].protocol"),
            p.protocol.as_deref(),
        )?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(parse_port(&obj, &format!("spec.ports[{i}].nodePort"), n)?),
        };
        let name = p.name.clone().unwrap_or_default();
        if !seen.insert((name.clone(), protocol)) {
            return Err(invalid(
                &obj,
                format!("spec.ports[{i}].name"),
                format!("duplicate port {name:?}/{}", protocol.as_str()),
            ));
        }
        for cluster_ip in &cluster_ips {
            let family = IpFamily::of(cluster_ip);
            ports.push(ServicePort {
                name: ServicePortName {
                    service: key.clone(),
                    port: name.clone(),
                    protocol,
                },
                family,
                cluster_ip: *cluster_ip,
                port,
                node_port,
                external_ips: of_family(&external_ips, family),
                load_balancer_ips: of_family(&load_balancer_ips, family),
                load_balancer_source_ranges: source_ranges_of_family(&source_ranges, family),
                affinity_timeout_seconds,
                external_policy_local,
                internal_policy_local,
                health_check_node_port,
                traffic_distribution: traffic_distribution.clone(),
            });
        }
    }
    Ok(Parsed::Valid(ports))
}

/// The source ranges of one family. A zero CIDR (`0.0.0.0/0`, `::/0`) allows every source,
/// which is what no ranges at all mean, so it empties that family's list (as newer
/// kube-proxy's newBaseServiceInfo does) instead of making the plan build a firewall that
/// filters nothing.
fn source_ranges_of_family(ranges: &[IpNet], family: IpFamily) -> Vec<IpNet> {
    let mine: Vec<IpNet> = ranges
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
        .copied()
        .collect();
    if mine.iter().any(|n| n.prefix_len() == 0) {
        Vec::new()
    } else {
        mine
    }
}

fn of_family(ips: &[IpAddr], family: IpFamily) -> Vec<IpAddr> {
    ips.iter()
        .filter(|ip| IpFamily::of(ip) == family)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    /// Build a Service from a JSON fragment: tables read like the manifests users write.
    pub(crate) fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).expect("test Service must deserialize")
    }

    fn base(spec: serde_json::Value) -> Service {
        svc(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "svc"},
            "spec": spec,
        }))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ports(s: &Service) -> Vec<ServicePort> {
        match parse_service(s) {
            Ok(Parsed::Valid(p)) => p,
            other => panic!("expected valid, got {other:?}"),
        }
    }

    fn error_field(s: &Service) -> Option<String> {
        match parse_service(s) {
            Err(ModelError::Invalid { field, object, .. }) => {
                assert_eq!(object.to_string(), "Service ns/svc");
                Some(field)
            }
            _ => None,
        }
    }

    #[test]
    fn ignored_table() {
        let cases: Vec<(&str, Service)> = vec![
            (
                "service-proxy-name label",
                svc(serde_json::json!({
                    "metadata": {"namespace": "ns", "name": "svc",
                        "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
                    "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}
                })),
            ),
            (
                "headless label",
                svc(serde_json::json!({
                    "metadata": {"namespace": "ns", "name": "svc",
                        "labels": {"service.kubernetes.io/headless": ""}},
                    "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}
                })),
            ),
            (
                "ExternalName",
                base(serde_json::json!({"type": "ExternalName", "externalName": "example.com"})),
            ),
            (
                "clusterIP None",
                base(serde_json::json!({"clusterIP": "None", "ports": [{"port": 80}]})),
            ),
            (
                "clusterIPs None",
                base(serde_json::json!({"clusterIPs": ["None"], "ports": [{"port": 80}]})),
            ),
            (
                "clusterIP empty",
                base(serde_json::json!({"clusterIP": "", "ports": [{"port": 80}]})),
            ),
            (
                "no clusterIP",
                base(serde_json::json!({"ports": [{"port": 80}]})),
            ),
            (
                "ignored label wins over invalid fields",
                svc(serde_json::json!({
                    "metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "x"}},
                    "spec": {"clusterIP": "bogus", "ports": [{"port": 0}]}
                })),
            ),
        ];
        for (name, s) in cases {
            assert!(
                matches!(parse_service(&s), Ok(Parsed::Ignored(_))),
                "{name}: {:?}",
                parse_service(&s)
            );
        }
    }

    #[test]
    fn invalid_table() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            (
                "spec.clusterIP",
                serde_json::json!({"clusterIP": "10.0.0.300", "ports": [{"port": 80}]}),
            ),
            (
                "spec.clusterIPs[1]",
                serde_json::json!({"clusterIPs": ["10.0.0.1", "fd00::x"], "ports": [{"port": 80}]}),
            ),
            (
                "spec.clusterIPs[1]",
                serde_json::json!({"clusterIPs": ["10.0.0.1", "10.0.0.2"], "ports": [{"port": 80}]}),
            ),
            (
                "spec.ports[1].port",
                serde_json::json!({"clusterIP": "10.0.0.1",
                    "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 0}]}),
            ),
            (
                "spec.ports[0].port",
                serde_json::json!({"clusterIP": "10.0.0.1", "ports": [{"port": 70000}]}),
            ),
            (
                "spec.ports[0].protocol",
                serde_json::json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80, "protocol": "ICMP"}]}),
            ),
            (
                "spec.ports[0].nodePort",
                serde_json::json!({"type": "NodePort", "clusterIP": "10.0.0.1",
                    "ports": [{"port": 80, "nodePort": 65536}]}),
            ),
            (
                "spec.ports[1].name",
                serde_json::json!({"clusterIP": "10.0.0.1",
                    "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
            ),
            (
                "spec.externalIPs[0]",
                serde_json::json!({"clusterIP": "10.0.0.1", "externalIPs": ["1.2.3"],
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.loadBalancerSourceRanges[1]",
                serde_json::json!({"type": "LoadBalancer", "clusterIP": "10.0.0.1",
                    "loadBalancerSourceRanges": ["10.0.0.0/8", "10.0.0.0/40"],
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.sessionAffinity",
                serde_json::json!({"clusterIP": "10.0.0.1", "sessionAffinity": "Cookie",
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                serde_json::json!({"clusterIP": "10.0.0.1", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                serde_json::json!({"clusterIP": "10.0.0.1", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}},
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.externalTrafficPolicy",
                serde_json::json!({"clusterIP": "10.0.0.1", "externalTrafficPolicy": "Nearby",
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.internalTrafficPolicy",
                serde_json::json!({"clusterIP": "10.0.0.1", "internalTrafficPolicy": "local",
                    "ports": [{"port": 80}]}),
            ),
            (
                "spec.type",
                serde_json::json!({"type": "Bogus", "clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
            ),
            (
                "spec.healthCheckNodePort",
                serde_json::json!({"type": "LoadBalancer", "clusterIP": "10.0.0.1",
                    "externalTrafficPolicy": "Local", "healthCheckNodePort": -5,
                    "ports": [{"port": 80}]}),
            ),
        ];
        for (field, spec) in cases {
            assert_eq!(
                error_field(&base(spec.clone())).as_deref(),
                Some(field),
                "spec {spec}"
            );
        }
        // Bad status field.
        let s = svc(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "svc"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.1", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "nope"}]}}
        }));
        assert_eq!(
            error_field(&s).as_deref(),
            Some("status.loadBalancer.ingress[1].ip")
        );
        // Missing identity and spec.
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                serde_json::json!({"metadata": {"namespace": "ns"}, "spec": {"clusterIP": "10.0.0.1"}}),
                "metadata.name",
            ),
            (
                serde_json::json!({"metadata": {"name": "svc"}, "spec": {"clusterIP": "10.0.0.1"}}),
                "metadata.namespace",
            ),
            (
                serde_json::json!({"metadata": {"namespace": "ns", "name": "svc"}}),
                "spec",
            ),
        ];
        for (json, want) in cases {
            let got = match parse_service(&svc(json.clone())) {
                Err(ModelError::Invalid { field, .. }) => field,
                other => panic!("{json}: {other:?}"),
            };
            assert_eq!(got, want, "{json}");
        }
    }

    #[test]
    fn cluster_ips_and_families_table() {
        // (spec, expected (family, clusterIP) per port in order)
        let cases: Vec<(serde_json::Value, Vec<(IpFamily, &str)>)> = vec![
            (
                serde_json::json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
                vec![(IpFamily::V4, "10.0.0.1")],
            ),
            (
                serde_json::json!({"clusterIP": "fd00::1", "ports": [{"port": 80}]}),
                vec![(IpFamily::V6, "fd00::1")],
            ),
            (
                // clusterIPs wins over clusterIP.
                serde_json::json!({"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1", "fd00::1"],
                    "ports": [{"port": 80}]}),
                vec![(IpFamily::V4, "10.0.0.1"), (IpFamily::V6, "fd00::1")],
            ),
            (
                serde_json::json!({"clusterIPs": ["fd00::1", "10.0.0.1"], "ports": [{"port": 80}]}),
                vec![(IpFamily::V6, "fd00::1"), (IpFamily::V4, "10.0.0.1")],
            ),
            (
                serde_json::json!({"clusterIPs": ["10.0.0.1"], "ports": []}),
                vec![],
            ),
        ];
        for (spec, want) in cases {
            let got: Vec<(IpFamily, IpAddr)> = ports(&base(spec.clone()))
                .iter()
                .map(|p| (p.family, p.cluster_ip))
                .collect();
            let want: Vec<(IpFamily, IpAddr)> = want.iter().map(|(f, a)| (*f, ip(a))).collect();
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn port_fields_table() {
        // (ports json, expected (name, protocol, port, nodePort))
        type Row<'a> = (&'a str, Protocol, u16, Option<u16>);
        let cases: Vec<(serde_json::Value, Vec<Row<'static>>)> = vec![
            (
                serde_json::json!([{"port": 80}]),
                vec![("", Protocol::Tcp, 80, None)],
            ),
            (
                serde_json::json!([{"name": "dns", "port": 53, "protocol": "UDP"},
                                   {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
                vec![
                    ("dns", Protocol::Udp, 53, None),
                    ("dns-tcp", Protocol::Tcp, 53, None),
                ],
            ),
            (
                // Same name, different protocols: distinct ServicePortNames.
                serde_json::json!([{"name": "p", "port": 53, "protocol": "UDP"},
                                   {"name": "p", "port": 53, "protocol": "TCP"}]),
                vec![
                    ("p", Protocol::Udp, 53, None),
                    ("p", Protocol::Tcp, 53, None),
                ],
            ),
            (
                serde_json::json!([{"name": "s", "port": 9, "protocol": "SCTP", "nodePort": 30009}]),
                vec![("s", Protocol::Sctp, 9, Some(30009))],
            ),
            (
                serde_json::json!([{"port": 80, "nodePort": 0}]),
                vec![("", Protocol::Tcp, 80, None)],
            ),
        ];
        for (ports_json, want) in cases {
            let s = base(
                serde_json::json!({"type": "NodePort", "clusterIP": "10.0.0.1",
                "ports": ports_json.clone()}),
            );
            let all = ports(&s);
            let got: Vec<Row> = all
                .iter()
                .map(|p| (p.name.port.as_str(), p.name.protocol, p.port, p.node_port))
                .collect();
            assert_eq!(got, want, "{ports_json}");
            for p in ports(&s) {
                assert_eq!(p.name.service.to_string(), "ns/svc");
            }
        }
    }

    #[test]
    fn external_and_lb_ips_table() {
        // (spec, status, v4 (externalIPs, LB IPs), v6 (externalIPs, LB IPs))
        type Ips = (Vec<&'static str>, Vec<&'static str>);
        let cases: Vec<(serde_json::Value, serde_json::Value, Ips, Ips)> = vec![
            (
                serde_json::json!({"externalIPs": ["192.0.2.1", "2001:db8::1", "192.0.2.2"]}),
                serde_json::json!({}),
                (vec!["192.0.2.1", "192.0.2.2"], vec![]),
                (vec!["2001:db8::1"], vec![]),
            ),
            (
                serde_json::json!({"type": "LoadBalancer"}),
                serde_json::json!({"loadBalancer": {"ingress": [
                    {"ip": "198.51.100.4"},
                    {"ip": "198.51.100.8", "ipMode": "VIP"},
                    {"ip": "198.51.100.12", "ipMode": "Proxy"},
                    {"hostname": "lb.example.com"},
                    {"ip": "2001:db8::4"}
                ]}}),
                (vec![], vec!["198.51.100.4", "198.51.100.8"]),
                (vec![], vec!["2001:db8::4"]),
            ),
        ];
        for (extra, status, v4, v6) in cases {
            let mut spec = serde_json::json!({"clusterIPs": ["10.0.0.1", "fd00::1"],
                "ports": [{"port": 80}]});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let s = svc(serde_json::json!({
                "metadata": {"namespace": "ns", "name": "svc"},
                "spec": spec, "status": status}));
            let got = ports(&s);
            let v4p = got.iter().find(|p| p.family == IpFamily::V4).unwrap();
            let v6p = got.iter().find(|p| p.family == IpFamily::V6).unwrap();
            let conv = |v: &Vec<&str>| v.iter().map(|a| ip(a)).collect::<Vec<_>>();
            assert_eq!(v4p.external_ips, conv(&v4.0), "{extra}");
            assert_eq!(v4p.load_balancer_ips, conv(&v4.1), "{extra}");
            assert_eq!(v6p.external_ips, conv(&v6.0), "{extra}");
            assert_eq!(v6p.load_balancer_ips, conv(&v6.1), "{extra}");
        }
    }

    #[test]
    fn source_ranges_table() {
        // (ranges, expected v4, expected v6)
        let cases: Vec<(Vec<&str>, Vec<&str>, Vec<&str>)> = vec![
            (vec![], vec![], vec![]),
            (
                vec![" 203.0.113.0/25", "203.0.113.128/25 ", "\t2001:db8::/64"],
                vec!["203.0.113.0/25", "203.0.113.128/25"],
                vec!["2001:db8::/64"],
            ),
            (vec!["10.1.2.3/16"], vec!["10.1.0.0/16"], vec![]),
            // A zero CIDR allows everything in its family: no filtering there.
            (
                vec!["10.0.0.0/8", "0.0.0.0/0", "2001:db8::/64"],
                vec![],
                vec!["2001:db8::/64"],
            ),
            (vec!["10.0.0.0/8", "::/0"], vec!["10.0.0.0/8"], vec![]),
        ];
        for (ranges, v4, v6) in cases {
            let s = base(serde_json::json!({"type": "LoadBalancer",
                "clusterIPs": ["10.0.0.1", "fd00::1"],
                "loadBalancerSourceRanges": ranges, "ports": [{"port": 80}]}));
            let got = ports(&s);
            let fam = |f: IpFamily| {
                got.iter()
                    .find(|p| p.family == f)
                    .unwrap()
                    .load_balancer_source_ranges
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(fam(IpFamily::V4), v4, "{ranges:?}");
            assert_eq!(fam(IpFamily::V6), v6, "{ranges:?}");
        }
    }

    #[test]
    fn affinity_table() {
        let cases: Vec<(serde_json::Value, Option<u32>)> = vec![
            (serde_json::json!({}), None),
            (serde_json::json!({"sessionAffinity": "None"}), None),
            (
                serde_json::json!({"sessionAffinity": "ClientIP"}),
                Some(10800),
            ),
            (
                serde_json::json!({"sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {}}}),
                Some(10800),
            ),
            (
                serde_json::json!({"sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                Some(60),
            ),
            (
                serde_json::json!({"sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}),
                Some(86400),
            ),
            (
                // The config without ClientIP affinity means nothing.
                serde_json::json!({"sessionAffinity": "None",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                None,
            ),
        ];
        for (extra, want) in cases {
            let mut spec = serde_json::json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            assert_eq!(
                ports(&base(spec))[0].affinity_timeout_seconds,
                want,
                "{extra}"
            );
        }
    }

    #[test]
    fn traffic_policies_and_health_check_table() {
        // (spec extras, external_policy_local, internal_policy_local, healthCheckNodePort)
        let cases: Vec<(serde_json::Value, bool, bool, Option<u16>)> = vec![
            (serde_json::json!({}), false, false, None),
            // eTP Local on ClusterIP without externalIPs: not externally accessible, ignored.
            (
                serde_json::json!({"externalTrafficPolicy": "Local"}),
                false,
                false,
                None,
            ),
            // ... but with externalIPs it applies.
            (
                serde_json::json!({"externalTrafficPolicy": "Local", "externalIPs": ["192.0.2.1"]}),
                true,
                false,
                None,
            ),
            // externalIPs of the other family still make the Service externally accessible.
            (
                serde_json::json!({"externalTrafficPolicy": "Local", "externalIPs": ["2001:db8::1"]}),
                true,
                false,
                None,
            ),
            (
                serde_json::json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": 30000}),
                true,
                false,
                None,
            ),
            (
                serde_json::json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": 30000}),
                true,
                false,
                Some(30000),
            ),
            (
                serde_json::json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
                true,
                false,
                None,
            ),
            (
                serde_json::json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                    "healthCheckNodePort": 30000}),
                false,
                false,
                None,
            ),
            (
                serde_json::json!({"internalTrafficPolicy": "Local"}),
                false,
                true,
                None,
            ),
            (
                serde_json::json!({"internalTrafficPolicy": "Cluster"}),
                false,
                false,
                None,
            ),
            (
                serde_json::json!({"type": "NodePort", "internalTrafficPolicy": "Local",
                    "externalTrafficPolicy": "Local"}),
                true,
                true,
                None,
            ),
        ];
        for (extra, etp, itp, hc) in cases {
            let mut spec = serde_json::json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let p = &ports(&base(spec))[0];
            assert_eq!(
                (
                    p.external_policy_local,
                    p.internal_policy_local,
                    p.health_check_node_port
                ),
                (etp, itp, hc),
                "{extra}"
            );
        }
    }

    #[test]
    fn traffic_distribution_table() {
        let cases: Vec<(Option<&str>, Option<TrafficDistribution>)> = vec![
            (None, None),
            (Some("PreferClose"), Some(TrafficDistribution::PreferClose)),
            (
                Some("PreferSameZone"),
                Some(TrafficDistribution::PreferSameZone),
            ),
            (
                Some("PreferSameNode"),
                Some(TrafficDistribution::PreferSameNode),
            ),
            (
                Some("Nearest"),
                Some(TrafficDistribution::Other("Nearest".into())),
            ),
        ];
        for (td, want) in cases {
            let mut spec = serde_json::json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]});
            if let Some(td) = td {
                spec["trafficDistribution"] = td.into();
            }
            assert_eq!(ports(&base(spec))[0].traffic_distribution, want, "{td:?}");
        }
    }
}
