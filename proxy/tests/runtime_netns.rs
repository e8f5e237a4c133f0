//! The binary contract end to end, inside a network namespace this test creates and always
//! deletes: start shunt in nftables mode on a manifest directory, wait for /healthz 200,
//! read /metrics, SIGTERM it (exit 0, rules stay), then `--cleanup` (everything shunt made is
//! gone, nothing else).
//!
//! Needs root, `ip` and `nft`; skips (printing why) otherwise.
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "support/netns.rs"]
mod netns;
use netns::{
    HEALTHZ, MANIFESTS, METRICS, Netns, Running, http_get, in_ns, must, wait_exit, wait_healthy,
};

#[test]
fn run_sigterm_keeps_rules_cleanup_removes_them() {
    // The node address lives on lo: no extra link type (dummy, veth) is needed.
    let Some(ns) = Netns::create("rt", &["nft"], &["10.0.0.2/32"]) else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("objects.yaml"))
        .unwrap()
        .write_all(MANIFESTS.as_bytes())
        .unwrap();
    let tables_before = must(&ns.0, &["nft", "list", "tables"]);

    let bin = env!("CARGO_BIN_EXE_shunt");
    let args = |cleanup: bool| {
        let mut a: Vec<String> = [
            bin,
            "--proxy-mode",
            "nftables",
            "--manifests",
            dir.path().to_str().unwrap(),
            "--hostname-override",
            "node1",
            "--detect-local-mode",
            "ClusterCIDR",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--nodeport-addresses",
            "10.0.0.0/24",
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if cleanup {
            a.push("--cleanup".into());
        }
        a
    };
    // `ip netns exec` execs the command in place, so the child's pid is shunt's.
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .args(args(false))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut running = Running(Some(child));

    let body = wait_healthy(&ns.0, &mut running, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
    let (code, metrics) = http_get(&ns.0, METRICS, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"));
    assert!(metrics.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1"));

    let tables_running = must(&ns.0, &["nft", "list", "tables"]);
    assert_ne!(tables_running, tables_before, "shunt created no table");

    let child = running.0.as_mut().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(child, Duration::from_secs(10)).expect("shunt ignored SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    running.0 = None;
    assert_eq!(
        must(&ns.0, &["nft", "list", "tables"]),
        tables_running,
        "SIGTERM must leave the rules in place"
    );

    let a = args(true);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = in_ns(&ns.0, &a);
    assert!(
        out.status.success(),
        "--cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(must(&ns.0, &["nft", "list", "tables"]), tables_before);
}
