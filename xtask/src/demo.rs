//! `cargo xtask demo`: a two-node netns cluster, shunt on node-1, traffic spread over pods, a
//! live EndpointSlice edit, and traffic following it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::lab::agent::{Answer, Mode};
use crate::lab::netns;
use crate::lab::plan::Plan;
use crate::lab::topology::Lab;
use crate::scenario::{self, Scenario};
use crate::shunt::{self, Cgroup, ProxyMode, Shunt};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "nftables")]
    pub mode: ProxyMode,
    /// shunt binary (default: `cargo build -p shunt`).
    #[arg(long)]
    pub shunt: Option<PathBuf>,
    /// Requests per measurement.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
}

pub(crate) const PODS: [(&str, &str, &str); 4] = [
    ("pod-a", "10.244.1.2", "node-1"),
    ("pod-b", "10.244.1.3", "node-1"),
    ("pod-c", "10.244.2.2", "node-2"),
    ("pod-d", "10.244.2.3", "node-2"),
];
pub(crate) const CLIENT_POD: &str = "10.244.1.100";
pub(crate) const EXTERNAL: &str = "203.0.113.2";
pub(crate) const CLUSTER_IP: &str = "10.96.0.10:80";
pub(crate) const NODE_PORT: &str = "192.168.0.2:30080";

fn slice(name: &str, svc: &str, pods: &[&str]) -> String {
    let mut eps = String::new();
    for (pod, ip, node) in PODS.iter().filter(|p| pods.contains(&p.0)) {
        eps.push_str(&format!(
            "      - addresses: [\"{ip}\"]\n        nodeName: {node}\n        targetRef: {{kind: Pod, namespace: demo, name: {pod}}}\n"
        ));
    }
    format!(
        "    - apiVersion: discovery.k8s.io/v1\n      kind: EndpointSlice\n      metadata:\n        name: {name}\n        namespace: demo\n        labels: {{kubernetes.io/service-name: {svc}}}\n      addressType: IPv4\n      endpoints:\n{eps}      ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

/// The demo cluster as a scenario document, so the lab plans it like any conformance scenario.
pub(crate) fn demo_scenario(pods: &[&str]) -> Result<Scenario> {
    let text = format!(
        r#"format_version: 1
scenarios:
  - id: demo
    name: demo
    node: {{name: node-1, ipv4: [192.168.0.2], ipv6: []}}
    cluster:
      ip_family: IPv4
      service_cidrs: [10.96.0.0/16]
      detect_local_mode: ClusterCIDR
      cluster_cidrs: [10.244.0.0/16]
      node_port_addresses: [192.168.0.2/32]
    services:
      - apiVersion: v1
        kind: Service
        metadata: {{name: web, namespace: demo}}
        spec:
          type: ClusterIP
          clusterIP: 10.96.0.10
          ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
      - apiVersion: v1
        kind: Service
        metadata: {{name: web-np, namespace: demo}}
        spec:
          type: NodePort
          clusterIP: 10.96.0.11
          ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}]
    endpointslices:
{}{}    packets:
      - {{name: pod to ClusterIP, protocol: TCP, source_ip: {CLIENT_POD}, dest_ip: 10.96.0.10, dest_port: 80,
          expect: {{endpoints: ["10.244.1.2:8080"], masquerade: false}}}}
      - {{name: external to NodePort, protocol: TCP, source_ip: {EXTERNAL}, dest_ip: 192.168.0.2, dest_port: 30080,
          expect: {{endpoints: ["10.244.1.2:8080"], masquerade: true}}}}
"#,
        slice("web-1", "web", pods),
        slice("web-np-1", "web-np", pods)
    );
    Ok(scenario::parse(&text).context("demo scenario")?.remove(0))
}

fn spread(lab: &Lab, src: IpAddr, dst: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
    crate::lab::check_interrupted()?;
    let ns = lab.ns_of(src).path();
    netns::in_netns(&ns, || {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let who = match shunt::http_get(dst, "/") {
                Ok((200, body)) => {
                    Answer::parse(&body).map_or_else(|| "bad answer".to_owned(), |a| a.name)
                }
                Ok((code, _)) => format!("HTTP {code}"),
                Err(e) => format!("error: {}", e.root_cause()),
            };
            *counts.entry(who).or_insert(0) += 1;
        }
        Ok(counts)
    })
}

fn show(title: &str, counts: &BTreeMap<String, usize>) {
    println!("  {title}");
    for (who, n) in counts {
        println!("    {who:<12} {:<32} {n}", "#".repeat(*n));
    }
}

