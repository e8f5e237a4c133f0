//! Plan tests: every packet of ../shared/scenarios traced through hand-built snapshots,
//! plus affinity, source ranges, partial-sync diffs and chain names.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::build::{Ruleset, ruleset};
use super::fixtures::*;
use super::ir::*;
use super::names::*;
use super::trace::{Fate, Packet, trace};
use super::tx::{self, KernelTable, NeedsFull, Op, Transaction};
use crate::model::*;

fn scenario_snapshot(id: &str) -> Option<Snapshot> {
    let v4_eps = || vec![ep("10.180.0.1", 80, None), ep("10.180.2.1", 80, Some(NODE))];
    let nodeport_svc = || {
        let mut p = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
        p.node_port = Some(3001);
        p
    };
    let v6 = |nodeport_ips: &[&str]| {
        let net = network(
            IpFamily::V6,
            nodeport_ips,
            &["fd00:10::/64"],
            &["fd00:10:96::/112"],
        );
        let mut p = port("ns1", "svc1", "p80", Protocol::Tcp, "fd00:172:30::41", 80);
        p.node_port = Some(3001);
        let eps = vec![
            ep("fd00:10:180::1", 80, None),
            ep("fd00:10:180::2:1", 80, Some(NODE)),
        ];
        snapshot(net, vec![state(p, eps)])
    };
    Some(match id {
        "basic_clusterip/base" => {
            let local = || ep("10.180.0.1", 0, Some(NODE));
            let remote = || ep("10.180.2.1", 0, Some("node2"));
            let with_port = |mut e: Endpoint, port: u16| {
                e.port = port;
                e
            };
            let svc2 = |pn: &str, proto: Protocol, port_: u16, target: u16| {
                state(
                    port("ns2", "svc2", pn, proto, "172.30.0.42", port_),
                    vec![with_port(local(), target), with_port(remote(), target)],
                )
            };
            snapshot(
                v4_network(),
                vec![
                    state(
                        port("ns1", "svc1", "http", Protocol::Tcp, "172.30.0.41", 80),
                        vec![with_port(local(), 80)],
                    ),
                    svc2("http", Protocol::Tcp, 80, 80),
                    svc2("https", Protocol::Tcp, 443, 8443),
                    svc2("dns-udp", Protocol::Udp, 53, 53),
                    svc2("dns-tcp", Protocol::Tcp, 53, 5353),
                    svc2("dns-sctp", Protocol::Sctp, 53, 53),
                ],
            )
        }
        "no_endpoints_reject/base" => {
            let mut p = nodeport_svc();
            p.external_ips = vec![ip("192.168.99.11")];
            p.load_balancer_ips = vec![ip("198.51.100.4")];
            snapshot(v4_network(), vec![state(p, vec![])])
        }
        "nodeport/ipv4" => snapshot(v4_network(), vec![state(nodeport_svc(), v4_eps())]),
        "nodeport/ipv4-multiple-nodeport-addresses" => snapshot(
            network(
                IpFamily::V4,
                &["192.168.0.2", "192.168.1.2"],
                &["10.0.0.0/8"],
                &["172.30.0.0/16"],
            ),
            vec![state(nodeport_svc(), v4_eps())],
        ),
        "nodeport/ipv6" => v6(&["2001:db8::1"]),
        "nodeport/ipv6-multiple-nodeport-addresses" => v6(&["2001:db8::1", "2001:db8:1::2"]),
        "external_traffic_policy_local/base" => {
            let mut p = nodeport_svc();
            p.external_ips = vec![ip("192.168.99.11")];
            p.load_balancer_ips = vec![ip("198.51.100.4")];
            p.external_policy_local = true;
            p.health_check_node_port = Some(30000);
            snapshot(v4_network(), vec![state(p, v4_eps())])
        }
        _ => return None,
    })
}

fn yaml_str<'a>(v: &'a serde_yaml::Value, k: &str) -> &'a str {
    v.get(k)
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("field {k} missing in {v:?}"))
}

fn protocol(s: &str) -> Protocol {
    match s {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => panic!("protocol {other}"),
    }
}

