//! End to end in network namespaces the test creates (and always deletes): a client netns, a
//! backend netns and a "node" netns routing between them, with `EbpfDataplane` attached at
//! tcx ingress of the node's two veths and its maps pinned on a private bpffs mount. Real TCP
//! connections to a ClusterIP, a reject, adoption of pins by a second instance, and cleanup.
//! Tx checksum offload is off on the veths so that a wrong checksum is not hidden.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;
use crate::dataplane::{Changed, Dataplane, SyncRequest};
use crate::model::Snapshot;
use crate::plan::ebpf::tests::{ep, snap, snap6, svc, svc6};

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the namespaces and unmounts the bpffs on drop, also when an assertion failed.
struct Lab {
    tag: String,
    bpffs: PathBuf,
    cgroup: PathBuf,
    servers: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in ["c", "n", "b", "d", "e"] {
            let _ = sh(&["ip", "netns", "del", &format!("{}{ns}", self.tag)]);
        }
        // The cgroup's processes have exited by now (each client runs to completion).
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.tag)
    }
    fn exec(&self, n: &str, args: &[&str]) -> Result<String, String> {
        let ns = self.ns(n);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Starts the python servers `progs` in namespace `n` (stopped with the lab) and waits,
    /// bounded, until `ss` shows `listeners` sockets on port 8080 there.
    fn serve(&mut self, n: &str, progs: &[&str], listeners: usize) {
        let ns = self.ns(n);
        for prog in progs {
            self.servers.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "python3", "-c", prog])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("server"),
            );
        }
        let up = |lab: &Lab| {
            lab.exec(n, &["ss", "-Hltun", "sport = :8080"])
                .is_ok_and(|o| o.lines().count() >= listeners)
        };
        for _ in 0..50 {
            if up(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("servers in {ns} not listening on :8080 after 5 s");
    }
}

fn setup() -> Result<Lab, String> {
    setup_tagged("")
}

/// `suffix` keeps the namespaces, bpffs and cgroup of tests running at once apart.
fn setup_tagged(suffix: &str) -> Result<Lab, String> {
    let tag = format!("shebpf{}{suffix}", std::process::id() % 100_000);
    let bpffs = std::env::temp_dir().join(format!("{tag}-bpffs"));
    let lab = Lab {
        cgroup: PathBuf::from(CGROUP2).join(format!("{tag}-cg")),
        tag,
        bpffs,
        servers: Vec::new(),
    };
    std::fs::create_dir_all(&lab.bpffs).map_err(|e| e.to_string())?;
    std::fs::create_dir(&lab.cgroup).map_err(|e| format!("{}: {e}", lab.cgroup.display()))?;
    sh(&["mount", "-t", "bpf", "bpf", lab.bpffs.to_str().unwrap()])?;
    for n in ["c", "n", "b"] {
        sh(&["ip", "netns", "add", &lab.ns(n)])?;
        lab.exec(n, &["ip", "link", "set", "lo", "up"])?;
    }
    let (c, n, b) = (lab.ns("c"), lab.ns("n"), lab.ns("b"));
    sh(&[
        "ip", "-n", &n, "link", "add", "toc", "type", "veth", "peer", "eth0", "netns", &c,
    ])?;
    sh(&[
        "ip", "-n", &n, "link", "add", "tob", "type", "veth", "peer", "eth0", "netns", &b,
    ])?;
    for (ns, dev, addr) in [
        ("n", "toc", "10.1.0.1/24"),
        ("n", "tob", "10.1.1.1/24"),
        ("c", "eth0", "10.1.0.9/24"),
        ("b", "eth0", "10.1.1.2/24"),
    ] {
        lab.exec(ns, &["ip", "addr", "add", addr, "dev", dev])?;
        lab.exec(ns, &["ip", "link", "set", dev, "up"])?;
        lab.exec(ns, &["ethtool", "-K", dev, "tx", "off"])?;
    }
    lab.exec("c", &["ip", "route", "add", "default", "via", "10.1.0.1"])?;
    lab.exec("b", &["ip", "route", "add", "default", "via", "10.1.1.1"])?;
    lab.exec("n", &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    Ok(lab)
}

/// Run `f` on a thread that has entered the node namespace (setns affects one thread only).
fn in_node<T: Send>(lab: &Lab, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{}", lab.ns("n"));
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).expect("netns file");
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("node thread")
    })
}

const SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(16)\ns.settimeout(30)\nwhile True:\n  c,a=s.accept()\n  c.sendall(('hello '+a[0]).encode())\n  c.close()\n";

/// A client netns `ns` behind node veth `dev`, addressed `<net>.9/24`, gateway `<net>.1`.
fn add_client(lab: &Lab, ns: &str, dev: &str, net: &str) -> Result<(), String> {
    let (full, node) = (lab.ns(ns), lab.ns("n"));
    sh(&["ip", "netns", "add", &full])?;
    sh(&[
        "ip", "-n", &node, "link", "add", dev, "type", "veth", "peer", "eth0", "netns", &full,
    ])?;
    for (n, d, a) in [
        ("n", dev, format!("{net}.1/24")),
        (ns, "eth0", format!("{net}.9/24")),
    ] {
        lab.exec(n, &["ip", "addr", "add", &a, "dev", d])?;
        lab.exec(n, &["ip", "link", "set", d, "up"])?;
        lab.exec(n, &["ethtool", "-K", d, "tx", "off"])?;
    }
    lab.exec(
        ns,
        &["ip", "route", "add", "default", "via", &format!("{net}.1")],
    )?;
    Ok(())
}

