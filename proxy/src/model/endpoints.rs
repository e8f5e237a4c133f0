//! EndpointSlices -> merged, deduplicated endpoints per service port, as kube-proxy's
//! EndpointSliceCache does (pkg/proxy/endpointslicecache.go: newEndpointSliceInfo,
//! endpointInfoByServicePort, addEndpoints).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::validate::{
    ANNOTATION_LAST_CHANGE_TRIGGER_TIME, LABEL_HEADLESS, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME, Parsed, has_label, invalid, object_ref, parse_ip, parse_protocol,
    require_identity,
};
use super::{Endpoint, IpFamily, Kind, ModelError, Protocol, ServiceKey, ServicePortName};

/// One `ports[]` entry of a slice that kube-proxy uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// "" for an unnamed port (name absent or empty).
    pub name: String,
    pub protocol: Protocol,
    /// The endpoints' (target) port.
    pub port: u16,
}

/// One `endpoints[]` entry, conditions resolved with their API defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// addresses[0] (the API says consumers use the first address only).
    pub ip: IpAddr,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// What shunt keeps of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// The owning Service (label kubernetes.io/service-name, same namespace).
    pub service: ServiceKey,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// endpoints.kubernetes.io/last-change-trigger-time, if present and valid RFC 3339.
    pub trigger_time: Option<SystemTime>,
}

/// The Service an EndpointSlice belongs to, if it names one.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ServiceKey {
        namespace: slice.metadata.namespace.clone().unwrap_or_default(),
        name: name.clone(),
    })
}

/// Read an EndpointSlice.
///
/// `Ignored`: labelled for another proxy or headless (kube-proxy's informer label selector
/// drops those), or addressType FQDN (kube-proxy only watches IPv4/IPv6 slices).
pub fn parse_slice(slice: &EndpointSlice) -> Result<Parsed<SliceInfo>, ModelError> {
    let obj = object_ref(Kind::EndpointSlice, &slice.metadata);
    if has_label(&slice.metadata, LABEL_SERVICE_PROXY_NAME) {
        return Ok(Parsed::Ignored(
            "labelled service.kubernetes.io/service-proxy-name",
        ));
    }
    if has_label(&slice.metadata, LABEL_HEADLESS) {
        return Ok(Parsed::Ignored("labelled service.kubernetes.io/headless"));
    }
    require_identity(&obj, true)?;
    let service = match slice_service(slice) {
        Some(k) if !k.name.is_empty() => k,
        _ => {
            return Err(invalid(
                &obj,
                format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                "missing: the slice names no Service",
            ));
        }
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(Parsed::Ignored("addressType FQDN")),
        other => {
            return Err(invalid(
                &obj,
                "addressType",
                format!("unknown address type {other:?}"),
            ));
        }
    };

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol =
            parse_protocol(&obj, &format!("ports[{i}].protocol"), p.protocol.as_deref())?;
        // A nil (or zero) port is legal for slices not derived from a Service; kube-proxy
        // skips such ports ("Ignoring invalid endpoint port").
        let port = match p.port {
            None | Some(0) => continue,
            Some(n) => u16::try_from(n).map_err(|_| {
                invalid(
                    &obj,
                    format!("ports[{i}].port"),
                    format!("{n} is not a port number (1-65535)"),
                )
            })?,
        };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(first) = ep.addresses.first() else {
            return Err(invalid(&obj, format!("endpoints[{i}].addresses"), "empty"));
        };
        let field = format!("endpoints[{i}].addresses[0]");
        let ip = parse_ip(&obj, &field, first)?;
        if IpFamily::of(&ip) != family {
            return Err(invalid(
                &obj,
                field,
                format!("{ip} does not match addressType {}", slice.address_type),
            ));
        }
        // Absent conditions: ready means true and terminating false (EndpointConditions
        // docs). For serving, shunt's contract (and the conformance FORMAT) uses the
        // discovery/v1 types.go wording "if nil, consumers should defer to the ready
        // condition". kube-proxy's newEndpointSliceInfo reads nil as true instead; the two
        // only differ for an endpoint that is explicitly not ready, terminating, and silent
        // about serving, which no controller writes (the EndpointSlice controller always
        // sets all three).
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            ready,
            serving,
            terminating,
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }

    Ok(Parsed::Valid(SliceInfo {
        service,
        family,
        ports,
        endpoints,
        trigger_time: trigger_time(slice),
    }))
}