/// Traces every packet of every scenario file and compares with its expectation.
#[test]
fn every_scenario_packet_gets_the_expected_verdict() {
    let Some(files) = crate::model::scenario_fixture::scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in files {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let Some(scenarios) = doc.get("scenarios").and_then(|s| s.as_sequence()) else {
            continue;
        };
        for sc in scenarios {
            let id = yaml_str(sc, "id");
            let snap = scenario_snapshot(id)
                .unwrap_or_else(|| panic!("no hand-built snapshot for scenario {id}"));
            let rs = ruleset(&snap);
            for pk in sc
                .get("packets")
                .and_then(|p| p.as_sequence())
                .into_iter()
                .flatten()
            {
                let name = yaml_str(pk, "name");
                let packet = Packet {
                    protocol: protocol(yaml_str(pk, "protocol")),
                    src: ip(yaml_str(pk, "source_ip")),
                    dst: ip(yaml_str(pk, "dest_ip")),
                    dport: pk.get("dest_port").and_then(|p| p.as_u64()).unwrap() as u16,
                };
                let got = trace(&rs, &node_ips(), &packet);
                let expect = pk.get("expect").unwrap();
                let ok = if let Some(eps) = expect.get("endpoints").and_then(|e| e.as_sequence()) {
                    let want: BTreeSet<SocketAddr> = eps
                        .iter()
                        .map(|e| e.as_str().unwrap().parse().unwrap())
                        .collect();
                    let masq = expect.get("masquerade").and_then(|m| m.as_bool()).unwrap();
                    let want_fates: BTreeSet<Fate> = want
                        .iter()
                        .map(|to| Fate::Dnat {
                            to: *to,
                            masquerade: masq,
                        })
                        .collect();
                    got.fates == want_fates
                } else {
                    let want = match yaml_str(expect, "verdict") {
                        "drop" => Fate::Drop,
                        "reject" => Fate::Reject,
                        "passthrough" => Fate::Passthrough { masquerade: false },
                        v => panic!("verdict {v}"),
                    };
                    got.fates == BTreeSet::from([want])
                };
                checked += 1;
                if !ok {
                    failures.push(format!(
                        "{id} / {name}: expected {expect:?}, got {:?}",
                        got.fates
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} packets wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // 10 + 6 + 16 + 7 packets in the four files this was written against.
    assert!(checked >= 39, "only {checked} packets found");
}

fn pkt(proto: Protocol, src: &str, dst: &str, dport: u16) -> Packet {
    Packet {
        protocol: proto,
        src: ip(src),
        dst: ip(dst),
        dport,
    }
}

fn dnat_set(fates: &BTreeSet<Fate>) -> BTreeSet<(SocketAddr, bool)> {
    fates
        .iter()
        .map(|f| match f {
            Fate::Dnat { to, masquerade } => (*to, *masquerade),
            other => panic!("expected DNAT, got {other:?}"),
        })
        .collect()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn chain_names_match_kube_proxy_hashes() {
    // Names from kube-proxy's own nftables tests (helpers_test.go / proxier_test.go).
    let p = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    assert_eq!(cluster_chain(&p.name), "service-ULMVA6XW-ns1/svc1/tcp/p80");
    assert_eq!(
        endpoint_chain(&p.name, &ep("10.180.0.1", 80, None)),
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    );
    let p2 = port("ns2", "svc2", "p80", Protocol::Tcp, "172.30.0.42", 80);
    assert_eq!(
        external_chain(&p2.name),
        "external-42NFTM6N-ns2/svc2/tcp/p80"
    );
    assert_eq!(
        endpoint_chain(&p2.name, &ep("10.180.0.2", 80, None)),
        "endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80"
    );
    // IPv6 colons are not valid in names.
    let n = endpoint_chain(&p.name, &ep("fd00:10:180::1", 80, None));
    assert!(
        n.ends_with("__fd00.10.180..1/80") && !n.contains(':'),
        "{n}"
    );
    assert!(is_service_chain(&n) && !is_service_chain(SERVICES));
    // Over-long names are truncated, still unique by the hash.
    let long = "x".repeat(63);
    let lp = port(&long, &long, &long, Protocol::Sctp, "fd00::1", 80);
    let a = endpoint_chain(
        &lp.name,
        &ep("fd00:1111:2222:3333:4444:5555:6666:7777", 65535, None),
    );
    let b = endpoint_chain(
        &lp.name,
        &ep("fd00:1111:2222:3333:4444:5555:6666:7778", 65535, None),
    );
    assert!(a.len() <= 255 && a.ends_with("...") && a != b);
}

#[test]
fn unallocated_and_wrong_port_cluster_ips_from_the_node() {
    let rs = ruleset(&scenario_snapshot("basic_clusterip/base").unwrap());
    // Locally generated traffic reaches cluster-ips-check through filter-output-post-dnat.
    let wrong_port = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "192.168.0.2", "172.30.0.41", 443),
    );
    assert_eq!(wrong_port.fates, BTreeSet::from([Fate::Reject]));
    let unallocated = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "192.168.0.2", "172.30.0.50", 80),
    );
    assert_eq!(unallocated.fates, BTreeSet::from([Fate::Drop]));
    // Outside the service CIDR nothing is touched.
    let other = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "10.180.0.2", "8.8.8.8", 80),
    );
    assert_eq!(
        other.fates,
        BTreeSet::from([Fate::Passthrough { masquerade: false }])
    );
}