const UDP_SERVER: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',8080))\ns.settimeout(30)\nwhile True:\n  d,a=s.recvfrom(100)\n  s.sendto(('echo '+a[0]).encode(),a)\n";

/// One UDP exchange with `addr`:80 (unconnected socket): "<answer> <answer's source>".
const UDP_CLIENT: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ntry:\n  s.sendto(b'hi',(sys.argv[1],80))\n  d,a=s.recvfrom(100)\n  print(d.decode(),a[0])\nexcept Exception as e:\n  print(type(e).__name__)\n";

fn udp_in(lab: &Lab, ns: &str, addr: &str) -> String {
    lab.exec(ns, &["python3", "-c", UDP_CLIENT, addr])
        .unwrap_or_else(|e| e)
        .trim()
        .to_string()
}

fn udp_from_node(lab: &Lab, addr: &str) -> String {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\" {addr}",
        lab.cgroup.display(),
        lab.ns("n")
    );
    sh(&["sh", "-c", &script, UDP_CLIENT])
        .unwrap_or_else(|e| e)
        .trim()
        .to_string()
}

/// Connect from the client netns; "hello <client ip>" or the error's name.
fn connect(lab: &Lab, addr: &str) -> String {
    connect_in(lab, "c", addr)
}

fn connect_in(lab: &Lab, ns: &str, addr: &str) -> String {
    connect_port(lab, ns, addr, 80)
}

fn connect_port(lab: &Lab, ns: &str, addr: &str, port: u16) -> String {
    let prog = format!(
        "import socket\ntry:\n  s=socket.create_connection(('{addr}',{port}),timeout=3)\n  print(s.recv(100).decode())\nexcept Exception as e:\n  print(type(e).__name__)\n"
    );
    lab.exec(ns, &["python3", "-c", &prog])
        .unwrap_or_else(|e| e)
        .trim()
        .to_string()
}

/// Where this machine mounts cgroup v2 (a child cgroup is created there, never the root used).
const CGROUP2: &str = "/sys/fs/cgroup/unified";

/// Connect from a process in the node netns that sits in the test cgroup: "<answer> <peer>".
fn connect_from_node(lab: &Lab, addr: &str) -> String {
    let prog = format!(
        "import socket\ntry:\n  s=socket.create_connection(('{addr}',80),timeout=3)\n  print(s.recv(100).decode(), s.getpeername()[0])\nexcept Exception as e:\n  print(type(e).__name__)\n"
    );
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\"",
        lab.cgroup.display(),
        lab.ns("n")
    );
    sh(&["sh", "-c", &script, &prog])
        .unwrap_or_else(|e| e)
        .trim()
        .to_string()
}

fn sync(dp: &mut EbpfDataplane, s: &Snapshot) {
    dp.sync(SyncRequest {
        snapshots: std::slice::from_ref(s),
        changed: &Changed::All,
    })
    .expect("sync");
}

/// Whether a lab test can run here (root, cgroup v2, `tools`); prints why not.
fn can_run(tools: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for netns, bpffs and tcx");
        return false;
    }
    if !std::path::Path::new(CGROUP2).join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v2 at {CGROUP2}");
        return false;
    }
    for tool in tools {
        if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            eprintln!("skipped: {tool} missing");
            return false;
        }
    }
    true
}

