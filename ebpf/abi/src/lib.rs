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
    /// Array, one `CtTimeouts`: the conntrack timeouts the agent configured.
    pub const CT_TIMEOUTS: &str = "SHUNT_CTTMO";
    /// LRU `FragKey<A>` -> `FragPorts`: the L4 ports of a translated first fragment, for
    /// the datagram's later fragments (which carry no L4 header).
    pub const FRAG4: &str = "SHUNT_FRAG4";
    pub const FRAG6: &str = "SHUNT_FRAG6";
    /// Every map the kernel object declares, pinned by name; except the tc program's
    /// per-CPU scratch maps `SHUNT_SCRATCH4`/`SHUNT_SCRATCH6`, which hold nothing between
    /// runs and are not pinned.
    pub const ALL: [&str; 29] = [
        CT_TIMEOUTS,
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
        FRAG4,
        FRAG6,
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
        pub frag: &'static str,
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
        frag: FRAG4,
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
        frag: FRAG6,
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
    /// Datagrams in flight as fragments (Cilium's CILIUM_IPV4_FRAG_MAP_MAX_ENTRIES default).
    pub const FRAGS: u32 = 8_192;
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

/// Fragment map key: one datagram in flight as fragments, as its fragments arrive (before
/// translation): source, destination, the IPv4 identification (16 bits, widened) or the
/// IPv6 fragment header's identification (32 bits), and the protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey<A> {
    pub saddr: A,
    pub daddr: A,
    pub id: u32,
    pub proto: u8,
    pub pad: [u8; 3],
}
pub type Frag4Key = FragKey<u32>;
pub type Frag6Key = FragKey<[u32; 4]>;
const _: () = assert!(core::mem::size_of::<Frag4Key>() == 16);
const _: () = assert!(core::mem::size_of::<Frag6Key>() == 40);

/// Fragment map value: the first fragment's L4 ports as it arrived (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);

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

/// The conntrack timeouts, in seconds (array map `SHUNT_CTTMO`, one entry, written by the
/// agent from kube-proxy's conntrack settings). 0 = the Linux nf_conntrack default
/// (`ct_state::DEFAULT_*`): an unwritten map, or a setting of 0 ("leave the kernel's value").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    pub tcp_established: u32,
    pub tcp_close_wait: u32,
    pub udp: u32,
    pub udp_stream: u32,
}
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 16);

impl CtTimeouts {
    /// Seconds left before an entry of `proto` in state `pad`, last seen at `last_seen_ns`,
    /// expires at `now_ns` (bpf_ktime_get_ns / CLOCK_MONOTONIC); None once it has.
    pub const fn left_ns(
        &self,
        proto: u8,
        pad: u32,
        last_seen_ns: u64,
        now_ns: u64,
    ) -> Option<u64> {
        let idle = now_ns.saturating_sub(last_seen_ns);
        let limit = self.secs(proto, pad).saturating_mul(1_000_000_000);
        if idle > limit {
            None
        } else {
            Some(limit - idle)
        }
    }

    /// Idle timeout of an entry whose `CtValue::pad2` is `pad` (see `ct_state`).
    pub const fn secs(&self, proto: u8, pad: u32) -> u64 {
        const fn or(v: u32, d: u32) -> u64 {
            if v == 0 { d as u64 } else { v as u64 }
        }
        match (pad & ct_state::STATE_MASK) as u8 {
            ct_state::TCP_SYN_SENT => ct_state::DEFAULT_TCP_SYN_SENT as u64,
            ct_state::TCP_CLOSE_WAIT => or(self.tcp_close_wait, ct_state::DEFAULT_TCP_CLOSE_WAIT),
            ct_state::TCP_TIME_WAIT => ct_state::DEFAULT_TCP_TIME_WAIT as u64,
            ct_state::TCP_CLOSE => ct_state::DEFAULT_TCP_CLOSE as u64,
            ct_state::TCP_ESTABLISHED => {
                or(self.tcp_established, ct_state::DEFAULT_TCP_ESTABLISHED)
            }
            ct_state::UDP_UNREPLIED => or(self.udp, ct_state::DEFAULT_UDP),
            ct_state::UDP_REPLIED => or(self.udp_stream, ct_state::DEFAULT_UDP_STREAM),
            // NONE: written by a program without state tracking (adopted on restart): the
            // live flow's timeout.
            _ if proto == ct_state::IPPROTO_TCP => {
                or(self.tcp_established, ct_state::DEFAULT_TCP_ESTABLISHED)
            }
            _ => or(self.udp_stream, ct_state::DEFAULT_UDP_STREAM),
        }
    }
}