#[test]
fn masquerade_all_and_detect_local_none() {
    let mut snap = scenario_snapshot("nodeport/ipv4").unwrap();
    let both = BTreeSet::from([(sa("10.180.0.1:80"), true), (sa("10.180.2.1:80"), true)]);
    let pod = pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.41", 80);
    let outside = pkt(Protocol::Tcp, "203.0.113.2", "172.30.0.41", 80);

    // ClusterCIDR: off-cluster clients of a ClusterIP are masqueraded, pods are not.
    let rs = ruleset(&snap);
    assert!(
        dnat_set(&trace(&rs, &node_ips(), &outside).fates)
            .iter()
            .all(|(_, m)| *m)
    );
    assert!(
        dnat_set(&trace(&rs, &node_ips(), &pod).fates)
            .iter()
            .all(|(_, m)| !*m)
    );

    // masqueradeAll: everything to the ClusterIP is masqueraded.
    snap.network.masquerade_all = true;
    let rs = ruleset(&snap);
    assert_eq!(dnat_set(&trace(&rs, &node_ips(), &pod).fates), both);

    // detect-local None: no way to tell pods apart, so ClusterIP traffic is not masqueraded
    // at all (kube-proxy's no-op detector), and eTP Local gets no pod short-circuit.
    snap.network.masquerade_all = false;
    snap.network.local_detector = LocalDetector::None;
    let rs = ruleset(&snap);
    assert!(
        dnat_set(&trace(&rs, &node_ips(), &outside).fates)
            .iter()
            .all(|(_, m)| !*m)
    );
    let mut etp = scenario_snapshot("external_traffic_policy_local/base").unwrap();
    etp.network.local_detector = LocalDetector::None;
    let rs = ruleset(&etp);
    let pod_to_lb = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "10.0.0.2", "198.51.100.4", 80),
    );
    assert_eq!(
        dnat_set(&pod_to_lb.fates),
        BTreeSet::from([(sa("10.180.2.1:80"), false)])
    );
}

#[test]
fn nodeports_on_every_local_address() {
    let mut snap = scenario_snapshot("nodeport/ipv4").unwrap();
    snap.network.node_port_ips = NodePortIps::AllLocal;
    let rs = ruleset(&snap);
    assert!(!rs.sets().any(|s| s.name == NODEPORT_IPS));
    let secondary = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "203.0.113.2", "192.168.1.2", 3001),
    );
    assert_eq!(
        secondary.endpoints(),
        BTreeSet::from([sa("10.180.0.1:80"), sa("10.180.2.1:80")])
    );
    // Loopback never takes NodePorts.
    let lo = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "127.0.0.1", "127.0.0.1", 3001),
    );
    assert_eq!(
        lo.fates,
        BTreeSet::from([Fate::Passthrough { masquerade: false }])
    );
}

#[test]
fn local_policy_without_local_endpoints_drops_external_but_short_circuits_pods() {
    let mut p = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    p.node_port = Some(3001);
    p.load_balancer_ips = vec![ip("198.51.100.4")];
    p.external_policy_local = true;
    let snap = snapshot(
        v4_network(),
        vec![state(p, vec![ep("10.180.0.1", 80, Some("node2"))])],
    );
    let rs = ruleset(&snap);
    let ext = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "203.0.113.2", "198.51.100.4", 80),
    );
    assert_eq!(ext.fates, BTreeSet::from([Fate::Drop]));
    let np = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "203.0.113.2", "192.168.0.2", 3001),
    );
    assert_eq!(np.fates, BTreeSet::from([Fate::Drop]));
    let pod = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "10.0.0.2", "198.51.100.4", 80),
    );
    assert_eq!(
        dnat_set(&pod.fates),
        BTreeSet::from([(sa("10.180.0.1:80"), false)])
    );
    // The node's own traffic meets service-endpoints-check in filter-output, before DNAT
    // (same layout as kube-proxy, whose tracer skips the output hooks): dropped too.
    let node = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "192.168.0.2", "198.51.100.4", 80),
    );
    assert_eq!(node.fates, BTreeSet::from([Fate::Drop]));

    // internalTrafficPolicy Local without local endpoints: ClusterIP traffic dropped.
    let mut q = port("ns1", "svc2", "p80", Protocol::Tcp, "172.30.0.42", 80);
    q.internal_policy_local = true;
    let snap = snapshot(
        v4_network(),
        vec![state(q, vec![ep("10.180.0.1", 80, Some("node2"))])],
    );
    let rs = ruleset(&snap);
    let c = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.42", 80),
    );
    assert_eq!(c.fates, BTreeSet::from([Fate::Drop]));
}

#[test]
fn client_ip_affinity_uses_timed_sets() {
    let mut p = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    p.affinity_timeout_seconds = Some(10800);
    let eps = vec![
        ep("10.180.0.1", 80, Some(NODE)),
        ep("10.180.2.1", 80, Some("node2")),
    ];
    let snap = snapshot(v4_network(), vec![state(p.clone(), eps.clone())]);
    let mut rs = ruleset(&snap);
    let frag = &rs.services[&p.name];
    let sets: Vec<&SetDef> = frag.sets.iter().collect();
    assert_eq!(sets.len(), 2);
    for (s, e) in sets.iter().zip(&eps) {
        assert_eq!(s.name, affinity_set(&p.name, e));
        assert_eq!(s.timeout_seconds, Some(10800));
        let chain = frag
            .chains
            .iter()
            .find(|c| c.name == endpoint_chain(&p.name, e))
            .unwrap();
        assert!(
            chain
                .rules
                .iter()
                .any(|r| r.stmts == vec![Stmt::UpdateSaddr(s.name.clone())])
        );
    }
    // A first packet may go to either endpoint.
    let client = pkt(Protocol::Tcp, "10.0.0.2", "172.30.0.41", 80);
    assert_eq!(trace(&rs, &node_ips(), &client).endpoints().len(), 2);
    // Once the client is recorded for the second endpoint, it only goes there.
    rs.node.elements.push(Element {
        set: affinity_set(&p.name, &eps[1]),
        key: Key::Addr(ip("10.0.0.2")),
        value: None,
        comment: None,
    });
    assert_eq!(
        trace(&rs, &node_ips(), &client).endpoints(),
        BTreeSet::from([sa("10.180.2.1:80")])
    );
    // Other clients are unaffected.
    let other = pkt(Protocol::Tcp, "10.0.0.3", "172.30.0.41", 80);
    assert_eq!(trace(&rs, &node_ips(), &other).endpoints().len(), 2);
}

