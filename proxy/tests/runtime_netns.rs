//! The binary contract end to end, inside a network namespace this test creates and always
//! deletes: start shunt in nftables mode on a manifest directory, wait for /healthz 200,
//! read /metrics, SIGTERM it (exit 0, rules stay), then `--cleanup` (everything shunt made is
//! gone, nothing else).
//!
//! Needs root, `ip` and `nft`; skips (printing why) otherwise.
use std::io::Write as _;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn in_ns(ns: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd.output().expect("ip netns exec")
}

fn must(ns: &str, args: &[&str]) -> String {
    let out = in_ns(ns, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Plain HTTP GET inside the namespace with curl: (status, body).
fn http_get(ns: &str, url: &str) -> Option<(u16, String)> {
    let out = in_ns(ns, &["curl", "-s", "-m", "2", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

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
---
apiVersion: v1
kind: Service
metadata:
  namespace: default
  name: web
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10"]
  ipFamilies: ["IPv4"]
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: default
  name: web-1
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: ["10.244.0.5"]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node1
ports:
- name: http
  port: 8080
  protocol: TCP
"#;

#[test]
fn run_sigterm_keeps_rules_cleanup_removes_them() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to create a network namespace");
        return;
    }
    if !tool("ip") || !tool("nft") || !tool("curl") {
        eprintln!("skipping: needs ip, nft and curl");
        return;
    }
    let ns = Netns(format!("shunt-rt-{}", std::process::id()));
    let st = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap();
    assert!(st.success(), "ip netns add failed");
    must(&ns.0, &["ip", "link", "set", "lo", "up"]);
    // The node address lives on lo: no extra link type (dummy, veth) is needed.
    must(&ns.0, &["ip", "addr", "add", "10.0.0.2/32", "dev", "lo"]);

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
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
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

    let mut healthy = None;
    for _ in 0..150 {
        if let Some(st) = running.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("shunt exited before /healthz answered 200: {st}");
        }
        if let Some((200, body)) = http_get(&ns.0, "http://127.0.0.1:10256/healthz") {
            healthy = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = healthy.expect("/healthz never answered 200");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
    let (code, metrics) = http_get(&ns.0, "http://127.0.0.1:10249/metrics").unwrap();
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
