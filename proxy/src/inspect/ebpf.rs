//! ebpf mode: the frontends of the userspace-owned maps (`plan::ebpf::State<F>`, read back
//! from the pins or computed by the plan), and a tracer that follows the decisions of the
//! kernel programs (ebpf/src/programs.rs) over that content for a new connection.
//!
//! Written once for both families, like the programs (`programs.rs` is generic over its
//! `Fam` trait, the plan over [`Family`]): the two families' maps have the same shapes and
//! the programs take the same decisions on them; only the address width differs.
//!
//! Which program sees the packet: a packet from a node address is node-originated; its
//! socket goes through `connect4`/`sendmsg4` (`connect6`/`sendmsg6`: translation of the
//! destination at the socket: no masquerade, a refusal is ECONNREFUSED, a drop EPERM),
//! except when the frontend is a node address (`NODE_ADDRESS`) and the tc program is
//! attached to `lo` (`HOST_NETNS[LOOPBACK]`): then tc on loopback handles it as a local
//! source (masqueraded, INTERNAL scope). Any other packet crosses tc ingress, which
//! translates TCP, UDP and SCTP alike; the socket programs translate TCP and UDP only, so
//! the node's own SCTP to a frontend that is not a node address passes untranslated.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use shunt_abi::{Lpm, Service4Value, ServiceKey, scope, svc_flags};

use super::view::{FamilyView, FrontendKind, FrontendView, NoEndpoints, family_name};
use super::{Fate, InspectError, Packet, Proto};
use crate::model::{IpFamily, Protocol};
use crate::plan::ebpf::{Family, MapOp, State, State4, State6, Trie, V4, V6};

/// A plan family whose addresses convert to [`IpAddr`] (both do; the bound names it once
/// here instead of at every function).
pub trait Fam: Family<Ip: Into<IpAddr>> {}
impl<F: Family<Ip: Into<IpAddr>>> Fam for F {}

fn ip<F: Fam>(w: F::Wire) -> IpAddr {
    F::from_wire(w).into()
}

fn proto_of(n: u8) -> Option<Proto> {
    match n {
        6 => Some(Proto::Tcp),
        17 => Some(Proto::Udp),
        132 => Some(Proto::Sctp),
        _ => None,
    }
}

/// An LPM entry as a CIDR (None for a prefix longer than the family's address).
fn net<F: Fam>(addr: F::Wire, prefix_len: u32) -> Option<IpNet> {
    let len = u8::try_from(prefix_len)
        .ok()
        .filter(|l| u32::from(*l) <= F::BITS)?;
    IpNet::new(ip::<F>(addr), len).ok()
}

/// The trie lookup of the programs (`F::lcidr().get(Key::new(F::BITS, addr))`): some entry
/// covers `a`.
fn lpm_contains<F: Fam>(set: &BTreeSet<Lpm<F::Wire>>, a: IpAddr) -> bool {
    set.iter()
        .any(|c| net::<F>(c.addr, c.prefix_len).is_some_and(|n| n.contains(&a)))
}

fn backends_of<F: Fam>(
    st: &State<F>,
    k: &ServiceKey<F::Wire>,
    v: &Service4Value,
) -> Vec<SocketAddr> {
    (1..=v.count)
        .filter_map(|slot| {
            let sk = ServiceKey {
                backend_slot: slot,
                ..*k
            };
            let id = st.services.get(&sk)?.backend_id;
            let b = st.backends.get(&id)?;
            Some(SocketAddr::new(ip::<F>(b.addr), u16::from_be(b.port)))
        })
        .collect()
}

/// The source ranges of a frontend: the trie's prefix counts 32 id bits before the address.
fn ranges_of<F: Fam>(st: &State<F>, rev_nat_id: u16) -> BTreeSet<IpNet> {
    st.src_ranges
        .iter()
        .filter(|(_, r)| r.rev_nat_id == rev_nat_id)
        .filter_map(|(plen, r)| net::<F>(r.addr, plen.saturating_sub(shunt_abi::SRC_RANGE_ID_BITS)))
        .collect()
}

