//! The bench cluster: a small lab scenario (the real pods) plus generated scale manifests.
//!
//! Only three pod namespaces are real: `pod-a` serves the probed Service, `pod-b` the Services
//! the control-plane figure changes, and a client pod. The N scale Services point at 10
//! addresses each inside 10.128.0.0/9 on another node that nobody answers on: shunt programs
//! them like any endpoint, which is all the control-plane cost and the rule walk need.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::scenario::{self, Scenario};
use crate::shunt;

pub const NODE: &str = "node-1";
pub const CLIENT: &str = "10.244.1.100";
/// The probed Service's only endpoint (HTTP on 8080, iperf3 on 5201).
pub const POD_A: (&str, &str) = ("pod-a", "10.244.1.2");
/// The endpoint the control-plane changes add, remove and point new Services at.
pub const POD_B: (&str, &str) = ("pod-b", "10.244.1.3");
pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// The probed Service. Its namespace sorts after the scale Services' namespace, and `web`
/// after `added-*` and `change`: shunt's iptables plan emits the nat `SHUNT-SERVICES` dispatch
/// rules in the model's `BTreeMap<ServicePortName, _>` order (namespace, name, port), so every
/// packet to this VIP walks past every other Service's rules first (the worst case).
pub const PROBE_NS: &str = "zz-bench";
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CHANGE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Scale Services take 10.96.128.1 onwards (up to 32,766 of them).
const SCALE_BASE: u32 = u32::from_be_bytes([10, 96, 128, 1]);
const SCALE_EP_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
pub const MAX_SERVICES: usize = 32_000;
/// Services the "Service added" change creates: 10.96.1.1 .. 10.96.1.250.
pub const MAX_ADDED: usize = 250;

pub fn web_vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(WEB_VIP), 80)
}
pub fn web_direct() -> SocketAddr {
    SocketAddr::new(POD_A.1.parse().expect("constant"), HTTP_PORT)
}
pub fn change_vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(CHANGE_VIP), 80)
}
pub fn added_vip(k: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 1, 1 + k as u8)), 80)
}

/// The lab part as a scenario document, planned like any conformance scenario (pods, client,
/// node address, contract command line). The scale objects are not part of it.
pub fn lab_scenario() -> Result<Scenario> {
    let (a, aip) = POD_A;
    let (b, bip) = POD_B;
    let text = format!(
        r#"format_version: 1
scenarios:
  - id: bench
    name: bench
    node: {{name: {NODE}, ipv4: [192.168.0.2], ipv6: []}}
    cluster:
      ip_family: IPv4
      service_cidrs: [10.96.0.0/16]
      detect_local_mode: ClusterCIDR
      cluster_cidrs: [10.244.0.0/16]
      node_port_addresses: [192.168.0.2/32]
    services:
      - apiVersion: v1
        kind: Service
        metadata: {{name: web, namespace: {PROBE_NS}}}
        spec: {{type: ClusterIP, clusterIP: {WEB_VIP}, ports: [{{name: http, protocol: TCP, port: 80, targetPort: {HTTP_PORT}}}]}}
    endpointslices:
      - apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {{name: web-1, namespace: {PROBE_NS}, labels: {{kubernetes.io/service-name: web}}}}
        addressType: IPv4
        endpoints:
          - {{addresses: ["{aip}"], nodeName: {NODE}, targetRef: {{kind: Pod, namespace: {PROBE_NS}, name: {a}}}}}
          - {{addresses: ["{bip}"], nodeName: {NODE}, targetRef: {{kind: Pod, namespace: {PROBE_NS}, name: {b}}}}}
        ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
    packets:
      - {{name: client to web, protocol: TCP, source_ip: {CLIENT}, dest_ip: {WEB_VIP}, dest_port: 80,
          expect: {{endpoints: ["{aip}:{HTTP_PORT}", "{bip}:{HTTP_PORT}"], masquerade: false}}}}
"#
    );
    Ok(scenario::parse(&text)
        .context("bench lab scenario")?
        .remove(0))
}

fn service(ns: &str, name: &str, vip: Ipv4Addr, ports: &[(&str, u16, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, port, target)| json!({"name": n, "protocol": "TCP", "port": port, "targetPort": target}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": vip.to_string(), "ports": ports},
    })
}

fn slice(ns: &str, svc: &str, eps: &[(String, &str)], ports: &[(&str, u16)]) -> Value {
    let eps: Vec<Value> = eps
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node}))
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": eps, "ports": ports,
    })
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// Atomic replace (rename), so the manifest watcher never reads half a file.
pub fn write_json(dir: &Path, file: &str, v: &Value) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(v)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("renaming {file}"))
}

