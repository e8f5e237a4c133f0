//! ebpf mode: the frontends of the userspace-owned maps (`plan::ebpf::State4`, read back from
//! the pins or computed by the plan), and a tracer that follows the decisions of the kernel
//! programs (ebpf/src/programs.rs) over that content for a new connection.
//!
//! Which program sees the packet: a packet from a node address is node-originated; its
//! socket goes through `connect4`/`sendmsg4` (translation of the destination at the socket:
//! no masquerade, a refusal is ECONNREFUSED, a drop EPERM), except when the frontend is a
//! node address (`NODE_ADDRESS`) and the tc program is attached to `lo`
//! (`HOST_NETNS[LOOPBACK]`): then tc on loopback handles it as a local source (masqueraded,
//! INTERNAL scope). Any other packet crosses tc ingress. SCTP and non-TCP/UDP packets are not
//! parsed by the programs: untouched.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use ipnet::{IpNet, Ipv4Net};
use shunt_abi::{Service4Key, Service4Value, scope, svc_flags};

use super::view::{FamilyView, FrontendKind, FrontendView, NoEndpoints, family_name};
use super::{Fate, Packet, Proto};
use crate::model::IpFamily;
use crate::plan::ebpf::State4;

fn ip4(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

fn wire(a: Ipv4Addr) -> u32 {
    shunt_abi::addr4(a.octets())
}

fn proto_of(n: u8) -> Option<Proto> {
    match n {
        6 => Some(Proto::Tcp),
        17 => Some(Proto::Udp),
        132 => Some(Proto::Sctp),
        _ => None,
    }
}

fn lpm_contains(set: &BTreeSet<crate::plan::ebpf::Lpm4Ord>, a: Ipv4Addr) -> bool {
    set.iter().any(|c| {
        Ipv4Net::new(ip4(c.addr), c.prefix_len.min(32) as u8).is_ok_and(|n| n.contains(&a))
    })
}

fn backends_of(st: &State4, k: &Service4Key, v: &Service4Value) -> Vec<SocketAddr> {
    (1..=v.count)
        .filter_map(|slot| {
            let sk = Service4Key {
                backend_slot: slot,
                ..*k
            };
            let id = st.services.get(&sk)?.backend_id;
            let b = st.backends.get(&id)?;
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip4(b.addr),
                u16::from_be(b.port),
            )))
        })
        .collect()
}

fn ranges_of(st: &State4, rev_nat_id: u16) -> BTreeSet<IpNet> {
    st.src_ranges
        .iter()
        .filter(|(_, r)| r.rev_nat_id == rev_nat_id)
        .filter_map(|(plen, r)| {
            let bits = plen.saturating_sub(shunt_abi::SRC_RANGE_ID_BITS).min(32) as u8;
            Ipv4Net::new(ip4(r.addr), bits).ok().map(IpNet::V4)
        })
        .collect()
}

/// The frontends of `st` (slot-0 entries; the INTERNAL scope folds into its EXTERNAL twin).
pub fn view(st: &State4) -> FamilyView {
    let mut frontends = Vec::new();
    for (k, v) in st
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0 && k.scope == scope::EXTERNAL)
    {
        let Some(protocol) = proto_of(k.proto) else {
            continue;
        };
        let kind = if v.flags & svc_flags::CLUSTER_IP != 0 {
            FrontendKind::ClusterIp
        } else if v.flags & svc_flags::NODE_ADDRESS != 0 {
            FrontendKind::NodePort
        } else {
            FrontendKind::External
        };
        let external: BTreeSet<SocketAddr> = backends_of(st, k, v).into_iter().collect();
        let mut endpoints = external.clone();
        let mut external_endpoints = None;
        if v.flags & svc_flags::TWO_SCOPES != 0 {
            let ik = Service4Key {
                scope: scope::INTERNAL,
                ..*k
            };
            if let Some(iv) = st.services.get(&ik) {
                endpoints.extend(backends_of(st, &ik, iv));
                if endpoints != external {
                    external_endpoints = Some(external);
                }
            }
        }
        let mut f = FrontendView {
            service: None,
            kind,
            address: Some(IpAddr::V4(ip4(k.addr))),
            port: u16::from_be(k.dport),
            protocol,
            endpoints,
            external_endpoints,
            no_endpoints: None,
            affinity_seconds: (v.flags & svc_flags::AFFINITY != 0).then_some(v.affinity_timeout),
            source_ranges: BTreeSet::new(),
            masquerade: st.node_ip != 0
                && v.flags & (svc_flags::MASQUERADE | svc_flags::MASQUERADE_ALL) != 0,
        };
        if v.count == 0
            || f.external_endpoints
                .as_ref()
                .is_some_and(BTreeSet::is_empty)
        {
            f.no_endpoints = Some(if v.flags & svc_flags::REJECT_NO_ENDPOINTS != 0 {
                NoEndpoints::Reject
            } else {
                NoEndpoints::Drop
            });
        }
        if v.flags & svc_flags::SOURCE_RANGES != 0 {
            f.source_ranges = ranges_of(st, v.rev_nat_id);
        }
        frontends.push(f);
    }
    frontends.sort();
    FamilyView {
        family: family_name(IpFamily::V4).into(),
        node_port_addresses: None,
        frontends,
    }
}

/// The node facts the programs read besides the maps.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// The node's addresses (node-originated packets come from one of them).
    pub local: Vec<IpAddr>,
    /// `HOST_NETNS[LOOPBACK]`: tc is attached to `lo`.
    pub loopback_attached: bool,
}

