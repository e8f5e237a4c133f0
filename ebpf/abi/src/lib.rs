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
    pub const SERVICES6: &str = "SHUNT_SVC6";
    pub const BACKENDS6: &str = "SHUNT_BE6";
    pub const REVNAT6: &str = "SHUNT_REVNAT6";
    pub const CT6: &str = "SHUNT_CT6";
    pub const AFFINITY6: &str = "SHUNT_AFF6";
    pub const SRC_RANGE6: &str = "SHUNT_SRCR6";
    pub const CLUSTER_IP6: &str = "SHUNT_CIP6";
    pub const SERVICE_CIDR6: &str = "SHUNT_SCIDR6";
    pub const LOCAL_CIDR6: &str = "SHUNT_LCIDR6";
    pub const SOCK_REVNAT6: &str = "SHUNT_SKRN6";
    pub const CONFIG6: &str = "SHUNT_CFG6";
    pub const SOCK_FWD6: &str = "SHUNT_SKFWD6";
    /// Every map the kernel object declares, pinned by name; except the tc program's
    /// per-CPU scratch maps `SHUNT_SCRATCH4`/`SHUNT_SCRATCH6`, which hold nothing between
    /// runs and are not pinned.
    pub const ALL: [&str; 26] = [
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
        SERVICES6,
        BACKENDS6,
        REVNAT6,
        CT6,
        AFFINITY6,
        SRC_RANGE6,
        CLUSTER_IP6,
        SERVICE_CIDR6,
        LOCAL_CIDR6,
        SOCK_REVNAT6,
        CONFIG6,
        SOCK_FWD6,
    ];

    /// One family's maps. Keys and values: `ServiceKey<A>` -> `Service4Value`,
    /// u32 -> `Backend<A>`, u32 -> `RevNat<A>`, `CtKey<A>` -> `CtValue<A>`,
    /// `AffinityKey<A>` -> `AffinityValue`, LPM `SrcRange<A>` -> u8, `A` -> u32 (ClusterIPs),
    /// LPM `A` -> u8 (CIDRs), `Config<A>` array, socket maps keyed by `SockRevNat4Key` /
    /// `SockRevNat6Key`; with `A` = u32 for IPv4 and `[u32; 4]` for IPv6.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Family {
        pub services: &'static str,
        pub backends: &'static str,
        pub rev_nat: &'static str,
        pub ct: &'static str,
        pub affinity: &'static str,
        pub src_range: &'static str,
        pub cluster_ip: &'static str,
        pub service_cidr: &'static str,
        pub local_cidr: &'static str,
        pub sock_rev_nat: &'static str,
        pub config: &'static str,
        pub sock_fwd: &'static str,
    }
    pub const V4: Family = Family {
        services: SERVICES4,
        backends: BACKENDS4,
        rev_nat: REVNAT4,
        ct: CT4,
        affinity: AFFINITY4,
        src_range: SRC_RANGE4,
        cluster_ip: CLUSTER_IP4,
        service_cidr: SERVICE_CIDR4,
        local_cidr: LOCAL_CIDR4,
        sock_rev_nat: SOCK_REVNAT4,
        config: CONFIG4,
        sock_fwd: SOCK_FWD4,
    };
    pub const V6: Family = Family {
        services: SERVICES6,
        backends: BACKENDS6,
        rev_nat: REVNAT6,
        ct: CT6,
        affinity: AFFINITY6,
        src_range: SRC_RANGE6,
        cluster_ip: CLUSTER_IP6,
        service_cidr: SERVICE_CIDR6,
        local_cidr: LOCAL_CIDR6,
        sock_rev_nat: SOCK_REVNAT6,
        config: CONFIG6,
        sock_fwd: SOCK_FWD6,
    };
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

