//! The nft parser on text captured from real runs (`fixtures/*.nft-list`: `nft list table`
//! output of nft 1.0.6 after shunt's plan for a conformance scenario was loaded into a
//! namespace), and on the plan's own scripts.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::inspect::view::{FrontendKind, from_nft};
use crate::inspect::{Fate, Packet, Proto, nft_trace};

const ETP_LOCAL: &str = include_str!("../fixtures/etp-local.nft-list");
const NODEPORT_V6: &str = include_str!("../fixtures/nodeport-ipv6.nft-list");

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pkt(src: &str, dst: &str, port: u16) -> Packet {
    Packet {
        protocol: Proto::Tcp,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        dport: port,
    }
}

fn dnat(eps: &[&str], masquerade: bool) -> BTreeSet<Fate> {
    eps.iter()
        .map(|e| Fate::Endpoint {
            endpoint: sa(e),
            masquerade,
        })
        .collect()
}

#[test]
fn listing_of_an_etp_local_service_parses_into_its_frontends() {
    let tables = parse_listing(ETP_LOCAL).unwrap();
    let t = &tables[&IpFamily::V4];
    // 1024 pick maps and the fixed sets/maps, every chain of the listing.
    assert!(t.sets.len() > 1024, "{}", t.sets.len());
    assert_eq!(
        t.chains["filter-prerouting"].base,
        Some(BaseHook {
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: -110
        })
    );
    assert_eq!(t.chains["nat-postrouting"].base.unwrap().priority, 100);
    assert_eq!(
        t.chains["masquerading"].rules[0].matches,
        vec![Match::MarkClear(0x4000)]
    );
    let view = from_nft(IpFamily::V4, t);
    let svc = Some("ns1/svc1:p80".to_string());
    let both: BTreeSet<SocketAddr> = [sa("10.180.0.1:80"), sa("10.180.2.1:80")].into();
    let local: BTreeSet<SocketAddr> = [sa("10.180.2.1:80")].into();
    let find = |kind, addr: Option<&str>, port| {
        view.frontends
            .iter()
            .find(|f| {
                f.kind == kind && f.address == addr.map(|a| a.parse().unwrap()) && f.port == port
            })
            .unwrap_or_else(|| panic!("{kind:?} {addr:?}:{port} in {:#?}", view.frontends))
    };
    let cip = find(FrontendKind::ClusterIp, Some("172.30.0.41"), 80);
    assert_eq!(
        (&cip.service, &cip.endpoints, &cip.external_endpoints),
        (&svc, &both, &None)
    );
    for f in [
        find(FrontendKind::NodePort, None, 3001),
        find(FrontendKind::External, Some("198.51.100.4"), 80),
        find(FrontendKind::External, Some("192.168.99.11"), 80),
    ] {
        assert_eq!(f.endpoints, both, "{f:?}");
        assert_eq!(f.external_endpoints.as_ref(), Some(&local), "{f:?}");
        assert!(f.masquerade, "local sources are masqueraded: {f:?}");
    }
    assert_eq!(
        view.node_port_addresses,
        Some(["192.168.0.2".parse::<IpAddr>().unwrap()].into())
    );
}

