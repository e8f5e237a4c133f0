//! Every packet of ../shared/scenarios traced in every mode through the read-back parsers:
//! the scenario's snapshot -> the plan rendered as the kernel receives it (nft script,
//! iptables-restore text with the jump rules, BPF map operations) -> the parsers `shunt
//! inspect`/`shunt trace` use on kernel state -> the tracer -> the scenario's expectation.
//! Also: the inspect view of each mode round-trips through JSON and shows the model's
//! ClusterIP frontends with the model's endpoints.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::nft::{NftTable, parse_script};
use super::view::{FamilyView, FrontendKind, Inspected};
use super::{Fate, Packet, Proto, nft_trace};
use crate::model::scenario_fixture::{scenario_files, scenario_snapshot, scenarios};
use crate::model::{IpFamily, Snapshot};
use crate::plan::iptables::tracer::Tracer;

/// The restore text and jump rules as iptables-save prints them (built-in chains declared,
/// the jump rules in them), so that the plan goes through `Tracer::from_save` like a save.
pub(crate) fn as_save(restore: &str, jumps: &[crate::plan::iptables::JumpRule]) -> String {
    use crate::plan::iptables::Table;
    let mut out = String::new();
    let mut table = None;
    for line in restore.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = Some(if t == "nat" {
                Table::Nat
            } else {
                Table::Filter
            });
            out.push_str(line);
            out.push('\n');
            let builtins: &[&str] = if t == "nat" {
                &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
            } else {
                &["INPUT", "FORWARD", "OUTPUT"]
            };
            for b in builtins {
                out.push_str(&format!(":{b} ACCEPT [0:0]\n"));
            }
            continue;
        }
        if line == "COMMIT" {
            for j in jumps.iter().filter(|j| Some(j.table) == table) {
                let args: Vec<String> = j
                    .args
                    .iter()
                    .map(|a| {
                        if a.contains(' ') {
                            format!("\"{a}\"")
                        } else {
                            a.clone()
                        }
                    })
                    .collect();
                out.push_str(&format!("-A {} {}\n", j.chain, args.join(" ")));
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

pub(crate) struct Programmed {
    pub nft: NftTable,
    pub iptables: Tracer,
    /// The snapshot's family's maps, written with the plan's operations (the other family
    /// None).
    pub ebpf: super::ebpf::Maps,
}

/// The ebpf plan of `snap` for family `F`, programmed with its operations into empty maps
/// (checked against the desired content).
pub(crate) fn program_ebpf<F: super::ebpf::Fam>(
    snap: &Snapshot,
    local: &[IpAddr],
) -> (
    crate::plan::ebpf::State<F>,
    Vec<crate::plan::ebpf::MapOp<F::Wire>>,
) {
    let st = crate::plan::ebpf::desired::<F>(snap, local, &Default::default())
        .expect("the ebpf plan accepts the scenario");
    let ops = crate::plan::ebpf::diff(&Default::default(), &st);
    let mut maps = crate::plan::ebpf::State::<F>::default();
    super::ebpf::apply_ops(&mut maps, &ops);
    assert_eq!(maps, st, "the map operations program the desired content");
    (maps, ops)
}

pub(crate) fn program(snap: &Snapshot, local: &[IpAddr]) -> Programmed {
    let rs = crate::plan::nft::ruleset(snap);
    let tx = crate::plan::nft::tx::full(std::slice::from_ref(&rs), &Default::default(), false);
    let script = crate::plan::nft::text::to_text(&tx);
    let mut parsed = parse_script(&script).expect("the plan's script parses");
    let nft = parsed
        .remove(&snap.network.family)
        .expect("the family's table");
    assert_eq!(
        nft,
        NftTable::from_ruleset(&rs),
        "parsing the rendered script gives the plan's ruleset back"
    );
    let irs = crate::plan::iptables::build(snap);
    let restore = crate::plan::iptables::render(
        &irs,
        crate::plan::iptables::RenderScope::Full {
            existing: &BTreeSet::new(),
        },
    )
    .text;
    let iptables = Tracer::from_save(
        &as_save(&restore, &crate::plan::iptables::jump_rules()),
        local,
    )
    .expect("the rendered rules load as a save");
    let mut ebpf = super::ebpf::Maps::default();
    match snap.network.family {
        IpFamily::V4 => ebpf.v4 = Some(program_ebpf::<crate::plan::ebpf::V4>(snap, local).0),
        IpFamily::V6 => ebpf.v6 = Some(program_ebpf::<crate::plan::ebpf::V6>(snap, local).0),
    }
    Programmed {
        nft,
        iptables,
        ebpf,
    }
}

pub(crate) fn packet(p: &Value) -> Packet {
    Packet {
        protocol: p["protocol"].as_str().unwrap().parse().unwrap(),
        src: p["source_ip"].as_str().unwrap().parse().unwrap(),
        dst: p["dest_ip"].as_str().unwrap().parse().unwrap(),
        dport: p["dest_port"].as_u64().unwrap() as u16,
    }
}

pub(crate) fn expected(expect: &Value) -> BTreeSet<Fate> {
    if let Some(eps) = expect["endpoints"].as_array() {
        let masquerade = expect["masquerade"].as_bool().unwrap();
        eps.iter()
            .map(|e| Fate::Endpoint {
                endpoint: e.as_str().unwrap().parse::<SocketAddr>().unwrap(),
                masquerade,
            })
            .collect()
    } else {
        BTreeSet::from([match expect["verdict"].as_str().unwrap() {
            "drop" => Fate::Drop,
            "reject" => Fate::Reject,
            "passthrough" => Fate::Untouched { masquerade: false },
            other => panic!("verdict {other}"),
        }])
    }
}

#[test]
fn every_scenario_packet_traces_to_its_verdict_in_every_mode() {
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let (mut nft_n, mut ipt_n, mut ebpf_n, mut ebpf6_n) = (0, 0, 0, 0);
    for file in files {
        for sc in scenarios(&file) {
            let id = sc["id"].as_str().unwrap();
            let (snap, local) = scenario_snapshot(&sc);
            let prog = program(&snap, &local);
            for pv in sc["packets"].as_array().into_iter().flatten() {
                let p = packet(pv);
                let name = format!("{id} :: {}", pv["name"].as_str().unwrap());
                let want = expected(&pv["expect"]);
                assert_eq!(
                    nft_trace(&prog.nft, &local, &p).unwrap(),
                    want,
                    "nftables: {name}"
                );
                nft_n += 1;
                assert_eq!(
                    super::iptables_trace(&prog.iptables, &p).unwrap(),
                    want,
                    "iptables: {name}"
                );
                ipt_n += 1;
                let host = super::ebpf::Host {
                    local: local.clone(),
                    loopback_attached: true,
                };
                let (got, why) = prog.ebpf.trace(&host, &p).unwrap();
                // Every packet, SCTP included (translated at tc ingress like TCP/UDP).
                assert_eq!(got, want, "ebpf: {name}; why: {why:?}");
                ebpf_n += 1;
                if p.family() == IpFamily::V6 {
                    ebpf6_n += 1;
                }
            }
        }
    }
    eprintln!(
        "traced scenario packets: nftables {nft_n}, iptables {ipt_n}, ebpf {ebpf_n} ({ebpf6_n} IPv6)"
    );
    assert!(
        nft_n >= 39 && ipt_n >= 39,
        "only {nft_n}/{ipt_n} scenario packets"
    );
    // Every packet is traced in ebpf mode too.
    assert_eq!(ebpf_n, nft_n, "ebpf packets");
    assert!(
        ebpf_n >= 39 && ebpf6_n >= 8,
        "only {ebpf_n} ebpf scenario packets ({ebpf6_n} IPv6)"
    );
}

/// The model's ClusterIP frontends appear in a view with the model's endpoints.
fn check_view_against_model(mode: &str, id: &str, view: &FamilyView, snap: &Snapshot) {
    for sps in snap.services.values() {
        let sp = &sps.port;
        let f = view
            .frontends
            .iter()
            .find(|f| {
                f.kind == FrontendKind::ClusterIp
                    && f.address == Some(sp.cluster_ip)
                    && f.port == sp.port
                    && f.protocol == Proto::from(sp.name.protocol)
            })
            .unwrap_or_else(|| panic!("{mode} {id}: no ClusterIP frontend for {}", sp.name));
        let want: BTreeSet<SocketAddr> =
            sps.internal_endpoints().iter().map(|e| e.addr()).collect();
        assert_eq!(f.endpoints, want, "{mode} {id}: endpoints of {}", sp.name);
        assert_eq!(
            want.is_empty(),
            f.no_endpoints.is_some(),
            "{mode} {id}: {} no-endpoint verdict",
            sp.name
        );
        if mode != "ebpf" {
            assert_eq!(
                f.service.as_deref(),
                Some(sp.name.to_string().as_str()),
                "{mode} {id}"
            );
        }
        assert_eq!(
            f.affinity_seconds, sp.affinity_timeout_seconds,
            "{mode} {id}: affinity of {}",
            sp.name
        );
    }
}

#[test]
fn inspect_views_round_trip_json_and_match_the_model() {
    let Some(files) = scenario_files() else {
        eprintln!("skipping: no scenario directory (set SHUNT_SCENARIOS)");
        return;
    };
    let mut checked = 0;
    for file in files {
        for sc in scenarios(&file) {
            let id = sc["id"].as_str().unwrap();
            let (snap, local) = scenario_snapshot(&sc);
            let prog = program(&snap, &local);
            let fam = snap.network.family;
            let mut views = vec![
                ("nftables", super::view::from_nft(fam, &prog.nft)),
                (
                    "iptables",
                    super::view::from_iptables(fam, prog.iptables.chains()),
                ),
            ];
            views.push(("ebpf", prog.ebpf.view_of(fam).expect("the family's maps")));
            for (mode, view) in views {
                check_view_against_model(mode, id, &view, &snap);
                let doc = Inspected {
                    mode: mode.into(),
                    families: vec![view],
                };
                let json = serde_json::to_string(&doc).unwrap();
                let back: Inspected = serde_json::from_str(&json).unwrap();
                assert_eq!(back, doc, "{mode} {id}: JSON round trip");
                checked += 1;
            }
        }
    }
    eprintln!("checked {checked} inspect views");
    // 7 scenarios x 3 modes, IPv6 ones included in ebpf mode.
    assert!(checked >= 21, "only {checked} views");
}

/// The addresses of [`load_balancer_case`] in one family.
struct LbAddrs {
    fam: IpFamily,
    cluster_ip: &'static str,
    lb: &'static str,
    range: &'static str,
    external_ip: &'static str,
    node: &'static str,
    cluster_cidr: &'static str,
    service_cidr: &'static str,
    mine: &'static str,
    other: &'static str,
    inside: &'static str,
    outside: &'static str,
}

/// What the scenarios do not exercise: a LoadBalancer with source ranges, an externalIP,
/// ClientIP affinity and eTP=Local, seen the same way in every mode's view, and traced.
#[test]
fn load_balancer_source_ranges_affinity_and_local_policy_in_every_view() {
    load_balancer_case(&LbAddrs {
        fam: IpFamily::V4,
        cluster_ip: "172.30.0.50",
        lb: "198.51.100.8",
        range: "203.0.113.0/25",
        external_ip: "192.168.99.20",
        node: "192.168.0.2",
        cluster_cidr: "10.0.0.0/8",
        service_cidr: "172.30.0.0/16",
        mine: "10.180.0.1",
        other: "10.180.2.1",
        inside: "203.0.113.2",
        outside: "203.0.113.130",
    });
}

/// The same in IPv6 (ebpf: the `SHUNT_*6` maps, the 160-bit source-range trie keys).
#[test]
fn load_balancer_source_ranges_affinity_and_local_policy_in_every_view_ipv6() {
    load_balancer_case(&LbAddrs {
        fam: IpFamily::V6,
        cluster_ip: "fd00:172:30::50",
        lb: "2001:db8:51::8",
        range: "2001:db8:113::/49",
        external_ip: "fd00:192:168:99::20",
        node: "fd00:192:168::2",
        cluster_cidr: "fd00:10::/64",
        service_cidr: "fd00:172:30::/112",
        mine: "fd00:10::180:1",
        other: "fd00:10::180:201",
        inside: "2001:db8:113::2",
        outside: "2001:db8:113:8000::2",
    });
}

fn load_balancer_case(a: &LbAddrs) {
    use crate::model::Protocol;
    use crate::plan::nft::fixtures::{NODE, ep, net, network, port, snapshot, state};
    let mut lb = port("ns1", "lb", "http", Protocol::Tcp, a.cluster_ip, 80);
    lb.node_port = Some(3050);
    lb.load_balancer_ips = vec![a.lb.parse().unwrap()];
    lb.load_balancer_source_ranges = vec![net(a.range)];
    lb.external_ips = vec![a.external_ip.parse().unwrap()];
    lb.affinity_timeout_seconds = Some(300);
    lb.external_policy_local = true;
    let snap = snapshot(
        network(a.fam, &[a.node], &[a.cluster_cidr], &[a.service_cidr]),
        vec![state(
            lb,
            vec![
                ep(a.mine, 8080, Some(NODE)),
                ep(a.other, 8080, Some("other")),
            ],
        )],
    );
    let local: Vec<IpAddr> = vec![a.node.parse().unwrap()];
    let prog = program(&snap, &local);
    let all: BTreeSet<SocketAddr> = [a.mine, a.other]
        .iter()
        .map(|s| SocketAddr::new(s.parse().unwrap(), 8080))
        .collect();
    let mine: BTreeSet<SocketAddr> = [SocketAddr::new(a.mine.parse().unwrap(), 8080)].into();
    let views = [
        ("nftables", super::view::from_nft(a.fam, &prog.nft)),
        (
            "iptables",
            super::view::from_iptables(a.fam, prog.iptables.chains()),
        ),
        ("ebpf", prog.ebpf.view_of(a.fam).unwrap()),
    ];
    for (mode, view) in &views {
        let at = |a: &str| {
            view.frontends
                .iter()
                .find(|f| f.address == Some(a.parse().unwrap()) && f.port == 80)
                .unwrap_or_else(|| panic!("{mode}: {a} in {:#?}", view.frontends))
        };
        let lbf = at(a.lb);
        assert!(
            matches!(
                lbf.kind,
                FrontendKind::LoadBalancer | FrontendKind::External
            ),
            "{mode}: {lbf:?}"
        );
        assert_eq!(lbf.source_ranges, [net(a.range)].into(), "{mode}");
        assert_eq!(lbf.affinity_seconds, Some(300), "{mode}");
        assert_eq!(
            lbf.endpoints, all,
            "{mode}: pods and the node reach every endpoint"
        );
        assert_eq!(
            lbf.external_endpoints.as_ref(),
            Some(&mine),
            "{mode}: outside only local ones"
        );
        let ext = at(a.external_ip);
        assert!(
            ext.source_ranges.is_empty(),
            "{mode}: source ranges are LoadBalancer-only"
        );
        assert_eq!(ext.external_endpoints.as_ref(), Some(&mine), "{mode}");
        let cip = at(a.cluster_ip);
        assert_eq!(
            (cip.kind, &cip.endpoints, cip.external_endpoints.as_ref()),
            (FrontendKind::ClusterIp, &all, None),
            "{mode}"
        );
    }
    let p = |src: &str, dst: &str| Packet {
        protocol: Proto::Tcp,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        dport: 80,
    };
    let inside = p(a.inside, a.lb);
    let outside = p(a.outside, a.lb);
    let want_in: BTreeSet<Fate> = [Fate::Endpoint {
        endpoint: SocketAddr::new(a.mine.parse().unwrap(), 8080),
        masquerade: false,
    }]
    .into();
    let host = super::ebpf::Host {
        local: local.clone(),
        loopback_attached: true,
    };
    for (mode, got_in, got_out) in [
        (
            "nftables",
            nft_trace(&prog.nft, &local, &inside).unwrap(),
            nft_trace(&prog.nft, &local, &outside).unwrap(),
        ),
        (
            "iptables",
            super::iptables_trace(&prog.iptables, &inside).unwrap(),
            super::iptables_trace(&prog.iptables, &outside).unwrap(),
        ),
        (
            "ebpf",
            prog.ebpf.trace(&host, &inside).unwrap().0,
            prog.ebpf.trace(&host, &outside).unwrap().0,
        ),
    ] {
        assert_eq!(got_in, want_in, "{mode}: inside the source range");
        assert_eq!(
            got_out,
            [Fate::Drop].into(),
            "{mode}: outside the source range"
        );
    }
}

/// A node process's dual-stack socket given `::ffff:<ClusterIP>`: traced as the IPv4 packet
/// the kernel sends, through the IPv4 services at the socket (connect6 in the programs), to
/// the same endpoint as the plain IPv4 ClusterIP. Without the IPv4 maps it is an error.
#[test]
fn ebpf_trace_of_an_ipv4_mapped_destination_uses_the_ipv4_services() {
    use crate::plan::ebpf::tests::{ep, snap, svc};
    let s = snap(vec![svc("web", "172.30.0.10", vec![ep("10.1.1.2", false)])]);
    let local: Vec<IpAddr> = vec!["10.1.0.1".parse().unwrap()];
    let maps = super::ebpf::Maps {
        v4: Some(program_ebpf::<crate::plan::ebpf::V4>(&s, &local).0),
        v6: None,
    };
    let host = super::ebpf::Host {
        local: local.clone(),
        loopback_attached: true,
    };
    let p = |src: &str, dst: &str| Packet {
        protocol: Proto::Tcp,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        dport: 80,
    };
    let (plain, _) = maps.trace(&host, &p("10.1.0.1", "172.30.0.10")).unwrap();
    let (fates, why) = maps
        .trace(&host, &p("::ffff:10.1.0.1", "::ffff:172.30.0.10"))
        .unwrap();
    assert_eq!(fates, plain);
    assert!(
        fates
            .iter()
            .any(|f| matches!(f, Fate::Endpoint { endpoint, .. }
            if *endpoint == "10.1.1.2:8080".parse::<SocketAddr>().unwrap())),
        "{fates:?}"
    );
    assert!(
        why[0].contains("IPv4-mapped") && why[0].contains("connect6"),
        "{why:?}"
    );
    assert!(
        super::ebpf::Maps::default()
            .trace(&host, &p("::ffff:10.1.0.1", "::ffff:172.30.0.10"))
            .is_err()
    );
}
