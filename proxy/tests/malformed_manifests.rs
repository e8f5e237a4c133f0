//! Bad input end to end: the committed corpus of malformed objects (tests/fixtures/malformed:
//! invalid IPs, port 0, an unknown protocol, garbage YAML, wrong types, huge values, a
//! non-object, a missing name) beside valid Services, read by the shunt binary from
//! `--manifests` inside a network namespace this test creates and always deletes.
//!
//! Each malformed file must be skipped with exactly one warning that names the file (and the
//! object, when the document says which one it is), nothing of it may reach the kernel, and
//! the valid Services must still carry traffic: a connection from the node to each ClusterIP
//! is DNATed to its endpoint (an address on the namespace's `lo` with a listener), and the
//! valid Service whose only slice is malformed has no endpoint, so it does not answer.
//!
//! Needs root, `ip` and `nft`; skips (printing why) otherwise.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "support/netns.rs"]
mod netns;
use netns::{HEALTHZ, METRICS, Netns, Running, in_netns, must, wait_exit, wait_healthy};

/// Valid objects: the Node, the ServiceCIDR, and two Services with one endpoint each.
const GOOD: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
status:
  addresses: [{type: InternalIP, address: 10.0.0.2}]
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: ["10.96.0.0/16"]}
---
apiVersion: v1
kind: Service
metadata: {namespace: good, name: web}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports: [{name: p, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: good
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: ["10.244.0.5"]
  conditions: {ready: true}
  nodeName: node1
ports: [{name: p, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {namespace: good, name: api}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  ports: [{name: p, port: 443, protocol: TCP, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: good
  name: api-1
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
endpoints:
- addresses: ["10.244.0.6"]
  conditions: {ready: true}
  nodeName: node1
ports: [{name: p, port: 8443, protocol: TCP}]
"#;

/// Malformed files: (file, object name the warning must carry, if the document names one,
/// an address of it that must not reach the kernel, if any).
const MALFORMED: [(&str, Option<&str>, Option<&str>); 12] = [
    ("garbage.yaml", None, None),
    (
        "huge-node-port.yaml",
        Some("bad/huge-node-port"),
        Some("10.96.1.7"),
    ),
    ("huge-port.yaml", Some("bad/huge-port"), Some("10.96.1.6")),
    (
        "huge-slice-port.yaml",
        Some("bad/huge-slice-port"),
        Some("10.244.0.7"),
    ),
    (
        "invalid-cluster-ip.yaml",
        Some("bad/invalid-cluster-ip"),
        None,
    ),
    (
        "invalid-endpoint-ip.yaml",
        Some("bad/invalid-endpoint-ip"),
        None,
    ),
    ("missing-name.yaml", None, Some("10.96.1.8")),
    ("not-an-object.json", None, None),
    ("port-zero.yaml", Some("bad/port-zero"), Some("10.96.1.2")),
    (
        "unknown-protocol.yaml",
        Some("bad/unknown-protocol"),
        Some("10.96.1.3"),
    ),
    (
        "wrong-port-type.yaml",
        Some("bad/wrong-port-type"),
        Some("10.96.1.5"),
    ),
    (
        "wrong-types.yaml",
        Some("bad/wrong-types"),
        Some("10.96.1.4"),
    ),
];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/malformed")
}

/// tracing's output with its ANSI styling removed.
fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A listener on `addr` inside the namespace answering "ok" to each connection, until the
/// returned flag is set (accept polls it every 100 ms).
fn serve(
    ns: &str,
    addr: SocketAddr,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let l = in_netns(ns, || TcpListener::bind(addr).expect("bind endpoint"));
    l.set_nonblocking(true).expect("nonblocking");
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let _ = c.write_all(b"ok\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    (stop, t)
}

fn get(ns: &str, addr: SocketAddr) -> Result<String, std::io::ErrorKind> {
    in_netns(ns, || {
        let mut c =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.kind())?;
        c.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.kind())?;
        let mut s = String::new();
        c.read_to_string(&mut s).map_err(|e| e.kind())?;
        Ok(s)
    })
}

#[test]
fn malformed_objects_are_skipped_with_one_warning_each() {
    let Some(ns) = Netns::create(
        "bad",
        &["nft"],
        &["10.0.0.2/32", "10.244.0.5/32", "10.244.0.6/32"],
    ) else {
        return;
    };
    // A route for the ClusterIPs: the output route lookup precedes the DNAT (which reroutes
    // to the local endpoint address).
    must(&ns.0, &["ip", "route", "add", "10.96.0.0/16", "dev", "lo"]);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00-good.yaml"), GOOD).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    for f in &files {
        std::fs::copy(corpus().join(f), dir.path().join(f)).unwrap();
    }
    // The corpus and the table agree: every malformed file is checked, and the only other
    // file is the valid Service whose slice is malformed.
    let listed: Vec<&str> = MALFORMED.iter().map(|m| m.0).collect();
    let others: Vec<&String> = files
        .iter()
        .filter(|f| !listed.contains(&f.as_str()))
        .collect();
    assert_eq!(
        others,
        ["has-bad-slice.yaml"],
        "corpus files not in MALFORMED"
    );

    let log = dir.path().join("shunt.log");
    let bin = env!("CARGO_BIN_EXE_shunt");
    let mut args: Vec<String> = [
        "--proxy-mode",
        "nftables",
        "--manifests",
        dir.path().to_str().unwrap(),
        "--hostname-override",
        "node1",
        "--detect-local-mode",
        "None",
        "--nodeport-addresses",
        "10.0.0.2/32",
        "--healthz-bind-address",
        HEALTHZ,
        "--metrics-bind-address",
        METRICS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, bin])
        .args(&args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut running = Running(Some(child));

    if let Err(e) = wait_healthy(&ns.0, &mut running, Duration::from_secs(30)) {
        panic!(
            "{e}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    let text = plain(&std::fs::read_to_string(&log).unwrap());
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    for (file, object, _) in MALFORMED {
        let about: Vec<&&str> = warnings
            .iter()
            .filter(|l| l.contains(&format!("/{file}")))
            .collect();
        assert_eq!(
            about.len(),
            1,
            "{file}: want exactly one warning, got {about:?}"
        );
        if let Some(name) = object {
            assert!(
                about[0].contains(name),
                "{file}: warning does not name {name}: {}",
                about[0]
            );
        }
    }
    assert_eq!(
        warnings.len(),
        MALFORMED.len(),
        "warnings beyond one per malformed file: {warnings:#?}"
    );

    let rules = must(&ns.0, &["nft", "list", "table", "ip", "shunt"]);
    for (file, _, addr) in MALFORMED {
        if let Some(a) = addr {
            assert!(!rules.contains(a), "{file}: {a} reached the kernel");
        }
    }
    for a in [
        "10.96.0.10",
        "10.96.0.11",
        "10.244.0.5",
        "10.244.0.6",
        "10.96.1.9",
    ] {
        assert!(rules.contains(a), "{a} missing from the rules");
    }

    // The valid Services carry traffic; the one whose only slice is malformed refuses.
    let servers = [
        serve(&ns.0, "10.244.0.5:8080".parse().unwrap()),
        serve(&ns.0, "10.244.0.6:8443".parse().unwrap()),
    ];
    let web = get(&ns.0, "10.96.0.10:80".parse().unwrap());
    let api = get(&ns.0, "10.96.0.11:443".parse().unwrap());
    let no_eps = get(&ns.0, "10.96.1.9:80".parse().unwrap());
    for (stop, t) in servers {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        t.join().unwrap();
    }
    assert_eq!(web, Ok("ok\n".to_owned()), "good/web");
    assert_eq!(api, Ok("ok\n".to_owned()), "good/api");
    // No endpoint: rejected (a refusal, or a timeout on this loopback-only topology, where
    // the reset's non-local source does not route back); never answered.
    assert!(no_eps.is_err(), "bad/has-bad-slice answered: {no_eps:?}");

    // Stop and clean up (the namespace goes anyway; this keeps the test's own footprint zero).
    let child = running.0.as_mut().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_exit(child, Duration::from_secs(10)).expect("shunt ignored SIGTERM");
    running.0 = None;
    args.push("--cleanup".into());
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, bin])
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "--cleanup: {out:?}");
}