/// Default map sizes (max_entries), the object's. The agent overrides them at load from its
/// capacity flags and grows the maps it fills (services, backends, reverse NAT, ClusterIPs)
/// when a plan needs more.
pub mod limits {
    /// One entry per frontend and scope plus one per backend slot: 10,000 Services x 10
    /// endpoints need 110,000. The maps userspace fills (services, backends, reverse NAT,
    /// ClusterIPs) are created with BPF_F_NO_PREALLOC, so the size costs kernel memory only
    /// for the entries present.
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    pub const REVNAT: u32 = 65_536;
    /// Conntrack holds every protocol in one map per family, sized TCP + non-TCP
    /// (`--bpf-ct-global-tcp-max` + `--bpf-ct-global-any-max`, Cilium's flags for its two
    /// maps); these are the defaults. The agent sets every size at load
    /// (EbpfLoader::map_max_entries); the values here are the object's defaults.
    pub const CT_TCP: u32 = 196_608;
    pub const CT_ANY: u32 = 65_536;
    pub const CT: u32 = CT_TCP + CT_ANY;
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

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for [u32; 4] {}
}

/// The address parameter of the generic map types: `u32` (IPv4) or `[u32; 4]` (IPv6) and
/// nothing else (sealed), so that every instantiation has the layout asserted below.
#[cfg(feature = "user")]
pub trait Wire:
    Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug + sealed::Sealed + aya::Pod
{
}
/// The address parameter of the generic map types: `u32` (IPv4) or `[u32; 4]` (IPv6) and
/// nothing else (sealed), so that every instantiation has the layout asserted below.
#[cfg(not(feature = "user"))]
pub trait Wire:
    Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug + sealed::Sealed
{
}
impl Wire for u32 {}
impl Wire for [u32; 4] {}

/// Frontend key. `backend_slot` 0 is the service entry, 1..=count the backends.
/// `A` is the address in wire order: `u32` (IPv4) or `[u32; 4]` (IPv6); the family's maps
/// (`names::V4`, `names::V6`) use the matching alias.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A> {
    pub addr: A,
    pub dport: u16,
    pub proto: u8,
    pub scope: u8,
    pub backend_slot: u16,
    pub pad: u16,
}
pub type Service4Key = ServiceKey<u32>;
pub type Service6Key = ServiceKey<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Service4Key>() == 12);
const _: () = assert!(core::mem::size_of::<Service6Key>() == 24);

/// Slot 0: `count`, `rev_nat_id`, `flags`, `affinity_timeout`. Slot n: `backend_id`.
/// The value of both families' service maps (it holds no address).
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
/// `SHUNT_SVC6`'s value: the same as IPv4's.
pub type Service6Value = Service4Value;

/// A backend (endpoint address and target port), keyed by a u32 id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
pub type Backend4 = Backend<u32>;
pub type Backend6 = Backend<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);

/// Reverse NAT: rev_nat_id (u32 key) -> the frontend replies must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat<A> {
    pub addr: A,
    pub port: u16,
    pub pad: u16,
}
pub type RevNat4 = RevNat<u32>;
pub type RevNat6 = RevNat<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<RevNat4>() == 8);
const _: () = assert!(core::mem::size_of::<RevNat6>() == 20);

/// Conntrack key: the packet's own 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
pub type Ct4Key = CtKey<u32>;
pub type Ct6Key = CtKey<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Ct6Key>() == 40);

/// `CtValue::flags`.
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

/// `CtValue::dir`.
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
pub struct CtValue<A> {
    pub nat_addr: A,
    pub nat_port: u16,
    pub rev_nat_id: u16,
    pub backend_id: u32,
    pub dir: u8,
    /// `ct_flags::*`.
    pub flags: u8,
    pub snat_port: u16,
    pub snat_addr: A,
    pub pad2: u32,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}
pub type Ct4Value = CtValue<u32>;
pub type Ct6Value = CtValue<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Ct4Value>() == 32);
const _: () = assert!(core::mem::size_of::<Ct6Value>() == 56);