fn lb_with_ranges(ranges: &[&str]) -> (ServicePort, Snapshot) {
    let mut p = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    p.node_port = Some(3001);
    p.load_balancer_ips = vec![ip("198.51.100.4")];
    p.load_balancer_source_ranges = ranges.iter().map(|r| net(r)).collect();
    let snap = snapshot(
        v4_network(),
        vec![state(p.clone(), vec![ep("10.180.0.1", 80, Some(NODE))])],
    );
    (p, snap)
}

#[test]
fn load_balancer_source_ranges_filter_lb_traffic_only() {
    let (p, snap) = lb_with_ranges(&["203.0.113.0/25"]);
    let rs = ruleset(&snap);
    let inside = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "203.0.113.2", "198.51.100.4", 80),
    );
    assert_eq!(inside.endpoints(), BTreeSet::from([sa("10.180.0.1:80")]));
    let outside = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "203.0.113.130", "198.51.100.4", 80),
    );
    assert_eq!(outside.fates, BTreeSet::from([Fate::Drop]));
    // NodePorts are not subject to loadBalancerSourceRanges (as upstream).
    let np = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "203.0.113.130", "192.168.0.2", 3001),
    );
    assert_eq!(np.endpoints(), BTreeSet::from([sa("10.180.0.1:80")]));
    // The node itself is not in the range, so its traffic to the VIP is dropped too...
    let node = trace(
        &rs,
        &node_ips(),
        &pkt(Protocol::Tcp, "192.168.0.2", "198.51.100.4", 80),
    );
    assert_eq!(node.fates, BTreeSet::from([Fate::Drop]));
    assert!(
        rs.elements()
            .any(|e| e.set == FIREWALL_IPS
                && e.value == Some(Verdict::Goto(firewall_chain(&p.name))))
    );

    // ...unless a range covers the node's IP: then the VIP itself is an allowed source.
    let (p, snap) = lb_with_ranges(&["203.0.113.0/25", "192.168.0.0/24"]);
    let rs = ruleset(&snap);
    let fw = rs.services[&p.name]
        .chains
        .iter()
        .find(|c| c.name == firewall_chain(&p.name))
        .unwrap();
    assert_eq!(
        fw.rules[0].matches,
        vec![Match::Saddr {
            nets: vec![
                net("203.0.113.0/25"),
                net("192.168.0.0/24"),
                net("198.51.100.4/32")
            ],
            negate: true
        }]
    );
}

// ---- transactions ----

/// A model of the kernel's view of one table, strict like the kernel: deleting what does not
/// exist, deleting a chain or set still referenced, adding a rule or element pointing at a
/// missing chain, or re-adding a map key with another value all fail.
#[derive(Default, Debug, PartialEq, Eq)]
struct FakeTable {
    chains: BTreeMap<String, (Option<BaseHook>, Vec<Rule>)>,
    sets: BTreeMap<String, (SetDef, BTreeMap<Key, Option<Verdict>>)>,
}

fn verdict_targets(v: &Verdict) -> Vec<String> {
    match v {
        Verdict::Jump(c) | Verdict::Goto(c) => vec![c.clone()],
        _ => vec![],
    }
}