#[test]
fn clusterip_tcp_through_tcx_with_restart_and_cleanup() {
    if !can_run(&["ip", "ethtool", "python3", "mount"]) {
        return;
    }
    let mut lab = match setup() {
        Ok(l) => l,
        Err(e) => panic!("lab setup: {e}"),
    };
    lab.serve("b", &[SERVER, UDP_SERVER], 2);
    let opts = EbpfOptions {
        cgroup_root: lab.cgroup.clone(),
        pin_dir: lab.bpffs.join("shunt"),
        interfaces: Interfaces::All,
        ..Default::default()
    };
    let mut web = svc("web", "172.30.0.10", vec![ep("10.1.1.2", false)]);
    web.port.node_port = Some(30080);
    let mut dns = svc("dns", "172.30.0.12", vec![ep("10.1.1.2", false)]);
    dns.port.name.protocol = crate::model::Protocol::Udp;
    // A service whose only endpoint is the client pod itself (hairpin).
    let hairpin = svc("self", "172.30.0.13", vec![ep("10.1.0.9", false)]);
    let mut s = snap(vec![web, svc("empty", "172.30.0.11", vec![]), dns, hairpin]);
    // The node's address towards the clients is its primary IP and NodePort address.
    s.network.primary_ip = Some("10.1.0.1".parse().unwrap());
    s.network.node_port_ips =
        crate::model::NodePortIps::Addresses(vec!["10.1.0.1".parse().unwrap()]);

    // Without shunt the ClusterIP leads nowhere.
    assert_ne!(connect(&lab, "172.30.0.10"), "hello 10.1.0.9");

    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
        // Dropping the instance leaves pins and links (SIGTERM semantics).
    });
    // The backend sees the client's own address (no masquerade for pod traffic), and the
    // client sees the answer coming from the ClusterIP (connect() would fail otherwise).
    assert_eq!(connect(&lab, "172.30.0.10"), "hello 10.1.0.9");
    assert_eq!(
        connect(&lab, "172.30.0.11"),
        "ConnectionRefusedError",
        "RST from the program"
    );
    // Node-originated: connect4 picks the backend (the node's source address on that link),
    // getpeername4 still shows the ClusterIP; no endpoints: ECONNREFUSED at connect().
    assert_eq!(
        connect_from_node(&lab, "172.30.0.10"),
        "hello 10.1.1.1 172.30.0.10"
    );
    assert_eq!(
        connect_from_node(&lab, "172.30.0.11"),
        "ConnectionRefusedError"
    );
    // UDP: a pod through the tc program, the node through sendmsg4/recvmsg4; both see the
    // answer coming from the ClusterIP.
    assert_eq!(
        udp_in(&lab, "c", "172.30.0.12"),
        "echo 10.1.0.9 172.30.0.12"
    );
    assert_eq!(
        udp_from_node(&lab, "172.30.0.12"),
        "echo 10.1.1.1 172.30.0.12"
    );
    for name in shunt_abi::names::ALL {
        assert!(opts.pin_dir.join(name).exists(), "{name} pinned");
    }
    let toc = lab
        .exec("n", &["cat", "/sys/class/net/toc/ifindex"])
        .unwrap();
    assert!(opts.pin_dir.join(format!("tcx_{}", toc.trim())).exists());
    for name in SOCK_PROGRAMS {
        assert!(
            opts.pin_dir.join(format!("cg_{name}")).exists(),
            "{name} link pinned"
        );
    }

    // A second instance adopts the pins and replaces the links; traffic keeps working.
    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
        let st = read_state::<V4>(&mut dp.loaded.as_mut().unwrap().ebpf).unwrap();
        assert_eq!(st.services.len(), 9, "adopted maps hold exactly the plan");
        // Make-before-break left exactly one shunt program per interface (the old link was
        // unpinned, which detached it).
        for dev in ["toc", "tob"] {
            assert_eq!(tcx_count_settled(dev, 1), 1, "{dev}");
        }
        // A pod appears after start: its veth is attached at the next sync.
        add_client(&lab, "d", "tod", "10.1.2").expect("second client");
        sync(&mut dp, &s);
    });
    assert_eq!(connect_in(&lab, "d", "172.30.0.10"), "hello 10.1.2.9");

    // An off-cluster client (outside 10.0.0.0/8) on the NodePort of a Cluster-policy
    // service: masqueraded to the node IP, so the backend answers the node, whose reply
    // translation hands the answer back to the client.
    in_node(&lab, || {
        add_client(&lab, "e", "toe", "172.16.5").expect("outside client")
    });
    let mut dp = in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
        dp
    });
    let got = connect_port(&lab, "e", "10.1.0.1", 30080);
    let stats: aya::maps::PerCpuArray<_, shunt_abi::Counter> = aya::maps::PerCpuArray::try_from(
        dp.loaded
            .as_mut()
            .unwrap()
            .ebpf
            .map(shunt_abi::names::STATS)
            .unwrap(),
    )
    .unwrap();
    let sums: Vec<u64> = (0..shunt_abi::stat::COUNT)
        .map(|i| stats.get(&i, 0).unwrap().iter().map(|c| c.packets).sum())
        .collect();
    assert_eq!(got, "hello 10.1.0.1", "stats {sums:?}");
    // A pod client on the same NodePort keeps its address.
    assert_eq!(connect_port(&lab, "c", "10.1.0.1", 30080), "hello 10.1.0.9");
    // Hairpin: the client reaches itself through the service, masqueraded to the node IP
    // (otherwise it would receive a packet from its own address and drop it).
    lab.serve("c", &[SERVER], 1);
    assert_eq!(connect(&lab, "172.30.0.13"), "hello 10.1.0.1");
    assert_eq!(connect(&lab, "172.30.0.10"), "hello 10.1.0.9");

    // --cleanup: pins removed, links gone, the ClusterIP leads nowhere again.
    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        dp.cleanup().unwrap();
    });
    assert!(!opts.pin_dir.exists());
    in_node(&lab, || {
        assert_eq!(
            tcx_count_settled("toc", 0),
            0,
            "cleanup detached the tc program"
        );
    });
    assert_ne!(connect(&lab, "172.30.0.10"), "hello 10.1.0.9");
    assert_ne!(
        connect_from_node(&lab, "172.30.0.10"),
        "hello 10.1.1.1 172.30.0.10"
    );
}