fn write_slices(s: &Scenario, dir: &Path) -> Result<()> {
    for obj in &s.endpointslices {
        let name = obj["metadata"]["name"].as_str().unwrap_or("slice");
        shunt::write_object(dir, &format!("demo-endpointslice-{name}.yaml"), obj)?;
    }
    Ok(())
}

pub fn run(a: &Args) -> Result<bool> {
    let bin = match &a.shunt {
        Some(p) => p.clone(),
        None => shunt::build()?,
    };
    let before = demo_scenario(&["pod-a", "pod-b", "pod-c"])?;
    let after = demo_scenario(&["pod-b", "pod-c", "pod-d"])?;
    let all = demo_scenario(&["pod-a", "pod-b", "pod-c", "pod-d"])?;
    let names: BTreeMap<IpAddr, String> = PODS
        .iter()
        .map(|(n, ip, _)| (ip.parse().expect("constant"), (*n).to_owned()))
        .collect();
    println!("shunt demo ({} mode)", a.mode.flag());
    println!("  building a two-node network-namespace cluster ...");
    let mut lab = Lab::build_named(Plan::new(&all)?, &names, Mode::Http)?;
    for (pod, ip, node) in PODS {
        println!("    {node}  {pod}  {ip}:8080 (HTTP server answering with its name)");
    }
    println!("    Service demo/web     ClusterIP {CLUSTER_IP} -> pods :8080");
    println!("    Service demo/web-np  NodePort  {NODE_PORT} -> pods :8080");

    let dir = tempfile::Builder::new().prefix("shunt-demo-").tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    for obj in before
        .services
        .iter()
        .cloned()
        .chain(shunt::cluster_objects(&before))
    {
        let kind = obj["kind"].as_str().unwrap_or("x").to_lowercase();
        let name = obj["metadata"]["name"].as_str().unwrap_or("x").to_owned();
        shunt::write_object(&manifests, &format!("demo-{kind}-{name}.yaml"), &obj)?;
    }
    write_slices(&before, &manifests)?;
    println!("  manifests in {}", manifests.display());

    let cgroup = if a.mode == ProxyMode::Ebpf {
        Some(Cgroup::create("demo")?)
    } else {
        None
    };
    lab.probe_cgroup = cgroup.as_ref().map(|c| c.path.clone());
    let args = shunt::args(
        &before,
        a.mode,
        &manifests,
        cgroup.as_ref().map(|c| c.path.as_path()),
    );
    println!("  starting shunt on node-1: shunt {}", args.join(" "));
    let started = Instant::now();
    let mut proc = Shunt::start(&bin, &lab.node, &args, a.mode, dir.path())?;
    proc.wait_healthy(Duration::from_secs(30))?;
    println!(
        "  /healthz answered 200 after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let client: IpAddr = CLIENT_POD.parse()?;
    let ext: IpAddr = EXTERNAL.parse()?;
    let (cip, np): (SocketAddr, SocketAddr) = (CLUSTER_IP.parse()?, NODE_PORT.parse()?);
    let n = a.requests;
    show(
        &format!("{n} requests from pod {client} to ClusterIP {cip}:"),
        &spread(&lab, client, cip, n)?,
    );
    show(
        &format!("{n} requests from external {ext} to NodePort {np}:"),
        &spread(&lab, ext, np, n)?,
    );

    println!("  editing the EndpointSlices live: removing pod-a, adding pod-d ...");
    write_slices(&after, &manifests)?;
    let edited = Instant::now();
    let limit = Duration::from_secs(30);
    let mut followed = false;
    while edited.elapsed() < limit {
        let c = spread(&lab, client, cip, 8)?;
        if !c.contains_key("pod-a")
            && c.contains_key("pod-d")
            && c.keys().all(|k| k.starts_with("pod-"))
        {
            followed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if followed {
        println!(
            "  traffic followed the edit after {:.1} s",
            edited.elapsed().as_secs_f64()
        );
    } else {
        println!("  traffic did NOT follow the edit within {limit:?}");
    }
    show(
        &format!("{n} requests from pod {client} to ClusterIP {cip}:"),
        &spread(&lab, client, cip, n)?,
    );
    show(
        &format!("{n} requests from external {ext} to NodePort {np}:"),
        &spread(&lab, ext, np, n)?,
    );

    let st = proc.stop()?;
    println!("  shunt stopped with SIGTERM ({st}); tearing the cluster down");
    drop(proc);
    drop(cgroup);
    drop(lab);
    Ok(followed)
}