/// One Service `scale/svcI` with `endpoints` remote endpoints nobody answers on.
fn scale_pair(i: usize, endpoints: usize) -> [Value; 2] {
    let vip = Ipv4Addr::from(SCALE_BASE + i as u32);
    let name = format!("svc{i}");
    let eps: Vec<(String, &str)> = (0..endpoints)
        .map(|j| {
            let ip = Ipv4Addr::from(SCALE_EP_BASE + (i * 16 + j) as u32);
            (ip.to_string(), "node-2")
        })
        .collect();
    [
        service("bench-scale", &name, vip, &[("http", 80, HTTP_PORT)]),
        slice("bench-scale", &name, &eps, &[("http", HTTP_PORT)]),
    ]
}

/// The `change` Service's slice: pod-b as its one endpoint, or none.
pub fn change_slice(with_endpoint: bool) -> Value {
    let eps = if with_endpoint {
        vec![(POD_B.1.to_owned(), NODE)]
    } else {
        vec![]
    };
    list(vec![
        service(PROBE_NS, "change", CHANGE_VIP, &[("http", 80, HTTP_PORT)]),
        slice(PROBE_NS, "change", &eps, &[("http", HTTP_PORT)]),
    ])
}

/// The k-th Service the "Service added" change creates, already with pod-b as endpoint.
pub fn added_service(k: usize) -> Value {
    let name = format!("added-{k}");
    let ip = match added_vip(k).ip() {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => unreachable!("IPv4 constant"),
    };
    list(vec![
        service(PROBE_NS, &name, ip, &[("http", 80, HTTP_PORT)]),
        slice(
            PROBE_NS,
            &name,
            &[(POD_B.1.to_owned(), NODE)],
            &[("http", HTTP_PORT)],
        ),
    ])
}

/// Writes the whole directory: ServiceCIDR + Node, `services` scale Services × `endpoints`
/// (1,000 per file, so a change never rewrites a big file), the probed Service (HTTP and
/// iperf3 ports on pod-a) and the `change` Service (starting without endpoint).
pub fn write_all(s: &Scenario, dir: &Path, services: usize, endpoints: usize) -> Result<()> {
    anyhow::ensure!(
        services <= MAX_SERVICES && endpoints <= 16,
        "at most {MAX_SERVICES} Services × 16 endpoints (address plan of bench/cluster.rs)"
    );
    for (i, obj) in shunt::cluster_objects(s).iter().enumerate() {
        shunt::write_object(dir, &format!("cluster-{i}.yaml"), obj)?;
    }
    for chunk in (0..services).step_by(1000) {
        let items: Vec<Value> = (chunk..(chunk + 1000).min(services))
            .flat_map(|i| scale_pair(i, endpoints))
            .collect();
        write_json(
            dir,
            &format!("scale-{:03}.json", chunk / 1000),
            &list(items),
        )?;
    }
    let web = list(vec![
        service(
            PROBE_NS,
            "web",
            WEB_VIP,
            &[("http", 80, HTTP_PORT), ("iperf", IPERF_PORT, IPERF_PORT)],
        ),
        slice(
            PROBE_NS,
            "web",
            &[(POD_A.1.to_owned(), NODE)],
            &[("http", HTTP_PORT), ("iperf", IPERF_PORT)],
        ),
    ]);
    write_json(dir, "probe-web.json", &web)?;
    write_json(dir, "probe-change.json", &change_slice(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_directory() {
        let s = lab_scenario().unwrap();
        let d = tempfile::tempdir().unwrap();
        write_all(&s, d.path(), 2500, 10).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "cluster-0.yaml",
                "cluster-1.yaml",
                "probe-change.json",
                "probe-web.json",
                "scale-000.json",
                "scale-001.json",
                "scale-002.json"
            ]
        );
        let last: Value =
            serde_json::from_slice(&std::fs::read(d.path().join("scale-002.json")).unwrap())
                .unwrap();
        let items = last["items"].as_array().unwrap();
        assert_eq!(items.len(), 1000); // 500 Services + 500 slices
        assert_eq!(items[998]["metadata"]["name"], "svc2499");
        assert_eq!(items[998]["spec"]["clusterIP"], "10.96.137.196");
        let eps = items[999]["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 10);
        assert_eq!(eps[9]["addresses"][0], "10.128.156.57");
        // The scale Services sort before the probed one (iptables dispatch order).
        assert!("bench-scale" < PROBE_NS);
        assert_eq!(change_slice(false)["items"][1]["endpoints"], json!([]));
        assert_eq!(added_vip(249).to_string(), "10.96.1.250:80");
    }
}