/// The number of tcx ingress programs on `dev`, polled (bounded: 50 x 100 ms) until it is
/// `want`. Unpinning a link's last reference detaches it from a workqueue
/// (bpf_link_put -> bpf_link_put_deferred), so on a loaded machine the detach can trail
/// the unlink for a moment.
fn tcx_count_settled(dev: &str, want: usize) -> usize {
    let mut n = usize::MAX;
    for _ in 0..50 {
        let (_, progs) =
            aya::programs::SchedClassifier::query_tcx(dev, aya::programs::TcAttachType::Ingress)
                .unwrap();
        n = progs.len();
        if n == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    n
}

/// A dual-stack TCP server on [::]:8080 answering "hello <peer address>".
const SERVER6: &str = "import socket\ns=socket.socket(socket.AF_INET6)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('::',8080))\ns.listen(16)\ns.settimeout(30)\nwhile True:\n  c,a=s.accept()\n  c.sendall(('hello '+a[0]).encode())\n  c.close()\n";
const UDP_SERVER6: &str = "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.bind(('::',8080))\ns.settimeout(30)\nwhile True:\n  d,a=s.recvfrom(100)\n  s.sendto(('echo '+a[0]).encode(),a)\n";
/// One UDP exchange over IPv6 with `argv[1]`:80. With argv[2] = "connected" the socket is
/// connected, so that an ICMPv6 error surfaces as ConnectionRefusedError.
const UDP_CLIENT6: &str = "import socket,sys\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.settimeout(3)\ntry:\n  if len(sys.argv)>2:\n    s.connect((sys.argv[1],80))\n    s.send(b'hi')\n    d=s.recv(100)\n    print(d.decode())\n  else:\n    s.sendto(b'hi',(sys.argv[1],80))\n    d,a=s.recvfrom(100)\n    print(d.decode(),a[0])\nexcept Exception as e:\n  print(type(e).__name__)\n";

fn udp6_from_node(lab: &Lab, addr: &str) -> String {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\" {addr}",
        lab.cgroup.display(),
        lab.ns("n")
    );
    sh(&["sh", "-c", &script, UDP_CLIENT6])
        .unwrap_or_else(|e| e)
        .trim()
        .to_string()
}

/// IPv6 beside the IPv4 the lab already has (nodad: usable at once): node fd01:1::1 towards
/// the client (fd01:1::9) and fd01:2::1 towards the backend (fd01:2::2), default routes via
/// the node, forwarding on in the node.
fn add_ipv6(lab: &Lab) {
    for (ns, dev, addr) in [
        ("n", "toc", "fd01:1::1/64"),
        ("n", "tob", "fd01:2::1/64"),
        ("c", "eth0", "fd01:1::9/64"),
        ("b", "eth0", "fd01:2::2/64"),
    ] {
        lab.exec(ns, &["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
            .unwrap();
    }
    lab.exec(
        "c",
        &["ip", "-6", "route", "add", "default", "via", "fd01:1::1"],
    )
    .unwrap();
    lab.exec(
        "b",
        &["ip", "-6", "route", "add", "default", "via", "fd01:2::1"],
    )
    .unwrap();
    lab.exec("n", &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        .unwrap();
}

/// IPv6 end to end: a pod reaches a v6 ClusterIP through the tc program (DNAT, reverse NAT,
/// checksums checked by the real stack with tx offload off), an endpoint-less one answers
/// with a TCP RST and an ICMPv6 port unreachable the client's stack accepts, and the node's
/// own TCP and UDP go through connect6/getpeername6 and sendmsg6/recvmsg6.
#[test]
fn ipv6_clusterip_from_pod_and_node() {
    if !can_run(&["ip", "ethtool", "python3", "mount"]) {
        return;
    }
    let mut lab = setup_tagged("v6").unwrap_or_else(|e| panic!("lab setup: {e}"));
    add_ipv6(&lab);
    lab.serve("b", &[SERVER6, UDP_SERVER6], 2);
    let opts = EbpfOptions {
        cgroup_root: lab.cgroup.clone(),
        pin_dir: lab.bpffs.join("shunt"),
        interfaces: Interfaces::All,
        ..Default::default()
    };
    let mut dns = svc6("dns", "fd00:172:30::12", vec![ep("fd01:2::2", false)]);
    dns.port.name.protocol = crate::model::Protocol::Udp;
    let mut none_udp = svc6("none-udp", "fd00:172:30::14", vec![]);
    none_udp.port.name.protocol = crate::model::Protocol::Udp;
    let mut s = snap6(vec![
        svc6("web", "fd00:172:30::10", vec![ep("fd01:2::2", false)]),
        svc6("empty", "fd00:172:30::11", vec![]),
        dns,
        none_udp,
    ]);
    s.network.primary_ip = Some("fd01:1::1".parse().unwrap());
    s.network.local_detector =
        crate::model::LocalDetector::ClusterCidr(vec!["fd01::/16".parse().unwrap()]);

    assert_ne!(
        connect(&lab, "fd00:172:30::10"),
        "hello fd01:1::9",
        "nothing answers before shunt"
    );
    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
    });
    assert_eq!(connect(&lab, "fd00:172:30::10"), "hello fd01:1::9");
    assert_eq!(
        connect(&lab, "fd00:172:30::11"),
        "ConnectionRefusedError",
        "RST from the program"
    );
    assert_eq!(
        lab.exec(
            "c",
            &["python3", "-c", UDP_CLIENT6, "fd00:172:30::14", "connected"]
        )
        .unwrap_or_else(|e| e)
        .trim(),
        "ConnectionRefusedError",
        "ICMPv6 port unreachable from the program"
    );
    assert_eq!(
        lab.exec("c", &["python3", "-c", UDP_CLIENT6, "fd00:172:30::12"])
            .unwrap_or_else(|e| e)
            .trim(),
        "echo fd01:1::9 fd00:172:30::12"
    );
    // The node's own sockets: connect6 picks the backend, getpeername6 shows the ClusterIP;
    // sendmsg6 / recvmsg6 for unconnected UDP.
    assert_eq!(
        connect_from_node(&lab, "fd00:172:30::10"),
        "hello fd01:2::1 fd00:172:30::10"
    );
    assert_eq!(
        connect_from_node(&lab, "fd00:172:30::11"),
        "ConnectionRefusedError"
    );
    assert_eq!(
        udp6_from_node(&lab, "fd00:172:30::12"),
        "echo fd01:2::1 fd00:172:30::12"
    );
    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        dp.cleanup().unwrap();
    });
    assert!(!opts.pin_dir.exists());
}