/// Node-wide settings (array map, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config<A> {
    /// Masquerade source address (the node's primary address of the family); 0 disables
    /// masquerading.
    pub node_ip: A,
    pub pad: u32,
}
pub type Config4 = Config<u32>;
pub type Config6 = Config<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Config4>() == 8);
const _: () = assert!(core::mem::size_of::<Config6>() == 20);

/// Source ports used for masquerading: above Linux's default ephemeral range
/// (net.ipv4.ip_local_port_range 32768-60999, which IPv6 sockets share) so that node
/// sockets do not collide.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

/// ClientIP affinity: (client, service) -> backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A> {
    pub client: A,
    pub rev_nat_id: u16,
    pub pad: u16,
}
pub type Affinity4Key = AffinityKey<u32>;
pub type Affinity6Key = AffinityKey<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Affinity4Key>() == 8);
const _: () = assert!(core::mem::size_of::<Affinity6Key>() == 20);

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange<A> {
    pub rev_nat_id: u16,
    pub pad: u16,
    pub addr: A,
}
pub type SrcRange4 = SrcRange<u32>;
pub type SrcRange6 = SrcRange<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<SrcRange4>() == 8);
const _: () = assert!(core::mem::size_of::<SrcRange6>() == 20);
/// Bits of `SrcRange` before the address.
pub const SRC_RANGE_ID_BITS: u32 = 32;

/// An `LpmTrie` key as the kernel reads it (`struct bpf_lpm_trie_key_u8` + data); same
/// layout as `aya_ebpf::maps::lpm_trie::Key` and `aya::maps::lpm_trie::Key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lpm<A> {
    pub prefix_len: u32,
    pub addr: A,
}
pub type Lpm4 = Lpm<u32>;
pub type Lpm6 = Lpm<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Lpm4>() == 8);
const _: () = assert!(core::mem::size_of::<Lpm6>() == 20);

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

/// IPv6 twin of [`SockRevNat4Key`] (connect6/sendmsg6, recvmsg6/getpeername6). Not the
/// generic shape: the u64 cookie aligns the struct to 8, so the padding is spelled out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u16; 3],
}
const _: () = assert!(core::mem::size_of::<SockRevNat6Key>() == 32);

/// Per-socket backend choice (key: `SockRevNat*Key` with the frontend address and port), so
/// that every datagram of an unconnected UDP socket to one frontend goes to one backend, as
/// a conntrack entry would keep it in kube-proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFwd<A> {
    pub backend_id: u32,
    pub addr: A,
    pub port: u16,
    pub rev_nat_id: u16,
}
pub type SockFwd4 = SockFwd<u32>;
pub type SockFwd6 = SockFwd<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<SockFwd4>() == 12);
const _: () = assert!(core::mem::size_of::<SockFwd6>() == 24);

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
    // SAFETY (all): repr(C), integer fields only, explicit padding, sizes asserted above;
    // the generic ones only for the two sealed `Wire` address types, whose instantiations'
    // sizes are asserted.
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Service4Value {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevNat4Key {}
    unsafe impl aya::Pod for SockRevNat6Key {}
    unsafe impl<A: Wire> aya::Pod for ServiceKey<A> {}
    unsafe impl<A: Wire> aya::Pod for Backend<A> {}
    unsafe impl<A: Wire> aya::Pod for RevNat<A> {}
    unsafe impl<A: Wire> aya::Pod for CtKey<A> {}
    unsafe impl<A: Wire> aya::Pod for CtValue<A> {}
    unsafe impl<A: Wire> aya::Pod for AffinityKey<A> {}
    unsafe impl<A: Wire> aya::Pod for SrcRange<A> {}
    unsafe impl<A: Wire> aya::Pod for Lpm<A> {}
    unsafe impl<A: Wire> aya::Pod for Config<A> {}
    unsafe impl<A: Wire> aya::Pod for SockFwd<A> {}
}
