//! Map keys and values shared by the kernel programs (`shunt-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with integer fields only and explicit padding, so that the
//! layout the verifier sees is the layout userspace writes; each size is asserted at compile
//! time. With the `user` feature each type implements `aya::Pod`, which is sound only because
//! of those rules (no enums, no `Option`, no implicit padding).
//!
//! Byte order: addresses and ports are stored exactly as they appear on the wire (network
//! order), so the programs compare packet bytes with map bytes without swapping. Userspace
//! builds them with [`addr4`], [`addr6`] and [`port`].
//!
//! The service layout follows the idea of Cilium's `bpf/lib/lb.h`: one hash map holds, per
//! frontend (address, port, protocol, scope), a "slot 0" entry describing the service and slots
//! 1..=count naming one backend each. Backends live in their own map keyed by a numeric id,
//! so a service's value never carries a fixed-size backend array.
#![no_std]

/// Pin names, under the agent's pin directory (one file per map).
pub mod names {
    pub const SERVICES4: &str = "SHUNT_SVC4";
    pub const BACKENDS4: &str = "SHUNT_BE4";
    pub const REVNAT4: &str = "SHUNT_REVNAT4";
    pub const CT4: &str = "SHUNT_CT4";
    pub const AFFINITY4: &str = "SHUNT_AFF4";
    pub const SRC_RANGE4: &str = "SHUNT_SRCR4";
    pub const CLUSTER_IP4: &str = "SHUNT_CIP4";
    pub const SERVICE_CIDR4: &str = "SHUNT_SCIDR4";
    pub const LOCAL_CIDR4: &str = "SHUNT_LCIDR4";
    pub const STATS: &str = "SHUNT_STATS";
    pub const SOCK_REVNAT4: &str = "SHUNT_SKRN4";
    pub const CONFIG4: &str = "SHUNT_CFG4";
    pub const SOCK_FWD4: &str = "SHUNT_SKFWD4";
    /// Array<u64>, `host_ns::COUNT` entries: the node's network namespace cookie
    /// (SO_NETNS_COOKIE, 0 when unset), the socket programs translating only sockets of
    /// that namespace; and whether the tc program is attached to loopback.
    pub const HOST_NETNS: &str = "SHUNT_HOSTNS";
    /// Every map the kernel object declares (pinned by name).
    pub const ALL: [&str; 14] = [
        SERVICES4,
        BACKENDS4,
        REVNAT4,
        CT4,
        AFFINITY4,
        SRC_RANGE4,
        CLUSTER_IP4,
        SERVICE_CIDR4,
        LOCAL_CIDR4,
        STATS,
        SOCK_REVNAT4,
        CONFIG4,
        SOCK_FWD4,
        HOST_NETNS,
    ];
}

/// Indexes of `names::HOST_NETNS`.
pub mod host_ns {
    /// The node's network namespace cookie.
    pub const COOKIE: u32 = 0;
    /// Nonzero when the tc program sees loopback ingress: node-originated traffic to a
    /// node address is then left to it (masquerade as kube-proxy does for local sources)
    /// instead of being balanced at the socket.
    pub const LOOPBACK: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Map sizes (max_entries). Userspace refuses plans that do not fit.
pub mod limits {
    pub const SERVICES: u32 = 65_536;
    pub const BACKENDS: u32 = 65_536;
    pub const REVNAT: u32 = 65_536;
    pub const CT: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    pub const SRC_RANGES: u32 = 16_384;
    pub const CLUSTER_IPS: u32 = 65_536;
    pub const CIDRS: u32 = 256;
    pub const SOCK_REVNAT: u32 = 262_144;
}

/// Per-CPU counter slots of the `SHUNT_STATS` array.
pub mod stat {
    pub const PACKETS_SEEN: u32 = 0;
    pub const DNAT: u32 = 1;
    pub const REV_NAT: u32 = 2;
    pub const DROP_NO_ENDPOINTS: u32 = 3;
    pub const REJECT_NO_ENDPOINTS: u32 = 4;
    pub const DROP_UNALLOCATED: u32 = 5;
    pub const REJECT_INVALID_PORT: u32 = 6;
    pub const DROP_SOURCE_RANGE: u32 = 7;
    pub const ERRORS: u32 = 8;
    /// connect4/sendmsg4 translations of node-originated traffic.
    pub const SOCK_XLATE: u32 = 9;
    pub const SNAT: u32 = 10;
    pub const COUNT: u32 = 11;
}

/// `Service4Key::scope`.
pub mod scope {
    /// The frontend's only entry, or for a two-scope frontend the one for external sources.
    pub const EXTERNAL: u8 = 0;
    /// For a two-scope frontend: the entry used by sources inside the cluster CIDR
    /// (kube-proxy sends pod traffic to external addresses to the cluster endpoints).
    pub const INTERNAL: u8 = 1;
}

/// `Service4Value::flags` (slot 0 only).
pub mod svc_flags {
    /// ClientIP session affinity; timeout in `affinity_timeout` seconds.
    pub const AFFINITY: u16 = 1 << 0;
    /// When `count == 0`: reject (TCP RST / ICMP port unreachable) instead of dropping.
    /// kube-proxy rejects when the service has no usable endpoint anywhere and drops when
    /// a Local traffic policy finds no local endpoint.
    pub const REJECT_NO_ENDPOINTS: u16 = 1 << 1;
    /// The frontend has a second entry with scope INTERNAL for sources in the cluster CIDR.
    pub const TWO_SCOPES: u16 = 1 << 2;
    /// loadBalancerSourceRanges apply: the source must match `SHUNT_SRCR4` for this rev_nat_id.
    pub const SOURCE_RANGES: u16 = 1 << 3;
    /// The frontend is a ClusterIP (internal traffic).
    pub const CLUSTER_IP: u16 = 1 << 4;
    /// Masquerade (SNAT to the node IP) sources outside the cluster CIDR: external traffic
    /// to a Cluster policy, and off-cluster traffic to a ClusterIP when the cluster CIDR is
    /// known (kube-proxy's `ip saddr != <clusterCIDR> jump mark-for-masquerade`).
    pub const MASQUERADE: u16 = 1 << 5;
    /// Masquerade every source (--masquerade-all).
    pub const MASQUERADE_ALL: u16 = 1 << 6;
    /// The frontend address is a node address (NodePort): replies get it as their source.
    pub const NODE_ADDRESS: u16 = 1 << 7;
}

/// Frontend key. `backend_slot` 0 is the service entry, 1..=count the backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4Key {
    pub addr: u32,
    pub dport: u16,
    pub proto: u8,
    pub scope: u8,
    pub backend_slot: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<Service4Key>() == 12);