/// The frontends of `st` (slot-0 entries; the INTERNAL scope folds into its EXTERNAL twin).
pub fn view<F: Fam>(st: &State<F>) -> FamilyView {
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
            let ik = ServiceKey {
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
            address: Some(ip::<F>(k.addr)),
            port: u16::from_be(k.dport),
            protocol,
            endpoints,
            external_endpoints,
            no_endpoints: None,
            affinity_seconds: (v.flags & svc_flags::AFFINITY != 0).then_some(v.affinity_timeout),
            source_ranges: BTreeSet::new(),
            masquerade: st.node_ip != F::Wire::default()
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
        family: family_name(F::FAMILY).into(),
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

/// The fates of a new connection's first packet of family `F`, with the reasons, as the
/// programs decide (`new_flow`/`miss` of the tc program, `sock_forward` of the socket
/// programs). A packet of the other family is an error: the caller picks the family's maps.
pub fn trace<F: Fam>(
    st: &State<F>,
    host: &Host,
    p: &Packet,
) -> Result<(BTreeSet<Fate>, Vec<String>), InspectError> {
    let (Some(_), Some(dst)) = (F::ip(&p.src), F::ip(&p.dst)) else {
        return Err(InspectError::Trace(format!(
            "{} -> {} is not an {} packet",
            p.src,
            p.dst,
            family_name(F::FAMILY)
        )));
    };
    let maps = F::MAPS;
    let dst_wire = F::wire(dst);
    let mut why = Vec::new();
    let one = |f: Fate| BTreeSet::from([f]);
    let key = ServiceKey {
        addr: dst_wire,
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
    let (connect, sendmsg) = match F::FAMILY {
        IpFamily::V4 => ("connect4", "sendmsg4"),
        IpFamily::V6 => ("connect6", "sendmsg6"),
    };
    if via_socket && p.protocol == Proto::Sctp {
        // sock_proto: the socket programs handle TCP and UDP only, and the node's own
        // packets never cross a tc ingress hook of ours (unless they loop through lo).
        why.push(format!(
            "node-originated SCTP: {connect}/{sendmsg} translate TCP and UDP only; the packet passes untranslated"
        ));
        return Ok((one(Fate::Untouched { masquerade: false }), why));
    }
    if via_socket {
        why.push(format!(
            "node-originated: translated at the socket (cgroup {connect}/{sendmsg})"
        ));
    } else if from_node {
        why.push("node-originated to a node address: tc on lo, as a local source".into());
    } else {
        why.push("tc ingress".into());
    }
    let Some(mut s) = svc else {
        if st.cluster_ips.contains(&dst_wire) {
            why.push(format!(
                "{} is a ClusterIP ({}) without this port/protocol: reject",
                p.dst, maps.cluster_ip
            ));
            return Ok((one(Fate::Reject), why));
        }
        if lpm_contains::<F>(&st.service_cidrs, p.dst) {
            why.push(format!(
                "{} is in a service CIDR ({}) but no Service's: drop",
                p.dst, maps.service_cidr
            ));
            return Ok((one(Fate::Drop), why));
        }
        why.push(format!("no frontend in {}: not a Service", maps.services));
        return Ok((one(Fate::Untouched { masquerade: false }), why));
    };
    let mut key = key;
    let pod_src = lpm_contains::<F>(&st.local_cidrs, p.src);
    if s.flags & svc_flags::TWO_SCOPES != 0 && (from_node || pod_src) {
        let ik = ServiceKey {
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
                "source {} outside loadBalancerSourceRanges {ranges:?} ({}): drop",
                p.src, maps.src_range
            ));
            return Ok((one(Fate::Drop), why));
        }
    }
    if s.count == 0 {
        if s.flags & svc_flags::REJECT_NO_ENDPOINTS != 0 {
            why.push("no endpoints: reject".into());
            return Ok((one(Fate::Reject), why));
        }
        why.push("no endpoints for this traffic policy: drop".into());
        return Ok((one(Fate::Drop), why));
    }
    let backends = backends_of(st, &key, &s);
    why.push(format!(
        "frontend rev_nat_id {} flags {:#x}: {} backend slot(s) in {}",
        s.rev_nat_id, s.flags, s.count, maps.services
    ));
    let mut fates = BTreeSet::new();
    for be in backends {
        // `new_flow`: masquerade needs the family's node address (`SHUNT_CFG4`/`6`).
        let masquerade = !via_socket
            && st.node_ip != F::Wire::default()
            && (from_node
                || s.flags & svc_flags::MASQUERADE_ALL != 0
                || (s.flags & svc_flags::MASQUERADE != 0 && !pod_src)
                || be.ip() == p.src);
        fates.insert(Fate::Endpoint {
            endpoint: be,
            masquerade,
        });
    }
    Ok((fates, why))
}

/// Map content after applying `ops` to `maps` in order, as `dataplane::ebpf::apply_ops`
/// writes them (pure twin, so that the plan's operations can be read back like pins).
pub fn apply_ops<F: Fam>(maps: &mut State<F>, ops: &[MapOp<F::Wire>]) {
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

/// Both families' maps (None: that family's maps are not pinned, e.g. pins adopted from a
/// shunt that predates IPv6 and not yet recreated).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    pub v4: Option<State4>,
    pub v6: Option<State6>,
}

impl Maps {
    /// One view per family present.
    pub fn views(&self) -> Vec<FamilyView> {
        let mut out = Vec::new();
        out.extend(self.v4.as_ref().map(view));
        out.extend(self.v6.as_ref().map(view));
        out
    }

    /// The view of `family`, if its maps are present.
    pub fn view_of(&self, family: IpFamily) -> Option<FamilyView> {
        match family {
            IpFamily::V4 => self.v4.as_ref().map(view),
            IpFamily::V6 => self.v6.as_ref().map(view),
        }
    }

    /// [`trace`] through the maps of the packet's family.
    pub fn trace(
        &self,
        host: &Host,
        p: &Packet,
    ) -> Result<(BTreeSet<Fate>, Vec<String>), InspectError> {
        // An IPv4-mapped destination (`::ffff:a.b.c.d`) only exists at a dual-stack IPv6
        // socket: the kernel sends IPv4, and connect6/sendmsg6 translate it through the
        // IPv4 services (ebpf/src/v4mapped.rs). Traced as the IPv4 packet it becomes.
        let mapped = match (p.src, p.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => d.to_ipv4_mapped().map(|d| Packet {
                src: s.to_ipv4_mapped().map_or(p.src, IpAddr::V4),
                dst: IpAddr::V4(d),
                ..*p
            }),
            _ => None,
        };
        let q = mapped.as_ref().unwrap_or(p);
        let missing = || InspectError::FamilyMissing {
            mode: "ebpf".into(),
            family: family_name(q.family()).into(),
        };
        let (fates, mut why) = match q.family() {
            IpFamily::V4 => trace::<V4>(self.v4.as_ref().ok_or_else(missing)?, host, q)?,
            IpFamily::V6 => trace::<V6>(self.v6.as_ref().ok_or_else(missing)?, host, q)?,
        };
        if mapped.is_some() {
            why.insert(
                0,
                format!(
                    "{} is IPv4-mapped: a dual-stack socket sends {} -> {} over IPv4; its connect6/sendmsg6 look it up in the IPv4 services",
                    p.dst, q.src, q.dst
                ),
            );
        }
        Ok((fates, why))
    }
}
