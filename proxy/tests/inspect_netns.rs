//! `shunt inspect` and `shunt trace` against a running shunt, end to end, in a network
//! namespace this test creates and always deletes: nothing programmed is a clear error;
//! then shunt runs in nftables mode, then in iptables mode, on a manifest directory, and
//! the subcommands must show what it programmed (JSON that round-trips) and give each
//! packet's verdict. Needs root, `ip`, `nft` and `iptables`; skips otherwise.
//! ebpf mode: a dual-stack plan written into maps pinned on a private bpffs, then read
//! through the binary (`inspect services|conntrack|counters`, `trace`) in both families.
use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use shunt::inspect::view::{FrontendKind, NoEndpoints};
use shunt::inspect::{Fate, Inspected, TraceResult};

#[path = "support/netns.rs"]
mod netns;
use netns::{HEALTHZ, METRICS, Netns, Running, in_ns, must, wait_healthy};

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
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10"]
  ipFamilies: ["IPv4"]
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: 30080
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
---
apiVersion: v1
kind: Service
metadata:
  namespace: default
  name: empty
spec:
  type: ClusterIP
  clusterIP: 10.96.0.11
  clusterIPs: ["10.96.0.11"]
  ipFamilies: ["IPv4"]
  ports:
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 53
"#;

fn shunt_args(mode: &str, dir: &str, cleanup: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        env!("CARGO_BIN_EXE_shunt"),
        "--proxy-mode",
        mode,
        "--manifests",
        dir,
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
}

fn shunt(ns: &str, args: &[&str]) -> Output {
    let mut a = vec![env!("CARGO_BIN_EXE_shunt")];
    a.extend_from_slice(args);
    in_ns(ns, &a)
}