/// Echoes every line of every connection on :8081 until the client closes.
const ECHO_SERVER: &str = "import socket,threading\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8081))\ns.listen(16)\ndef h(c):\n  f=c.makefile('rb',0)\n  for l in f:\n    c.sendall(b'echo '+l)\n  c.close()\nwhile True:\n  c,a=s.accept()\n  threading.Thread(target=h,args=(c,),daemon=True).start()\n";

/// A long-lived TCP connection to argv[1]:80: one exchange, then (bounded, 60 s) wait for
/// the file argv[2] to exist, then a second exchange on the same connection.
const LONG_CLIENT: &str = "import socket,sys,os,time\ns=socket.create_connection((sys.argv[1],80),timeout=5)\ns.sendall(b'one\\n')\nprint(s.recv(100).decode().strip(),flush=True)\nfor _ in range(600):\n  if os.path.exists(sys.argv[2]): break\n  time.sleep(0.1)\ntry:\n  s.sendall(b'two\\n')\n  print(s.recv(100).decode().strip(),flush=True)\nexcept Exception as e:\n  print(type(e).__name__,flush=True)\n";

/// A [`LONG_CLIENT`] in namespace `ns`; killed on drop, its go-file removed.
struct LongClient {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    go: PathBuf,
}

impl LongClient {
    fn start(lab: &Lab, ns: &str, addr: &str, tag: &str) -> LongClient {
        let go = std::env::temp_dir().join(format!("{}-{tag}-go", lab.tag));
        let _ = std::fs::remove_file(&go);
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(ns),
                "python3",
                "-c",
                LONG_CLIENT,
                addr,
            ])
            .arg(&go)
            .stdout(Stdio::piped())
            .spawn()
            .expect("long-lived client");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        LongClient { child, out, go }
    }
    /// The next line the client prints (it prints within its socket timeout or exits).
    fn line(&mut self) -> String {
        use std::io::BufRead as _;
        let mut l = String::new();
        let _ = self.out.read_line(&mut l);
        l.trim().to_string()
    }
    fn go(&mut self) -> String {
        std::fs::write(&self.go, b"").unwrap();
        self.line()
    }
}

impl Drop for LongClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.go);
    }
}

