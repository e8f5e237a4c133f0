//! PURE: one family's [`Snapshot`] -> the content of shunt's BPF maps, and the ordered map
//! operations that move the kernel from a previous content to it.
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
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use shunt_abi::{
    Backend4, Config4, Lpm4, RevNat4, Service4Key, Service4Value, SrcRange4, addr4, limits, port,
    scope, svc_flags,
};

use crate::model::{Endpoint, IpFamily, LocalDetector, NodePortIps, ServicePortState, Snapshot};

/// Why a snapshot cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("ebpf mode programs IPv4 only so far; got an IPv6 snapshot")]
    Ipv6,
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

/// The identity of a backend: address, port (host order) and protocol number.
pub type BackendAddr = (Ipv4Addr, u16, u8);
/// The identity of a frontend: address, port (host order) and protocol number.
pub type FrontendAddr = (Ipv4Addr, u16, u8);

/// The full content of the maps userspace owns (conntrack and affinity belong to the kernel
/// program), plus the id allocations that must stay stable between syncs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State4 {
    pub services: BTreeMap<Service4Key, Service4Value>,
    pub backends: BTreeMap<u32, Backend4>,
    pub rev_nat: BTreeMap<u32, RevNat4>,
    /// LPM keys of the `SHUNT_SRCR4` trie: (prefix length, data).
    pub src_ranges: BTreeSet<(u32, SrcRange4Ord)>,
    pub cluster_ips: BTreeSet<u32>,
    pub service_cidrs: BTreeSet<Lpm4Ord>,
    pub local_cidrs: BTreeSet<Lpm4Ord>,
    /// Masquerade source (primary node IPv4, wire order); 0 = none known, no masquerading.
    pub node_ip: u32,
    pub backend_ids: BTreeMap<BackendAddr, u32>,
    pub rev_nat_ids: BTreeMap<FrontendAddr, u32>,
}

/// `SrcRange4` with an order (for sets); fields as in the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange4Ord {
    pub rev_nat_id: u16,
    pub addr: u32,
}

impl SrcRange4Ord {
    pub fn abi(self) -> SrcRange4 {
        SrcRange4 {
            rev_nat_id: self.rev_nat_id,
            pad: 0,
            addr: self.addr,
        }
    }
}

/// `Lpm4` with an order (for sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lpm4Ord {
    pub prefix_len: u32,
    pub addr: u32,
}

impl Lpm4Ord {
    pub fn abi(self) -> Lpm4 {
        Lpm4 {
            prefix_len: self.prefix_len,
            addr: self.addr,
        }
    }
}

/// Which LPM trie an [`MapOp::PutLpm`]/[`MapOp::DelLpm`] addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trie {
    ServiceCidr,
    LocalCidr,
}

/// One map write, in the order it must be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Node-wide settings (`SHUNT_CFG4[0]`): the masquerade address.
    SetConfig(Config4),
    PutBackend(u32, Backend4),
    PutRevNat(u32, RevNat4),
    PutSrcRange(u32, SrcRange4Ord),
    PutClusterIp(u32),
    PutLpm(Trie, Lpm4Ord),
    PutService(Service4Key, Service4Value),
    DelService(Service4Key),
    DelSrcRange(u32, SrcRange4Ord),
    DelClusterIp(u32),
    DelLpm(Trie, Lpm4Ord),
    DelRevNat(u32),
    DelBackend(u32),
}

fn v4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    }
}

fn lpm(net: &IpNet) -> Option<Lpm4Ord> {
    match net {
        IpNet::V4(n) => Some(Lpm4Ord {
            prefix_len: u32::from(n.prefix_len()),
            addr: addr4(n.network().octets()),
        }),
        IpNet::V6(_) => None,
    }
}

/// Lowest id >= 1 not in `used` (0 is reserved: "no id").
fn alloc(used: &BTreeSet<u32>, max: u32, what: &'static str) -> Result<u32, PlanError> {
    let mut want = 1;
    for &u in used.range(1..) {
        if u != want {
            break;
        }
        want += 1;
    }
    if want > max {
        return Err(PlanError::IdsExhausted { what });
    }
    Ok(want)
}