fn json<T: serde::de::DeserializeOwned>(ns: &str, args: &[&str]) -> T {
    let out = shunt(ns, args);
    assert!(
        out.status.success(),
        "shunt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "shunt {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn trace(ns: &str, src: &str, dst: &str, proto: &str) -> BTreeSet<Fate> {
    let t: TraceResult = json(
        ns,
        &[
            "trace", "--src", src, "--dst", dst, "--proto", proto, "-o", "json",
        ],
    );
    assert!(!t.why.is_empty());
    t.fates
}

fn check_mode(ns: &str, mode: &str, dir: &str) {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(shunt_args(mode, dir, false))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(Some(child));
    if let Err(e) = wait_healthy(ns, &mut running, Duration::from_secs(20)) {
        panic!("{mode}: {e}");
    }

    let doc: Inspected = json(ns, &["inspect", "services", "-o", "json"]);
    assert_eq!(doc.mode, mode);
    let back: Inspected = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
    assert_eq!(back, doc, "JSON round trip");
    let v4 = doc
        .families
        .iter()
        .find(|f| f.family == "ipv4")
        .expect("ipv4");
    let ep: BTreeSet<SocketAddr> = ["10.244.0.5:8080".parse().unwrap()].into();
    let cip = v4
        .frontends
        .iter()
        .find(|f| {
            f.kind == FrontendKind::ClusterIp && f.address == Some("10.96.0.10".parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{mode}: web's ClusterIP in {:#?}", v4.frontends));
    assert_eq!(cip.service.as_deref(), Some("default/web:http"));
    assert_eq!(
        (cip.port, &cip.endpoints, cip.affinity_seconds),
        (80, &ep, Some(600))
    );
    let np = v4
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::NodePort)
        .unwrap_or_else(|| panic!("{mode}: NodePort in {:#?}", v4.frontends));
    assert_eq!((np.port, &np.endpoints, np.masquerade), (30080, &ep, true));
    let empty = v4
        .frontends
        .iter()
        .find(|f| f.address == Some("10.96.0.11".parse().unwrap()))
        .unwrap_or_else(|| panic!("{mode}: empty's ClusterIP in {:#?}", v4.frontends));
    assert_eq!(empty.no_endpoints, Some(NoEndpoints::Reject));
    assert!(empty.endpoints.is_empty());
    assert_eq!(
        v4.node_port_addresses,
        Some(["10.0.0.2".parse().unwrap()].into()),
        "{mode}"
    );

    let only: Inspected = json(ns, &["inspect", "services", "default/empty", "-o", "json"]);
    assert!(
        only.families
            .iter()
            .flat_map(|f| &f.frontends)
            .all(|f| f.service.as_deref() == Some("default/empty:dns"))
    );
    let text = shunt(ns, &["inspect", "services"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("ClusterIP    10.96.0.10:80/tcp  default/web:http"),
        "{text}"
    );

    let to = |masquerade| {
        BTreeSet::from([Fate::Endpoint {
            endpoint: "10.244.0.5:8080".parse().unwrap(),
            masquerade,
        }])
    };
    assert_eq!(
        trace(ns, "10.244.0.9", "10.96.0.10:80", "tcp"),
        to(false),
        "{mode}: pod to ClusterIP"
    );
    assert_eq!(
        trace(ns, "203.0.113.7", "10.96.0.10:80", "tcp"),
        to(true),
        "{mode}: off-cluster to ClusterIP"
    );
    assert_eq!(
        trace(ns, "203.0.113.7", "10.0.0.2:30080", "tcp"),
        to(true),
        "{mode}: NodePort"
    );
    assert_eq!(
        trace(ns, "10.244.0.9", "10.96.0.11:53", "udp"),
        [Fate::Reject].into(),
        "{mode}: no endpoints"
    );
    assert_eq!(
        trace(ns, "10.244.0.9", "10.96.0.10:81", "tcp"),
        [Fate::Reject].into(),
        "{mode}: wrong port"
    );
    assert_eq!(
        trace(ns, "10.244.0.9", "10.96.7.7:80", "tcp"),
        [Fate::Drop].into(),
        "{mode}: unallocated"
    );
    assert_eq!(
        trace(ns, "10.244.0.9", "192.0.2.1:80", "tcp"),
        [Fate::Untouched { masquerade: false }].into(),
        "{mode}: not a Service"
    );
    // Conntrack and counters are the ebpf programs' own: a clear refusal in other modes.
    let ct = shunt(ns, &["inspect", "conntrack"]);
    assert!(!ct.status.success());
    assert!(String::from_utf8_lossy(&ct.stderr).contains("ebpf"));

    let child = running.0.as_mut().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = child.wait();
    running.0 = None;
    // Rules stay after SIGTERM: inspect still reads them.
    let after: Inspected = json(ns, &["inspect", "services", "-o", "json"]);
    assert_eq!(after, doc, "{mode}: rules left in place after SIGTERM");
    let a = shunt_args(mode, dir, true);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    must(ns, &a);
}

#[test]
fn inspect_and_trace_a_running_shunt() {
    let Some(ns) = Netns::create("insp", &["nft", "iptables"], &["10.0.0.2/32"]) else {
        return;
    };

    // Nothing programmed yet: a clear error, non-zero exit.
    let out = shunt(&ns.0, &["inspect", "services"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing programmed by shunt"), "{err}");
    let out = shunt(
        &ns.0,
        &["trace", "--src", "10.0.0.9", "--dst", "10.96.0.10:80"],
    );
    assert!(!out.status.success());

    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("objects.yaml"))
        .unwrap()
        .write_all(MANIFESTS.as_bytes())
        .unwrap();
    let d = dir.path().to_str().unwrap();
    check_mode(&ns.0, "nftables", d);
    check_mode(&ns.0, "iptables", d);
    let out = shunt(&ns.0, &["inspect", "services"]);
    assert!(!out.status.success(), "everything cleaned up");
}

/// A private bpffs mount, unmounted on drop (also when an assertion failed).
struct Bpffs(tempfile::TempDir);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// IPv6 additions for the ebpf read-back test: the node gets an IPv6 address, an IPv6
/// service CIDR, and an IPv6 NodePort Service with one endpoint (the same objects kube-proxy
/// would see on a dual-stack node). Not used by the nftables/iptables runs (their command
/// line gives an IPv4 cluster CIDR only).
const MANIFESTS_V6: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node1
status:
  addresses:
  - type: InternalIP
    address: 10.0.0.2
  - type: InternalIP
    address: fd00::2
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata:
  name: kubernetes-v6
spec:
  cidrs: ["fd00:96::/112"]
---
apiVersion: v1
kind: Service
metadata:
  namespace: default
  name: web6
spec:
  type: NodePort
  clusterIP: fd00:96::10
  clusterIPs: ["fd00:96::10"]
  ipFamilies: ["IPv6"]
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: 30081
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: default
  name: web6-1
  labels:
    kubernetes.io/service-name: web6
addressType: IPv6
endpoints:
- addresses: ["fd00:244::5"]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node1
ports:
- name: http
  port: 8080
  protocol: TCP
"#;

/// The manifests above (both sets) through the real model, as shunt would see them on a
/// dual-stack node1: the IPv4 and the IPv6 snapshot.
fn snapshots() -> Vec<shunt::model::Snapshot> {
    use shunt::model::{DetectLocal, IpFamily, NodeConfig, Object, Tracker};
    let mut t = Tracker::new(NodeConfig {
        node_name: "node1".into(),
        families: vec![IpFamily::V4, IpFamily::V6],
        detect_local: DetectLocal::ClusterCidr(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/64".parse().unwrap(),
        ]),
        masquerade_all: false,
        node_port_addresses: vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
    });
    for doc in MANIFESTS
        .split("\n---\n")
        .chain(MANIFESTS_V6.split("\n---\n"))
    {
        let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        let obj = match v["kind"].as_str().unwrap() {
            "Node" => Object::Node(Box::new(serde_yaml::from_value(v).unwrap())),
            "ServiceCIDR" => Object::ServiceCidr(Box::new(serde_yaml::from_value(v).unwrap())),
            "Service" => Object::Service(Box::new(serde_yaml::from_value(v).unwrap())),
            "EndpointSlice" => Object::EndpointSlice(Box::new(serde_yaml::from_value(v).unwrap())),
            other => panic!("kind {other}"),
        };
        t.apply(obj).unwrap();
    }
    t.set_local_addresses(vec![
        "10.0.0.2".parse().unwrap(),
        "fd00::2".parse().unwrap(),
    ]);
    t.take_update();
    t.snapshots().to_vec()
}

/// ebpf mode: the plan's map operations written into maps pinned on a private bpffs (the
/// kernel object loaded as the dataplane loads it), then the binary reads the pins.
#[test]
fn inspect_and_trace_pinned_ebpf_maps() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to mount a bpffs and load BPF programs");
        return;
    }
    let Some(ns) = Netns::create("inspb", &["mount"], &["10.0.0.2/32"]) else {
        return;
    };
    let mnt = Bpffs(tempfile::tempdir().unwrap());
    assert!(
        Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(mnt.0.path())
            .status()
            .unwrap()
            .success()
    );
    let pins = mnt.0.path().join("shunt");
    std::fs::create_dir(&pins).unwrap();
    must(
        &ns.0,
        &["ip", "addr", "add", "fd00::2/128", "dev", "lo", "nodad"],
    );
    let snaps = snapshots();
    let local = vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
    {
        use shunt::plan::ebpf::{V4, V6, desired, diff};
        let st4 = desired::<V4>(&snaps[0], &local, &Default::default()).unwrap();
        let st6 = desired::<V6>(&snaps[1], &local, &Default::default()).unwrap();
        let mut ebpf = shunt::dataplane::ebpf::load_object(Some(&pins)).expect("load the object");
        shunt::dataplane::ebpf::apply_ops::<V4>(&mut ebpf, &diff(&Default::default(), &st4))
            .expect("write the IPv4 maps");
        shunt::dataplane::ebpf::apply_ops::<V6>(&mut ebpf, &diff(&Default::default(), &st6))
            .expect("write the IPv6 maps");
    }
    let pin = pins.to_str().unwrap();
    // `ip netns exec` remounts /sys only: the temp dir's bpffs stays visible.
    let doc: Inspected = json(
        &ns.0,
        &["inspect", "services", "--pin-dir", pin, "-o", "json"],
    );
    assert_eq!(doc.mode, "ebpf", "detected from the pins");
    let back: Inspected = serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
    assert_eq!(back, doc);
    let fam = |name: &str| {
        doc.families
            .iter()
            .find(|f| f.family == name)
            .unwrap_or_else(|| panic!("{name} in {doc:#?}"))
    };
    let fr = &fam("ipv4").frontends;
    let ep: BTreeSet<SocketAddr> = ["10.244.0.5:8080".parse().unwrap()].into();
    let cip = fr
        .iter()
        .find(|f| f.address == Some("10.96.0.10".parse().unwrap()))
        .unwrap_or_else(|| panic!("{fr:#?}"));
    assert_eq!(
        (cip.kind, &cip.endpoints, cip.affinity_seconds),
        (FrontendKind::ClusterIp, &ep, Some(600))
    );
    let np = fr
        .iter()
        .find(|f| f.address == Some("10.0.0.2".parse().unwrap()) && f.port == 30080)
        .unwrap_or_else(|| panic!("{fr:#?}"));
    assert_eq!((np.kind, &np.endpoints), (FrontendKind::NodePort, &ep));
    let empty = fr
        .iter()
        .find(|f| f.address == Some("10.96.0.11".parse().unwrap()))
        .unwrap();
    assert_eq!(empty.no_endpoints, Some(NoEndpoints::Reject));

    let ebpf_trace = |src: &str, dst: &str, proto: &str| -> BTreeSet<Fate> {
        let t: TraceResult = json(
            &ns.0,
            &[
                "trace",
                "--src",
                src,
                "--dst",
                dst,
                "--proto",
                proto,
                "--pin-dir",
                pin,
                "-o",
                "json",
            ],
        );
        assert_eq!(t.mode, "ebpf");
        t.fates
    };
    let to = |masquerade| {
        BTreeSet::from([Fate::Endpoint {
            endpoint: "10.244.0.5:8080".parse().unwrap(),
            masquerade,
        }])
    };
    assert_eq!(ebpf_trace("10.244.0.9", "10.96.0.10:80", "tcp"), to(false));
    assert_eq!(ebpf_trace("203.0.113.7", "10.0.0.2:30080", "tcp"), to(true));
    assert_eq!(
        ebpf_trace("10.244.0.9", "10.96.0.11:53", "udp"),
        [Fate::Reject].into()
    );
    assert_eq!(
        ebpf_trace("10.244.0.9", "10.96.0.10:81", "tcp"),
        [Fate::Reject].into()
    );
    assert_eq!(
        ebpf_trace("10.244.0.9", "10.96.7.7:80", "tcp"),
        [Fate::Drop].into()
    );

    // IPv6: the SHUNT_*6 maps, the same decisions.
    let fr6 = &fam("ipv6").frontends;
    let ep6: BTreeSet<SocketAddr> = ["[fd00:244::5]:8080".parse().unwrap()].into();
    let cip6 = fr6
        .iter()
        .find(|f| f.address == Some("fd00:96::10".parse().unwrap()))
        .unwrap_or_else(|| panic!("{fr6:#?}"));
    assert_eq!(
        (cip6.kind, cip6.port, &cip6.endpoints),
        (FrontendKind::ClusterIp, 80, &ep6)
    );
    let np6 = fr6
        .iter()
        .find(|f| f.address == Some("fd00::2".parse().unwrap()) && f.port == 30081)
        .unwrap_or_else(|| panic!("{fr6:#?}"));
    assert_eq!(
        (np6.kind, &np6.endpoints, np6.masquerade),
        (FrontendKind::NodePort, &ep6, true)
    );
    let to6 = |masquerade| {
        BTreeSet::from([Fate::Endpoint {
            endpoint: "[fd00:244::5]:8080".parse().unwrap(),
            masquerade,
        }])
    };
    assert_eq!(
        ebpf_trace("fd00:244::9", "[fd00:96::10]:80", "tcp"),
        to6(false),
        "pod to the IPv6 ClusterIP"
    );
    assert_eq!(
        ebpf_trace("2001:db8::7", "[fd00::2]:30081", "tcp"),
        to6(true),
        "off-cluster to the IPv6 NodePort: masqueraded"
    );
    assert_eq!(
        ebpf_trace("fd00:244::9", "[fd00:96::10]:81", "tcp"),
        [Fate::Reject].into(),
        "IPv6 ClusterIP, unknown port"
    );
    assert_eq!(
        ebpf_trace("fd00:244::9", "[fd00:96::77]:80", "tcp"),
        [Fate::Drop].into(),
        "unallocated IPv6 service address"
    );
    assert_eq!(
        ebpf_trace("fd00:244::9", "[2001:db8::1]:80", "tcp"),
        [Fate::Untouched { masquerade: false }].into(),
        "not a Service"
    );

    let ct: Vec<serde_json::Value> = json(
        &ns.0,
        &["inspect", "conntrack", "--pin-dir", pin, "-o", "json"],
    );
    assert!(ct.is_empty(), "no packet went through the programs");
    let counters: Vec<serde_json::Value> = json(
        &ns.0,
        &["inspect", "counters", "--pin-dir", pin, "-o", "json"],
    );
    assert!(
        counters
            .iter()
            .any(|c| c["name"] == "dnat" && c["packets"] == 0),
        "{counters:?}"
    );
}