/// Waits (bounded, 5 s) until something listens on TCP `port` in namespace `n`.
fn wait_listen(lab: &Lab, n: &str, port: u16) {
    for _ in 0..50 {
        if lab
            .exec(n, &["ss", "-Hltn", &format!("sport = :{port}")])
            .is_ok_and(|o| o.lines().count() >= 1)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listens on :{port} in {n}");
}

fn pinned_size(dir: &std::path::Path, name: &str) -> u32 {
    maps::pinned_def(&dir.join(name)).unwrap().max_entries
}

fn lb_sizes(lb: u32, ct_tcp: Option<u32>, ct_any: Option<u32>) -> MapSizes {
    MapSizes::resolve(
        &capacity::CapacityFlags {
            lb_map_max: Some(lb),
            ct_tcp_max: ct_tcp,
            ct_any_max: ct_any,
            ..Default::default()
        },
        0,
    )
}

/// Maps sized for 1,024 entries; a plan with ~3,600 backends and ~300 Services makes the
/// agent grow the service, backend, reverse-NAT and ClusterIP maps (new maps, programs
/// re-attached make-before-break) while a TCP connection through a Service stays open: it
/// still works after the growth, and after a restart with other conntrack sizes (its
/// conntrack map replaced, the entries copied).
#[test]
fn maps_grow_and_resize_without_dropping_a_connection() {
    if !can_run(&["ip", "ethtool", "python3", "ss"]) {
        return;
    }
    let mut lab = match setup_tagged("g") {
        Ok(l) => l,
        Err(e) => panic!("lab setup: {e}"),
    };
    lab.serve("b", &[SERVER, ECHO_SERVER], 1);
    wait_listen(&lab, "b", 8081);
    let mut opts = EbpfOptions {
        cgroup_root: lab.cgroup.clone(),
        pin_dir: lab.bpffs.join("shunt"),
        interfaces: Interfaces::All,
        map_sizes: lb_sizes(1024, None, None),
    };
    let dir = opts.pin_dir.clone();
    let mut echo = ep("10.1.1.2", false);
    echo.port = 8081;
    let base = vec![
        svc("web", "172.30.0.10", vec![ep("10.1.1.2", false)]),
        svc("long", "172.30.0.20", vec![echo]),
    ];
    let with_net = |mut s: Snapshot| {
        s.network.primary_ip = Some("10.1.0.1".parse().unwrap());
        s.network.node_port_ips =
            crate::model::NodePortIps::Addresses(vec!["10.1.0.1".parse().unwrap()]);
        s
    };
    let small = with_net(snap(base.clone()));
    let mut big = base;
    big.push(svc("new", "172.30.0.21", vec![ep("10.1.1.2", false)]));
    for i in 0..300u32 {
        let eps = (1..=12)
            .map(|j| ep(&format!("10.{}.{}.{j}", 2 + i / 250, i % 250), false))
            .collect();
        big.push(svc(
            &format!("bulk{i}"),
            &format!("172.30.{}.{}", 1 + i / 250, 1 + i % 250),
            eps,
        ));
    }
    let big = with_net(snap(big));

    let mut dp = in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &small);
        dp
    });
    assert_eq!(pinned_size(&dir, names::BACKENDS4), 1024);
    assert_eq!(pinned_size(&dir, names::REVNAT4), 256);
    let ct_size = pinned_size(&dir, names::CT4);
    let map_id = |n: &str| aya::maps::MapInfo::from_pin(dir.join(n)).unwrap().id();
    let (ct_id, be_id) = (map_id(names::CT4), map_id(names::BACKENDS4));
    let mut long = LongClient::start(&lab, "c", "172.30.0.20", "1");
    assert_eq!(long.line(), "echo one");

    in_node(&lab, || {
        sync(&mut dp, &big);
        for dev in ["toc", "tob"] {
            assert_eq!(
                tcx_count_settled(dev, 1),
                1,
                "{dev}: the old program detached"
            );
        }
    });
    let sizes = dp.loaded.as_ref().unwrap().sizes.clone();
    for (name, want) in [
        (names::SERVICES4, 8192),
        (names::BACKENDS4, 8192),
        (names::REVNAT4, 512),
        (names::CLUSTER_IP4, 512),
    ] {
        assert_eq!(sizes[name], want, "{name}");
        assert_eq!(pinned_size(&dir, name), want, "{name} pinned");
    }
    // Nothing grew in the other family or among the maps of live flows.
    assert_eq!(pinned_size(&dir, names::BACKENDS6), 1024);
    assert_eq!(pinned_size(&dir, names::CT4), ct_size);
    assert_eq!(map_id(names::CT4), ct_id, "the same conntrack map, adopted");
    assert_ne!(map_id(names::BACKENDS4), be_id, "a new backend map");
    assert!(!maps::aside_path(&dir, names::BACKENDS4).exists());
    let st = read_state::<V4>(&mut dp.loaded.as_mut().unwrap().ebpf).unwrap();
    assert_eq!(st.backends.len(), 3_602, "the grown maps hold the plan");
    assert_eq!(
        connect(&lab, "172.30.0.21"),
        "hello 10.1.0.9",
        "a new Service"
    );
    assert_eq!(connect(&lab, "172.30.0.10"), "hello 10.1.0.9");
    // The node's own sockets: the socket programs were re-attached against the new maps.
    assert_eq!(
        connect_from_node(&lab, "172.30.0.21"),
        "hello 10.1.1.1 172.30.0.21"
    );
    assert_eq!(
        long.go(),
        "echo two",
        "the long-lived connection survived the growth"
    );
    drop(long);

    // Restart with other conntrack sizes: the conntrack maps are replaced with their
    // entries, the grown maps (bigger than configured) adopted as they are.
    let mut long = LongClient::start(&lab, "c", "172.30.0.20", "2");
    assert_eq!(long.line(), "echo one");
    // This flow's conntrack entries (client -> ClusterIP, and the backend's reply).
    let flows = |dp: &mut EbpfDataplane| -> std::collections::HashSet<shunt_abi::CtKey<u32>> {
        let l = dp.loaded.as_mut().unwrap();
        let ct = hash::<shunt_abi::CtKey<u32>, shunt_abi::CtValue<u32>>(&mut l.ebpf, names::CT4)
            .unwrap();
        let svc = shunt_abi::addr4([172, 30, 0, 20]);
        let be = shunt_abi::addr4([10, 1, 1, 2]);
        ct.keys()
            .map(|k| k.unwrap())
            .filter(|k| {
                (k.daddr == svc && k.dport == shunt_abi::port(80))
                    || (k.saddr == be && k.sport == shunt_abi::port(8081))
            })
            .collect()
    };
    let before = flows(&mut dp);
    assert!(!before.is_empty());
    drop(dp);
    opts.map_sizes = lb_sizes(1024, Some(4096), Some(4096));
    let mut dp = in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &big);
        dp
    });
    assert_eq!(pinned_size(&dir, names::CT4), 8192);
    assert_ne!(map_id(names::CT4), ct_id, "a new conntrack map");
    let after = flows(&mut dp);
    assert!(
        before.is_subset(&after),
        "entries copied: {before:?} {after:?}"
    );
    assert_eq!(pinned_size(&dir, names::BACKENDS4), 8192);
    assert!(!maps::aside_path(&dir, names::CT4).exists());
    assert_eq!(
        long.go(),
        "echo two",
        "the connection survived its conntrack map's replacement"
    );
    assert_eq!(connect(&lab, "172.30.0.21"), "hello 10.1.0.9");
    in_node(&lab, || dp.cleanup().unwrap());
    assert!(!dir.exists());
}