fn rule_refs(r: &Rule) -> (Vec<String>, Vec<String>) {
    let chains = r.verdict.as_ref().map(verdict_targets).unwrap_or_default();
    let mut sets: Vec<String> = r
        .matches
        .iter()
        .filter_map(|m| match m {
            Match::DaddrInSet(s) | Match::SaddrInSet(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    sets.extend(r.stmts.iter().filter_map(|s| match s {
        Stmt::UpdateSaddr(s) => Some(s.clone()),
        _ => None,
    }));
    if let Some(Verdict::Vmap { map, .. } | Verdict::Pick { map, .. }) = &r.verdict {
        sets.push(map.clone());
    }
    (chains, sets)
}

impl FakeTable {
    fn chain_in_use(&self, name: &str) -> bool {
        self.chains.values().any(|(_, rules)| {
            rules
                .iter()
                .any(|r| rule_refs(r).0.iter().any(|c| c == name))
        }) || self.sets.values().any(|(_, els)| {
            els.values()
                .flatten()
                .any(|v| verdict_targets(v).iter().any(|c| c == name))
        })
    }
    fn set_in_use(&self, name: &str) -> bool {
        self.chains.values().any(|(_, rules)| {
            rules
                .iter()
                .any(|r| rule_refs(r).1.iter().any(|s| s == name))
        })
    }

    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::AddTable => {}
                Op::DeleteTable => *self = FakeTable::default(),
                Op::AddChain { name, base } => {
                    let e = self.chains.entry(name.clone()).or_insert((*base, vec![]));
                    assert_eq!(e.0, *base, "chain {name} re-added with another hook");
                }
                Op::FlushChain(n) => self
                    .chains
                    .get_mut(n)
                    .unwrap_or_else(|| panic!("flush missing chain {n}"))
                    .1
                    .clear(),
                Op::DeleteChain(n) => {
                    assert!(self.chains.contains_key(n), "delete missing chain {n}");
                    self.chains.remove(n);
                    assert!(!self.chain_in_use(n), "deleted chain {n} still referenced");
                }
                Op::AddRule { chain, rule } => {
                    let (chains, sets) = rule_refs(rule);
                    for c in chains {
                        assert!(
                            self.chains.contains_key(&c),
                            "rule in {chain} jumps to missing {c}"
                        );
                    }
                    for s in sets {
                        assert!(
                            self.sets.contains_key(&s),
                            "rule in {chain} uses missing set {s}"
                        );
                    }
                    self.chains
                        .get_mut(chain)
                        .unwrap_or_else(|| panic!("rule for missing chain {chain}"))
                        .1
                        .push(rule.clone());
                }
                Op::AddSet(d) => {
                    let e = self
                        .sets
                        .entry(d.name.clone())
                        .or_insert((d.clone(), BTreeMap::new()));
                    assert_eq!(&e.0, d, "set {} re-added with other properties", d.name);
                }
                Op::FlushSet(d) => self
                    .sets
                    .get_mut(&d.name)
                    .unwrap_or_else(|| panic!("flush missing set {}", d.name))
                    .1
                    .clear(),
                Op::DeleteSet { name, .. } => {
                    assert!(
                        self.sets.remove(name).is_some(),
                        "delete missing set {name}"
                    );
                    assert!(
                        !self.set_in_use(name),
                        "deleted set {name} still referenced"
                    );
                }
                Op::AddElement(e) => {
                    for c in e.value.iter().flat_map(verdict_targets) {
                        assert!(
                            self.chains.contains_key(&c),
                            "element of {} points at missing {c}",
                            e.set
                        );
                    }
                    let els = &mut self
                        .sets
                        .get_mut(&e.set)
                        .unwrap_or_else(|| panic!("element for missing set {}", e.set))
                        .1;
                    if let Some(old) = els.get(&e.key) {
                        assert_eq!(
                            old, &e.value,
                            "element {:?} of {} re-added with another value",
                            e.key, e.set
                        );
                    }
                    els.insert(e.key.clone(), e.value.clone());
                }
                Op::DeleteElement(e) => {
                    let els = &mut self
                        .sets
                        .get_mut(&e.set)
                        .unwrap_or_else(|| panic!("element for missing set {}", e.set))
                        .1;
                    assert!(
                        els.remove(&e.key).is_some(),
                        "delete missing element {:?} of {}",
                        e.key,
                        e.set
                    );
                }
            }
        }
    }

    fn kernel_table(&self) -> KernelTable {
        KernelTable {
            chains: self.chains.keys().cloned().collect(),
            sets: self
                .sets
                .iter()
                .map(|(n, (d, _))| {
                    (
                        n.clone(),
                        tx::KernelSet {
                            verdict_map: d.verdict_map,
                            timeout_seconds: d.timeout_seconds,
                        },
                    )
                })
                .collect(),
        }
    }
}

fn fresh(rs: &Ruleset) -> FakeTable {
    let mut t = FakeTable::default();
    let full = tx::full(std::slice::from_ref(rs), &BTreeMap::new(), true);
    t.apply(&full.families[0].ops);
    t
}

fn two_services(svc2_eps: Vec<Endpoint>) -> Snapshot {
    let mut p1 = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
    p1.node_port = Some(3001);
    let mut p2 = port("ns2", "svc2", "p53", Protocol::Udp, "172.30.0.42", 53);
    p2.affinity_timeout_seconds = Some(60);
    snapshot(
        v4_network(),
        vec![
            state(p1, vec![ep("10.180.0.1", 80, Some(NODE))]),
            state(p2, svc2_eps),
        ],
    )
}

fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
    names
        .iter()
        .map(|n| {
            let (ns, name) = n.split_once('/').unwrap();
            ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            }
        })
        .collect()
}

