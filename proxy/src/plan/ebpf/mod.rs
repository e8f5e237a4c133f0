//! PURE: one family's [`Snapshot`] -> the content of shunt's BPF maps, and the ordered map
//! operations that move the kernel from a previous content to it. Written once, generic
//! over [`Family`] ([`V4`], [`V6`]): the two families' maps have the same shapes
//! (`shunt_abi`, `u32` or `[u32; 4]` addresses) and kube-proxy's rules do not depend on it.
//!
//! Layout (see `shunt_abi`): per frontend (address, port, protocol, scope) a slot-0 entry with
//! the backend count, a reverse-NAT id and flags, then slots 1..=count each naming a backend
//! id; backends, reverse-NAT entries, source ranges, ClusterIPs and CIDRs in maps of their own.
//! The idea of slots as separate keys comes from Cilium's `bpf/lib/lb.h`.
//!
//! Ordering is make-before-break, because the kernel program reads the maps while they are
//! written: everything a slot-0 entry refers to (backends, reverse NAT, source ranges, slots)
//! is written before it, and removed only after it. [`diff`] therefore emits, in order:
//! puts of backends, reverse NAT, source ranges, ClusterIPs, CIDRs, slots >= 1, slot 0; then
//! deletes of slot 0, slots >= 1, and the referenced maps last.
//!
//! kube-proxy semantics mirrored here (pkg/proxy/nftables/proxier.go, syncProxyRules):
//! - internal traffic (ClusterIP) uses `internal_endpoints()`, external traffic (NodePort on
//!   node addresses, externalIPs, LoadBalancer IPs) `external_endpoints()`;
//! - with no usable endpoint at all the verdict is reject; with endpoints elsewhere but none
//!   for a Local policy it is drop;
//! - pod traffic (source in the cluster CIDR) to an external address of an eTP=Local service
//!   is short-circuited to the Cluster endpoints (the INTERNAL scope entry here);
//! - loadBalancerSourceRanges filter LoadBalancer IP traffic only;
//! - ClusterIPs with an unknown port are rejected, other service-CIDR addresses dropped.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use shunt_abi::{
    Backend, Config, Lpm, RevNat, Service4Value, ServiceKey, SrcRange, addr4, addr6, limits, names,
    port, scope, svc_flags,
};

use crate::model::{Endpoint, IpFamily, LocalDetector, NodePortIps, ServicePortState, Snapshot};

pub mod capacity;

/// One IP family: its addresses in userspace (`Ip`) and on the wire / in the maps (`Wire`).
pub trait Family: Clone + Copy + Debug + Default + PartialEq + Eq + 'static {
    type Ip: Copy + Ord + Debug + Hash;
    type Wire: shunt_abi::Wire;
    const FAMILY: IpFamily;
    /// Address bits (the LPM prefix length of one address).
    const BITS: u32;
    /// The family's pinned maps.
    const MAPS: names::Family;
    fn ip(a: &IpAddr) -> Option<Self::Ip>;
    /// A CIDR of this family: (network address, prefix length).
    fn net(n: &IpNet) -> Option<(Self::Ip, u8)>;
    fn wire(a: Self::Ip) -> Self::Wire;
    fn from_wire(w: Self::Wire) -> Self::Ip;
    fn is_loopback(a: &Self::Ip) -> bool;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4;
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6;

impl Family for V4 {
    type Ip = Ipv4Addr;
    type Wire = u32;
    const FAMILY: IpFamily = IpFamily::V4;
    const BITS: u32 = 32;
    const MAPS: names::Family = names::V4;
    fn ip(a: &IpAddr) -> Option<Ipv4Addr> {
        match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }
    }
    fn net(n: &IpNet) -> Option<(Ipv4Addr, u8)> {
        match n {
            IpNet::V4(n) => Some((n.network(), n.prefix_len())),
            IpNet::V6(_) => None,
        }
    }
    fn wire(a: Ipv4Addr) -> u32 {
        addr4(a.octets())
    }
    fn from_wire(w: u32) -> Ipv4Addr {
        Ipv4Addr::from(w.to_ne_bytes())
    }
    fn is_loopback(a: &Ipv4Addr) -> bool {
        a.is_loopback()
    }
}

