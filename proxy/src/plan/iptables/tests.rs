//! Table tests: every packet of the conformance scenarios traced through the rendered
//! rules, plus affinity, source ranges, partial restores and chain names.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::render::{parse_saved_chains, render_delete};
use super::tracer::{Outcome, Packet, Tracer};
use super::*;
use crate::model::scenario_fixture::{scenario_files, scenario_snapshot, scenarios};
use crate::model::{
    Endpoint, IpFamily, LocalDetector, NodeNetwork, NodePortIps, Protocol, ServicePort,
    ServicePortName, ServicePortState, Snapshot,
};

fn full(rs: &Ruleset) -> String {
    render(
        rs,
        RenderScope::Full {
            existing: &BTreeSet::new(),
        },
    )
    .text
}

fn tracer(snap: &Snapshot, local: &[IpAddr]) -> Tracer {
    Tracer::new(&full(&build(snap)), &jump_rules(), local)
}

fn protocol(s: &str) -> Protocol {
    match s {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => panic!("unknown protocol {other}"),
    }
}

/// Check a traced outcome set against a scenario expectation.
fn check(name: &str, got: &BTreeSet<Outcome>, expect: &Value) {
    if let Some(eps) = expect["endpoints"].as_array() {
        let want: BTreeSet<SocketAddr> = eps
            .iter()
            .map(|e| e.as_str().unwrap().parse().unwrap())
            .collect();
        let masq = expect["masquerade"].as_bool().unwrap();
        let want: BTreeSet<Outcome> = want
            .into_iter()
            .map(|to| Outcome::Dnat { to, masq })
            .collect();
        assert_eq!(got, &want, "{name}");
    } else {
        let want = match expect["verdict"].as_str().unwrap() {
            "drop" => Outcome::Drop,
            "reject" => Outcome::Reject,
            "passthrough" => Outcome::Pass { masq: false },
            other => panic!("{name}: verdict {other}"),
        };
        assert_eq!(got, &BTreeSet::from([want]), "{name}");
    }
}

#[test]
fn every_scenario_packet_gets_its_upstream_verdict() {
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let mut checked = 0;
    for file in files {
        for sc in scenarios(&file) {
            let id = sc["id"].as_str().unwrap();
            let (snap, local) = scenario_snapshot(&sc);
            let t = tracer(&snap, &local);
            for p in sc["packets"].as_array().into_iter().flatten() {
                let pkt = Packet {
                    protocol: protocol(p["protocol"].as_str().unwrap()),
                    src: p["source_ip"].as_str().unwrap().parse().unwrap(),
                    dst: p["dest_ip"].as_str().unwrap().parse().unwrap(),
                    dport: p["dest_port"].as_u64().unwrap() as u16,
                };
                let name = format!("{id}: {}", p["name"].as_str().unwrap());
                check(&name, &t.trace(&pkt), &p["expect"]);
                checked += 1;
            }
        }
    }
    eprintln!("traced {checked} scenario packets");
    assert!(checked >= 39, "only {checked} scenario packets");
}

// ---- hand-built snapshots ----

pub(crate) fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(crate) fn network(family: IpFamily) -> NodeNetwork {
    NodeNetwork {
        family,
        node_name: "test-node".into(),
        primary_ip: Some(v4("192.168.0.2")),
        node_port_ips: NodePortIps::Addresses(vec![v4("192.168.0.2")]),
        local_detector: LocalDetector::ClusterCidr(vec!["10.0.0.0/8".parse().unwrap()]),
        masquerade_all: false,
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
    }
}

const NODE: [&str; 2] = ["192.168.0.2", "192.168.1.2"];

fn node_addrs() -> Vec<IpAddr> {
    NODE.iter().map(|s| v4(s)).collect()
}

pub(crate) fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        ip: v4(ip),
        port,
        ready: true,
        serving: true,
        terminating: false,
        is_local: local,
        node_name: local.then(|| "test-node".to_string()),
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    }
}

pub(crate) fn port(
    ns: &str,
    name: &str,
    pname: &str,
    proto: Protocol,
    cip: &str,
    p: u16,
) -> ServicePort {
    ServicePort {
        name: ServicePortName {
            service: crate::model::ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            },
            port: pname.into(),
            protocol: proto,
        },
        family: IpFamily::V4,
        cluster_ip: v4(cip),
        port: p,
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        traffic_distribution: None,
    }
}

/// Cluster policy everywhere: cluster endpoints are all, local are the local ones.
pub(crate) fn state(port: ServicePort, eps: Vec<Endpoint>) -> ServicePortState {
    let local: Vec<Endpoint> = eps.iter().filter(|e| e.is_local).cloned().collect();
    ServicePortState {
        has_any_endpoints: !eps.is_empty(),
        cluster_endpoints: if port.uses_cluster_endpoints() {
            eps.clone()
        } else {
            vec![]
        },
        local_endpoints: if port.uses_local_endpoints() {
            local
        } else {
            vec![]
        },
        endpoints: eps,
        port,
    }
}