/// Compute the desired map content for `snap`. `prev` provides the id allocations to keep
/// (backend and reverse-NAT ids of things that still exist keep their ids, so conntrack and
/// affinity entries referring to them stay valid). `local_addrs` are the node's addresses,
/// used when `--nodeport-addresses` selects every local address; loopback addresses never
/// accept NodePorts (kube-proxy's nftables mode does not support localhost NodePorts).
pub fn desired(
    snap: &Snapshot,
    local_addrs: &[IpAddr],
    prev: &State4,
) -> Result<State4, PlanError> {
    if snap.network.family == IpFamily::V6 {
        return Err(PlanError::Ipv6);
    }
    let mut st = State4 {
        node_ip: snap
            .network
            .primary_ip
            .as_ref()
            .and_then(v4)
            .map_or(0, |a| addr4(a.octets())),
        ..Default::default()
    };
    for c in &snap.network.service_cidrs {
        st.service_cidrs.extend(lpm(c));
    }
    if let LocalDetector::ClusterCidr(cidrs) = &snap.network.local_detector {
        for c in cidrs {
            st.local_cidrs.extend(lpm(c));
        }
    }
    let candidates: &[IpAddr] = match &snap.network.node_port_ips {
        NodePortIps::AllLocal => local_addrs,
        NodePortIps::Addresses(a) => a,
    };
    let node_port_ips: Vec<Ipv4Addr> = candidates
        .iter()
        .filter_map(v4)
        .filter(|a| !a.is_loopback())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    // Ids: keep the previous ones for what still exists, allocate the rest afterwards.
    let mut backend_want: BTreeSet<BackendAddr> = BTreeSet::new();
    let mut frontend_want: BTreeSet<FrontendAddr> = BTreeSet::new();
    for sps in snap.services.values() {
        let proto = sps.port.name.protocol.number();
        for e in sps.endpoints.iter() {
            if let Some(a) = v4(&e.ip) {
                backend_want.insert((a, e.port, proto));
            }
        }
        for (a, p) in frontends(sps, &node_port_ips) {
            frontend_want.insert((a, p, proto));
        }
    }
    for b in &backend_want {
        if let Some(&id) = prev.backend_ids.get(b) {
            st.backend_ids.insert(*b, id);
        }
    }
    let mut used: BTreeSet<u32> = st.backend_ids.values().copied().collect();
    for b in &backend_want {
        if !st.backend_ids.contains_key(b) {
            let id = alloc(&used, limits::BACKENDS, "backend")?;
            used.insert(id);
            st.backend_ids.insert(*b, id);
        }
    }
    for f in &frontend_want {
        if let Some(&id) = prev.rev_nat_ids.get(f) {
            st.rev_nat_ids.insert(*f, id);
        }
    }
    let mut used: BTreeSet<u32> = st.rev_nat_ids.values().copied().collect();
    for f in &frontend_want {
        if !st.rev_nat_ids.contains_key(f) {
            // rev_nat_id is a u16 in service values and affinity keys.
            let id = alloc(
                &used,
                u32::from(u16::MAX).min(limits::REVNAT),
                "reverse-NAT",
            )?;
            used.insert(id);
            st.rev_nat_ids.insert(*f, id);
        }
    }
    for ((a, p, proto), id) in &st.backend_ids {
        st.backends.insert(
            *id,
            Backend4 {
                addr: addr4(a.octets()),
                port: port(*p),
                proto: *proto,
                flags: 0,
            },
        );
    }
    for ((a, p, _), id) in &st.rev_nat_ids {
        st.rev_nat.insert(
            *id,
            RevNat4 {
                addr: addr4(a.octets()),
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
        if let Some(cip) = v4(&sp.cluster_ip) {
            st.cluster_ips.insert(addr4(cip.octets()));
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
        let mut external: Vec<(Ipv4Addr, u16, bool)> = Vec::new();
        for (a, p) in frontends(sps, &node_port_ips) {
            if Some(a) == v4(&sp.cluster_ip) && p == sp.port {
                continue;
            }
            let is_lb = p == sp.port && sp.load_balancer_ips.iter().any(|l| v4(l) == Some(a));
            external.push((a, p, is_lb));
        }
        for (a, p, is_lb) in external {
            let id = st.rev_nat_ids[&(a, p, proto)] as u16;
            let mut flags = base;
            // Replies carry a node address as source after reverse NAT: NodePorts, and
            // externalIPs / LoadBalancer IPs that are assigned to this node.
            let local = local_addrs.iter().any(|l| v4(l) == Some(a));
            if (Some(p) == sp.node_port && node_port_ips.contains(&a)) || local {
                flags |= svc_flags::NODE_ADDRESS;
            }
            // External traffic to a Cluster policy is masqueraded (unless it comes from a
            // pod); eTP=Local keeps the client address.
            if !sp.external_policy_local {
                flags |= svc_flags::MASQUERADE;
            }
            let ranges: Vec<Lpm4Ord> = if is_lb {
                sp.load_balancer_source_ranges
                    .iter()
                    .filter_map(lpm)
                    .collect()
            } else {
                Vec::new()
            };
            if !ranges.is_empty() {
                flags |= svc_flags::SOURCE_RANGES;
                for r in &ranges {
                    st.src_ranges.insert((
                        shunt_abi::SRC_RANGE_ID_BITS + r.prefix_len,
                        SrcRange4Ord {
                            rev_nat_id: id,
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

/// External frontends of a service port: (address, port) for NodePorts on node addresses,
/// externalIPs and LoadBalancer IPs (both on the service port).
fn frontends(sps: &ServicePortState, node_port_ips: &[Ipv4Addr]) -> Vec<(Ipv4Addr, u16)> {
    let sp = &sps.port;
    let mut out = Vec::new();
    if let Some(c) = v4(&sp.cluster_ip) {
        out.push((c, sp.port));
    }
    if let Some(np) = sp.node_port {
        out.extend(node_port_ips.iter().map(|a| (*a, np)));
    }
    for ip in sp.external_ips.iter().chain(sp.load_balancer_ips.iter()) {
        if let Some(a) = v4(ip) {
            out.push((a, sp.port));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn put_frontend(
    st: &mut State4,
    (addr, p, proto, scope): (Ipv4Addr, u16, u8, u8),
    endpoints: &[Endpoint],
    (rev_nat_id, flags, timeout): (u16, u16, u32),
    name: &str,
) -> Result<(), PlanError> {
    let ids: Vec<u32> = endpoints
        .iter()
        .filter_map(|e| v4(&e.ip).map(|a| st.backend_ids[&(a, e.port, proto)]))
        .collect();
    let count = u16::try_from(ids.len()).map_err(|_| PlanError::TooManyEndpoints {
        service: name.to_string(),
        max: usize::from(u16::MAX),
    })?;
    let key = |slot: u16| Service4Key {
        addr: addr4(addr.octets()),
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

fn check(st: &State4) -> Result<(), PlanError> {
    let sizes: [(&'static str, usize, u32); 5] = [
        (
            shunt_abi::names::SERVICES4,
            st.services.len(),
            limits::SERVICES,
        ),
        (
            shunt_abi::names::BACKENDS4,
            st.backends.len(),
            limits::BACKENDS,
        ),
        (
            shunt_abi::names::SRC_RANGE4,
            st.src_ranges.len(),
            limits::SRC_RANGES,
        ),
        (
            shunt_abi::names::CLUSTER_IP4,
            st.cluster_ips.len(),
            limits::CLUSTER_IPS,
        ),
        (
            shunt_abi::names::SERVICE_CIDR4,
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
pub fn diff(old: &State4, new: &State4) -> Vec<MapOp> {
    let mut ops = Vec::new();
    if old.node_ip != new.node_ip {
        ops.push(MapOp::SetConfig(Config4 {
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
    let changed = |k: &Service4Key, v: &Service4Value| old.services.get(k) != Some(v);
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
    let gone = |k: &&Service4Key| !new.services.contains_key(k);
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
pub fn valid_pairs(st: &State4) -> BTreeSet<(u16, u32)> {
    let mut out = BTreeSet::new();
    for (k, v) in st.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        for slot in 1..=v.count {
            let sk = Service4Key {
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
pub fn ids_from_maps(st: &mut State4) {
    st.backend_ids = st
        .backends
        .iter()
        .map(|(id, b)| {
            let a = Ipv4Addr::from(b.addr.to_ne_bytes());
            ((a, u16::from_be(b.port), b.proto), *id)
        })
        .collect();
    // A reverse-NAT entry has no protocol; take it from the slot-0 entries that use the id.
    st.rev_nat_ids = st
        .services
        .iter()
        .filter(|(k, _)| k.backend_slot == 0)
        .map(|(k, v)| {
            let a = Ipv4Addr::from(k.addr.to_ne_bytes());
            ((a, u16::from_be(k.dport), k.proto), u32::from(v.rev_nat_id))
        })
        .collect();
}

#[cfg(test)]
pub(crate) mod tests;