#[test]
fn listing_traces_like_the_scenario_says() {
    let tables = parse_listing(ETP_LOCAL).unwrap();
    let t = &tables[&IpFamily::V4];
    let node: Vec<IpAddr> = ["192.168.0.2", "192.168.1.2", "192.168.99.11"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let both = ["10.180.0.1:80", "10.180.2.1:80"];
    let cases = [
        (
            pkt("203.0.113.2", "198.51.100.4", 80),
            dnat(&["10.180.2.1:80"], false),
        ),
        (pkt("10.0.0.2", "198.51.100.4", 80), dnat(&both, false)),
        (pkt("10.0.0.2", "192.168.0.2", 3001), dnat(&both, false)),
        (pkt("192.168.0.2", "192.168.0.2", 3001), dnat(&both, true)),
        (
            pkt("203.0.113.2", "192.168.0.2", 3001),
            dnat(&["10.180.2.1:80"], false),
        ),
        (pkt("10.0.0.2", "172.30.0.41", 80), dnat(&both, false)),
        (pkt("10.0.0.2", "172.30.0.41", 81), [Fate::Reject].into()),
        (pkt("10.0.0.2", "172.30.0.99", 80), [Fate::Drop].into()),
        (
            pkt("10.0.0.2", "10.180.0.1", 80),
            [Fate::Untouched { masquerade: false }].into(),
        ),
    ];
    for (p, want) in cases {
        assert_eq!(nft_trace(t, &node, &p).unwrap(), want, "{p:?}");
    }
}

#[test]
fn ipv6_listing_parses_bracketed_dnat_and_element_keys() {
    let tables = parse_listing(NODEPORT_V6).unwrap();
    let t = &tables[&IpFamily::V6];
    let view = from_nft(IpFamily::V6, t);
    let cip = view
        .frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)
        .unwrap();
    assert_eq!(cip.address, Some("fd00:172:30::41".parse().unwrap()));
    assert_eq!(
        cip.endpoints,
        [sa("[fd00:10:180::1]:80"), sa("[fd00:10:180::2:1]:80")].into()
    );
    let node: Vec<IpAddr> = vec![
        "2001:db8::1".parse().unwrap(),
        "2001:db8:1::2".parse().unwrap(),
    ];
    assert_eq!(
        nft_trace(t, &node, &pkt("2001:db8:ff::1", "2001:db8::1", 3001)).unwrap(),
        dnat(&["[fd00:10:180::1]:80", "[fd00:10:180::2:1]:80"], true)
    );
    // A secondary node address does not accept NodePorts.
    assert_eq!(
        nft_trace(t, &node, &pkt("2001:db8:ff::1", "2001:db8:1::2", 3001)).unwrap(),
        [Fate::Untouched { masquerade: false }].into()
    );
}

#[test]
fn element_comments_wrapped_lists_and_timeouts() {
    let text = r#"table ip shunt {
	map no-endpoint-services {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
		elements = { 198.51.100.4 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain,
			     172.30.0.41 . udp . 53 comment "ns1/svc1:dns" : drop }
	}

	set affinity-X {
		type ipv4_addr
		size 65535
		flags dynamic,timeout
		timeout 3h
		elements = { 10.0.0.2 timeout 3h expires 2h59m }
	}

	chain firewall-X {
		ip saddr != { 203.0.113.0/25, 192.168.0.0/24 } drop
	}

	chain endpoint-X {
		ip saddr 10.180.0.1 jump mark-for-masquerade # handle 7
		update @affinity-X { ip saddr }
		meta l4proto tcp dnat to 10.180.0.1:80
		numgen random mod 2 vmap @endpoint-picks-000
	}
}
"#;
    let tables = parse_listing(text).unwrap();
    let t = &tables[&IpFamily::V4];
    let ne = &t.elements["no-endpoint-services"];
    assert_eq!(ne.len(), 2);
    let e = &ne[&Key::AddrProtoPort("172.30.0.41".parse().unwrap(), Protocol::Udp, 53)];
    assert_eq!(e.comment.as_deref(), Some("ns1/svc1:dns"));
    assert_eq!(e.value, Some(Verdict::Drop));
    assert_eq!(t.sets["affinity-X"].timeout_seconds, Some(10_800));
    assert_eq!(t.elements["affinity-X"].len(), 1);
    let fw = &t.chains["firewall-X"].rules[0];
    assert_eq!(
        fw.matches,
        vec![Match::Saddr {
            nets: vec![
                "192.168.0.0/24".parse().unwrap(),
                "203.0.113.0/25".parse().unwrap()
            ],
            negate: true
        }]
    );
    let ep = &t.chains["endpoint-X"].rules;
    assert_eq!(ep[1].stmts, vec![Stmt::UpdateSaddr("affinity-X".into())]);
    assert_eq!(
        ep[3].verdict,
        Some(Verdict::Pick {
            count: 2,
            offset: 0,
            map: "endpoint-picks-000".into()
        })
    );
}

#[test]
fn what_shunt_never_programs_is_an_error_naming_the_line() {
    let text = "table ip shunt {\n\tchain x {\n\t\tip daddr 1.2.3.4 counter packets 0 bytes 0 accept\n\t}\n}\n";
    let e = parse_listing(text).unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    assert!(e.what.contains("counter"), "{e}");
    // Foreign tables are skipped whole.
    let foreign = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tcounter accept\n\t}\n}\n";
    assert!(parse_listing(foreign).unwrap().is_empty());
}
