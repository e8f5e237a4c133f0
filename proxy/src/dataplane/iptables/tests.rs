//! Root tests: the dataplane in a private network namespace, for both iptables-legacy and
//! iptables-nft. Skip (printing why) when not root or a tool is missing. The namespace is
//! always deleted (Drop guard), also when an assertion fails.
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use super::*;
use crate::model::{IpFamily, LocalDetector, NodeNetwork, NodePortIps, Protocol};
use crate::plan::iptables::tests::{ep, port, snapshot, state, v4};
use crate::plan::iptables::{ChainKind, endpoint_chain, port_chain};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn skip_reason(backend: Backend) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    let mut tools = vec!["ip".to_string(), "conntrack".to_string()];
    for f in [IpFamily::V4, IpFamily::V6] {
        for t in ["", "-save", "-restore"] {
            tools.push(backend.binary(f, t));
        }
    }
    tools
        .into_iter()
        .find(|t| !have(t))
        .map(|t| format!("{t} not found"))
}

/// Run a command inside the namespace; panics with its stderr on failure.
fn ns_ok(ns: &str, argv: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// iptables-save as chain -> rules (counters and comments lines dropped), one table.
fn chains(
    ns: &str,
    backend: Backend,
    family: IpFamily,
    table: &str,
) -> BTreeMap<String, Vec<String>> {
    let save = ns_ok(ns, &[&backend.binary(family, "-save"), "-t", table]);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in save.lines() {
        if let Some(d) = line.strip_prefix(':') {
            out.entry(d.split_whitespace().next().unwrap().to_string())
                .or_default();
        } else if let Some(r) = line.strip_prefix("-A ") {
            let name = r.split_whitespace().next().unwrap().to_string();
            out.entry(name).or_default().push(r.to_string());
        }
    }
    out
}

fn ours(c: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    c.keys()
        .filter(|k| k.starts_with("SHUNT-"))
        .cloned()
        .collect()
}

fn v6_snapshot() -> Snapshot {
    let mut sp = port("ns6", "web", "http", Protocol::Tcp, "172.30.0.1", 80);
    sp.family = IpFamily::V6;
    sp.cluster_ip = "fd00:172:30::41".parse().unwrap();
    sp.node_port = Some(3001);
    let mut e = ep("10.0.0.1", 80, true);
    e.ip = "fd00:10:180::1".parse().unwrap();
    let mut s = snapshot(vec![state(sp, vec![e])]);
    s.network = NodeNetwork {
        family: IpFamily::V6,
        node_name: "test-node".into(),
        primary_ip: Some("2001:db8::1".parse().unwrap()),
        node_port_ips: NodePortIps::AllLocal,
        local_detector: LocalDetector::ClusterCidr(vec!["fd00:10::/64".parse().unwrap()]),
        masquerade_all: false,
        service_cidrs: vec!["fd00:172:30::/112".parse().unwrap()],
    };
    s
}

fn v4_snapshot(a_endpoints: usize) -> Snapshot {
    let mut a = port("ns1", "a", "dns", Protocol::Udp, "172.30.0.10", 53);
    a.node_port = Some(3053);
    a.affinity_timeout_seconds = Some(600);
    let a_eps = (1..=a_endpoints)
        .map(|i| ep(&format!("10.180.0.{i}"), 53, i == 1))
        .collect();
    let mut b = port("ns2", "b", "", Protocol::Tcp, "172.30.0.20", 443);
    b.load_balancer_ips = vec![v4("198.51.100.4")];
    b.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
    b.external_policy_local = true;
    b.node_port = Some(3443);
    b.health_check_node_port = Some(30443);
    let b_eps = vec![ep("10.180.1.1", 8443, true), ep("10.180.1.2", 8443, false)];
    // c: probed with real connections (see `probe`).
    let c = port("ns3", "c", "", Protocol::Tcp, "172.30.0.30", 80);
    let c_eps = vec![ep("10.180.0.1", 8080, true)];
    snapshot(vec![state(a, a_eps), state(b, b_eps), state(c, c_eps)])
}

/// Real connections from inside the namespace (a thread that joined it): the ClusterIP
/// reaches the endpoint's listener, a port the Service does not expose is refused, an
/// unallocated address in the service CIDR is dropped (EPERM for a locally generated packet
/// dropped in OUTPUT, or a timeout).
fn probe(ns: &str) {
    ns_ok(ns, &["ip", "link", "set", "lo", "up"]);
    // No dummy module on every kernel: a veth pair inside the namespace does as well.
    ns_ok(
        ns,
        &[
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ],
    );
    ns_ok(ns, &["ip", "link", "set", "d1", "up"]);
    ns_ok(ns, &["ip", "addr", "add", "192.168.0.2/24", "dev", "d0"]);
    ns_ok(ns, &["ip", "addr", "add", "10.180.0.1/32", "dev", "d0"]);
    ns_ok(ns, &["ip", "link", "set", "d0", "up"]);
    ns_ok(ns, &["ip", "route", "add", "172.30.0.0/16", "dev", "d0"]);
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::io::{ErrorKind, Read, Write};
        use std::net::{SocketAddr, TcpListener, TcpStream};
        use std::time::Duration;
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind("10.180.0.1:8080").unwrap();
        let t = Duration::from_secs(2);
        let to = |a: &str| a.parse::<SocketAddr>().unwrap();
        let mut c = TcpStream::connect_timeout(&to("172.30.0.30:80"), t).expect("ClusterIP");
        let (mut srv, _) = l.accept().unwrap();
        srv.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        let e = TcpStream::connect_timeout(&to("172.30.0.30:81"), t).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "wrong port: {e}");
        let e = TcpStream::connect_timeout(&to("172.30.0.99:80"), t).unwrap_err();
        assert!(
            e.kind() == ErrorKind::PermissionDenied || e.kind() == ErrorKind::TimedOut,
            "unallocated ClusterIP: {e}"
        );
    })
    .join()
    .expect("probe thread");
}