/// The slice's last-change-trigger-time. A malformed value is not worth rejecting the slice
/// for: kube-proxy only logs it and leaves the change out of its latency metric.
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_LAST_CHANGE_TRIGGER_TIME)?;
    let ts: jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(ts))
}

/// Merge the endpoints of one service port from all slices of its Service (in the order
/// given: shunt passes them by slice name so the result is deterministic).
///
/// Slices' ports are matched by name and protocol; the endpoint port is the slice's port
/// number. Endpoints are deduplicated by (IP, port): the first one seen is kept unless a
/// later duplicate is local, which then wins (kube-proxy's addEndpoints favours isLocal).
/// Only slices of `family` are used. The result is sorted by (IP, port).
pub fn merge_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a SliceInfo>,
    port_name: &ServicePortName,
    family: IpFamily,
    node_name: &str,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.family != family {
            continue;
        }
        for sp in &slice.ports {
            if sp.name != port_name.port || sp.protocol != port_name.protocol {
                continue;
            }
            for ep in &slice.endpoints {
                // kube-proxy's isLocal: only with a non-empty node name of our own.
                let is_local = !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name);
                let key = (ep.ip, sp.port);
                if merged.contains_key(&key) && !is_local {
                    continue;
                }
                merged.insert(
                    key,
                    Endpoint {
                        ip: ep.ip,
                        port: sp.port,
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        is_local,
                        node_name: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                        zone_hints: ep.zone_hints.clone(),
                        node_hints: ep.node_hints.clone(),
                    },
                );
            }
        }
    }
    merged.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).expect("test EndpointSlice must deserialize")
    }

    fn info(json: serde_json::Value) -> SliceInfo {
        match parse_slice(&slice(json.clone())) {
            Ok(Parsed::Valid(i)) => i,
            other => panic!("{json}: {other:?}"),
        }
    }

    fn spn(port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: ServiceKey {
                namespace: "ns".into(),
                name: "svc".into(),
            },
            port: port.into(),
            protocol,
        }
    }

    fn std_slice(name: &str, endpoints: serde_json::Value) -> serde_json::Value {
        json!({
            "metadata": {"namespace": "ns", "name": name,
                "labels": {"kubernetes.io/service-name": "svc"}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    }

    #[test]
    fn ignored_table() {
        let cases = vec![
            json!({"metadata": {"namespace": "ns", "name": "s",
                "labels": {"kubernetes.io/service-name": "svc",
                           "service.kubernetes.io/service-proxy-name": "other"}},
                "addressType": "IPv4", "endpoints": []}),
            json!({"metadata": {"namespace": "ns", "name": "s",
                "labels": {"kubernetes.io/service-name": "svc",
                           "service.kubernetes.io/headless": ""}},
                "addressType": "IPv4", "endpoints": []}),
            json!({"metadata": {"namespace": "ns", "name": "s",
                "labels": {"kubernetes.io/service-name": "svc"}},
                "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}]}),
        ];
        for j in cases {
            assert!(
                matches!(parse_slice(&slice(j.clone())), Ok(Parsed::Ignored(_))),
                "{j}"
            );
        }
    }

    #[test]
    fn invalid_table() {
        let label = json!({"kubernetes.io/service-name": "svc"});
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                json!({"metadata": {"namespace": "ns", "name": "s"},
                    "addressType": "IPv4", "endpoints": []}),
                "metadata.labels[kubernetes.io/service-name]",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s",
                    "labels": {"kubernetes.io/service-name": ""}},
                    "addressType": "IPv4", "endpoints": []}),
                "metadata.labels[kubernetes.io/service-name]",
            ),
            (
                json!({"metadata": {"namespace": "ns", "labels": label},
                    "addressType": "IPv4", "endpoints": []}),
                "metadata.name",
            ),
            (
                json!({"metadata": {"name": "s", "labels": label},
                    "addressType": "IPv4", "endpoints": []}),
                "metadata.namespace",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv5", "endpoints": []}),
                "addressType",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv4", "endpoints": [
                        {"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.x"]}]}),
                "endpoints[1].addresses[0]",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]}),
                "endpoints[0].addresses[0]",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv6", "endpoints": [{"addresses": ["10.0.0.1"]}]}),
                "endpoints[0].addresses[0]",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv4", "endpoints": [{"addresses": []}]}),
                "endpoints[0].addresses",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv4", "ports": [{"port": 80, "protocol": "HTTP"}],
                    "endpoints": []}),
                "ports[0].protocol",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv4", "ports": [{"name": "a", "port": 80},
                        {"name": "b", "port": 65536}],
                    "endpoints": []}),
                "ports[1].port",
            ),
            (
                json!({"metadata": {"namespace": "ns", "name": "s", "labels": label},
                    "addressType": "IPv4", "ports": [{"port": -1}], "endpoints": []}),
                "ports[0].port",
            ),
        ];
        for (j, want) in cases {
            match parse_slice(&slice(j.clone())) {
                Err(ModelError::Invalid { field, object, .. }) => {
                    assert_eq!(field, want, "{j}");
                    assert_eq!(object.kind, Kind::EndpointSlice);
                }
                other => panic!("{j}: expected invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn conditions_table() {
        // (conditions json, ready, serving, terminating)
        let cases: Vec<(serde_json::Value, bool, bool, bool)> = vec![
            (json!(null), true, true, false),
            (json!({}), true, true, false),
            (json!({"ready": true}), true, true, false),
            (json!({"ready": false}), false, false, false),
            (
                json!({"ready": false, "terminating": true}),
                false,
                false,
                true,
            ),
            (json!({"ready": true, "serving": false}), true, false, false),
            (
                json!({"ready": false, "serving": true, "terminating": true}),
                false,
                true,
                true,
            ),
            (
                json!({"ready": false, "serving": false, "terminating": true}),
                false,
                false,
                true,
            ),
            (json!({"terminating": true}), true, true, true),
            (json!({"serving": false}), true, false, false),
        ];
        for (cond, ready, serving, terminating) in cases {
            let mut ep = json!({"addresses": ["10.0.0.1"]});
            if !cond.is_null() {
                ep["conditions"] = cond.clone();
            }
            let i = info(std_slice("s", json!([ep])));
            let e = &i.endpoints[0];
            assert_eq!(
                (e.ready, e.serving, e.terminating),
                (ready, serving, terminating),
                "{cond}"
            );
        }
    }

    #[test]
    fn slice_fields_table() {
        let i = info(json!({
            "metadata": {"namespace": "ns", "name": "svc-abc",
                "labels": {"kubernetes.io/service-name": "svc"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                    "2024-05-01T10:00:00Z"}},
            "addressType": "IPv6",
            "ports": [{"port": 80}, {"name": "x", "port": null}, {"name": "y", "port": 0},
                      {"name": "dns", "port": 53, "protocol": "UDP"}],
            "endpoints": [{"addresses": ["fd00::1", "fd00::2"], "nodeName": "n1", "zone": "z1",
                "hints": {"forZones": [{"name": "z1"}, {"name": "z2"}],
                          "forNodes": [{"name": "n1"}]}}],
        }));
        assert_eq!(
            i.service,
            ServiceKey {
                namespace: "ns".into(),
                name: "svc".into()
            }
        );
        assert_eq!(i.family, IpFamily::V6);
        assert_eq!(
            i.ports,
            vec![
                SlicePort {
                    name: "".into(),
                    protocol: Protocol::Tcp,
                    port: 80
                },
                SlicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53
                },
            ]
        );
        let e = &i.endpoints[0];
        assert_eq!(e.ip, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert_eq!(e.zone.as_deref(), Some("z1"));
        assert_eq!(e.zone_hints, vec!["z1", "z2"]);
        assert_eq!(e.node_hints, vec!["n1"]);
        let want = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_714_557_600);
        assert_eq!(i.trigger_time, Some(want));
    }

    #[test]
    fn trigger_time_table() {
        let cases: Vec<(Option<&str>, Option<u64>)> = vec![
            (None, None),
            (Some("2024-05-01T10:00:00Z"), Some(1_714_557_600)),
            (Some("2024-05-01T12:00:00+02:00"), Some(1_714_557_600)),
            (Some("yesterday"), None),
        ];
        for (annotation, want) in cases {
            let mut j = std_slice("s", json!([]));
            if let Some(a) = annotation {
                j["metadata"]["annotations"] =
                    json!({"endpoints.kubernetes.io/last-change-trigger-time": a});
            }
            let got = info(j).trigger_time;
            let want = want.map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
            assert_eq!(got, want, "{annotation:?}");
        }
    }

    #[test]
    fn merge_table() {
        struct Case {
            name: &'static str,
            slices: Vec<serde_json::Value>,
            port: ServicePortName,
            family: IpFamily,
            /// (ip, port, is_local, ready)
            want: Vec<(&'static str, u16, bool, bool)>,
        }
        let tcp_p = spn("p", Protocol::Tcp);
        let cases = vec![
            Case {
                name: "one slice, sorted by address",
                slices: vec![std_slice(
                    "a",
                    json!([{"addresses": ["10.0.0.2"]}, {"addresses": ["10.0.0.1"]}]),
                )],
                port: tcp_p.clone(),
                family: IpFamily::V4,
                want: vec![
                    ("10.0.0.1", 8080, false, true),
                    ("10.0.0.2", 8080, false, true),
                ],
            },
            Case {
                name: "merged across slices",
                slices: vec![
                    std_slice("a", json!([{"addresses": ["10.0.0.1"]}])),
                    std_slice("b", json!([{"addresses": ["10.0.0.3"]}])),
                ],
                port: tcp_p.clone(),
                family: IpFamily::V4,
                want: vec![
                    ("10.0.0.1", 8080, false, true),
                    ("10.0.0.3", 8080, false, true),
                ],
            },
            Case {
                name: "duplicate across slices: first kept",
                slices: vec![
                    std_slice(
                        "a",
                        json!([{"addresses": ["10.0.0.1"],
                        "conditions": {"ready": false}}]),
                    ),
                    std_slice("b", json!([{"addresses": ["10.0.0.1"]}])),
                ],
                port: tcp_p.clone(),
                family: IpFamily::V4,
                want: vec![("10.0.0.1", 8080, false, false)],
            },
            Case {
                name: "duplicate across slices: local one wins",
                slices: vec![
                    std_slice(
                        "a",
                        json!([{"addresses": ["10.0.0.1"], "nodeName": "other"}]),
                    ),
                    std_slice(
                        "b",
                        json!([{"addresses": ["10.0.0.1"], "nodeName": "me",
                        "conditions": {"ready": false}}]),
                    ),
                ],
                port: tcp_p.clone(),
                family: IpFamily::V4,
                want: vec![("10.0.0.1", 8080, true, false)],
            },
            Case {
                name: "port matched by name and protocol",
                slices: vec![json!({
                    "metadata": {"namespace": "ns", "name": "a",
                        "labels": {"kubernetes.io/service-name": "svc"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "p", "port": 1, "protocol": "UDP"},
                              {"name": "q", "port": 2, "protocol": "TCP"},
                              {"name": "p", "port": 3, "protocol": "TCP"}],
                    "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "me"}],
                })],
                port: tcp_p.clone(),
                family: IpFamily::V4,
                want: vec![("10.0.0.1", 3, true, true)],
            },
            Case {
                name: "unnamed: absent and empty names are the same",
                slices: vec![
                    json!({
                        "metadata": {"namespace": "ns", "name": "a",
                            "labels": {"kubernetes.io/service-name": "svc"}},
                        "addressType": "IPv4",
                        "ports": [{"port": 80}],
                        "endpoints": [{"addresses": ["10.0.0.1"]}],
                    }),
                    json!({
                        "metadata": {"namespace": "ns", "name": "b",
                            "labels": {"kubernetes.io/service-name": "svc"}},
                        "addressType": "IPv4",
                        "ports": [{"name": "", "port": 80}],
                        "endpoints": [{"addresses": ["10.0.0.2"]}],
                    }),
                ],
                port: spn("", Protocol::Tcp),
                family: IpFamily::V4,
                want: vec![("10.0.0.1", 80, false, true), ("10.0.0.2", 80, false, true)],
            },
            Case {
                name: "same IP, different target ports in different slices stay apart",
                slices: vec![
                    std_slice("a", json!([{"addresses": ["10.0.0.1"]}])),
                    json!({
                        "metadata": {"namespace": "ns", "name": "b",
                            "labels": {"kubernetes.io/service-name": "svc"}},
                        "addressType": "IPv4",
                        "ports": [{"name": "p", "port": 9090}],
                        "endpoints": [{"addresses": ["10.0.0.1"]}],
                    }),
                ],
                port: tcp_p.clone(),
                family: IpFamily::V4,
                want: vec![
                    ("10.0.0.1", 8080, false, true),
                    ("10.0.0.1", 9090, false, true),
                ],
            },
            Case {
                name: "other family's slices are not used",
                slices: vec![
                    std_slice("a", json!([{"addresses": ["10.0.0.1"]}])),
                    json!({
                        "metadata": {"namespace": "ns", "name": "b",
                            "labels": {"kubernetes.io/service-name": "svc"}},
                        "addressType": "IPv6",
                        "ports": [{"name": "p", "port": 8080}],
                        "endpoints": [{"addresses": ["fd00::1"]}],
                    }),
                ],
                port: tcp_p.clone(),
                family: IpFamily::V6,
                want: vec![("fd00::1", 8080, false, true)],
            },
            Case {
                name: "no matching port",
                slices: vec![std_slice("a", json!([{"addresses": ["10.0.0.1"]}]))],
                port: spn("other", Protocol::Tcp),
                family: IpFamily::V4,
                want: vec![],
            },
            Case {
                name: "wrong protocol",
                slices: vec![std_slice("a", json!([{"addresses": ["10.0.0.1"]}]))],
                port: spn("p", Protocol::Udp),
                family: IpFamily::V4,
                want: vec![],
            },
        ];
        for c in cases {
            let infos: Vec<SliceInfo> = c.slices.into_iter().map(info).collect();
            let got: Vec<(IpAddr, u16, bool, bool)> =
                merge_endpoints(&infos, &c.port, c.family, "me")
                    .into_iter()
                    .map(|e| (e.ip, e.port, e.is_local, e.ready))
                    .collect();
            let want: Vec<(IpAddr, u16, bool, bool)> = c
                .want
                .iter()
                .map(|(ip, p, l, r)| (ip.parse().unwrap(), *p, *l, *r))
                .collect();
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn is_local_table() {
        // (endpoint nodeName, our node name, is_local)
        let cases: Vec<(Option<&str>, &str, bool)> = vec![
            (Some("me"), "me", true),
            (Some("other"), "me", false),
            (None, "me", false),
            (Some(""), "", false),
        ];
        for (ep_node, ours, want) in cases {
            let mut ep = json!({"addresses": ["10.0.0.1"]});
            if let Some(n) = ep_node {
                ep["nodeName"] = n.into();
            }
            let infos = vec![info(std_slice("a", json!([ep])))];
            let got = merge_endpoints(&infos, &spn("p", Protocol::Tcp), IpFamily::V4, ours);
            assert_eq!(got[0].is_local, want, "{ep_node:?} vs {ours:?}");
            assert_eq!(got[0].node_name.as_deref(), ep_node);
        }
    }
}