/// Connection state of a conntrack entry, kept in `CtValue::pad2` (a field older programs
/// leave 0, so adopted entries read as `NONE`): bits 0..8 the state, bit 8 / 9 a FIN seen
/// from the client / from the backend. Both entries of a flow carry the same value.
/// Modelled on nf_conntrack_proto_tcp.c and Cilium's bpf/lib/conntrack.h (closing flags,
/// SYN vs. established lifetime), reduced to what decides a timeout.
pub mod ct_state {
    pub const IPPROTO_TCP: u8 = 6;
    pub const STATE_MASK: u32 = 0xff;
    pub const NONE: u8 = 0;
    /// The client's SYN was seen, no answer yet.
    pub const TCP_SYN_SENT: u8 = 1;
    pub const TCP_ESTABLISHED: u8 = 2;
    /// One side sent FIN (half closed).
    pub const TCP_CLOSE_WAIT: u8 = 3;
    /// Both sides sent FIN.
    pub const TCP_TIME_WAIT: u8 = 4;
    /// RST seen.
    pub const TCP_CLOSE: u8 = 5;
    pub const UDP_UNREPLIED: u8 = 6;
    /// A reply was seen (nf_conntrack's ASSURED UDP "stream").
    pub const UDP_REPLIED: u8 = 7;
    pub const FIN_FORWARD: u32 = 1 << 8;
    pub const FIN_REPLY: u32 = 1 << 9;

    /// Linux's nf_conntrack defaults, seconds (nf_conntrack_proto_tcp.c tcp_timeouts,
    /// nf_conntrack_proto_udp.c udp_timeouts).
    pub const DEFAULT_TCP_SYN_SENT: u32 = 120;
    pub const DEFAULT_TCP_ESTABLISHED: u32 = 5 * 24 * 3600;
    pub const DEFAULT_TCP_CLOSE_WAIT: u32 = 60;
    pub const DEFAULT_TCP_TIME_WAIT: u32 = 120;
    pub const DEFAULT_TCP_CLOSE: u32 = 10;
    pub const DEFAULT_UDP: u32 = 30;
    pub const DEFAULT_UDP_STREAM: u32 = 120;

    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;

    /// The state of a new flow from its first packet (`tcp_flags` 0 for UDP). A TCP flow
    /// first seen mid-connection (entries lost) is picked up as established, as
    /// nf_conntrack_tcp_loose does.
    pub const fn initial(proto: u8, tcp_flags: u8) -> u32 {
        if proto != IPPROTO_TCP {
            return UDP_UNREPLIED as u32;
        }
        if tcp_flags & RST != 0 {
            TCP_CLOSE as u32
        } else if tcp_flags & (SYN | ACK) == SYN {
            TCP_SYN_SENT as u32
        } else {
            TCP_ESTABLISHED as u32
        }
    }

    /// The state after a packet in direction `dir` (`ct_dir::FORWARD`/`REPLY`).
    pub const fn next(pad: u32, dir: u8, proto: u8, tcp_flags: u8) -> u32 {
        let state = (pad & STATE_MASK) as u8;
        let mut fins = pad & (FIN_FORWARD | FIN_REPLY);
        let reply = dir == super::ct_dir::REPLY;
        if proto != IPPROTO_TCP {
            return if reply || state == UDP_REPLIED || state == NONE {
                UDP_REPLIED as u32
            } else {
                UDP_UNREPLIED as u32
            };
        }
        if state == TCP_CLOSE || tcp_flags & RST != 0 {
            return TCP_CLOSE as u32 | fins;
        }
        if tcp_flags & FIN != 0 {
            fins |= if reply { FIN_REPLY } else { FIN_FORWARD };
        }
        let s = if fins == FIN_FORWARD | FIN_REPLY {
            TCP_TIME_WAIT
        } else if fins != 0 {
            TCP_CLOSE_WAIT
        } else if state == TCP_SYN_SENT && !reply {
            TCP_SYN_SENT
        } else {
            // The backend answered (SYN-ACK or anything else), or an adopted entry.
            TCP_ESTABLISHED
        };
        s as u32 | fins
    }

    /// A TCP SYN without ACK on an entry whose connection is over opens a new connection
    /// (nf_conntrack reopens TIME_WAIT/CLOSE tuples the same way).
    pub const fn reopens(pad: u32, tcp_flags: u8) -> bool {
        let state = (pad & STATE_MASK) as u8;
        tcp_flags & (SYN | ACK) == SYN && (state == TCP_TIME_WAIT || state == TCP_CLOSE)
    }

    pub const fn name(pad: u32) -> &'static str {
        match (pad & STATE_MASK) as u8 {
            TCP_SYN_SENT => "SYN_SENT",
            TCP_ESTABLISHED => "ESTABLISHED",
            TCP_CLOSE_WAIT => "CLOSE_WAIT",
            TCP_TIME_WAIT => "TIME_WAIT",
            TCP_CLOSE => "CLOSE",
            UDP_UNREPLIED => "UNREPLIED",
            UDP_REPLIED => "REPLIED",
            _ => "UNTRACKED",
        }
    }
}

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
    unsafe impl aya::Pod for CtTimeouts {}
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
    unsafe impl<A: Wire> aya::Pod for FragKey<A> {}
    unsafe impl aya::Pod for FragPorts {}
}