impl Family for V6 {
    type Ip = Ipv6Addr;
    type Wire = [u32; 4];
    const FAMILY: IpFamily = IpFamily::V6;
    const BITS: u32 = 128;
    const MAPS: names::Family = names::V6;
    fn ip(a: &IpAddr) -> Option<Ipv6Addr> {
        match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        }
    }
    fn net(n: &IpNet) -> Option<(Ipv6Addr, u8)> {
        match n {
            IpNet::V6(n) => Some((n.network(), n.prefix_len())),
            IpNet::V4(_) => None,
        }
    }
    fn wire(a: Ipv6Addr) -> [u32; 4] {
        addr6(a.octets())
    }
    fn from_wire(w: [u32; 4]) -> Ipv6Addr {
        let mut o = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(o)
    }
    fn is_loopback(a: &Ipv6Addr) -> bool {
        a.is_loopback()
    }
}

/// Why a snapshot cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("snapshot of family {got:?} given to the {want:?} plan")]
    WrongFamily { want: IpFamily, got: IpFamily },
    #[error("service {service}: more than {max} endpoints in one frontend")]
    TooManyEndpoints { service: String, max: usize },
    #[error("map {map} would need {need} entries, its size is {max}")]
    MapFull {
        map: &'static str,
        need: usize,
        max: u32,
    },
    #[error("no free {what} id")]
    IdsExhausted { what: &'static str },
}

/// The identity of a backend or a frontend: address, port (host order), protocol number.
pub type L4Addr<F> = (<F as Family>::Ip, u16, u8);

/// The full content of the maps userspace owns for one family (conntrack and affinity
/// belong to the kernel program), plus the id allocations that must stay stable between
/// syncs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State<F: Family> {
    pub services: BTreeMap<ServiceKey<F::Wire>, Service4Value>,
    pub backends: BTreeMap<u32, Backend<F::Wire>>,
    pub rev_nat: BTreeMap<u32, RevNat<F::Wire>>,
    /// LPM keys of the source-range trie: (prefix length, data).
    pub src_ranges: BTreeSet<(u32, SrcRange<F::Wire>)>,
    pub cluster_ips: BTreeSet<F::Wire>,
    pub service_cidrs: BTreeSet<Lpm<F::Wire>>,
    pub local_cidrs: BTreeSet<Lpm<F::Wire>>,
    /// Masquerade source (primary node IP of the family, wire order); 0 = none known, no
    /// masquerading.
    pub node_ip: F::Wire,
    pub backend_ids: BTreeMap<L4Addr<F>, u32>,
    pub rev_nat_ids: BTreeMap<L4Addr<F>, u32>,
}

pub type State4 = State<V4>;
pub type State6 = State<V6>;

/// Which LPM trie an [`MapOp::PutLpm`]/[`MapOp::DelLpm`] addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trie {
    ServiceCidr,
    LocalCidr,
}

/// One map write, in the order it must be applied (`W`: the family's wire address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp<W> {
    /// Node-wide settings (the family's config array, entry 0): the masquerade address.
    SetConfig(Config<W>),
    PutBackend(u32, Backend<W>),
    PutRevNat(u32, RevNat<W>),
    PutSrcRange(u32, SrcRange<W>),
    PutClusterIp(W),
    PutLpm(Trie, Lpm<W>),
    PutService(ServiceKey<W>, Service4Value),
    DelService(ServiceKey<W>),
    DelSrcRange(u32, SrcRange<W>),
    DelClusterIp(W),
    DelLpm(Trie, Lpm<W>),
    DelRevNat(u32),
    DelBackend(u32),
}

fn lpm<F: Family>(net: &IpNet) -> Option<Lpm<F::Wire>> {
    F::net(net).map(|(a, len)| Lpm {
        prefix_len: u32::from(len),
        addr: F::wire(a),
    })
}