pub(crate) fn snapshot(states: Vec<ServicePortState>) -> Snapshot {
    Snapshot {
        network: network(IpFamily::V4),
        services: states
            .into_iter()
            .map(|s| (s.port.name.clone(), s))
            .collect(),
    }
}

fn pkt(proto: Protocol, src: &str, dst: &str, dport: u16) -> Packet {
    Packet {
        protocol: proto,
        src: v4(src),
        dst: v4(dst),
        dport,
    }
}

fn dnat(to: &str, masq: bool) -> Outcome {
    Outcome::Dnat {
        to: to.parse().unwrap(),
        masq,
    }
}

#[test]
fn chain_names_match_upstream_hashes() {
    // Upstream's TestOverallIPTablesRules dump: ns1/svc1:p80 is KUBE-SVC-XPGD46QRK7WJZT7O
    // and its endpoint 10.180.0.1:80 is KUBE-SEP-SXIVWICOYRO3J4NJ.
    let sp = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    assert_eq!(
        port_chain(ChainKind::Svc, &sp.name),
        "SHUNT-SVC-XPGD46QRK7WJZT7O"
    );
    assert_eq!(
        port_chain(ChainKind::Ext, &sp.name),
        "SHUNT-EXT-XPGD46QRK7WJZT7O"
    );
    assert_eq!(
        endpoint_chain(&sp.name, &ep("10.180.0.1", 80, false)),
        "SHUNT-SEP-SXIVWICOYRO3J4NJ"
    );
    // Protocol is part of the hash; long names never exceed the limit.
    let udp = port("ns1", "svc1", "p80", Protocol::Udp, "172.30.0.41", 80);
    assert_ne!(
        port_chain(ChainKind::Svc, &udp.name),
        port_chain(ChainKind::Svc, &sp.name)
    );
    let long = port(
        &"n".repeat(63),
        &"s".repeat(63),
        &"p".repeat(15),
        Protocol::Sctp,
        "172.30.0.1",
        1,
    );
    for kind in [
        ChainKind::Svc,
        ChainKind::Svl,
        ChainKind::Ext,
        ChainKind::Fw,
    ] {
        let c = port_chain(kind, &long.name);
        assert!(c.len() <= MAX_CHAIN_LEN, "{c}");
        assert!(
            !c.contains('n') && !c.contains('s'),
            "{c} leaks the object name"
        );
    }
    let e = endpoint_chain(&long.name, &ep("10.180.0.1", 80, false));
    assert!(e.len() <= MAX_CHAIN_LEN);
    for j in jump_rules() {
        let target = j.args.last().unwrap();
        assert!(target.len() <= MAX_CHAIN_LEN && target.starts_with(CHAIN_PREFIX));
    }
}