/// Pins made with other sizes (an older shunt, other flags) are replaced by maps of the
/// configured sizes holding the same entries; pins of the configured sizes are adopted.
#[test]
fn pins_of_other_sizes_are_replaced_with_their_entries() {
    // The lab (namespaces unused here) brings the private bpffs and its cleanup.
    if !can_run(&["ip", "ethtool", "mount"]) {
        return;
    }
    let lab = match setup_tagged("m") {
        Ok(l) => l,
        Err(e) => panic!("lab setup: {e}"),
    };
    let dir = lab.bpffs.join("shunt");
    std::fs::create_dir_all(&dir).unwrap();
    let old = Sizes {
        configured: lb_sizes(1024, Some(1024), Some(1024)),
        grown: Default::default(),
    };
    let new = Sizes::default();
    let mut ebpf = load_object_sized(Some(&dir), &old).unwrap();
    let ck = |i: u32| shunt_abi::CtKey::<u32> {
        saddr: i,
        dport: 80,
        proto: 6,
        ..Default::default()
    };
    {
        let mut ct =
            hash::<shunt_abi::CtKey<u32>, shunt_abi::CtValue<u32>>(&mut ebpf, names::CT4).unwrap();
        for i in 1..=10 {
            let v = shunt_abi::CtValue::<u32> {
                backend_id: i,
                ..Default::default()
            };
            ct.insert(ck(i), v, 0).unwrap();
        }
        let mut be = hash::<u32, Backend<u32>>(&mut ebpf, names::BACKENDS4).unwrap();
        for i in 1..=10 {
            let b = Backend::<u32> {
                addr: i,
                port: 80,
                proto: 6,
                flags: 0,
            };
            be.insert(i, b, 0).unwrap();
        }
    }
    drop(ebpf);
    // The kernel reports what the object asks for: same sizes, nothing to replace.
    let same = maps::check_pins(&dir, &maps::wanted_defs(OBJECT, &old).unwrap()).unwrap();
    assert_eq!(same, vec![]);

    let replaced = maps::check_pins(&dir, &maps::wanted_defs(OBJECT, &new).unwrap()).unwrap();
    let names_replaced: Vec<&str> = replaced.iter().map(|r| r.name).collect();
    for n in [names::BACKENDS4, names::CT4, names::CT6, names::AFFINITY4] {
        assert!(names_replaced.contains(&n), "{n} in {names_replaced:?}");
    }
    // Same definition: adopted.
    for n in [names::CONFIG4, names::SOCK_REVNAT4, names::STATS] {
        assert!(!names_replaced.contains(&n), "{n} in {names_replaced:?}");
    }
    assert!(replaced.iter().all(|r| r.copy), "{replaced:?}");
    let mut ebpf = load_object_sized(Some(&dir), &new).unwrap();
    maps::copy_replaced(&dir, &replaced, false).unwrap();
    maps::finish(&dir, &replaced).unwrap();
    for r in &replaced {
        assert!(!maps::aside_path(&dir, r.name).exists(), "{}", r.name);
    }
    assert_eq!(pinned_size(&dir, names::CT4), shunt_abi::limits::CT);
    assert_eq!(
        pinned_size(&dir, names::BACKENDS4),
        shunt_abi::limits::BACKENDS
    );
    let ct = hash::<shunt_abi::CtKey<u32>, shunt_abi::CtValue<u32>>(&mut ebpf, names::CT4).unwrap();
    let mut got: Vec<u32> = ct.iter().map(|kv| kv.unwrap().1.backend_id).collect();
    got.sort_unstable();
    assert_eq!(got, (1..=10).collect::<Vec<_>>(), "conntrack entries kept");
    assert_eq!(ct.get(&ck(3), 0).unwrap().backend_id, 3);
    let be = hash::<u32, Backend<u32>>(&mut ebpf, names::BACKENDS4).unwrap();
    assert_eq!(be.iter().count(), 10, "backends kept");
    assert_eq!(be.get(&7, 0).unwrap().addr, 7);
    drop(ebpf);
    // Now they match.
    let again = maps::check_pins(&dir, &maps::wanted_defs(OBJECT, &new).unwrap()).unwrap();
    assert_eq!(again, vec![]);

    // A layout that cannot be copied (here an array of 8-byte values where the backend
    // hash is: same key and value sizes, another type) is replaced by an empty map.
    std::fs::remove_file(dir.join(names::BACKENDS6)).unwrap();
    let private = load_object(None).unwrap();
    private
        .map(names::CONFIG4)
        .unwrap()
        .pin(dir.join(names::BACKENDS6))
        .unwrap();
    drop(private);
    let replaced = maps::check_pins(&dir, &maps::wanted_defs(OBJECT, &new).unwrap()).unwrap();
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(replaced[0].name, names::BACKENDS6);
    assert!(!replaced[0].copy);
    assert!(
        replaced[0]
            .differs
            .iter()
            .any(|d| d.starts_with("type 2 -> 1")),
        "{replaced:?}"
    );
    let mut ebpf = load_object_sized(Some(&dir), &new).unwrap();
    maps::copy_replaced(&dir, &replaced, false).unwrap();
    maps::finish(&dir, &replaced).unwrap();
    let want6 = maps::wanted_defs(OBJECT, &new).unwrap()[names::BACKENDS6];
    assert_eq!(
        maps::pinned_def(&dir.join(names::BACKENDS6)).unwrap(),
        want6
    );
    let be6 = hash::<u32, Backend<[u32; 4]>>(&mut ebpf, names::BACKENDS6).unwrap();
    assert_eq!(be6.iter().count(), 0, "started empty");
    drop(ebpf);

    // A run that died mid-replacement: a lone aside pin is put back (and adopted, being
    // right); an aside pin next to a new one is dropped.
    let wanted = maps::wanted_defs(OBJECT, &new).unwrap();
    let (ct, ct_aside) = (dir.join(names::CT4), maps::aside_path(&dir, names::CT4));
    std::fs::rename(&ct, &ct_aside).unwrap();
    assert_eq!(maps::check_pins(&dir, &wanted).unwrap(), vec![]);
    assert!(ct.exists() && !ct_aside.exists());
    aya::maps::MapData::from_pin(&ct)
        .unwrap()
        .pin(&ct_aside)
        .unwrap();
    assert_eq!(maps::check_pins(&dir, &wanted).unwrap(), vec![]);
    assert!(ct.exists() && !ct_aside.exists());
    let mut dp = EbpfDataplane::new(EbpfOptions {
        pin_dir: dir.clone(),
        interfaces: Interfaces::Named(vec![]),
        ..Default::default()
    })
    .unwrap();
    dp.cleanup().unwrap();
    assert!(!dir.exists());
}