fn touched_names(t: &Transaction) -> BTreeSet<String> {
    t.families[0]
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::AddChain { name, .. } | Op::FlushChain(name) | Op::DeleteChain(name) => {
                Some(name.clone())
            }
            Op::AddRule { chain, .. } => Some(chain.clone()),
            Op::AddSet(d) => Some(d.name.clone()),
            Op::DeleteSet { name, .. } => Some(name.clone()),
            // With the value: a slot of the shared endpoint-pick map is the service's own
            // through the endpoint chain it names.
            Op::AddElement(e) | Op::DeleteElement(e) => {
                Some(format!("{}:{:?}:{:?}", e.set, e.key, e.value))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn full_sync_is_idempotent_and_replaces_stale_content() {
    let old = ruleset(&two_services(vec![
        ep("10.180.0.2", 53, Some(NODE)),
        ep("10.180.0.3", 53, None),
    ]));
    let mut kernel = fresh(&old);
    // A restart: nothing is remembered, everything is read back from the kernel.
    let new = ruleset(&two_services(vec![ep("10.180.0.3", 53, None)]));
    let full = tx::full(
        std::slice::from_ref(&new),
        &BTreeMap::from([(IpFamily::V4, kernel.kernel_table())]),
        true,
    );
    assert!(full.full);
    kernel.apply(&full.families[0].ops);
    assert_eq!(kernel, fresh(&new));
    // The removed endpoint's chain and affinity set are gone.
    let p2 = &new.services.keys().nth(1).unwrap().clone();
    let gone = ep("10.180.0.2", 53, None);
    assert!(!kernel.chains.contains_key(&endpoint_chain(p2, &gone)));
    assert!(!kernel.sets.contains_key(&affinity_set(p2, &gone)));
    // Again: same result.
    let again = tx::full(
        std::slice::from_ref(&new),
        &BTreeMap::from([(IpFamily::V4, kernel.kernel_table())]),
        false,
    );
    kernel.apply(&again.families[0].ops);
    assert_eq!(kernel, fresh(&new));
}

#[test]
fn partial_sync_touches_only_the_changed_service() {
    let old = ruleset(&two_services(vec![
        ep("10.180.0.2", 53, Some(NODE)),
        ep("10.180.0.3", 53, None),
    ]));
    let new = ruleset(&two_services(vec![
        ep("10.180.0.3", 53, None),
        ep("10.180.0.4", 53, None),
    ]));
    let t = tx::partial(
        std::slice::from_ref(&old),
        std::slice::from_ref(&new),
        &keys(&["ns2/svc2"]),
    )
    .unwrap();
    assert!(!t.full);
    let touched = touched_names(&t);
    let svc1 = old.services.keys().next().unwrap().clone();
    let svc2 = old.services.keys().nth(1).unwrap().clone();
    for name in &touched {
        assert!(
            name.contains("ns2/svc2")
                || name.starts_with(SERVICE_IPS)
                || name.starts_with(CLUSTER_IPS),
            "partial sync touched {name}"
        );
        assert!(!name.contains("ns1/svc1"), "partial sync touched {name}");
    }
    let ops = &t.families[0].ops;
    // The removed endpoint's chain and affinity set are deleted, the new one's created.
    let removed = ep("10.180.0.2", 53, None);
    let added = ep("10.180.0.4", 53, None);
    assert!(ops.contains(&Op::DeleteChain(endpoint_chain(&svc2, &removed))));
    assert!(ops.contains(&Op::DeleteSet {
        name: affinity_set(&svc2, &removed),
        verdict_map: false
    }));
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::AddSet(d) if d.name == affinity_set(&svc2, &added)))
    );
    // The kept endpoint's affinity set is not re-added (its entries are live state).
    let kept = ep("10.180.0.3", 53, None);
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::AddSet(d) if d.name == affinity_set(&svc2, &kept)))
    );
    // Map elements of the fixed maps did not change (the service still has endpoints):
    // none rewritten. Only slots of the endpoint-pick map are, and only those that now
    // name another endpoint chain of svc2.
    for o in ops {
        if let Op::AddElement(e) | Op::DeleteElement(e) = o {
            assert!(e.set.starts_with(ENDPOINT_PICKS_PREFIX), "{o:?}");
            let Some(Verdict::Goto(c)) = &e.value else {
                panic!("{o:?}")
            };
            assert!(c.contains("ns2/svc2"), "{o:?}");
        }
    }
    assert!(ops.iter().any(|o| matches!(o,
        Op::AddElement(e) if e.value == Some(Verdict::Goto(endpoint_chain(&svc2, &added))))));
    assert!(
        !touched
            .iter()
            .any(|n| n.contains(&svc1.service.name) && n.contains("ns1"))
    );

    // Applied to the old kernel state it yields exactly the new state.
    let mut kernel = fresh(&old);
    kernel.apply(ops);
    assert_eq!(kernel, fresh(&new));
}

#[test]
fn partial_sync_of_a_service_losing_all_endpoints_and_of_a_removed_service() {
    let old = ruleset(&two_services(vec![ep("10.180.0.3", 53, None)]));
    let empty = ruleset(&two_services(vec![]));
    let t = tx::partial(
        std::slice::from_ref(&old),
        std::slice::from_ref(&empty),
        &keys(&["ns2/svc2"]),
    )
    .unwrap();
    let svc2 = old.services.keys().nth(1).unwrap().clone();
    let ops = &t.families[0].ops;
    let cip = Key::AddrProtoPort(ip("172.30.0.42"), Protocol::Udp, 53);
    assert!(ops.contains(&Op::DeleteElement(Element {
        set: SERVICE_IPS.into(),
        key: cip.clone(),
        value: Some(Verdict::Goto(cluster_chain(&svc2))),
        comment: None,
    })));
    assert!(ops.contains(&Op::AddElement(Element {
        set: NO_ENDPOINT_SERVICES.into(),
        key: cip,
        value: Some(Verdict::Goto(REJECT_CHAIN.into())),
        comment: Some("ns2/svc2:p53".into()),
    })));
    assert!(ops.contains(&Op::DeleteChain(cluster_chain(&svc2))));
    let mut kernel = fresh(&old);
    kernel.apply(ops);
    assert_eq!(kernel, fresh(&empty));

    // Remove ns2/svc2 entirely.
    let mut snap = two_services(vec![ep("10.180.0.3", 53, None)]);
    snap.services.remove(&svc2);
    let removed = ruleset(&snap);
    let t = tx::partial(
        std::slice::from_ref(&old),
        std::slice::from_ref(&removed),
        &keys(&["ns2/svc2"]),
    )
    .unwrap();
    let ops = &t.families[0].ops;
    for c in &old.services[&svc2].chains {
        assert!(
            ops.contains(&Op::DeleteChain(c.name.clone())),
            "chain {} not deleted",
            c.name
        );
    }
    assert!(ops.contains(&Op::DeleteElement(Element {
        set: CLUSTER_IPS.into(),
        key: Key::Addr(ip("172.30.0.42")),
        value: None,
        comment: None,
    })));
    let mut kernel = fresh(&old);
    kernel.apply(ops);
    assert_eq!(kernel, fresh(&removed));
}

