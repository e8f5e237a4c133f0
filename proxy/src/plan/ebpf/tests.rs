//! Table tests: what the maps hold for a snapshot, and the order of writes.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use shunt_abi::{SrcRange, addr4, addr6, port, scope, svc_flags};

use super::*;
use crate::model::{
    Endpoint, IpFamily, LocalDetector, NodeNetwork, NodePortIps, Protocol, ServiceKey, ServicePort,
    ServicePortName, ServicePortState, Snapshot,
};

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(crate) fn ep(addr: &str, local: bool) -> Endpoint {
    Endpoint {
        ip: ip(addr),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: local,
        node_name: None,
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    }
}

pub(crate) fn svc(name: &str, cip: &str, eps: Vec<Endpoint>) -> ServicePortState {
    ServicePortState {
        port: ServicePort {
            name: ServicePortName {
                service: ServiceKey {
                    namespace: "ns".into(),
                    name: name.into(),
                },
                port: "p".into(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::V4,
            cluster_ip: ip(cip),
            port: 80,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            affinity_timeout_seconds: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
            traffic_distribution: None,
        },
        has_any_endpoints: !eps.is_empty(),
        local_endpoints: eps.iter().filter(|e| e.is_local).cloned().collect(),
        cluster_endpoints: eps.clone(),
        endpoints: eps,
    }
}

pub(crate) fn snap(services: Vec<ServicePortState>) -> Snapshot {
    Snapshot {
        network: NodeNetwork {
            family: IpFamily::V4,
            node_name: "node".into(),
            primary_ip: Some(ip("192.168.0.2")),
            node_port_ips: NodePortIps::Addresses(vec![ip("192.168.0.2")]),
            local_detector: LocalDetector::ClusterCidr(vec!["10.0.0.0/8".parse().unwrap()]),
            masquerade_all: false,
            service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        },
        services: services
            .into_iter()
            .map(|s| (s.port.name.clone(), s))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn key(a: &str, p: u16, sc: u8, slot: u16) -> shunt_abi::Service4Key {
    let IpAddr::V4(a) = ip(a) else { panic!() };
    shunt_abi::Service4Key {
        addr: addr4(a.octets()),
        dport: port(p),
        proto: 6,
        scope: sc,
        backend_slot: slot,
        pad: 0,
    }
}

fn slot0(st: &State4, a: &str, p: u16, sc: u8) -> Service4Value {
    st.services[&key(a, p, sc, 0)]
}

#[test]
fn cluster_ip_with_two_endpoints() {
    let s = snap(vec![svc(
        "a",
        "172.30.0.10",
        vec![ep("10.1.0.1", true), ep("10.1.0.2", false)],
    )]);
    let st = desired(&s, &[], &State4::default()).unwrap();
    let v = slot0(&st, "172.30.0.10", 80, scope::EXTERNAL);
    assert_eq!(v.count, 2);
    assert_eq!(v.flags, svc_flags::CLUSTER_IP | svc_flags::MASQUERADE);
    assert_eq!(st.node_ip, addr4([192, 168, 0, 2]));
    let b1 = st.services[&key("172.30.0.10", 80, 0, 1)].backend_id;
    let b2 = st.services[&key("172.30.0.10", 80, 0, 2)].backend_id;
    assert_ne!(b1, b2);
    assert_eq!(st.backends[&b1].addr, addr4([10, 1, 0, 1]));
    assert_eq!(st.backends[&b1].port, port(8080));
    assert_eq!(
        st.rev_nat[&u32::from(v.rev_nat_id)].addr,
        addr4([172, 30, 0, 10])
    );
    assert!(st.cluster_ips.contains(&addr4([172, 30, 0, 10])));
    assert_eq!(st.service_cidrs.len(), 1);
    assert_eq!(st.local_cidrs.len(), 1);
    assert_eq!(st.services.len(), 3);
}

#[test]
fn no_endpoints_reject_local_policy_drop() {
    let none = svc("none", "172.30.0.11", vec![]);
    let mut local = svc("local", "172.30.0.12", vec![ep("10.1.0.2", false)]);
    local.port.internal_policy_local = true;
    let st = desired(&snap(vec![none, local]), &[], &State4::default()).unwrap();
    let v = slot0(&st, "172.30.0.11", 80, 0);
    assert_eq!(v.count, 0);
    assert_ne!(v.flags & svc_flags::REJECT_NO_ENDPOINTS, 0);
    let v = slot0(&st, "172.30.0.12", 80, 0);
    assert_eq!(v.count, 0);
    assert_eq!(
        v.flags & svc_flags::REJECT_NO_ENDPOINTS,
        0,
        "Local without local: drop"
    );
}

#[test]
fn nodeport_lb_local_policy_two_scopes_and_source_ranges() {
    let mut s = svc(
        "lb",
        "172.30.0.13",
        vec![ep("10.1.0.1", true), ep("10.1.0.2", false)],
    );
    s.port.node_port = Some(30080);
    s.port.load_balancer_ips = vec![ip("1.2.3.4")];
    s.port.external_ips = vec![ip("5.6.7.8")];
    s.port.load_balancer_source_ranges = vec!["9.9.0.0/16".parse().unwrap()];
    s.port.external_policy_local = true;
    s.port.affinity_timeout_seconds = Some(10800);
    let st = desired(&snap(vec![s]), &[], &State4::default()).unwrap();
    // NodePort on the node address: external scope = local endpoints, internal = cluster.
    let ext = slot0(&st, "192.168.0.2", 30080, scope::EXTERNAL);
    assert_eq!(ext.count, 1);
    assert_ne!(ext.flags & svc_flags::TWO_SCOPES, 0);
    assert_eq!(
        ext.flags & svc_flags::MASQUERADE,
        0,
        "eTP=Local keeps the client IP"
    );
    assert_eq!(ext.affinity_timeout, 10800);
    assert_ne!(ext.flags & svc_flags::AFFINITY, 0);
    assert_eq!(
        ext.flags & svc_flags::SOURCE_RANGES,
        0,
        "ranges apply to LB IPs only"
    );
    let int = slot0(&st, "192.168.0.2", 30080, scope::INTERNAL);
    assert_eq!(int.count, 2);
    let lb = slot0(&st, "1.2.3.4", 80, scope::EXTERNAL);
    assert_ne!(lb.flags & svc_flags::SOURCE_RANGES, 0);
    assert!(st.src_ranges.contains(&(
        shunt_abi::SRC_RANGE_ID_BITS + 16,
        SrcRange {
            rev_nat_id: lb.rev_nat_id,
            pad: 0,
            addr: addr4([9, 9, 0, 0])
        }
    )));
    let eip = slot0(&st, "5.6.7.8", 80, scope::EXTERNAL);
    assert_eq!(eip.flags & svc_flags::SOURCE_RANGES, 0);
    // Four frontends, four distinct reverse-NAT ids.
    let ids: BTreeSet<u16> = st
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .map(|(_, v)| v.rev_nat_id)
        .collect();
    assert_eq!(ids.len(), 4);
}

#[test]
fn all_local_nodeports_skip_loopback() {
    let mut s = svc("np", "172.30.0.14", vec![ep("10.1.0.1", true)]);
    s.port.node_port = Some(30081);
    let mut sn = snap(vec![s]);
    sn.network.node_port_ips = NodePortIps::AllLocal;
    let local = [
        ip("127.0.0.1"),
        ip("192.168.0.2"),
        ip("10.99.0.1"),
        ip("fd00::1"),
    ];
    let st = desired(&sn, &local, &State4::default()).unwrap();
    assert!(st.services.contains_key(&key("192.168.0.2", 30081, 0, 0)));
    assert!(st.services.contains_key(&key("10.99.0.1", 30081, 0, 0)));
    assert!(!st.services.contains_key(&key("127.0.0.1", 30081, 0, 0)));
    let v = slot0(&st, "10.99.0.1", 30081, 0);
    assert_ne!(
        v.flags & svc_flags::MASQUERADE,
        0,
        "external traffic to Cluster policy"
    );
    assert_ne!(
        v.flags & svc_flags::NODE_ADDRESS,
        0,
        "NodePort replies come from the node"
    );
    let c = slot0(&st, "172.30.0.14", 80, 0);
    assert_eq!(c.flags & svc_flags::NODE_ADDRESS, 0);
    // An externalIP assigned to this node is a node address too.
    let mut s = svc("eip", "172.30.0.15", vec![ep("10.1.0.1", true)]);
    s.port.external_ips = vec![ip("10.99.0.1"), ip("5.6.7.8")];
    let st = desired(&snap(vec![s]), &local, &State4::default()).unwrap();
    assert_ne!(
        slot0(&st, "10.99.0.1", 80, 0).flags & svc_flags::NODE_ADDRESS,
        0
    );
    assert_eq!(
        slot0(&st, "5.6.7.8", 80, 0).flags & svc_flags::NODE_ADDRESS,
        0
    );
}

#[test]
fn snapshot_of_the_other_family_is_refused() {
    let mut s = snap(vec![]);
    s.network.family = IpFamily::V6;
    assert_eq!(
        desired(&s, &[], &State4::default()),
        Err(PlanError::WrongFamily {
            want: IpFamily::V4,
            got: IpFamily::V6
        })
    );
    assert!(desired(&snap(vec![]), &[], &State6::default()).is_err());
}

fn pos<W>(ops: &[MapOp<W>], f: impl Fn(&MapOp<W>) -> bool) -> Vec<usize> {
    ops.iter()
        .enumerate()
        .filter(|(_, o)| f(o))
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn first_sync_writes_referenced_entries_before_slot_zero() {
    let s = snap(vec![svc(
        "a",
        "172.30.0.10",
        vec![ep("10.1.0.1", true), ep("10.1.0.2", false)],
    )]);
    let st = desired(&s, &[], &State4::default()).unwrap();
    let ops = diff(&State4::default(), &st);
    let slot0 = pos(
        &ops,
        |o| matches!(o, MapOp::PutService(k, _) if k.backend_slot == 0),
    );
    let slots = pos(
        &ops,
        |o| matches!(o, MapOp::PutService(k, _) if k.backend_slot != 0),
    );
    let backends = pos(&ops, |o| matches!(o, MapOp::PutBackend(..)));
    let revnat = pos(&ops, |o| matches!(o, MapOp::PutRevNat(..)));
    assert_eq!(
        (slot0.len(), slots.len(), backends.len(), revnat.len()),
        (1, 2, 2, 1)
    );
    assert!(
        backends
            .iter()
            .chain(&slots)
            .chain(&revnat)
            .all(|i| *i < slot0[0])
    );
    assert!(backends.iter().all(|b| slots.iter().all(|s| b < s)));
    // Applying the same state again changes nothing.
    assert!(diff(&st, &st).is_empty());
}

#[test]
fn shrink_and_delete_break_after_make() {
    let old = desired(
        &snap(vec![
            svc(
                "a",
                "172.30.0.10",
                vec![ep("10.1.0.1", true), ep("10.1.0.2", false)],
            ),
            svc("b", "172.30.0.20", vec![ep("10.1.0.3", true)]),
        ]),
        &[],
        &State4::default(),
    )
    .unwrap();
    // a loses 10.1.0.1, b disappears.
    let new = desired(
        &snap(vec![svc("a", "172.30.0.10", vec![ep("10.1.0.2", false)])]),
        &[],
        &old,
    )
    .unwrap();
    // 10.1.0.2 keeps its id across syncs.
    let id = |st: &State4| st.backend_ids[&(Ipv4Addr::new(10, 1, 0, 2), 8080, 6)];
    assert_eq!(id(&old), id(&new));
    let ops = diff(&old, &new);
    let put0 = pos(
        &ops,
        |o| matches!(o, MapOp::PutService(k, _) if k.backend_slot == 0),
    );
    let del0 = pos(
        &ops,
        |o| matches!(o, MapOp::DelService(k) if k.backend_slot == 0),
    );
    let deln = pos(
        &ops,
        |o| matches!(o, MapOp::DelService(k) if k.backend_slot != 0),
    );
    let delb = pos(&ops, |o| matches!(o, MapOp::DelBackend(..)));
    let delr = pos(&ops, |o| matches!(o, MapOp::DelRevNat(..)));
    let delc = pos(&ops, |o| matches!(o, MapOp::DelClusterIp(..)));
    assert_eq!(put0.len(), 1, "a's slot 0 shrinks to count 1: {ops:?}");
    assert_eq!(del0.len(), 1, "b's slot 0");
    // a's slot 2 and b's slot 1.
    assert_eq!(deln.len(), 2);
    assert_eq!(delb.len(), 2, "10.1.0.1 and 10.1.0.3");
    assert_eq!((delr.len(), delc.len()), (1, 1));
    assert!(put0[0] < del0[0] && del0[0] < deln[0]);
    assert!(deln.iter().all(|d| delb.iter().all(|b| d < b)));
    // After a's count dropped to 1 the surviving slot 1 must name 10.1.0.2.
    let a1 = new.services[&key("172.30.0.10", 80, 0, 1)].backend_id;
    assert_eq!(a1, id(&new));
}

/// What the kernel maps would give back for `st` (the id allocations are not stored), with
/// its ids rebuilt: they must be `st`'s.
fn assert_ids_survive_readback<F: Family>(st: &State<F>) -> State<F> {
    let mut back = State::<F> {
        node_ip: st.node_ip,
        services: st.services.clone(),
        backends: st.backends.clone(),
        rev_nat: st.rev_nat.clone(),
        ..Default::default()
    };
    ids_from_maps(&mut back);
    assert_eq!(back.backend_ids, st.backend_ids);
    assert_eq!(back.rev_nat_ids, st.rev_nat_ids);
    back
}

#[test]
fn ids_survive_a_readback() {
    let mut s = svc("lb", "172.30.0.13", vec![ep("10.1.0.1", true)]);
    s.port.node_port = Some(30080);
    let sn = snap(vec![s]);
    let st = desired(&sn, &[], &State4::default()).unwrap();
    let back = assert_ids_survive_readback(&st);
    let again = desired(&sn, &[], &back).unwrap();
    assert_eq!(again, st);
}

#[test]
fn valid_pairs_follow_the_slots() {
    let old = desired(
        &snap(vec![svc(
            "a",
            "172.30.0.10",
            vec![ep("10.1.0.1", true), ep("10.1.0.2", false)],
        )]),
        &[],
        &State4::default(),
    )
    .unwrap();
    let new = desired(
        &snap(vec![svc("a", "172.30.0.10", vec![ep("10.1.0.2", false)])]),
        &[],
        &old,
    )
    .unwrap();
    let rid = slot0(&old, "172.30.0.10", 80, 0).rev_nat_id;
    let b1 = old.backend_ids[&(Ipv4Addr::new(10, 1, 0, 1), 8080, 6)];
    let b2 = old.backend_ids[&(Ipv4Addr::new(10, 1, 0, 2), 8080, 6)];
    assert_eq!(valid_pairs(&old), BTreeSet::from([(rid, b1), (rid, b2)]));
    assert_eq!(valid_pairs(&new), BTreeSet::from([(rid, b2)]));
}

#[test]
fn masquerade_flags_follow_detect_local_and_masquerade_all() {
    let mut s = svc("a", "172.30.0.10", vec![ep("10.1.0.1", true)]);
    s.port.node_port = Some(30082);
    s.port.external_policy_local = true;
    let mut sn = snap(vec![s]);
    // Without a cluster CIDR kube-proxy cannot tell off-cluster sources of a ClusterIP.
    sn.network.local_detector = LocalDetector::None;
    let st = desired(&sn, &[], &State4::default()).unwrap();
    let cip = slot0(&st, "172.30.0.10", 80, 0);
    assert_eq!(
        cip.flags & (svc_flags::MASQUERADE | svc_flags::MASQUERADE_ALL),
        0
    );
    let np = slot0(&st, "192.168.0.2", 30082, 0);
    assert_eq!(np.flags & svc_flags::MASQUERADE, 0, "eTP=Local");
    assert!(st.local_cidrs.is_empty());

    sn.network.masquerade_all = true;
    let st = desired(&sn, &[], &State4::default()).unwrap();
    for (k, v) in st.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        assert_ne!(v.flags & svc_flags::MASQUERADE_ALL, 0, "{k:?}");
    }
}

pub(crate) fn svc6(name: &str, cip: &str, eps: Vec<Endpoint>) -> ServicePortState {
    let mut s = svc(name, cip, eps);
    s.port.family = IpFamily::V6;
    s
}

/// An IPv6 snapshot: node 2001:db8::1, pods fd00:10::/64, services fd00:172:30::/112.
pub(crate) fn snap6(services: Vec<ServicePortState>) -> Snapshot {
    let mut s = snap(services);
    s.network.family = IpFamily::V6;
    s.network.primary_ip = Some(ip("2001:db8::1"));
    s.network.node_port_ips = NodePortIps::Addresses(vec![ip("2001:db8::1"), ip("192.168.0.2")]);
    s.network.local_detector = LocalDetector::ClusterCidr(vec!["fd00:10::/64".parse().unwrap()]);
    s.network.service_cidrs = vec!["fd00:172:30::/112".parse().unwrap()];
    s
}

fn w6(a: &str) -> [u32; 4] {
    let IpAddr::V6(a) = ip(a) else { panic!() };
    addr6(a.octets())
}

fn key6(a: &str, p: u16, sc: u8, slot: u16) -> shunt_abi::Service6Key {
    shunt_abi::Service6Key {
        addr: w6(a),
        dport: port(p),
        proto: 6,
        scope: sc,
        backend_slot: slot,
        pad: 0,
    }
}

#[test]
fn ipv6_nodeport_lb_local_policy_and_source_ranges() {
    let mut s = svc6(
        "lb",
        "fd00:172:30::41",
        vec![ep("fd00:10:180::1", false), ep("fd00:10:180::2:1", true)],
    );
    s.port.node_port = Some(3001);
    s.port.load_balancer_ips = vec![ip("2001:db8:5::4"), ip("198.51.100.4")];
    s.port.load_balancer_source_ranges = vec![
        "2001:db8:ff::/48".parse().unwrap(),
        "203.0.113.0/25".parse().unwrap(),
    ];
    s.port.external_policy_local = true;
    let local = [
        ip("2001:db8::1"),
        ip("2001:db8:1::2"),
        ip("::1"),
        ip("192.168.0.2"),
    ];
    let st = desired(&snap6(vec![s]), &local, &State6::default()).unwrap();
    assert_eq!(st.node_ip, w6("2001:db8::1"));
    // ClusterIP: both endpoints, masquerade for off-cluster sources.
    let c = st.services[&key6("fd00:172:30::41", 80, scope::EXTERNAL, 0)];
    assert_eq!(c.count, 2);
    assert_eq!(c.flags, svc_flags::CLUSTER_IP | svc_flags::MASQUERADE);
    let b1 = st.services[&key6("fd00:172:30::41", 80, 0, 1)].backend_id;
    let be = st.backends[&b1];
    assert!(be.addr == w6("fd00:10:180::1") || be.addr == w6("fd00:10:180::2:1"));
    assert_eq!(be.port, port(8080));
    // NodePort only on the IPv6 node-port address (the IPv4 one belongs to the other
    // family); local endpoint only externally, both from pods (two scopes).
    let np = st.services[&key6("2001:db8::1", 3001, scope::EXTERNAL, 0)];
    assert_eq!(np.count, 1);
    assert_ne!(np.flags & svc_flags::TWO_SCOPES, 0);
    assert_ne!(np.flags & svc_flags::NODE_ADDRESS, 0);
    assert_eq!(
        st.services[&key6("2001:db8::1", 3001, scope::INTERNAL, 0)].count,
        2
    );
    assert!(
        !st.services
            .keys()
            .any(|k| k.addr == w6("2001:db8:1::2") && k.backend_slot == 0)
    );
    // LoadBalancer IP: the IPv6 source range only, 32 id bits + 48 prefix bits.
    let lb = st.services[&key6("2001:db8:5::4", 80, scope::EXTERNAL, 0)];
    assert_ne!(lb.flags & svc_flags::SOURCE_RANGES, 0);
    assert_eq!(
        st.src_ranges,
        BTreeSet::from([(
            shunt_abi::SRC_RANGE_ID_BITS + 48,
            SrcRange {
                rev_nat_id: lb.rev_nat_id,
                pad: 0,
                addr: w6("2001:db8:ff::"),
            }
        )])
    );
    assert_eq!(
        st.rev_nat[&u32::from(lb.rev_nat_id)].addr,
        w6("2001:db8:5::4")
    );
    assert_eq!(st.cluster_ips, BTreeSet::from([w6("fd00:172:30::41")]));
    assert_eq!(
        st.local_cidrs,
        BTreeSet::from([shunt_abi::Lpm {
            prefix_len: 64,
            addr: w6("fd00:10::")
        }])
    );
    assert_eq!(
        st.service_cidrs
            .iter()
            .map(|l| l.prefix_len)
            .collect::<Vec<_>>(),
        vec![112]
    );
    // No IPv4 address leaked into the IPv6 maps.
    assert!(st.backends.values().all(|b| b.addr[0] != 0));

    // Ids survive a read-back (V6::from_wire inverts V6::wire), and a diff from empty
    // writes everything a slot 0 refers to before it.
    assert_ids_survive_readback(&st);
    let ops = diff(&State6::default(), &st);
    let first_slot0 = pos(
        &ops,
        |o| matches!(o, MapOp::PutService(k, _) if k.backend_slot == 0),
    )[0];
    let last_ref = *pos(
        &ops,
        |o| !matches!(o, MapOp::PutService(k, _) if k.backend_slot == 0),
    )
    .last()
    .unwrap();
    assert!(last_ref < first_slot0, "{ops:?}");
    assert!(diff(&st, &st).is_empty());
}

#[test]
fn ids_fill_gaps_lowest_first_and_run_out() {
    let mut ids = Ids::new(BTreeSet::from([1, 2, 4, 7]), 9, "backend");
    let got: Vec<u32> = (0..5).map(|_| ids.take().unwrap()).collect();
    assert_eq!(got, vec![3, 5, 6, 8, 9]);
    assert_eq!(ids.take(), Err(PlanError::IdsExhausted { what: "backend" }));
}