/// The fates of a new connection's first packet, with the reasons, as the programs decide.
pub fn trace(st: &State4, host: &Host, p: &Packet) -> (BTreeSet<Fate>, Vec<String>) {
    let mut why = Vec::new();
    let one = |f: Fate| BTreeSet::from([f]);
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (p.src, p.dst) else {
        why.push("IPv6: the programs translate IPv4 only; the packet is not parsed".into());
        return (one(Fate::Untouched { masquerade: false }), why);
    };
    if !matches!(p.protocol, Proto::Tcp | Proto::Udp) {
        why.push(format!(
            "{}: the programs parse TCP and UDP only; the packet passes untranslated",
            p.protocol.as_str()
        ));
        return (one(Fate::Untouched { masquerade: false }), why);
    }
    let key = Service4Key {
        addr: wire(dst),
        dport: p.dport.to_be(),
        proto: Protocol::from(p.protocol).number(),
        scope: scope::EXTERNAL,
        backend_slot: 0,
        pad: 0,
    };
    let from_node = host.local.contains(&p.src);
    let svc = st.services.get(&key).copied();
    let via_socket = from_node
        && !(host.loopback_attached && svc.is_some_and(|s| s.flags & svc_flags::NODE_ADDRESS != 0));
    if via_socket {
        why.push("node-originated: translated at the socket (cgroup connect4/sendmsg4)".into());
    } else if from_node {
        why.push("node-originated to a node address: tc on lo, as a local source".into());
    } else {
        why.push("tc ingress".into());
    }
    let Some(mut s) = svc else {
        if st.cluster_ips.contains(&wire(dst)) {
            why.push(format!(
                "{dst} is a ClusterIP (SHUNT_CIP4) without this port/protocol: reject"
            ));
            return (one(Fate::Reject), why);
        }
        if lpm_contains(&st.service_cidrs, dst) {
            why.push(format!(
                "{dst} is in a service CIDR (SHUNT_SCIDR4) but no Service's: drop"
            ));
            return (one(Fate::Drop), why);
        }
        why.push("no frontend in SHUNT_SVC4: not a Service".into());
        return (one(Fate::Untouched { masquerade: false }), why);
    };
    let mut key = key;
    let pod_src = lpm_contains(&st.local_cidrs, src);
    if s.flags & svc_flags::TWO_SCOPES != 0 && (from_node || pod_src) {
        let ik = Service4Key {
            scope: scope::INTERNAL,
            ..key
        };
        if let Some(v) = st.services.get(&ik) {
            why.push("source is the node or a pod: INTERNAL scope (cluster-wide endpoints)".into());
            s = *v;
            key = ik;
        }
    }
    if !via_socket && s.flags & svc_flags::SOURCE_RANGES != 0 {
        let ranges = ranges_of(st, s.rev_nat_id);
        if !ranges.iter().any(|r| r.contains(&p.src)) {
            why.push(format!(
                "source {src} outside loadBalancerSourceRanges {ranges:?}: drop"
            ));
            return (one(Fate::Drop), why);
        }
    }
    if s.count == 0 {
        if s.flags & svc_flags::REJECT_NO_ENDPOINTS != 0 {
            why.push("no endpoints: reject".into());
            return (one(Fate::Reject), why);
        }
        why.push("no endpoints for this traffic policy: drop".into());
        return (one(Fate::Drop), why);
    }
    let backends = backends_of(st, &key, &s);
    why.push(format!(
        "frontend rev_nat_id {} flags {:#x}: {} backend slot(s)",
        s.rev_nat_id, s.flags, s.count
    ));
    let mut fates = BTreeSet::new();
    for be in backends {
        let masquerade = !via_socket
            && st.node_ip != 0
            && (from_node
                || s.flags & svc_flags::MASQUERADE_ALL != 0
                || (s.flags & svc_flags::MASQUERADE != 0 && !pod_src)
                || be.ip() == p.src);
        fates.insert(Fate::Endpoint {
            endpoint: be,
            masquerade,
        });
    }
    (fates, why)
}

use crate::model::Protocol;

/// Map content after applying `ops` to `maps` in order, as `dataplane::ebpf::apply_ops`
/// writes them (pure twin, so that the plan's operations can be read back like pins).
pub fn apply_ops(maps: &mut State4, ops: &[crate::plan::ebpf::MapOp]) {
    use crate::plan::ebpf::{MapOp, Trie};
    for op in ops {
        match op {
            MapOp::SetConfig(c) => maps.node_ip = c.node_ip,
            MapOp::PutBackend(id, b) => {
                maps.backends.insert(*id, *b);
            }
            MapOp::DelBackend(id) => {
                maps.backends.remove(id);
            }
            MapOp::PutRevNat(id, r) => {
                maps.rev_nat.insert(*id, *r);
            }
            MapOp::DelRevNat(id) => {
                maps.rev_nat.remove(id);
            }
            MapOp::PutSrcRange(p, r) => {
                maps.src_ranges.insert((*p, *r));
            }
            MapOp::DelSrcRange(p, r) => {
                maps.src_ranges.remove(&(*p, *r));
            }
            MapOp::PutClusterIp(a) => {
                maps.cluster_ips.insert(*a);
            }
            MapOp::DelClusterIp(a) => {
                maps.cluster_ips.remove(a);
            }
            MapOp::PutLpm(t, c) => {
                match t {
                    Trie::ServiceCidr => maps.service_cidrs.insert(*c),
                    Trie::LocalCidr => maps.local_cidrs.insert(*c),
                };
            }
            MapOp::DelLpm(t, c) => {
                match t {
                    Trie::ServiceCidr => maps.service_cidrs.remove(c),
                    Trie::LocalCidr => maps.local_cidrs.remove(c),
                };
            }
            MapOp::PutService(k, v) => {
                maps.services.insert(*k, *v);
            }
            MapOp::DelService(k) => {
                maps.services.remove(k);
            }
        }
    }
    crate::plan::ebpf::ids_from_maps(maps);
}