/// Hands out the lowest ids >= 1 not in use (0 is reserved: "no id"), in increasing order.
/// The cursor only moves forward, so allocating n ids among m kept ones costs
/// O((n + m) log m), not a rescan from 1 per id (quadratic: at 100,000 backends that scan
/// was most of a cold sync).
struct Ids {
    used: BTreeSet<u32>,
    next: u32,
    max: u32,
    what: &'static str,
}

impl Ids {
    fn new(used: BTreeSet<u32>, max: u32, what: &'static str) -> Ids {
        Ids {
            used,
            next: 1,
            max,
            what,
        }
    }

    fn take(&mut self) -> Result<u32, PlanError> {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        if self.next > self.max {
            return Err(PlanError::IdsExhausted { what: self.what });
        }
        let id = self.next;
        self.used.insert(id);
        self.next += 1;
        Ok(id)
    }
}

/// Compute the desired map content for `snap` (of family `F`). `prev` provides the id
/// allocations to keep (backend and reverse-NAT ids of things that still exist keep their
/// ids, so conntrack and affinity entries referring to them stay valid). `local_addrs` are
/// the node's addresses (both families; only `F`'s are used), used when
/// `--nodeport-addresses` selects every local address; loopback addresses never accept
/// NodePorts (kube-proxy's nftables mode does not support localhost NodePorts).
pub fn desired<F: Family>(
    snap: &Snapshot,
    local_addrs: &[IpAddr],
    prev: &State<F>,
) -> Result<State<F>, PlanError> {
    if snap.network.family != F::FAMILY {
        return Err(PlanError::WrongFamily {
            want: F::FAMILY,
            got: snap.network.family,
        });
    }
    let mut st = State::<F> {
        node_ip: snap
            .network
            .primary_ip
            .as_ref()
            .and_then(F::ip)
            .map_or(F::Wire::default(), F::wire),
        ..Default::default()
    };
    for c in &snap.network.service_cidrs {
        st.service_cidrs.extend(lpm::<F>(c));
    }
    if let LocalDetector::ClusterCidr(cidrs) = &snap.network.local_detector {
        for c in cidrs {
            st.local_cidrs.extend(lpm::<F>(c));
        }
    }
    let candidates: &[IpAddr] = match &snap.network.node_port_ips {
        NodePortIps::AllLocal => local_addrs,
        NodePortIps::Addresses(a) => a,
    };
    let node_port_ips: Vec<F::Ip> = candidates
        .iter()
        .filter_map(F::ip)
        .filter(|a| !F::is_loopback(a))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    // Ids: keep the previous ones for what still exists, allocate the rest afterwards.
    let mut backend_want: BTreeSet<L4Addr<F>> = BTreeSet::new();
    let mut frontend_want: BTreeSet<L4Addr<F>> = BTreeSet::new();
    for sps in snap.services.values() {
        let proto = sps.port.name.protocol.number();
        for e in sps.endpoints.iter() {
            if let Some(a) = F::ip(&e.ip) {
                backend_want.insert((a, e.port, proto));
            }
        }
        for (a, p) in frontends::<F>(sps, &node_port_ips) {
            frontend_want.insert((a, p, proto));
        }
    }
    for b in &backend_want {
        if let Some(&id) = prev.backend_ids.get(b) {
            st.backend_ids.insert(*b, id);
        }
    }
    let mut ids = Ids::new(
        st.backend_ids.values().copied().collect(),
        // Ids name hash-map keys, not slots: any u32 would do; bounded like the map.
        capacity::MAX_ENTRIES,
        "backend",
    );
    for b in &backend_want {
        if !st.backend_ids.contains_key(b) {
            st.backend_ids.insert(*b, ids.take()?);
        }
    }
    for f in &frontend_want {
        if let Some(&id) = prev.rev_nat_ids.get(f) {
            st.rev_nat_ids.insert(*f, id);
        }
    }
    // rev_nat_id is a u16 in service values and affinity keys.
    let mut ids = Ids::new(
        st.rev_nat_ids.values().copied().collect(),
        u32::from(u16::MAX),
        "reverse-NAT",
    );
    for f in &frontend_want {
        if !st.rev_nat_ids.contains_key(f) {
            st.rev_nat_ids.insert(*f, ids.take()?);
        }
    }
    for ((a, p, proto), id) in &st.backend_ids {
        st.backends.insert(
            *id,
            Backend {
                addr: F::wire(*a),
                port: port(*p),
                proto: *proto,
                flags: 0,
            },
        );
    }
    for ((a, p, _), id) in &st.rev_nat_ids {
        st.rev_nat.insert(
            *id,
            RevNat {
                addr: F::wire(*a),
                port: port(*p),
                pad: 0,
            },
        );
    }

    for sps in snap.services.values() {
        let sp = &sps.port;
        let proto = sp.name.protocol.number();
        let reject = !sps.has_any_endpoints;
        let mut base = 0u16;
        if snap.network.masquerade_all {
            base |= svc_flags::MASQUERADE_ALL;
        }
        if sp.affinity_timeout_seconds.is_some() {
            base |= svc_flags::AFFINITY;
        }
        if reject {
            base |= svc_flags::REJECT_NO_ENDPOINTS;
        }
        let timeout = sp.affinity_timeout_seconds.unwrap_or(0);
        let name = sp.name.to_string();
        let cluster_ip = F::ip(&sp.cluster_ip);
        if let Some(cip) = cluster_ip {
            st.cluster_ips.insert(F::wire(cip));
            let mut flags = base | svc_flags::CLUSTER_IP;
            // Off-cluster sources to a ClusterIP are masqueraded only when the cluster CIDR
            // tells them apart (kube-proxy: `ip saddr != <clusterCIDR>`).
            if matches!(snap.network.local_detector, LocalDetector::ClusterCidr(_)) {
                flags |= svc_flags::MASQUERADE;
            }
            let id = st.rev_nat_ids[&(cip, sp.port, proto)] as u16;
            put_frontend(
                &mut st,
                (cip, sp.port, proto, scope::EXTERNAL),
                sps.internal_endpoints(),
                (id, flags, timeout),
                &name,
            )?;
        }
        let mut external: Vec<(F::Ip, u16, bool)> = Vec::new();
        for (a, p) in frontends::<F>(sps, &node_port_ips) {
            if Some(a) == cluster_ip && p == sp.port {
                continue;
            }
            let is_lb = p == sp.port && sp.load_balancer_ips.iter().any(|l| F::ip(l) == Some(a));
            external.push((a, p, is_lb));
        }
        for (a, p, is_lb) in external {
            let id = st.rev_nat_ids[&(a, p, proto)] as u16;
            let mut flags = base;
            // Replies carry a node address as source after reverse NAT: NodePorts, and
            // externalIPs / LoadBalancer IPs that are assigned to this node.
            let local = local_addrs.iter().any(|l| F::ip(l) == Some(a));
            if (Some(p) == sp.node_port && node_port_ips.contains(&a)) || local {
                flags |= svc_flags::NODE_ADDRESS;
            }
            // External traffic to a Cluster policy is masqueraded (unless it comes from a
            // pod); eTP=Local keeps the client address.
            if !sp.external_policy_local {
                flags |= svc_flags::MASQUERADE;
            }
            let ranges: Vec<Lpm<F::Wire>> = if is_lb {
                sp.load_balancer_source_ranges
                    .iter()
                    .filter_map(lpm::<F>)
                    .collect()
            } else {
                Vec::new()
            };
            if !ranges.is_empty() {
                flags |= svc_flags::SOURCE_RANGES;
                for r in &ranges {
                    st.src_ranges.insert((
                        shunt_abi::SRC_RANGE_ID_BITS + r.prefix_len,
                        SrcRange {
                            rev_nat_id: id,
                            pad: 0,
                            addr: r.addr,
                        },
                    ));
                }
            }
            if sp.external_policy_local {
                flags |= svc_flags::TWO_SCOPES;
                put_frontend(
                    &mut st,
                    (a, p, proto, scope::INTERNAL),
                    &sps.cluster_endpoints,
                    (id, flags & !svc_flags::MASQUERADE, timeout),
                    &name,
                )?;
            }
            put_frontend(
                &mut st,
                (a, p, proto, scope::EXTERNAL),
                sps.external_endpoints(),
                (id, flags, timeout),
                &name,
            )?;
        }
    }
    check(&st)?;
    Ok(st)
}