/// From a dual-stack IPv6 socket of a process in the node netns and the test cgroup:
/// TCP connect + getpeername, connected UDP (connect + send + recv + getpeername) and
/// unconnected UDP (sendto + recvfrom) to `argv[1]`:80. One line per case: the answer and
/// the peer the socket shows, or the error's name.
const MAPPED_CLIENT: &str = "import socket,sys\nd=sys.argv[1]\nfor case in ('tcp','udp-connected','udp'):\n  try:\n    if case=='tcp':\n      s=socket.socket(socket.AF_INET6)\n      s.settimeout(3)\n      s.connect((d,80))\n      print(s.recv(100).decode(),s.getpeername()[0])\n    else:\n      s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n      s.settimeout(3)\n      if case=='udp':\n        s.sendto(b'hi',(d,80))\n        m,a=s.recvfrom(100)\n        print(m.decode(),a[0])\n      else:\n        s.connect((d,80))\n        s.send(b'hi')\n        print(s.recv(100).decode(),s.getpeername()[0])\n  except Exception as e:\n    print(type(e).__name__)\n";

fn mapped_from_node(lab: &Lab, addr: &str) -> Vec<String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {} python3 -c \"$0\" {addr}",
        lab.cgroup.display(),
        lab.ns("n")
    );
    sh(&["sh", "-c", &script, MAPPED_CLIENT])
        .unwrap_or_else(|e| e)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// An IPv4-mapped ClusterIP (`::ffff:172.30.0.10`) given to a dual-stack IPv6 socket goes
/// through the IPv4 services: connect6 (TCP and connected UDP) and, for unconnected UDP,
/// the kernel's own sendmsg4 pick the backend; getpeername6/recvmsg6 show the mapped
/// frontend again. Before the programs are attached the same address reaches nothing.
#[test]
fn ipv4_mapped_clusterip_from_a_dual_stack_node_socket() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for netns, bpffs and tcx");
        return;
    }
    if !std::path::Path::new(CGROUP2).join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v2 at {CGROUP2}");
        return;
    }
    for tool in ["ip", "ethtool", "python3", "mount"] {
        if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            eprintln!("skipped: {tool} missing");
            return;
        }
    }
    let mut lab = setup_tagged("m").unwrap_or_else(|e| panic!("lab setup: {e}"));
    lab.serve("b", &[SERVER, UDP_SERVER], 2);
    let opts = EbpfOptions {
        cgroup_root: lab.cgroup.clone(),
        pin_dir: lab.bpffs.join("shunt"),
        interfaces: Interfaces::All,
        ..Default::default()
    };
    let web = svc("web", "172.30.0.10", vec![ep("10.1.1.2", false)]);
    let mut dns = svc("dns", "172.30.0.10", vec![ep("10.1.1.2", false)]);
    dns.port.name.protocol = crate::model::Protocol::Udp;
    let mut s = snap(vec![web, dns]);
    s.network.primary_ip = Some("10.1.0.1".parse().unwrap());

    let before = mapped_from_node(&lab, "::ffff:172.30.0.10");
    assert!(
        !before
            .iter()
            .any(|l| l.starts_with("hello") || l.starts_with("echo")),
        "nothing answers at the ClusterIP before shunt: {before:?}"
    );
    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
    });
    // The backend sees the node's IPv4 address on its link; the socket sees the frontend.
    assert_eq!(
        mapped_from_node(&lab, "::ffff:172.30.0.10"),
        [
            "hello 10.1.1.1 ::ffff:172.30.0.10",
            "echo 10.1.1.1 ::ffff:172.30.0.10",
            "echo 10.1.1.1 ::ffff:172.30.0.10",
        ]
    );
    in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        dp.cleanup().unwrap();
    });
    assert!(!opts.pin_dir.exists());
}

mod frag;