#[test]
fn partial_sync_escalates_when_it_cannot_be_exact() {
    let old = ruleset(&two_services(vec![ep("10.180.0.3", 53, None)]));
    let new = ruleset(&two_services(vec![ep("10.180.0.4", 53, None)]));
    let o = std::slice::from_ref(&old);
    let n = std::slice::from_ref(&new);
    // ns2/svc2 changed but was not announced.
    let svc2 = new.services.keys().nth(1).unwrap().clone();
    assert_eq!(
        tx::partial(o, n, &keys(&["ns1/svc1"])),
        Err(NeedsFull::UnlistedChange(svc2))
    );
    // A node-wide change.
    let mut snap = two_services(vec![ep("10.180.0.3", 53, None)]);
    snap.network.masquerade_all = true;
    let node_changed = ruleset(&snap);
    assert_eq!(
        tx::partial(o, std::slice::from_ref(&node_changed), &keys(&["ns2/svc2"])),
        Err(NeedsFull::NodeChanged(IpFamily::V4))
    );
    assert_eq!(
        tx::partial(o, &[], &keys(&[])),
        Err(NeedsFull::FamiliesChanged)
    );
    // Nothing changed: an empty transaction.
    let same = tx::partial(o, o, &keys(&["ns2/svc2"])).unwrap();
    let mut kernel = fresh(&old);
    kernel.apply(&same.families[0].ops);
    assert_eq!(kernel, fresh(&old));
}

#[test]
fn rule_count_counts_rules_and_elements() {
    let rs = ruleset(&scenario_snapshot("nodeport/ipv4").unwrap());
    let rules: usize = rs.chains().map(|c| c.rules.len()).sum();
    let elements: BTreeSet<&Element> = rs.elements().collect();
    assert_eq!(rs.rule_count(), (rules + elements.len()) as u64);
    assert!(rules > 20 && elements.len() >= 4);
}

#[test]
fn full_sync_drops_the_table_of_a_family_no_longer_programmed() {
    let rs = ruleset(&two_services(vec![]));
    let existing = BTreeMap::from([
        (IpFamily::V4, fresh(&rs).kernel_table()),
        (IpFamily::V6, KernelTable::default()),
    ]);
    let t = tx::full(std::slice::from_ref(&rs), &existing, false);
    assert_eq!(t.families.len(), 2);
    assert_eq!(t.families[1].family, IpFamily::V6);
    assert_eq!(t.families[1].ops, vec![Op::DeleteTable]);
    // The kept family is refilled in place, never deleted.
    assert!(!t.families[0].ops.contains(&Op::DeleteTable));
    assert_eq!(rs.kernel_table(), fresh(&rs).kernel_table());
}

/// Every pick range of `rs`: (offset, count, map), with a check that each slot is in its map.
fn pick_ranges(rs: &Ruleset) -> Vec<(u32, u32, String)> {
    let elements: BTreeMap<(String, Key), Option<Verdict>> = rs
        .elements()
        .map(|e| ((e.set.clone(), e.key.clone()), e.value.clone()))
        .collect();
    let mut ranges = Vec::new();
    for rule in rs.chains().flat_map(|c| c.rules.iter()) {
        if let Some(Verdict::Pick { count, offset, map }) = &rule.verdict {
            for slot in *offset..offset + count {
                assert!(
                    matches!(
                        elements.get(&(map.clone(), Key::Pick(slot))),
                        Some(Some(Verdict::Goto(_)))
                    ),
                    "slot {slot} of {map} missing"
                );
            }
            ranges.push((*offset, *count, map.clone()));
        }
    }
    ranges
}

#[test]
fn pick_slots_are_disjoint_and_skip_taken_ranges() {
    let mut slots = super::build::PickSlots::default();
    let a = slots.take("chain-a", 10);
    // The same name wants the same start: it is moved past the first range.
    let b = slots.take("chain-a", 5);
    assert_eq!(b, a + 10);
    let c = slots.take("chain-a", 3);
    assert_eq!(c, a + 15);
    // Ranges never cross 2^31 (numgen's offset + modulus stays in a u32).
    let big = super::build::PickSlots::default().take("chain-b", (1 << 31) - 100);
    assert!(u64::from(big) + (1u64 << 31) - 100 <= 1u64 << 31);
}

