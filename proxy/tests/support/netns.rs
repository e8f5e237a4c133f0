//! What the integration tests that run the shunt binary inside a network namespace of their
//! own share: the namespace (deleted on drop, also after a failed assertion), the child
//! process (killed and reaped on drop), commands and sockets inside the namespace, and the
//! bounded wait for `/healthz` 200. Included with `#[path]` by each test binary, which uses
//! part of it.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::AsFd as _;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// shunt's `--healthz-bind-address` in these tests.
pub const HEALTHZ: &str = "127.0.0.1:10256";
/// shunt's `--metrics-bind-address` in these tests.
pub const METRICS: &str = "127.0.0.1:10249";

/// A network namespace this test created; `ip netns del` on drop.
pub struct Netns(pub String);

impl Netns {
    /// `shunt-TAG-PID` with `lo` up and `addrs` on `lo` (a node address needs no other link
    /// type), or None, printing why, when not root or a tool in `tools` is missing.
    pub fn create(tag: &str, tools: &[&str], addrs: &[&str]) -> Option<Netns> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to create a network namespace");
            return None;
        }
        if let Some(t) = ["ip"].iter().chain(tools).find(|t| !tool(t)) {
            eprintln!("skipping: needs {t}");
            return None;
        }
        let ns = Netns(format!("shunt-{tag}-{}", std::process::id()));
        let st = Command::new("ip").args(["netns", "add", &ns.0]).status();
        assert!(st.is_ok_and(|s| s.success()), "ip netns add {}", ns.0);
        must(&ns.0, &["ip", "link", "set", "lo", "up"]);
        for a in addrs {
            must(&ns.0, &["ip", "addr", "add", a, "dev", "lo"]);
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process, killed and reaped on drop unless taken out.
pub struct Running(pub Option<Child>);

impl Running {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the process was already taken out")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `name` runs (`-V` or `--version` succeeds).
pub fn tool(name: &str) -> bool {
    ["-V", "--version"].iter().any(|f| {
        Command::new(name)
            .arg(f)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `ip netns exec NS ARGS...`.
pub fn in_ns(ns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec")
}

/// [`in_ns`] that must succeed; its stdout.
pub fn must(ns: &str, args: &[&str]) -> String {
    let out = in_ns(ns, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `f` on a thread that joined namespace `ns` (sockets stay in the namespace they were
/// created in).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// `GET path` over HTTP/1.0 to `addr` inside the namespace: (status, body), None when
/// nothing answered.
pub fn http_get(ns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    in_netns(ns, || {
        let mut c = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        let (head, body) = s.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    })
}

/// Polls `/healthz` until it answers 200 (its body) or `limit` passes; Err says why (shunt
/// exited, or the time ran out).
pub fn wait_healthy(ns: &str, running: &mut Running, limit: Duration) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = running.child().try_wait().expect("try_wait") {
            return Err(format!("shunt exited before /healthz answered 200: {st}"));
        }
        if let Some((200, body)) = http_get(ns, HEALTHZ, "/healthz") {
            return Ok(body);
        }
        if Instant::now() >= deadline {
            return Err(format!("/healthz never answered 200 within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `limit` for `child` to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Node `node1` (10.0.0.2), the ServiceCIDR `kubernetes` (10.96.0.0/16) and ClusterIP Service
/// default/web 10.96.0.10:80 with one endpoint, 10.244.0.5:8080 on node1.
pub const MANIFESTS: &str = r#"
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