fn run_backend(backend: Backend, tag: &str) {
    if let Some(why) = skip_reason(backend) {
        eprintln!("skipping iptables {tag} netns test: {why}");
        return;
    }
    let name = format!("shunt-ipt-test-{}-{tag}", std::process::id());
    let st = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(st.success(), "ip netns add {name}");
    let ns = Netns(name);
    let n = ns.0.as_str();
    let v4bin = backend.binary(IpFamily::V4, "");
    let v6bin = backend.binary(IpFamily::V6, "");

    // Foreign state that must survive everything.
    ns_ok(n, &[&v4bin, "-t", "nat", "-N", "FOREIGN-CHAIN"]);
    ns_ok(
        n,
        &[
            &v4bin,
            "-t",
            "nat",
            "-A",
            "FOREIGN-CHAIN",
            "-s",
            "10.9.9.9",
            "-j",
            "RETURN",
        ],
    );
    ns_ok(
        n,
        &[
            &v4bin,
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-j",
            "FOREIGN-CHAIN",
        ],
    );
    ns_ok(
        n,
        &[
            &v4bin, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
        ],
    );
    ns_ok(
        n,
        &[
            &v6bin, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
        ],
    );
    let foreign_nat = chains(n, backend, IpFamily::V4, "nat")["FOREIGN-CHAIN"].clone();
    let foreign_input = chains(n, backend, IpFamily::V4, "filter")["INPUT"].clone();

    let prefix: Vec<String> = ["ip", "netns", "exec", n].map(String::from).to_vec();
    // The foreign rules make the auto-detection pick this backend.
    assert_eq!(detect_backend(&prefix), backend, "auto-detection");
    let choice = match backend {
        Backend::Legacy => BackendChoice::Legacy,
        Backend::Nft => BackendChoice::Nft,
    };
    let mut dp = IptablesDataplane::new(IptablesOptions {
        backend: choice,
        command_prefix: prefix.clone(),
    })
    .unwrap();
    assert_eq!(dp.mode(), "iptables");

    // Full sync.
    let snaps = vec![v4_snapshot(3), v6_snapshot()];
    let out = dp
        .sync(SyncRequest {
            snapshots: &snaps,
            changed: &Changed::All,
        })
        .unwrap();
    assert!(out.full);
    let total: u64 = out.rules_total.iter().map(|(_, n)| n).sum();
    if std::env::var_os("SHUNT_DUMP").is_some() {
        eprintln!("{}", ns_ok(n, &[&backend.binary(IpFamily::V4, "-save")]));
    }
    let nat4 = chains(n, backend, IpFamily::V4, "nat");
    let filter4 = chains(n, backend, IpFamily::V4, "filter");
    let nat6 = chains(n, backend, IpFamily::V6, "nat");
    let filter6 = chains(n, backend, IpFamily::V6, "filter");
    let kernel_rules: usize = [&nat4, &filter4, &nat6, &filter6]
        .iter()
        .flat_map(|c| c.iter().filter(|(k, _)| k.starts_with("SHUNT-")))
        .map(|(_, r)| r.len())
        .sum();
    assert_eq!(total, kernel_rules as u64, "rules_total vs iptables-save");
    let a_name = &snaps[0].services.values().next().unwrap().port.name;
    let svc_a = port_chain(ChainKind::Svc, a_name);
    for c in [
        "SHUNT-SERVICES",
        "SHUNT-NODEPORTS",
        "SHUNT-POSTROUTING",
        svc_a.as_str(),
    ] {
        assert!(nat4.contains_key(c), "{c} missing: {:?}", nat4.keys());
    }
    assert!(filter4.contains_key("SHUNT-PROXY-FIREWALL"));
    assert!(nat6.contains_key("SHUNT-SERVICES"));
    let jumps = |c: &BTreeMap<String, Vec<String>>, chain: &str, target: &str| {
        c[chain]
            .iter()
            .filter(|r| r.ends_with(&format!("-j {target}")))
            .count()
    };
    assert_eq!(jumps(&nat4, "PREROUTING", "SHUNT-SERVICES"), 1);
    assert_eq!(jumps(&nat6, "OUTPUT", "SHUNT-SERVICES"), 1);
    assert_eq!(jumps(&filter4, "FORWARD", "SHUNT-FORWARD"), 1);

    probe(n);

    // A second full sync neither duplicates jump rules nor changes anything.
    dp.sync(SyncRequest {
        snapshots: &snaps,
        changed: &Changed::All,
    })
    .unwrap();
    assert_eq!(chains(n, backend, IpFamily::V4, "nat"), nat4);
    assert_eq!(chains(n, backend, IpFamily::V4, "filter"), filter4);

    // Partial sync: Service a (UDP) loses endpoint 10.180.0.3. A UDP flow DNATed to it
    // must be deleted from conntrack, one to a remaining endpoint kept.
    let flow = |ep: &str, sport: &str| {
        ns_ok(
            n,
            &[
                "conntrack",
                "-I",
                "-p",
                "udp",
                "-s",
                "10.0.0.2",
                "-d",
                "172.30.0.10",
                "--sport",
                sport,
                "--dport",
                "53",
                "-r",
                ep,
                "-q",
                "10.0.0.2",
                "--reply-port-src",
                "53",
                "--reply-port-dst",
                sport,
                "-t",
                "100",
            ],
        );
    };
    flow("10.180.0.3", "1111");
    flow("10.180.0.1", "2222");
    let snaps2 = vec![v4_snapshot(2), v6_snapshot()];
    let changed = Changed::Services(BTreeSet::from([a_name.service.clone()]));
    let out = dp
        .sync(SyncRequest {
            snapshots: &snaps2,
            changed: &changed,
        })
        .unwrap();
    assert!(!out.full);
    assert_eq!(out.conntrack_deleted, 1);
    let left = ns_ok(n, &["conntrack", "-L", "-p", "udp"]);
    assert!(
        left.contains("sport=2222") && !left.contains("sport=1111"),
        "{left}"
    );
    let nat4b = chains(n, backend, IpFamily::V4, "nat");
    let gone = endpoint_chain(a_name, &snaps[0].services[a_name].endpoints[2]);
    assert!(nat4.contains_key(&gone) && !nat4b.contains_key(&gone));
    let a_chains: BTreeSet<String> = snaps[0].services[a_name]
        .endpoints
        .iter()
        .map(|e| endpoint_chain(a_name, e))
        .chain([
            svc_a.clone(),
            port_chain(ChainKind::Svl, a_name),
            port_chain(ChainKind::Ext, a_name),
        ])
        .collect();
    let changed_chains: BTreeSet<String> = nat4
        .keys()
        .chain(nat4b.keys())
        .filter(|k| nat4.get(*k) != nat4b.get(*k))
        .cloned()
        .collect();
    assert!(changed_chains.contains(&svc_a), "{changed_chains:?}");
    for c in &changed_chains {
        assert!(
            a_chains.contains(c),
            "partial sync changed unrelated chain {c}"
        );
    }
    // Service b's chains are byte-identical.
    let b_svc = port_chain(
        ChainKind::Svc,
        &snaps[0].services.values().nth(1).unwrap().port.name,
    );
    assert_eq!(nat4[&b_svc], nat4b[&b_svc]);

    // A node-wide change is never partial, even when the caller names no Service.
    let mut snaps3 = snaps2.clone();
    snaps3[0].network.masquerade_all = true;
    let out = dp
        .sync(SyncRequest {
            snapshots: &snaps3,
            changed: &Changed::Services(BTreeSet::new()),
        })
        .unwrap();
    assert!(out.full, "network change must force a full sync");
    let nat4m = chains(n, backend, IpFamily::V4, "nat");
    assert!(
        nat4m[&b_svc][0].contains("-j SHUNT-MARK-MASQ") && !nat4m[&b_svc][0].contains("! -s"),
        "{:?}",
        nat4m[&b_svc]
    );

    // A restart: a fresh dataplane whose first sync is full and removes what is stale
    // from the previous run (Service b deleted meanwhile).
    drop(dp);
    let mut dp = IptablesDataplane::new(IptablesOptions {
        backend: choice,
        command_prefix: prefix.clone(),
    })
    .unwrap();
    let only_a = {
        let mut s = v4_snapshot(2);
        s.services.retain(|k, _| k == a_name);
        vec![s, v6_snapshot()]
    };
    let out = dp
        .sync(SyncRequest {
            snapshots: &only_a,
            changed: &Changed::Services(BTreeSet::new()),
        })
        .unwrap();
    assert!(out.full, "first sync of a new instance must be full");
    let nat4c = chains(n, backend, IpFamily::V4, "nat");
    assert!(!nat4c.contains_key(&b_svc));
    assert!(nat4c.contains_key(&svc_a));

    // Foreign state untouched throughout.
    assert_eq!(
        chains(n, backend, IpFamily::V4, "nat")["FOREIGN-CHAIN"],
        foreign_nat
    );
    let input = &chains(n, backend, IpFamily::V4, "filter")["INPUT"];
    for r in &foreign_input {
        assert!(input.contains(r), "foreign INPUT rule {r} lost");
    }

    // A failed restore (a foreign rule still jumps to a chain the partial sync deletes) is
    // an error naming the tool, changes nothing, and makes the next sync full.
    ns_ok(
        n,
        &[&v4bin, "-t", "nat", "-A", "FOREIGN-CHAIN", "-j", &svc_a],
    );
    let without_a = {
        let mut s = only_a.clone();
        s[0].services.clear();
        s
    };
    let err = dp
        .sync(SyncRequest {
            snapshots: &without_a,
            changed: &Changed::Services(BTreeSet::from([a_name.service.clone()])),
        })
        .unwrap_err();
    assert!(
        matches!(&err, DataplaneError::Tool { tool, .. } if tool.contains("-restore")),
        "{err}"
    );
    assert!(chains(n, backend, IpFamily::V4, "nat").contains_key(&svc_a));
    ns_ok(
        n,
        &[&v4bin, "-t", "nat", "-D", "FOREIGN-CHAIN", "-j", &svc_a],
    );
    let out = dp
        .sync(SyncRequest {
            snapshots: &without_a,
            changed: &Changed::Services(BTreeSet::new()),
        })
        .unwrap();
    assert!(out.full, "the sync after a failure must be full");
    assert!(!chains(n, backend, IpFamily::V4, "nat").contains_key(&svc_a));

    // Cleanup: nothing of ours in any table of either family; foreign state kept.
    dp.cleanup().unwrap();
    for f in [IpFamily::V4, IpFamily::V6] {
        let save = ns_ok(n, &[&backend.binary(f, "-save")]);
        assert!(!save.contains("SHUNT-"), "{f:?} after cleanup:\n{save}");
    }
    let nat = chains(n, backend, IpFamily::V4, "nat");
    assert_eq!(nat["FOREIGN-CHAIN"], foreign_nat);
    assert_eq!(jumps(&nat, "PREROUTING", "FOREIGN-CHAIN"), 1);
    assert_eq!(
        chains(n, backend, IpFamily::V4, "filter")["INPUT"],
        foreign_input
    );
    assert!(ours(&nat).is_empty());
    // Cleanup again (nothing there) is fine.
    dp.cleanup().unwrap();
}