#[test]
fn statistic_cascade_is_uniform_and_enumerates_all() {
    let eps: Vec<Endpoint> = (1..=4)
        .map(|i| ep(&format!("10.180.0.{i}"), 80, false))
        .collect();
    let snap = snapshot(vec![state(
        port("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80),
        eps,
    )]);
    let rs = build(&snap);
    let svc = &rs.services.values().next().unwrap()[0];
    let probs: Vec<&str> = svc
        .rules
        .iter()
        .filter_map(|r| r.split("--probability ").nth(1))
        .map(|s| s.split(' ').next().unwrap())
        .collect();
    assert_eq!(probs, ["0.2500000000", "0.3333333333", "0.5000000000"]);
    let t = tracer(&snap, &node_addrs());
    let got = t.trace(&pkt(Protocol::Tcp, "10.0.0.9", "172.30.0.1", 80));
    let want: BTreeSet<Outcome> = (1..=4)
        .map(|i| dnat(&format!("10.180.0.{i}:80"), false))
        .collect();
    assert_eq!(got, want);
    // From outside the pod CIDRs: masqueraded; with masquerade-all: even from pods.
    let got = t.trace(&pkt(Protocol::Tcp, "203.0.113.2", "172.30.0.1", 80));
    assert!(
        got.iter()
            .all(|o| matches!(o, Outcome::Dnat { masq: true, .. }))
    );
    let mut all = snap.clone();
    all.network.masquerade_all = true;
    let got = tracer(&all, &node_addrs()).trace(&pkt(Protocol::Tcp, "10.0.0.9", "172.30.0.1", 80));
    assert!(
        got.iter()
            .all(|o| matches!(o, Outcome::Dnat { masq: true, .. }))
    );
    // detect-local None: no ClusterIP masquerade rule at all (upstream's no-op detector).
    let mut none = snap.clone();
    none.network.local_detector = LocalDetector::None;
    let got =
        tracer(&none, &node_addrs()).trace(&pkt(Protocol::Tcp, "203.0.113.2", "172.30.0.1", 80));
    assert!(
        got.iter()
            .all(|o| matches!(o, Outcome::Dnat { masq: false, .. }))
    );
}

#[test]
fn multiple_pod_cidrs_use_the_nonpod_chain() {
    let mut snap = snapshot(vec![state(
        port("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80),
        vec![ep("10.180.0.1", 80, false)],
    )]);
    snap.network.local_detector = LocalDetector::ClusterCidr(vec![
        "10.0.0.0/16".parse().unwrap(),
        "10.1.0.0/16".parse().unwrap(),
    ]);
    let t = tracer(&snap, &node_addrs());
    for (src, masq) in [("10.0.0.5", false), ("10.1.0.5", false), ("10.2.0.5", true)] {
        assert_eq!(
            t.trace(&pkt(Protocol::Tcp, src, "172.30.0.1", 80)),
            BTreeSet::from([dnat("10.180.0.1:80", masq)]),
            "{src}"
        );
    }
}

#[test]
fn client_ip_affinity_sticks_to_the_recent_endpoint() {
    let mut sp = port("ns", "s", "", Protocol::Tcp, "172.30.0.1", 80);
    sp.affinity_timeout_seconds = Some(10800);
    let eps = vec![ep("10.180.0.1", 80, false), ep("10.180.0.2", 80, false)];
    let snap = snapshot(vec![state(sp.clone(), eps.clone())]);
    let rs = build(&snap);
    let text = full(&rs);
    let sep2 = endpoint_chain(&sp.name, &eps[1]);
    assert!(text.contains(&format!(
        "-m recent --name {sep2} --mask 255.255.255.255 --rcheck --seconds 10800 --reap -j {sep2}"
    )));
    assert!(text.contains(&format!(
        "-m recent --name {sep2} --mask 255.255.255.255 --set"
    )));
    let mut t = Tracer::new(&text, &jump_rules(), &node_addrs());
    let p = pkt(Protocol::Tcp, "10.0.0.9", "172.30.0.1", 80);
    // No history: either endpoint.
    assert_eq!(t.trace(&p).len(), 2);
    // The client was sent to endpoint 2 before: only endpoint 2.
    t.recent
        .insert(sep2.clone(), BTreeSet::from([v4("10.0.0.9")]));
    assert_eq!(t.trace(&p), BTreeSet::from([dnat("10.180.0.2:80", false)]));
    // Another client is unaffected.
    let q = pkt(Protocol::Tcp, "10.0.0.10", "172.30.0.1", 80);
    assert_eq!(t.trace(&q).len(), 2);
}

#[test]
fn load_balancer_source_ranges() {
    let mut sp = port("ns", "lb", "p", Protocol::Tcp, "172.30.0.5", 80);
    sp.load_balancer_ips = vec![v4("198.51.100.4")];
    sp.load_balancer_source_ranges = vec![
        "203.0.113.0/25".parse().unwrap(),
        "192.168.0.0/24".parse().unwrap(),
    ];
    sp.node_port = Some(3005);
    let snap = snapshot(vec![state(sp.clone(), vec![ep("10.180.0.1", 80, false)])]);
    let t = tracer(&snap, &node_addrs());
    // Inside a range: accepted (masqueraded: eTP Cluster).
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "203.0.113.2", "198.51.100.4", 80)),
        BTreeSet::from([dnat("10.180.0.1:80", true)])
    );
    // Outside: dropped by SHUNT-PROXY-FIREWALL.
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "203.0.113.130", "198.51.100.4", 80)),
        BTreeSet::from([Outcome::Drop])
    );
    // The node itself: its primary IP is in 192.168.0.0/24, so node traffic is allowed.
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "192.168.1.2", "198.51.100.4", 80)),
        BTreeSet::from([dnat("10.180.0.1:80", true)])
    );
    // ClusterIP and NodePort are not subject to the ranges.
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "203.0.113.130", "192.168.0.2", 3005)),
        BTreeSet::from([dnat("10.180.0.1:80", true)])
    );
    // Without the node range, node traffic to the LB IP is refused as well.
    let mut sp2 = sp;
    sp2.load_balancer_source_ranges = vec!["203.0.113.0/25".parse().unwrap()];
    let t = tracer(
        &snapshot(vec![state(sp2, vec![ep("10.180.0.1", 80, false)])]),
        &node_addrs(),
    );
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "192.168.1.2", "198.51.100.4", 80)),
        BTreeSet::from([Outcome::Drop])
    );
}