#[test]
fn reusing_fragments_keeps_unchanged_services_and_their_slots() {
    let old_snap = two_services(vec![ep("10.180.0.2", 53, None), ep("10.180.0.3", 53, None)]);
    let old = ruleset(&old_snap);
    // Same state: the very same ruleset.
    assert_eq!(
        super::build::ruleset_reusing(&old_snap, Some((&old_snap, &old))),
        old
    );
    // svc2 changes: svc1's fragment is kept as is, svc2's is the one `ruleset` builds, and
    // all pick ranges stay disjoint and filled.
    let new_snap = two_services(vec![
        ep("10.180.0.3", 53, None),
        ep("10.180.0.4", 53, None),
        ep("10.180.0.5", 53, None),
    ]);
    let new = super::build::ruleset_reusing(&new_snap, Some((&old_snap, &old)));
    let svc1 = old.services.keys().next().unwrap();
    let svc2 = old.services.keys().nth(1).unwrap();
    assert_eq!(new.services[svc1], old.services[svc1]);
    assert_eq!(new.services[svc2], ruleset(&new_snap).services[svc2]);
    let mut ranges = pick_ranges(&new);
    ranges.sort();
    assert!(ranges.len() >= 2);
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping ranges {w:?}");
    }
    // And it programs the same thing: a partial sync from `old` is accepted.
    assert!(
        tx::partial(
            std::slice::from_ref(&old),
            std::slice::from_ref(&new),
            &keys(&["ns2/svc2"])
        )
        .is_ok()
    );
    // Another node network: nothing is reused (masquerade-all changes every fragment).
    let mut other = new_snap.clone();
    other.network.masquerade_all = !other.network.masquerade_all;
    assert_eq!(
        super::build::ruleset_reusing(&other, Some((&old_snap, &old))),
        ruleset(&other)
    );
}

#[test]
fn text_lowering_speaks_nft_syntax_and_batches_elements() {
    let rs = ruleset(&two_services(vec![
        ep("10.180.0.3", 53, None),
        ep("10.180.0.4", 53, None),
    ]));
    let t = tx::full(std::slice::from_ref(&rs), &BTreeMap::new(), false);
    let text = super::text::to_text(&t);
    let lines: Vec<&str> = text.lines().collect();
    let has = |want: &str| lines.iter().any(|l| l.contains(want));
    assert_eq!(lines[0], "add table ip shunt");
    assert!(has(
        "add chain ip shunt nat-prerouting { type nat hook prerouting priority -100; policy accept; }"
    ));
    assert!(has(&format!(
        "add map ip shunt {SERVICE_IPS} {{ type ipv4_addr . inet_proto . inet_service : verdict;"
    )));
    assert!(has(&format!(
        "add map ip shunt {ENDPOINT_PICKS_PREFIX}000 {{ typeof numgen random mod 1 : verdict; }}"
    )));
    // Affinity sets: timeout flag and value.
    assert!(lines.iter().any(
        |l| l.starts_with(&format!("add set ip shunt {AFFINITY_PREFIX}"))
            && l.ends_with("{ type ipv4_addr; flags timeout; timeout 60s; }")
    ));
    assert!(has(
        "add rule ip shunt masquerading meta mark & 0x4000 == 0 return"
    ));
    assert!(has(
        "add rule ip shunt masquerading meta mark set meta mark ^ 0x4000"
    ));
    assert!(has(
        "add rule ip shunt masquerading masquerade fully-random"
    ));
    assert!(has("meta l4proto udp dnat to 10.180.0.3:53"));
    // Endpoint choice: the pick rule and its slots.
    let svc2 = rs.services.keys().nth(1).unwrap();
    let (count, offset, map) = rs.services[svc2]
        .chains
        .iter()
        .flat_map(|c| c.rules.iter())
        .find_map(|r| match &r.verdict {
            Some(Verdict::Pick { count, offset, map }) => Some((*count, *offset, map.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(count, 2);
    assert!(has(&format!(
        "numgen random mod 2 offset {offset} vmap @{map}"
    )));
    // All elements of one map in one command, with comments before the value.
    let service_ips: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with(&format!("add element ip shunt {SERVICE_IPS} ")))
        .collect();
    assert_eq!(service_ips.len(), 1, "{service_ips:?}");
    assert!(service_ips[0].contains("172.30.0.42 . udp . 53 : goto service-"));
    let picks = lines
        .iter()
        .find(|l| l.starts_with(&format!("add element ip shunt {map} ")))
        .unwrap();
    assert!(picks.contains(&format!("{offset} : goto endpoint-")));
    assert!(picks.contains(&format!("{} : goto endpoint-", offset + 1)));
    // Deletions carry keys only.
    let del = Transaction {
        full: false,
        families: vec![tx::FamilyOps {
            family: IpFamily::V4,
            ops: vec![
                Op::DeleteElement(Element {
                    set: SERVICE_IPS.into(),
                    key: Key::AddrProtoPort("172.30.0.42".parse().unwrap(), Protocol::Udp, 53),
                    value: Some(Verdict::Goto("x".into())),
                    comment: Some("c".into()),
                }),
                Op::DeleteChain("x".into()),
            ],
        }],
    };
    assert_eq!(
        super::text::to_text(&del),
        "delete element ip shunt service-ips { 172.30.0.42 . udp . 53 }\ndelete chain ip shunt x\n"
    );
}
