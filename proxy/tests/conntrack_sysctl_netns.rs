//! kube-proxy's conntrack flags end to end in nftables mode: shunt, started inside a network
//! namespace this test creates and always deletes, sets the per-namespace nf_conntrack
//! sysctls there, leaves the global nf_conntrack_max alone (it cannot be set outside the
//! initial namespace: one log line, shunt goes on), and the root namespace is untouched.
//!
//! Needs root, `ip` and `nft`, and nf_conntrack loaded; skips (printing why) otherwise.
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "support/netns.rs"]
mod netns;
use netns::{HEALTHZ, METRICS, Netns, Running, must, wait_healthy};

const SYSCTLS: [&str; 6] = [
    "nf_conntrack_max",
    "nf_conntrack_tcp_timeout_established",
    "nf_conntrack_tcp_timeout_close_wait",
    "nf_conntrack_tcp_be_liberal",
    "nf_conntrack_udp_timeout",
    "nf_conntrack_udp_timeout_stream",
];

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node1
status:
  addresses:
  - type: InternalIP
    address: 10.0.0.2
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata:
  name: kubernetes
spec:
  cidrs: ["10.96.0.0/16"]
"#;

#[test]
fn nftables_mode_sets_the_node_namespace_conntrack_sysctls() {
    let dir = std::path::Path::new("/proc/sys/net/netfilter");
    if !dir.join("nf_conntrack_udp_timeout").exists() {
        eprintln!("skipping: nf_conntrack is not loaded");
        return;
    }
    let Some(ns) = Netns::create("ctsysctl", &["nft"], &["10.0.0.2/32"]) else {
        return;
    };
    let root = || SYSCTLS.map(|n| std::fs::read_to_string(dir.join(n)).unwrap());
    let in_ns = |ns: &str| {
        SYSCTLS.map(|n| {
            must(ns, &["cat", &format!("/proc/sys/net/netfilter/{n}")])
                .trim()
                .to_string()
        })
    };
    let root_before = root();
    let ns_before = in_ns(&ns.0);

    let mdir = tempfile::tempdir().unwrap();
    std::fs::File::create(mdir.path().join("objects.yaml"))
        .unwrap()
        .write_all(MANIFESTS.as_bytes())
        .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_shunt")])
        .args(["--proxy-mode", "nftables", "--manifests"])
        .arg(mdir.path())
        .args([
            "--hostname-override",
            "node1",
            "--detect-local-mode",
            "None",
            "--nodeport-addresses",
            "10.0.0.0/24",
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
            "--conntrack-max-per-core",
            "1048576",
            "--conntrack-tcp-timeout-established=7h",
            "--conntrack-tcp-timeout-close-wait=1234s",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=47s",
            "--conntrack-udp-timeout-stream=2m50s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut running = Running(Some(child));
    wait_healthy(&ns.0, &mut running, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    let after = in_ns(&ns.0);
    assert_eq!(
        after[0], ns_before[0],
        "nf_conntrack_max is global: not set here"
    );
    assert_eq!(after[1..], ["25200", "1234", "1", "47", "170"]);
    drop(running);
    assert_eq!(root(), root_before, "the root namespace was changed");
}