#[test]
fn local_policies_without_local_endpoints_drop_and_all_local_nodeports() {
    let mut sp = port("ns", "l", "", Protocol::Udp, "172.30.0.7", 53);
    sp.external_policy_local = true;
    sp.internal_policy_local = true;
    sp.node_port = Some(3007);
    sp.external_ips = vec![v4("192.168.99.20")];
    let mut snap = snapshot(vec![state(sp, vec![ep("10.180.9.9", 53, false)])]);
    snap.network.node_port_ips = NodePortIps::AllLocal;
    let t = tracer(&snap, &node_addrs());
    for (src, dst, port) in [
        ("10.0.0.2", "172.30.0.7", 53),
        ("203.0.113.2", "192.168.99.20", 53),
        ("203.0.113.2", "192.168.1.2", 3007),
        ("192.168.0.2", "192.168.1.2", 3007),
    ] {
        assert_eq!(
            t.trace(&pkt(Protocol::Udp, src, dst, port)),
            BTreeSet::from([Outcome::Drop]),
            "{src} -> {dst}:{port}"
        );
    }
    // Loopback never accepts NodePorts.
    let mut with_lo = node_addrs();
    with_lo.push(v4("127.0.0.1"));
    let t2 = tracer(&snap, &with_lo);
    assert_eq!(
        t2.trace(&pkt(Protocol::Udp, "127.0.0.1", "127.0.0.1", 3007)),
        BTreeSet::from([Outcome::Pass { masq: false }])
    );
    // TCP to the same NodePort number is not ours.
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "203.0.113.2", "192.168.1.2", 3007)),
        BTreeSet::from([Outcome::Pass { masq: false }])
    );
}

#[test]
fn etp_local_node_originated_traffic_is_masqueraded_to_cluster_endpoints() {
    let mut sp = port("ns", "l", "", Protocol::Tcp, "172.30.0.8", 80);
    sp.external_policy_local = true;
    sp.node_port = Some(3008);
    sp.health_check_node_port = Some(30008);
    let snap = snapshot(vec![state(
        sp,
        vec![ep("10.180.0.1", 80, false), ep("10.180.2.1", 80, true)],
    )]);
    let t = tracer(&snap, &node_addrs());
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "192.168.0.2", "192.168.0.2", 3008)),
        BTreeSet::from([dnat("10.180.0.1:80", true), dnat("10.180.2.1:80", true)])
    );
    assert_eq!(
        t.trace(&pkt(Protocol::Tcp, "203.0.113.2", "192.168.0.2", 3008)),
        BTreeSet::from([dnat("10.180.2.1:80", false)])
    );
    let filter_np = t.chain(Table::Filter, NODEPORTS).unwrap();
    assert!(filter_np[0].join(" ").contains("--dport 30008 -j ACCEPT"));
}

