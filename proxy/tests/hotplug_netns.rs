//! ebpf mode follows a new pod's veth through netlink: shunt runs with a sync period of an
//! hour and a minimum sync period of 30 s, so no sync happens after the first one; a pod
//! namespace and its veth created afterwards must reach a ClusterIP within seconds (only the
//! link watcher can have attached the tc program), and deleting the veth removes its link
//! pin. Namespaces, the cgroup and the pin directory are this test's own and always removed.
//! Needs root, `ip`, `nsenter` and `python3`; skips otherwise.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/netns.rs"]
mod netns;
use netns::{HEALTHZ, MANIFESTS, METRICS, Netns, Running, http_get, in_ns, must, wait_healthy};

/// The cgroup and pin directory of this test, and `shunt --cleanup` of what it pinned;
/// removed on drop (after the namespaces' shunt was stopped: declare it first).
struct Owned {
    cgroup: PathBuf,
    pins: PathBuf,
    ns: String,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_shunt"))
            .args(["--proxy-mode", "ebpf", "--cleanup", "--pin-dir"])
            .arg(&self.pins)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Creates veth `host` in `node` with its peer `eth0` in namespace `ns`.
fn veth(node: &str, host: &str, ns: &str) {
    let st = Command::new("ip")
        .args(["-n", node, "link", "add", host, "type", "veth"])
        .args(["peer", "name", "eth0", "netns", ns])
        .status();
    assert!(st.is_ok_and(|s| s.success()), "creating veth {host}");
}

/// Addresses and routes a pod's veth as a routed CNI does: the node routes `ip` to `host`,
/// the pod's default route goes to 10.244.0.1.
fn configure(node: &str, host: &str, ns: &str, ip: &str) {
    must(node, &["ip", "addr", "add", "10.244.0.1/32", "dev", host]);
    must(node, &["ip", "link", "set", host, "up"]);
    must(
        node,
        &["ip", "route", "add", &format!("{ip}/32"), "dev", host],
    );
    must(
        ns,
        &["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
    );
    must(ns, &["ip", "link", "set", "eth0", "up"]);
    must(ns, &["ip", "route", "add", "10.244.0.1", "dev", "eth0"]);
    must(ns, &["ip", "route", "add", "default", "via", "10.244.0.1"]);
}

fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = must(ns, &["cat", &format!("/sys/class/net/{dev}/ifindex")]);
    out.trim().parse().expect("ifindex")
}

/// Polls `cond` every 5 ms for up to `limit`: the time it took, or None.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn new_pod_veth_is_attached_through_netlink() {
    let Some(node) = Netns::create("hpn", &["nsenter", "python3"], &["10.0.0.2/32"]) else {
        return;
    };
    let Ok(cg_mount) = shunt::dataplane::ebpf::cgroup2_mount() else {
        eprintln!("skipping: no cgroup2 mount");
        return;
    };
    if !Path::new("/sys/fs/bpf").is_dir() {
        eprintln!("skipping: no /sys/fs/bpf");
        return;
    }
    let tag = format!("shunt-hotplug-{}", std::process::id());
    let owned = Owned {
        cgroup: cg_mount.join(&tag),
        pins: Path::new("/sys/fs/bpf").join(&tag),
        ns: node.0.clone(),
    };
    std::fs::create_dir(&owned.cgroup).expect("creating the test's cgroup");
    let backend = Netns::create("hpb", &[], &[]).expect("backend namespace");
    must(&node.0, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    veth(&node.0, "vb", &backend.0);
    configure(&node.0, "vb", &backend.0, "10.244.0.5");
    let _server = Running(Some(
        Command::new("ip")
            .args(["netns", "exec", &backend.0, "python3", "-m", "http.server"])
            .args(["8080", "--bind", "10.244.0.5", "--directory", "/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("backend server"),
    ));
    assert!(
        wait_for(Duration::from_secs(20), || {
            in_ns(&backend.0, &["ss", "-Hltn", "sport = :8080"])
                .stdout
                .contains(&b'\n')
        })
        .is_some(),
        "the backend never listened"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), MANIFESTS).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.0))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_shunt"))
        .args(["--proxy-mode", "ebpf", "--manifests"])
        .arg(dir.path())
        .args([
            "--hostname-override",
            "node1",
            "--detect-local-mode",
            "ClusterCIDR",
        ])
        .args([
            "--cluster-cidr",
            "10.244.0.0/16",
            "--nodeport-addresses",
            "10.0.0.0/24",
        ])
        .args([
            "--healthz-bind-address",
            HEALTHZ,
            "--metrics-bind-address",
            METRICS,
        ])
        // No sync after the first one during this test: only netlink can attach.
        .args([
            "--iptables-sync-period",
            "1h",
            "--iptables-min-sync-period",
            "30s",
        ])
        .arg("--cgroup-root")
        .arg(&owned.cgroup)
        .arg("--pin-dir")
        .arg(&owned.pins)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting shunt");
    let mut shunt = Running(Some(child));
    if let Err(e) = wait_healthy(&node.0, &mut shunt, Duration::from_secs(60)) {
        panic!("{e}");
    }
    // The backend's veth existed at the first sync: attached by the scan.
    let vb = owned.pins.join(format!("tcx_{}", ifindex(&node.0, "vb")));
    assert!(vb.exists(), "{} after the first sync", vb.display());

    let pod = Netns::create("hpp", &[], &[]).expect("pod namespace");
    let created = Instant::now();
    veth(&node.0, "vp", &pod.0);
    let pin = owned.pins.join(format!("tcx_{}", ifindex(&node.0, "vp")));
    // The veth is still down here (as a CNI plugin creates it): attached all the same.
    let Some(_) = wait_for(Duration::from_secs(10), || pin.exists()) else {
        panic!(
            "{} never appeared: the new veth was not attached",
            pin.display()
        );
    };
    // From before `ip link add` was spawned (its process start and the ifindex lookup
    // included, so an upper bound), to the link pin seen (polled every 5 ms).
    eprintln!("veth vp: attached {:?} after creation", created.elapsed());
    configure(&node.0, "vp", &pod.0, "10.244.0.9");
    let reached = wait_for(Duration::from_secs(15), || {
        matches!(http_get(&pod.0, "10.96.0.10:80", "/"), Some((200, _)))
    });
    assert!(
        reached.is_some(),
        "the new pod never reached the ClusterIP 10.96.0.10:80"
    );
    assert!(
        shunt.child().try_wait().unwrap().is_none(),
        "shunt exited during the test"
    );

    must(&node.0, &["ip", "link", "del", "vp"]);
    assert!(
        wait_for(Duration::from_secs(10), || !pin.exists()).is_some(),
        "{} was not removed after the veth was deleted",
        pin.display()
    );
    assert!(vb.exists(), "the other veth's pin stays");
    drop(shunt);
}