#[test]
fn netns_legacy_full_partial_restart_cleanup() {
    run_backend(Backend::Legacy, "legacy");
}

#[test]
fn netns_nft_full_partial_restart_cleanup() {
    run_backend(Backend::Nft, "nft");
}

#[test]
fn backend_choice_parses_flag_values_and_detects_hints() {
    assert_eq!(
        "auto".parse::<BackendChoice>().unwrap(),
        BackendChoice::Auto
    );
    assert_eq!(
        "legacy".parse::<BackendChoice>().unwrap(),
        BackendChoice::Legacy
    );
    assert_eq!("nft".parse::<BackendChoice>().unwrap(), BackendChoice::Nft);
    assert!("iptables".parse::<BackendChoice>().is_err());
    assert_eq!(
        Backend::Legacy.binary(IpFamily::V6, "-restore"),
        "ip6tables-legacy-restore"
    );
    assert_eq!(Backend::Nft.binary(IpFamily::V4, ""), "iptables-nft");
    assert!(has_kubelet_chains(
        "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
    ));
    assert!(!has_kubelet_chains(
        "*mangle\n-A X -j KUBE-IPTABLES-HINT\nCOMMIT\n"
    ));
    assert_eq!(
        rule_lines("*nat\n:A - [0:0]\n-A A -j RETURN\n-A A -j RETURN\nCOMMIT\n"),
        2
    );
}