/// Slot 0: `count`, `rev_nat_id`, `flags`, `affinity_timeout`. Slot n: `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service4Value {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub pad: u16,
    pub affinity_timeout: u32,
}
const _: () = assert!(core::mem::size_of::<Service4Value>() == 16);

/// A backend (endpoint address and target port), keyed by a u32 id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4 {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);

/// Reverse NAT: rev_nat_id (u32 key) -> the frontend replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4 {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat4>() == 8);

/// Conntrack key: the packet's own 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);

/// `Ct4Value::flags`.
pub mod ct_flags {
    /// After translation the packet's source is a node address (a NodePort reply, or a
    /// masqueraded flow): it must bypass the input path, which drops local sources as
    /// martian, and is sent on with bpf_fib_lookup + bpf_redirect.
    pub const REDIRECT: u8 = 1;
    /// The client is the node itself (the flow entered on loopback ingress, so its source
    /// is a local address): after reverse NAT the reply goes back in through loopback
    /// ingress, the only interface the input path accepts a local source on.
    pub const LOCAL_CLIENT: u8 = 2;
}

/// `Ct4Value::dir`.
pub mod ct_dir {
    /// Client -> frontend: rewrite the destination to `nat_addr:nat_port` (the backend).
    pub const FORWARD: u8 = 1;
    /// Backend -> client: rewrite the source to `nat_addr:nat_port` (the frontend).
    pub const REPLY: u8 = 2;
}

/// FORWARD: `nat_*` is the backend (new destination), `snat_*` the masquerade source (0 =
/// none). REPLY: `nat_*` is the frontend (new source), `snat_*` the original client (new
/// destination; 0 = destination unchanged).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Value {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub rev_nat_id: u16,
    pub backend_id: u32,
    pub dir: u8,
    /// `ct_flags::*`.
    pub flags: u8,
    pub snat_port: u16,
    pub snat_addr: u32,
    pub pad2: u32,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 32);

/// Node-wide settings (array map, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config4 {
    /// Masquerade source address (the node's primary IPv4); 0 disables masquerading.
    pub node_ip: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config4>() == 8);

/// Source ports used for masquerading: above Linux's default ephemeral range
/// (net.ipv4.ip_local_port_range 32768-60999) so that node sockets do not collide.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// ClientIP affinity: (client, service) -> backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Key {
    pub client: u32,
    pub rev_nat_id: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<Affinity4Key>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// LPM key data for loadBalancerSourceRanges: the prefix length counts 32 bits of
/// `rev_nat_id`+`pad` plus the source prefix, so one trie serves every service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRange4 {
    pub rev_nat_id: u16,
    pub pad: u16,
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<SrcRange4>() == 8);
/// Bits of `SrcRange4` before the address.
pub const SRC_RANGE_ID_BITS: u32 = 32;

/// An `LpmTrie` key as the kernel reads it (`struct bpf_lpm_trie_key_u8` + data); same
/// layout as `aya_ebpf::maps::lpm_trie::Key` and `aya::maps::lpm_trie::Key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lpm4 {
    pub prefix_len: u32,
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<Lpm4>() == 8);

/// Socket-level reverse NAT for node-originated traffic (cgroup connect4/sendmsg4 rewrote
/// the destination; recvmsg4/getpeername4 must show the frontend again): keyed by the
/// socket cookie and the backend the socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNat4Key>() == 16);

/// Per-socket backend choice (key: `SockRevNat4Key` with the frontend address and port), so
/// that every datagram of an unconnected UDP socket to one frontend goes to one backend, as
/// a conntrack entry would keep it in kube-proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFwd4 {
    pub backend_id: u32,
    pub addr: u32,
    pub port: u16,
    pub rev_nat_id: u16,
}
const _: () = assert!(core::mem::size_of::<SockFwd4>() == 12);

/// IPv6 twins: same shapes with 128-bit addresses as four u32 words in wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service6Key {
    pub addr: [u32; 4],
    pub dport: u16,
    pub proto: u8,
    pub scope: u8,
    pub backend_slot: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<Service6Key>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat6>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Ct6Key>() == 40);

/// One per-CPU counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// IPv4 address in wire order as the programs read it from a packet.
pub const fn addr4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// IPv6 address in wire order as four words.
pub const fn addr6(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Port in wire order.
pub const fn port(p: u16) -> u16 {
    p.to_be()
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY (all): repr(C), integer fields only, explicit padding, sizes asserted above.
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Service4Key {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for RevNat4 {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Value {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SrcRange4 {}
    unsafe impl aya::Pod for Lpm4 {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for Config4 {}
    unsafe impl aya::Pod for SockFwd4 {}
    unsafe impl aya::Pod for Service6Key {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for RevNat6 {}
    unsafe impl aya::Pod for Ct6Key {}
}
