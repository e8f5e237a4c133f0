//! The soak cluster: the demo's two nodes with more pods, as manifests shunt reads and as the
//! scenario the lab is planned from.
//!
//! The lab is planned once from [`lab_scenario`], which lists every pod any soak scenario
//! uses (so every pod has its namespace and echo/UDP server from the start); what shunt sees
//! is written separately ([`initial_objects`], then edits), as a real cluster's EndpointSlices
//! only name some of the pods that exist.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use serde_yaml::{Mapping, Value};

use crate::scenario::{self, Scenario};
use crate::shunt;

pub const CLIENT_POD: &str = "10.244.1.100";
pub const EXTERNAL: &str = "203.0.113.2";
/// Service demo/web (ClusterIP, TCP 80 -> 8080).
pub const WEB: &str = "10.96.0.10:80";
/// Service demo/web-np (NodePort 30080 -> 8080), same pods as web.
pub const WEB_NP: &str = "192.168.0.2:30080";
/// Service demo/dns (ClusterIP, UDP 53 -> 5353).
pub const DNS: &str = "10.96.0.53:53";
/// Service demo/late (ClusterIP, TCP 80 -> 8080): no endpoints until one is added while the
/// API is down (outage).
pub const LATE: &str = "10.96.0.20:80";
/// Service demo/fresh (ClusterIP, TCP 80 -> 8080): created, with its EndpointSlice, while the
/// API is down (outage): a change that reaches shunt through two watchers.
pub const FRESH: &str = "10.96.0.21:80";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pod {
    pub name: &'static str,
    pub ip: &'static str,
    pub node: &'static str,
}

const fn pod(name: &'static str, ip: &'static str, node: &'static str) -> Pod {
    Pod { name, ip, node }
}

/// web's pods at the start of every scenario: two on the node under test, two remote.
pub const WEB_PODS: [Pod; 4] = [
    pod("pod-a", "10.244.1.2", "node-1"),
    pod("pod-b", "10.244.1.3", "node-1"),
    pod("pod-c", "10.244.2.2", "node-2"),
    pod("pod-d", "10.244.2.3", "node-2"),
];
/// The pods a rolling update replaces them with, one for one (same node).
pub const NEXT_PODS: [Pod; 4] = [
    pod("pod-e", "10.244.1.4", "node-1"),
    pod("pod-f", "10.244.1.5", "node-1"),
    pod("pod-g", "10.244.2.4", "node-2"),
    pod("pod-h", "10.244.2.5", "node-2"),
];
/// dns's backend, and the one that replaces it (on the other node).
pub const UDP_OLD: Pod = pod("udp-old", "10.244.1.20", "node-1");
pub const UDP_NEW: Pod = pod("udp-new", "10.244.2.20", "node-2");

pub const WEB_PORT: u16 = 8080;
pub const DNS_PORT: u16 = 5353;

/// An endpoint's conditions as the EndpointSlice controller writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// A running, ready pod.
    Ready,
    /// A pod being deleted that still serves (ready=false, serving=true, terminating=true).
    Terminating,
}

pub fn all_pods() -> Vec<Pod> {
    let mut v: Vec<Pod> = WEB_PODS.iter().chain(&NEXT_PODS).copied().collect();
    v.extend([UDP_OLD, UDP_NEW]);
    v
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("constant socket address")
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("constant address")
}

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).expect("static YAML")
}

/// A Service with one port; `node_port` makes it a NodePort Service.
pub fn service(
    name: &str,
    cluster_ip: &str,
    proto: &str,
    port: u16,
    target: u16,
    node_port: Option<u16>,
) -> Value {
    let mut p = Mapping::new();
    p.insert("name".into(), "p".into());
    p.insert("protocol".into(), proto.into());
    p.insert("port".into(), port.into());
    p.insert("targetPort".into(), target.into());
    if let Some(np) = node_port {
        p.insert("nodePort".into(), np.into());
    }
    let mut v = yaml("apiVersion: v1\nkind: Service\nmetadata: {namespace: demo}\nspec: {}");
    v["metadata"]["name"] = name.into();
    v["spec"]["type"] = if node_port.is_some() {
        "NodePort"
    } else {
        "ClusterIP"
    }
    .into();
    v["spec"]["clusterIP"] = cluster_ip.into();
    v["spec"]["clusterIPs"] = Value::Sequence(vec![cluster_ip.into()]);
    v["spec"]["ipFamilies"] = Value::Sequence(vec!["IPv4".into()]);
    v["spec"]["ports"] = Value::Sequence(vec![Value::Mapping(p)]);
    v
}