/// Frontends of a service port: (address, port) for the ClusterIP, NodePorts on node
/// addresses, externalIPs and LoadBalancer IPs (both on the service port).
fn frontends<F: Family>(sps: &ServicePortState, node_port_ips: &[F::Ip]) -> Vec<(F::Ip, u16)> {
    let sp = &sps.port;
    let mut out = Vec::new();
    if let Some(c) = F::ip(&sp.cluster_ip) {
        out.push((c, sp.port));
    }
    if let Some(np) = sp.node_port {
        out.extend(node_port_ips.iter().map(|a| (*a, np)));
    }
    for ip in sp.external_ips.iter().chain(sp.load_balancer_ips.iter()) {
        if let Some(a) = F::ip(ip) {
            out.push((a, sp.port));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn put_frontend<F: Family>(
    st: &mut State<F>,
    (addr, p, proto, scope): (F::Ip, u16, u8, u8),
    endpoints: &[Endpoint],
    (rev_nat_id, flags, timeout): (u16, u16, u32),
    name: &str,
) -> Result<(), PlanError> {
    let ids: Vec<u32> = endpoints
        .iter()
        .filter_map(|e| F::ip(&e.ip).map(|a| st.backend_ids[&(a, e.port, proto)]))
        .collect();
    let count = u16::try_from(ids.len()).map_err(|_| PlanError::TooManyEndpoints {
        service: name.to_string(),
        max: usize::from(u16::MAX),
    })?;
    let key = |slot: u16| ServiceKey {
        addr: F::wire(addr),
        dport: port(p),
        proto,
        scope,
        backend_slot: slot,
        pad: 0,
    };
    for (i, id) in ids.iter().enumerate() {
        st.services.insert(
            key(i as u16 + 1),
            Service4Value {
                backend_id: *id,
                ..Default::default()
            },
        );
    }
    st.services.insert(
        key(0),
        Service4Value {
            backend_id: 0,
            count,
            rev_nat_id,
            flags,
            pad: 0,
            affinity_timeout: timeout,
        },
    );
    Ok(())
}

/// Refuse a plan no map could hold. The maps userspace fills grow (see [`capacity`]), so
/// they are checked against the most they may grow to; the others have fixed sizes.
fn check<F: Family>(st: &State<F>) -> Result<(), PlanError> {
    let m = F::MAPS;
    let sizes: [(&'static str, usize, u32); 5] = [
        (m.services, st.services.len(), capacity::ceiling(m.services)),
        (m.backends, st.backends.len(), capacity::ceiling(m.backends)),
        (m.src_range, st.src_ranges.len(), limits::SRC_RANGES),
        (
            m.cluster_ip,
            st.cluster_ips.len(),
            capacity::ceiling(m.cluster_ip),
        ),
        (
            m.service_cidr,
            st.service_cidrs.len().max(st.local_cidrs.len()),
            limits::CIDRS,
        ),
    ];
    for (map, need, max) in sizes {
        if need > max as usize {
            return Err(PlanError::MapFull { map, need, max });
        }
    }
    Ok(())
}

/// The ordered operations that turn `old` into `new` (make-before-break, see module docs).
/// Entries whose value is unchanged are not rewritten.
pub fn diff<F: Family>(old: &State<F>, new: &State<F>) -> Vec<MapOp<F::Wire>> {
    let mut ops = Vec::new();
    if old.node_ip != new.node_ip {
        ops.push(MapOp::SetConfig(Config {
            node_ip: new.node_ip,
            pad: 0,
        }));
    }
    for (id, b) in &new.backends {
        if old.backends.get(id) != Some(b) {
            ops.push(MapOp::PutBackend(*id, *b));
        }
    }
    for (id, r) in &new.rev_nat {
        if old.rev_nat.get(id) != Some(r) {
            ops.push(MapOp::PutRevNat(*id, *r));
        }
    }
    for (p, r) in new.src_ranges.difference(&old.src_ranges) {
        ops.push(MapOp::PutSrcRange(*p, *r));
    }
    for c in new.cluster_ips.difference(&old.cluster_ips) {
        ops.push(MapOp::PutClusterIp(*c));
    }
    for c in new.service_cidrs.difference(&old.service_cidrs) {
        ops.push(MapOp::PutLpm(Trie::ServiceCidr, *c));
    }
    for c in new.local_cidrs.difference(&old.local_cidrs) {
        ops.push(MapOp::PutLpm(Trie::LocalCidr, *c));
    }
    let changed = |k: &ServiceKey<F::Wire>, v: &Service4Value| old.services.get(k) != Some(v);
    for (k, v) in new.services.iter().filter(|(k, _)| k.backend_slot != 0) {
        if changed(k, v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    for (k, v) in new.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        if changed(k, v) {
            ops.push(MapOp::PutService(*k, *v));
        }
    }
    let gone = |k: &&ServiceKey<F::Wire>| !new.services.contains_key(k);
    for k in old
        .services
        .keys()
        .filter(|k| k.backend_slot == 0)
        .filter(gone)
    {
        ops.push(MapOp::DelService(*k));
    }
    for k in old
        .services
        .keys()
        .filter(|k| k.backend_slot != 0)
        .filter(gone)
    {
        ops.push(MapOp::DelService(*k));
    }
    for (p, r) in old.src_ranges.difference(&new.src_ranges) {
        ops.push(MapOp::DelSrcRange(*p, *r));
    }
    for c in old.cluster_ips.difference(&new.cluster_ips) {
        ops.push(MapOp::DelClusterIp(*c));
    }
    for c in old.service_cidrs.difference(&new.service_cidrs) {
        ops.push(MapOp::DelLpm(Trie::ServiceCidr, *c));
    }
    for c in old.local_cidrs.difference(&new.local_cidrs) {
        ops.push(MapOp::DelLpm(Trie::LocalCidr, *c));
    }
    for id in old
        .rev_nat
        .keys()
        .filter(|id| !new.rev_nat.contains_key(id))
    {
        ops.push(MapOp::DelRevNat(*id));
    }
    for id in old
        .backends
        .keys()
        .filter(|id| !new.backends.contains_key(id))
    {
        ops.push(MapOp::DelBackend(*id));
    }
    ops
}

/// Every (reverse-NAT id, backend id) pair a service may use in `st`. Kernel-owned state
/// naming any other pair is stale: an affinity entry for a backend that left the service,
/// or a UDP flow to a removed endpoint (kube-proxy deletes those conntrack entries so that
/// clients switch to a live endpoint).
pub fn valid_pairs<F: Family>(st: &State<F>) -> BTreeSet<(u16, u32)> {
    let mut out = BTreeSet::new();
    for (k, v) in st.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        for slot in 1..=v.count {
            let sk = ServiceKey {
                backend_slot: slot,
                ..*k
            };
            if let Some(b) = st.services.get(&sk) {
                out.insert((v.rev_nat_id, b.backend_id));
            }
        }
    }
    out
}

/// Rebuild the id allocations from map content read back from the kernel (adopted pins
/// after a restart), so that the next [`desired`] keeps the ids live flows refer to.
pub fn ids_from_maps<F: Family>(st: &mut State<F>) {
    st.backend_ids = st
        .backends
        .iter()
        .map(|(id, b)| ((F::from_wire(b.addr), u16::from_be(b.port), b.proto), *id))
        .collect();
    // A reverse-NAT entry has no protocol; take it from the slot-0 entries that use the id.
    st.rev_nat_ids = st
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .map(|(k, v)| {
            (
                (F::from_wire(k.addr), u16::from_be(k.dport), k.proto),
                u32::from(v.rev_nat_id),
            )
        })
        .collect();
}

#[cfg(test)]
pub(crate) mod tests;