#[test]
fn partial_restore_rewrites_only_changed_services_and_deletes_stale_chains() {
    let a = state(
        port("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80),
        vec![ep("10.180.0.1", 80, false), ep("10.180.0.2", 80, false)],
    );
    let b = state(
        port("ns", "b", "", Protocol::Tcp, "172.30.0.2", 80),
        vec![ep("10.180.1.1", 80, false)],
    );
    let before = build(&snapshot(vec![a.clone(), b.clone()]));
    let previous = before.ownership();
    // a loses an endpoint; b is unchanged.
    let mut a2 = a.clone();
    a2.endpoints.pop();
    a2.cluster_endpoints.pop();
    let after = build(&snapshot(vec![a2.clone(), b.clone()]));
    let key_a = a.port.name.service.clone();
    let changed = BTreeSet::from([key_a.clone()]);
    let r = render(
        &after,
        RenderScope::Partial {
            services: &changed,
            previous: &previous,
        },
    );
    let gone = endpoint_chain(&a.port.name, &a.endpoints[1]);
    assert_eq!(r.deleted, BTreeSet::from([(Table::Nat, gone.clone())]));
    assert!(r.text.contains(&format!(":{gone} - [0:0]\n")));
    assert!(r.text.contains(&format!("-X {gone}\n")));
    let svc_b = port_chain(ChainKind::Svc, &b.port.name);
    assert!(!r.text.contains(&svc_b) || r.text.contains(&format!("-j {svc_b}")));
    assert!(
        !r.text.contains(&format!(":{svc_b} ")),
        "unchanged chain rewritten"
    );
    assert!(r.written.contains(&(Table::Nat, SERVICES.to_string())));
    assert!(
        r.written
            .contains(&(Table::Nat, port_chain(ChainKind::Svc, &a.port.name)))
    );
    // Applied on top of the old full state, the partial restore equals the new full state.
    let merged = Tracer::new(
        &format!("{}{}", full(&before), r.text),
        &jump_rules(),
        &node_addrs(),
    );
    let fresh = Tracer::new(&full(&after), &jump_rules(), &node_addrs());
    for p in [
        pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.1", 80),
        pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.2", 80),
    ] {
        assert_eq!(merged.trace(&p), fresh.trace(&p));
    }
    // Removing Service b entirely deletes all its chains.
    let after2 = build(&snapshot(vec![a2]));
    let key_b = b.port.name.service.clone();
    let r2 = render(
        &after2,
        RenderScope::Partial {
            services: &BTreeSet::from([key_b.clone()]),
            previous: &after.ownership(),
        },
    );
    assert_eq!(r2.deleted, after.ownership()[&key_b]);
    // A full render deletes every shunt chain found in the kernel and not wanted, and
    // never a foreign one.
    let existing = BTreeSet::from([
        (Table::Nat, "SHUNT-SVC-OLDOLDOLDOLDOLDO".to_string()),
        (Table::Nat, "KUBE-SERVICES".to_string()),
        (Table::Nat, SERVICES.to_string()),
    ]);
    let r3 = render(
        &after2,
        RenderScope::Full {
            existing: &existing,
        },
    );
    assert_eq!(
        r3.deleted,
        BTreeSet::from([(Table::Nat, "SHUNT-SVC-OLDOLDOLDOLDOLDO".to_string())])
    );
    assert!(!r3.text.contains("KUBE-"));
    // Rule counts cover the whole state.
    let counts = after2.rule_counts();
    let lines = full(&after2)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count() as u64;
    assert_eq!(counts[&Table::Nat] + counts[&Table::Filter], lines);
}

#[test]
fn save_parsing_and_delete_rendering() {
    let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-X - [0:0]\n:SHUNT-SERVICES - [0:0]\n-A PREROUTING -j SHUNT-SERVICES\nCOMMIT\n*filter\n:SHUNT-FORWARD - [0:0]\nCOMMIT\n*mangle\n:SHUNT-NOT-OURS - [0:0]\nCOMMIT\n";
    let got = parse_saved_chains(save);
    assert_eq!(
        got,
        BTreeSet::from([
            (Table::Nat, "SHUNT-SERVICES".to_string()),
            (Table::Filter, "SHUNT-FORWARD".to_string())
        ])
    );
    assert_eq!(
        render_delete(&got),
        "*filter\n:SHUNT-FORWARD - [0:0]\n-X SHUNT-FORWARD\nCOMMIT\n*nat\n:SHUNT-SERVICES - [0:0]\n-X SHUNT-SERVICES\nCOMMIT\n"
    );
}

#[test]
fn ipv6_rules_use_v6_masks_and_brackets() {
    let mut sp = port("ns", "s6", "", Protocol::Tcp, "172.30.0.1", 80);
    sp.family = IpFamily::V6;
    sp.cluster_ip = "fd00:172:30::41".parse().unwrap();
    sp.affinity_timeout_seconds = Some(60);
    let mut e = ep("10.0.0.1", 80, false);
    e.ip = "fd00:10:180::1".parse().unwrap();
    let mut snap = snapshot(vec![state(sp, vec![e])]);
    snap.network = NodeNetwork {
        family: IpFamily::V6,
        node_name: "test-node".into(),
        primary_ip: Some("2001:db8::1".parse().unwrap()),
        node_port_ips: NodePortIps::Addresses(vec!["2001:db8::1".parse().unwrap()]),
        local_detector: LocalDetector::ClusterCidr(vec!["fd00:10::/64".parse().unwrap()]),
        masquerade_all: false,
        service_cidrs: vec!["fd00:172:30::/112".parse().unwrap()],
    };
    let text = full(&build(&snap));
    assert!(text.contains("--to-destination [fd00:10:180::1]:80"));
    assert!(text.contains("--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    assert!(text.contains("-d fd00:172:30::41/128"));
    assert!(!text.contains("0.0.0.0") && !text.contains("/32"));
}

// ---- the scenario worlds, hand-built (independent of /work/shared being present) ----

enum Want {
    Eps(&'static [&'static str], bool),
    To(Vec<SocketAddr>, bool),
    Drop,
    Reject,
    Pass,
}

fn want(w: &Want) -> BTreeSet<Outcome> {
    match w {
        Want::Eps(eps, masq) => eps.iter().map(|e| dnat(e, *masq)).collect(),
        Want::To(eps, masq) => eps
            .iter()
            .map(|&to| Outcome::Dnat { to, masq: *masq })
            .collect(),
        Want::Drop => BTreeSet::from([Outcome::Drop]),
        Want::Reject => BTreeSet::from([Outcome::Reject]),
        Want::Pass => BTreeSet::from([Outcome::Pass { masq: false }]),
    }
}

fn scenario_node() -> Vec<IpAddr> {
    [
        "192.168.0.2",
        "192.168.1.2",
        "192.168.99.11",
        "2001:db8::1",
        "2001:db8:1::2",
    ]
    .iter()
    .map(|s| v4(s))
    .collect()
}

fn run_table(name: &str, snap: &Snapshot, rows: &[(Protocol, &str, &str, u16, Want)]) {
    let t = tracer(snap, &scenario_node());
    for (proto, src, dst, dport, w) in rows {
        let p = Packet {
            protocol: *proto,
            src: v4(src),
            dst: v4(dst),
            dport: *dport,
        };
        assert_eq!(
            t.trace(&p),
            want(w),
            "{name}: {src} -> {dst}:{dport} {proto:?}"
        );
    }
}

#[test]
fn hand_built_basic_clusterip() {
    use Protocol::*;
    let svc1 = port("ns1", "svc1", "http", Tcp, "172.30.0.41", 80);
    let svc2 = |p: &str, proto, port_: u16, target: u16| {
        state(
            port("ns2", "svc2", p, proto, "172.30.0.42", port_),
            vec![
                ep("10.180.0.1", target, true),
                ep("10.180.2.1", target, false),
            ],
        )
    };
    let snap = snapshot(vec![
        state(svc1, vec![ep("10.180.0.1", 80, true)]),
        svc2("http", Tcp, 80, 80),
        svc2("https", Tcp, 443, 8443),
        svc2("dns-udp", Udp, 53, 53),
        svc2("dns-tcp", Tcp, 53, 5353),
        svc2("dns-sctp", Sctp, 53, 53),
    ]);
    let both = |p: u16| -> &'static [&'static str] {
        match p {
            80 => &["10.180.0.1:80", "10.180.2.1:80"],
            8443 => &["10.180.0.1:8443", "10.180.2.1:8443"],
            5353 => &["10.180.0.1:5353", "10.180.2.1:5353"],
            _ => &["10.180.0.1:53", "10.180.2.1:53"],
        }
    };
    run_table(
        "basic_clusterip",
        &snap,
        &[
            (
                Tcp,
                "10.180.0.2",
                "172.30.0.41",
                80,
                Want::Eps(&["10.180.0.1:80"], false),
            ),
            (
                Tcp,
                "10.180.0.1",
                "172.30.0.41",
                80,
                Want::Eps(&["10.180.0.1:80"], true),
            ),
            (
                Tcp,
                "10.180.0.2",
                "172.30.0.42",
                80,
                Want::Eps(both(80), false),
            ),
            (
                Tcp,
                "10.180.0.2",
                "172.30.0.42",
                443,
                Want::Eps(both(8443), false),
            ),
            (
                Tcp,
                "10.180.0.2",
                "172.30.0.42",
                53,
                Want::Eps(both(5353), false),
            ),
            (
                Udp,
                "10.180.0.2",
                "172.30.0.42",
                53,
                Want::Eps(both(53), false),
            ),
            (
                Sctp,
                "10.180.0.2",
                "172.30.0.42",
                53,
                Want::Eps(both(53), false),
            ),
            (Udp, "10.180.0.2", "172.30.0.42", 80, Want::Reject),
            (Tcp, "10.180.0.2", "172.30.0.41", 443, Want::Reject),
            (Tcp, "10.180.0.2", "172.30.0.50", 80, Want::Drop),
        ],
    );
}

fn lb_port(etp_local: bool) -> ServicePort {
    let mut sp = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    sp.external_ips = vec![v4("192.168.99.11")];
    sp.load_balancer_ips = vec![v4("198.51.100.4")];
    sp.node_port = Some(3001);
    sp.external_policy_local = etp_local;
    if etp_local {
        sp.health_check_node_port = Some(30000);
    }
    sp
}

#[test]
fn hand_built_external_traffic_policy_local() {
    use Protocol::Tcp;
    let snap = snapshot(vec![state(
        lb_port(true),
        vec![ep("10.180.0.1", 80, false), ep("10.180.2.1", 80, true)],
    )]);
    const BOTH: &[&str] = &["10.180.0.1:80", "10.180.2.1:80"];
    const LOCAL: &[&str] = &["10.180.2.1:80"];
    run_table(
        "external_traffic_policy_local",
        &snap,
        &[
            (Tcp, "10.0.0.2", "172.30.0.41", 80, Want::Eps(BOTH, false)),
            (Tcp, "10.0.0.2", "192.168.99.11", 80, Want::Eps(BOTH, false)),
            (
                Tcp,
                "203.0.113.2",
                "192.168.99.11",
                80,
                Want::Eps(LOCAL, false),
            ),
            (Tcp, "10.0.0.2", "198.51.100.4", 80, Want::Eps(BOTH, false)),
            (
                Tcp,
                "203.0.113.2",
                "198.51.100.4",
                80,
                Want::Eps(LOCAL, false),
            ),
            (Tcp, "10.0.0.2", "192.168.0.2", 3001, Want::Eps(BOTH, false)),
            (
                Tcp,
                "203.0.113.2",
                "192.168.0.2",
                3001,
                Want::Eps(LOCAL, false),
            ),
        ],
    );
}

#[test]
fn hand_built_no_endpoints_reject() {
    use Protocol::Tcp;
    let snap = snapshot(vec![state(lb_port(false), vec![])]);
    let mut rows = Vec::new();
    for src in ["10.0.0.2", "203.0.113.2"] {
        for (dst, p) in [
            ("172.30.0.41", 80),
            ("192.168.99.11", 80),
            ("192.168.0.2", 3001),
            ("198.51.100.4", 80),
        ] {
            rows.push((Tcp, src, dst, p, Want::Reject));
        }
    }
    run_table("no_endpoints_reject", &snap, &rows);
}

#[test]
fn hand_built_nodeports() {
    use Protocol::Tcp;
    for v6 in [false, true] {
        for multiple in [false, true] {
            let (cip, eps, pod, ext, primary, secondary, node_ips): (
                &str,
                [&str; 2],
                &str,
                &str,
                &str,
                &str,
                Vec<&str>,
            ) = if v6 {
                (
                    "fd00:172:30::41",
                    ["fd00:10:180::1", "fd00:10:180::2:1"],
                    "fd00:10::2",
                    "2001:db8:ff::1",
                    "2001:db8::1",
                    "2001:db8:1::2",
                    if multiple {
                        vec!["2001:db8::1", "2001:db8:1::2"]
                    } else {
                        vec!["2001:db8::1"]
                    },
                )
            } else {
                (
                    "172.30.0.41",
                    ["10.180.0.1", "10.180.2.1"],
                    "10.0.0.2",
                    "203.0.113.2",
                    "192.168.0.2",
                    "192.168.1.2",
                    if multiple {
                        vec!["192.168.0.2", "192.168.1.2"]
                    } else {
                        vec!["192.168.0.2"]
                    },
                )
            };
            let mut sp = port("ns1", "svc1", "p80", Tcp, cip, 80);
            sp.node_port = Some(3001);
            let mut e0 = ep("10.0.0.1", 80, false);
            e0.ip = v4(eps[0]);
            let mut e1 = ep("10.0.0.1", 80, true);
            e1.ip = v4(eps[1]);
            let mut snap = snapshot(vec![state(sp.clone(), vec![e0.clone(), e1.clone()])]);
            if v6 {
                snap.network = NodeNetwork {
                    family: IpFamily::V6,
                    node_name: "test-node".into(),
                    primary_ip: Some(v4(primary)),
                    node_port_ips: NodePortIps::Addresses(vec![]),
                    local_detector: LocalDetector::ClusterCidr(vec![
                        "fd00:10::/64".parse().unwrap(),
                    ]),
                    masquerade_all: false,
                    service_cidrs: vec!["fd00:10:96::/112".parse().unwrap()],
                };
            }
            snap.network.node_port_ips =
                NodePortIps::Addresses(node_ips.iter().map(|s| v4(s)).collect());
            let all = || vec![e0.addr(), e1.addr()];
            run_table(
                &format!("nodeport v6={v6} multiple={multiple}"),
                &snap,
                &[
                    (Tcp, pod, cip, 80, Want::To(all(), false)),
                    (Tcp, ext, primary, 3001, Want::To(all(), true)),
                    (Tcp, primary, primary, 3001, Want::To(all(), true)),
                    (
                        Tcp,
                        ext,
                        secondary,
                        3001,
                        if multiple {
                            Want::To(all(), true)
                        } else {
                            Want::Pass
                        },
                    ),
                ],
            );
        }
    }
}

/// The chain names a block mentions are counted as iptables-nft 1.8.9 records them
/// (nft_cache_level_set: the command's chain, and a `-j` target only when it is a chain).
#[test]
fn chain_mentions_count_declarations_rule_chains_and_chain_targets() {
    let s = snapshot(vec![state(
        port("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80),
        vec![ep("10.180.0.1", 80, false), ep("10.180.0.2", 80, false)],
    )]);
    let r = render(
        &build(&s),
        RenderScope::Full {
            existing: &BTreeSet::from([(Table::Nat, "SHUNT-SVC-OLDOLDOLDOLDOLDO".to_string())]),
        },
    );
    // nat: SERVICES, NODEPORTS, MARK-MASQ, MASQ-NONPOD, POSTROUTING, SVC, 2 SEP, and the
    // stale chain: 9 names. Mentions: 9 declarations, 1 `-X`; SERVICES 2 rules × 2 (both
    // jump to chains); MARK-MASQ 1 (MARK); MASQ-NONPOD 1 (RETURN) + 2; POSTROUTING 3
    // (RETURN, MARK, MASQUERADE); SVC 1 masquerade jump × 2 + 2 endpoint jumps × 2;
    // each SEP: hairpin jump × 2 + DNAT 1.
    assert_eq!(
        r.blocks[&Table::Nat].1,
        ChainMentions {
            names: 9,
            mentions: 9 + 1 + 4 + 1 + 3 + 3 + 6 + 2 * 3,
        }
    );
    // filter: 5 chains; SERVICES has the invalid-port REJECT and the ServiceCIDR DROP,
    // FORWARD its 3 rules; no rule jumps to a chain.
    assert_eq!(
        r.blocks[&Table::Filter].1,
        ChainMentions {
            names: 5,
            mentions: 5 + 2 + 3,
        }
    );
}

#[test]
fn whole_table_cache_request_is_a_listing_first_in_its_block() {
    let s = snapshot(vec![state(
        port("ns", "a", "", Protocol::Tcp, "172.30.0.1", 80),
        vec![ep("10.180.0.1", 80, false)],
    )]);
    let rs = build(&s);
    let plain = render(
        &rs,
        RenderScope::Full {
            existing: &BTreeSet::new(),
        },
    );
    let mut r = plain.clone();
    r.request_whole_table_cache(Table::Nat);
    r.request_whole_table_cache(Table::Nat);
    assert_eq!(
        r.text.matches("-S\n").count(),
        1,
        "requested twice: {}",
        r.text
    );
    assert!(r.text.contains("*nat\n-S\n:SHUNT-"), "{}", r.text);
    assert!(r.text.starts_with("*filter\n:SHUNT-"), "{}", r.text);
    // Filter comes first in the text: its insertion moves the nat block.
    r.request_whole_table_cache(Table::Filter);
    assert!(r.text.starts_with("*filter\n-S\n:SHUNT-"), "{}", r.text);
    let (nat_at, _) = r.blocks[&Table::Nat];
    assert!(
        r.text[..nat_at].ends_with("*nat\n"),
        "{}",
        &r.text[..nat_at]
    );
    r.request_whole_table_cache(Table::Nat);
    assert_eq!(r.text.matches("-S\n").count(), 2);
    // Nothing else changed, and the rules mean the same.
    assert_eq!(r.text.replace("-S\n", ""), plain.text);
    let with = Tracer::new(&r.text, &jump_rules(), &node_addrs());
    let without = Tracer::new(&plain.text, &jump_rules(), &node_addrs());
    for p in [
        pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.1", 80),
        pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.1", 81),
    ] {
        assert_eq!(with.trace(&p), without.trace(&p));
    }
}

/// The cost model of nft_cache on the shapes measured at 10,000 Services × 10 endpoints.
#[test]
fn whole_table_cache_is_wanted_where_the_name_list_is_quadratic() {
    use super::nft_cache::want_whole_table_cache;
    let m = |names, mentions| ChainMentions { names, mentions };
    // Cold full restore: nothing to list.
    assert!(want_whole_table_cache(m(8, 31), 0));
    // Full restore over a full table (110,000 chains, 330,000 mentions, 230,000 rules).
    assert!(want_whole_table_cache(m(110_000, 330_000), 230_000));
    // One endpoint change: the dispatch chain's 10,000 targets plus one Service's 11
    // chains (measured 1.5-2.0 s without the request, 6.1-7.4 s with it).
    assert!(!want_whole_table_cache(m(10_016, 20_060), 230_000));
    // 3,000 Services changed at once: quadratic again.
    assert!(want_whole_table_cache(m(43_000, 119_000), 230_000));
    // A small table: a few hundred Services, any restore.
    assert!(!want_whole_table_cache(m(12, 40), 5_000));
}

/// The scale shape of scripts/scale-manifests.py (N ClusterIP Services × E remote endpoints),
/// full-restore text written to `$SHUNT_IPT_DUMP/restore-N.txt` for N in
/// `$SHUNT_IPT_DUMP_SIZES` (comma separated). Used to time iptables-{nft,legacy}-restore on
/// plan output outside shunt; not a check, so ignored unless asked for.
#[test]
#[ignore]
fn dump_scale_restore() {
    let dir = std::env::var("SHUNT_IPT_DUMP").expect("SHUNT_IPT_DUMP");
    let sizes = std::env::var("SHUNT_IPT_DUMP_SIZES").unwrap_or_else(|_| "1000".into());
    for n in sizes.split(',').map(|s| s.trim().parse::<u32>().unwrap()) {
        let states = (0..n)
            .map(|i| {
                let cip = std::net::Ipv4Addr::from(
                    u32::from(std::net::Ipv4Addr::new(172, 30, 0, 10)) + i,
                );
                let eps = (0..10u32)
                    .map(|j| {
                        let a = std::net::Ipv4Addr::from(
                            u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + j,
                        );
                        ep(&a.to_string(), 8080, false)
                    })
                    .collect();
                state(
                    port(
                        "scale",
                        &format!("svc{i}"),
                        "http",
                        Protocol::Tcp,
                        &cip.to_string(),
                        80,
                    ),
                    eps,
                )
            })
            .collect();
        let rs = build(&snapshot(states));
        std::fs::write(format!("{dir}/restore-{n}.txt"), full(&rs)).unwrap();
        // The partial restore of one endpoint change (svc0), as scale-measure.sh makes it.
        let svc0: BTreeSet<_> = rs.services.keys().take(1).cloned().collect();
        let partial = render(
            &rs,
            RenderScope::Partial {
                services: &svc0,
                previous: &rs.ownership(),
            },
        );
        println!(
            "{n} Services: partial {:?}",
            partial.blocks.values().map(|b| b.1).collect::<Vec<_>>()
        );
        std::fs::write(format!("{dir}/partial-{n}.txt"), partial.text).unwrap();
    }
}