/// An EndpointSlice `name` of Service `svc` with one port and the given endpoints. Each
/// endpoint: (address, nodeName, pod name for targetRef or None, conditions).
pub fn slice(
    name: &str,
    svc: &str,
    proto: &str,
    port: u16,
    eps: &[(&str, &str, Option<&str>, Cond)],
) -> Value {
    let endpoints = eps
        .iter()
        .map(|(addr, node, pod, cond)| {
            let (ready, terminating) = match cond {
                Cond::Ready => (true, false),
                Cond::Terminating => (false, true),
            };
            let mut e = yaml("conditions: {serving: true}");
            e["addresses"] = Value::Sequence(vec![(*addr).into()]);
            e["conditions"]["ready"] = ready.into();
            e["conditions"]["terminating"] = terminating.into();
            e["nodeName"] = (*node).into();
            if let Some(pod) = pod {
                e["targetRef"] = yaml("{kind: Pod, namespace: demo}");
                e["targetRef"]["name"] = (*pod).into();
            }
            e
        })
        .collect();
    let mut v = yaml(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: demo, labels: {}}\naddressType: IPv4",
    );
    v["metadata"]["name"] = name.into();
    v["metadata"]["labels"]["kubernetes.io/service-name"] = svc.into();
    v["endpoints"] = Value::Sequence(endpoints);
    let mut p = Mapping::new();
    p.insert("name".into(), "p".into());
    p.insert("protocol".into(), proto.into());
    p.insert("port".into(), port.into());
    v["ports"] = Value::Sequence(vec![Value::Mapping(p)]);
    v
}

/// The slice of web and the slice of web-np (same pods) for these pods and conditions.
pub fn web_slices(pods: &[(Pod, Cond)]) -> Vec<Value> {
    let eps: Vec<_> = pods
        .iter()
        .map(|(p, c)| (p.ip, p.node, Some(p.name), *c))
        .collect();
    vec![
        slice("web-1", "web", "TCP", WEB_PORT, &eps),
        slice("web-np-1", "web-np", "TCP", WEB_PORT, &eps),
    ]
}

pub fn dns_slice(p: Pod) -> Value {
    slice(
        "dns-1",
        "dns",
        "UDP",
        DNS_PORT,
        &[(p.ip, p.node, Some(p.name), Cond::Ready)],
    )
}

pub fn services() -> Vec<Value> {
    let (web, np, dns) = (addr(WEB), addr(WEB_NP), addr(DNS));
    vec![
        service(
            "web",
            &web.ip().to_string(),
            "TCP",
            web.port(),
            WEB_PORT,
            None,
        ),
        service("web-np", "10.96.0.11", "TCP", 80, WEB_PORT, Some(np.port())),
        service(
            "dns",
            &dns.ip().to_string(),
            "UDP",
            dns.port(),
            DNS_PORT,
            None,
        ),
    ]
}

/// The scenario the lab is planned from: every pod of every soak scenario in a slice, and the
/// two client sources (a pod and an external client) as packet sources.
pub fn lab_scenario() -> Result<Scenario> {
    let web: Vec<(Pod, Cond)> = WEB_PODS
        .iter()
        .chain(&NEXT_PODS)
        .map(|p| (*p, Cond::Ready))
        .collect();
    let mut slices = web_slices(&web);
    let udp = [UDP_OLD, UDP_NEW]
        .iter()
        .map(|p| (p.ip, p.node, Some(p.name), Cond::Ready))
        .collect::<Vec<_>>();
    slices.push(slice("dns-1", "dns", "UDP", DNS_PORT, &udp));
    let list = |v: Vec<Value>| serde_yaml::to_string(&Value::Sequence(v)).expect("yaml");
    let indent = |s: String| {
        s.lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    };
    let text = format!(
        r#"format_version: 1
scenarios:
  - id: soak
    name: soak
    node: {{name: node-1, ipv4: [192.168.0.2], ipv6: []}}
    cluster:
      ip_family: IPv4
      service_cidrs: [10.96.0.0/16]
      detect_local_mode: ClusterCIDR
      cluster_cidrs: [10.244.0.0/16]
      node_port_addresses: [192.168.0.2/32]
    services:
{}    endpointslices:
{}    packets:
      - {{name: pod to ClusterIP, protocol: TCP, source_ip: {CLIENT_POD}, dest_ip: 10.96.0.10, dest_port: 80,
          expect: {{endpoints: ["10.244.1.2:8080"], masquerade: false}}}}
      - {{name: external to NodePort, protocol: TCP, source_ip: {EXTERNAL}, dest_ip: 192.168.0.2, dest_port: 30080,
          expect: {{endpoints: ["10.244.1.2:8080"], masquerade: true}}}}
"#,
        indent(list(services())),
        indent(list(slices)),
    );
    Ok(scenario::parse(&text).context("soak scenario")?.remove(0))
}

/// What shunt sees at the start of every scenario: the three Services, web and web-np on
/// [`WEB_PODS`], dns on [`UDP_OLD`], the ServiceCIDR and the Node.
pub fn initial_objects(s: &Scenario) -> Vec<Value> {
    let web: Vec<(Pod, Cond)> = WEB_PODS.iter().map(|p| (*p, Cond::Ready)).collect();
    let mut v = services();
    v.extend(web_slices(&web));
    v.push(dns_slice(UDP_OLD));
    v.extend(shunt::cluster_objects(s));
    v
}

/// The file an object lives in: one per object, so an edit replaces exactly that file.
pub fn file_name(obj: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("x").to_owned();
    let kind = s(&obj["kind"]).to_lowercase();
    let md = &obj["metadata"];
    let ns = md.get("namespace").map_or_else(|| "cluster".to_owned(), s);
    format!("{kind}-{ns}-{}.yaml", s(&md["name"]))
}

/// Writes (atomically replaces) each object's file.
pub fn write(dir: &Path, objs: &[Value]) -> Result<()> {
    for o in objs {
        shunt::write_object(dir, &file_name(o), o)?;
    }
    Ok(())
}
