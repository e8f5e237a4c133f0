//! Program entry points. Every map is a `#[map]` static (never `static mut`).
//!
//! The tc program runs at tcx ingress of the node's uplink and of every pod's host-side veth,
//! i.e. before the kernel routes the packet. For IPv4 and IPv6 TCP/UDP/SCTP (sctp.rs) it:
//!  1. looks the packet's 5-tuple up in the conntrack map: a FORWARD entry re-applies the DNAT
//!     chosen for the flow's first packet, a REPLY entry rewrites the source back to the
//!     frontend (reverse NAT of a backend's answer);
//!  2. otherwise looks the destination up as a service frontend (slot 0), picks a backend
//!     (ClientIP affinity first, else `bpf_get_prandom_u32() % count`), writes both conntrack
//!     entries and DNATs the packet;
//!  3. with no endpoint: rejects (TCP RST, ICMP / ICMPv6 port unreachable, built in place
//!     and sent back out of the interface it came in on) or drops, as slot 0's flags say;
//!     traffic to an unallocated address of a service CIDR is dropped and to a ClusterIP's
//!     unknown port rejected, as kube-proxy's nftables proxier does (chains
//!     `cluster-ips-check`).
//!
//! The logic is written once, generic over [`Fam`] (`V4`, `V6`): the family supplies its
//! maps (the `…4`/`…6` statics below, same layouts with `u32` or `[u32; 4]` addresses) and
//! the few things the two headers do differently (parsing, the IPv4 header checksum, the
//! TTL/hop limit, the reject packets, the FIB lookup).
//!
//! Every header access goes through `bpf_skb_load_bytes`/`bpf_skb_store_bytes` (aya's
//! `load`/`store`), so the verifier sees helper calls with runtime bounds checks rather than
//! direct packet pointers; checksums are patched incrementally with
//! `bpf_l3_csum_replace`/`bpf_l4_csum_replace` (include/uapi/linux/bpf.h; an IPv6 address
//! change is folded into one difference with `bpf_csum_diff`) and computed from scratch only
//! for the packets this program builds itself.
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup as FibParams, bpf_sock_addr,
        tcx_action_base::{TCX_DROP, TCX_NEXT},
    },
    helpers::{
        bpf_csum_diff, bpf_fib_lookup, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_set_retval,
        bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SockAddrContext, TcContext},
};
#[path = "frag.rs"]
mod frag;
#[path = "icmp_err.rs"]
mod icmp_err;
#[path = "ipv6_ext.rs"]
mod ipv6_ext;
#[path = "sctp.rs"]
mod sctp;

use shunt_abi::{
    AffinityKey, AffinityValue, Backend, Config, Counter, CtKey, CtValue, FragKey, FragPorts,
    RevNat, SNAT_PORT_MAX, SNAT_PORT_MIN, Service4Value, ServiceKey, SockFwd, SockRevNat4Key,
    SockRevNat6Key, SrcRange, ct_dir, ct_flags, host_ns, limits, scope, stat, svc_flags,
};

#[path = "ct.rs"]
mod ct;

#[map(name = "SHUNT_STATS")]
static SHUNT_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map(name = "SHUNT_HOSTNS")]
static HOSTNS: Array<u64> = Array::with_max_entries(host_ns::COUNT, 0);

/// One family's maps (`$a`: the wire address type, `$sk`: the socket map key). The hash
/// maps only userspace writes are BPF_F_NO_PREALLOC (memory for present entries only; the
/// program only looks them up); the conntrack-like LRU maps preallocate, as LRU maps must.
macro_rules! family_maps {
    ($a:ty, $sk:ty, $svc:ident, $be:ident, $revnat:ident, $ct:ident, $aff:ident, $srcr:ident,
     $cip:ident, $scidr:ident, $lcidr:ident, $skfwd:ident, $cfg:ident, $skrn:ident,
     $scratch:ident) => {
        #[map]
        static $svc: HashMap<ServiceKey<$a>, Service4Value> =
            HashMap::with_max_entries(limits::SERVICES, BPF_F_NO_PREALLOC);
        #[map]
        static $be: HashMap<u32, Backend<$a>> =
            HashMap::with_max_entries(limits::BACKENDS, BPF_F_NO_PREALLOC);
        #[map]
        static $revnat: HashMap<u32, RevNat<$a>> =
            HashMap::with_max_entries(limits::REVNAT, BPF_F_NO_PREALLOC);
        #[map]
        static $ct: LruHashMap<CtKey<$a>, CtValue<$a>> =
            LruHashMap::with_max_entries(limits::CT, 0);
        #[map]
        static $aff: LruHashMap<AffinityKey<$a>, AffinityValue> =
            LruHashMap::with_max_entries(limits::AFFINITY, 0);
        #[map]
        static $srcr: LpmTrie<SrcRange<$a>, u8> = LpmTrie::with_max_entries(limits::SRC_RANGES, 0);
        #[map]
        static $cip: HashMap<$a, u32> =
            HashMap::with_max_entries(limits::CLUSTER_IPS, BPF_F_NO_PREALLOC);
        #[map]
        static $scidr: LpmTrie<$a, u8> = LpmTrie::with_max_entries(limits::CIDRS, 0);
        #[map]
        static $lcidr: LpmTrie<$a, u8> = LpmTrie::with_max_entries(limits::CIDRS, 0);
        #[map]
        static $skfwd: LruHashMap<$sk, SockFwd<$a>> =
            LruHashMap::with_max_entries(limits::SOCK_REVNAT, 0);
        #[map]
        static $cfg: Array<Config<$a>> = Array::with_max_entries(1, 0);
        #[map]
        static $scratch: PerCpuArray<Scratch<$a>> = PerCpuArray::with_max_entries(1, 0);
        #[map]
        static $skrn: LruHashMap<$sk, RevNat<$a>> =
            LruHashMap::with_max_entries(limits::SOCK_REVNAT, 0);
    };
}
// The statics' names are the pin names (shunt_abi::names).
family_maps!(
    u32,
    SockRevNat4Key,
    SHUNT_SVC4,
    SHUNT_BE4,
    SHUNT_REVNAT4,
    SHUNT_CT4,
    SHUNT_AFF4,
    SHUNT_SRCR4,
    SHUNT_CIP4,
    SHUNT_SCIDR4,
    SHUNT_LCIDR4,
    SHUNT_SKFWD4,
    SHUNT_CFG4,
    SHUNT_SKRN4,
    SHUNT_SCRATCH4
);
family_maps!(
    [u32; 4],
    SockRevNat6Key,
    SHUNT_SVC6,
    SHUNT_BE6,
    SHUNT_REVNAT6,
    SHUNT_CT6,
    SHUNT_AFF6,
    SHUNT_SRCR6,
    SHUNT_CIP6,
    SHUNT_SCIDR6,
    SHUNT_LCIDR6,
    SHUNT_SKFWD6,
    SHUNT_CFG6,
    SHUNT_SKRN6,
    SHUNT_SCRATCH6
);

const ETH_HLEN: usize = 14;
const IP_OFF: usize = ETH_HLEN;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SADDR_OFF: usize = IP_OFF + 12;
const IP_DADDR_OFF: usize = IP_OFF + 16;
const IP6_HLEN: usize = 40;
const IP6_SADDR_OFF: usize = IP_OFF + 8;
const IP6_DADDR_OFF: usize = IP_OFF + 24;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The parsed L4 packet: wire-order addresses and ports.
pub struct Pkt<A> {
    saddr: A,
    daddr: A,
    sport: u16,
    dport: u16,
    proto: u8,
    l4_off: usize,
    /// Bytes from the L4 header to the end of the IP payload.
    l4_len: u32,
    /// IPv4 options present (the reject builder handles only plain headers).
    ip_options: bool,
    /// `frag::NONE`, `FIRST` or `LATER` (frag.rs; a LATER packet's ports come from the
    /// fragment map and it has no L4 header). IPv6 marks FIRST any packet with extension
    /// headers that is not a later fragment; frag.rs reads its fragment header, if any.
    frag: u8,
    /// The datagram's identification (IPv4: 16 bits widened; IPv6: the fragment header's),
    /// wire order; set by frag.rs.
    frag_id: u32,
}

/// What differs between IPv4 and IPv6. Everything else is written once, generic over it.
trait Fam {
    /// The address as it is on the wire and in the maps: u32 or [u32; 4].
    type A: Copy + PartialEq + Default + 'static;
    /// Key of the socket-level maps.
    type SockKey: 'static;
    /// Address bits (LPM prefix of a full address).
    const BITS: u32;
    fn svc() -> &'static HashMap<ServiceKey<Self::A>, Service4Value>;
    fn be() -> &'static HashMap<u32, Backend<Self::A>>;
    fn ct() -> &'static LruHashMap<CtKey<Self::A>, CtValue<Self::A>>;
    fn aff() -> &'static LruHashMap<AffinityKey<Self::A>, AffinityValue>;
    fn srcr() -> &'static LpmTrie<SrcRange<Self::A>, u8>;
    fn cip() -> &'static HashMap<Self::A, u32>;
    fn scidr() -> &'static LpmTrie<Self::A, u8>;
    fn lcidr() -> &'static LpmTrie<Self::A, u8>;
    fn cfg() -> &'static Array<Config<Self::A>>;
    fn skfwd() -> &'static LruHashMap<Self::SockKey, SockFwd<Self::A>>;
    fn skrn() -> &'static LruHashMap<Self::SockKey, RevNat<Self::A>>;
    fn frag() -> &'static LruHashMap<FragKey<Self::A>, FragPorts>;
    fn sock_key(cookie: u64, addr: Self::A, port: u16) -> Self::SockKey;

    /// Parse the network header after an Ethernet header of this family's ethertype.
    /// Writes into `p` (scratch memory, see [`Scratch`]); None when not ours.
    fn parse(ctx: &TcContext, p: &mut Pkt<Self::A>) -> Option<()>;
    fn scratch() -> &'static PerCpuArray<Scratch<Self::A>>;
    /// Rewrite one address (source or destination), fixing what covers it: the IPv4 header
    /// checksum, and the L4 checksum (at `csum_off`) through its pseudo-header.
    fn set_addr(
        ctx: &TcContext,
        dst: bool,
        old: Self::A,
        new: Self::A,
        csum_off: usize,
        mangled: u64,
    ) -> Result<(), ()>;
    /// Decrement the TTL / hop limit as forwarding would; Err when it expires.
    fn dec_ttl(ctx: &TcContext) -> Result<(), ()>;
    /// Fill the family and addresses of a FIB lookup.
    fn fib_addrs(fib: &mut FibParams, src: Self::A, dst: Self::A);
    /// Write a fresh IP header (`l4_len` bytes of `proto` after it, from `saddr` to
    /// `daddr`) followed by `l4`, whose checksum at `csum_off` is computed here (with the
    /// pseudo-header when the protocol has one), and trim the packet to end there.
    fn emit<const N: usize>(
        ctx: &TcContext,
        proto: u8,
        saddr: Self::A,
        daddr: Self::A,
        l4: &mut [u8; N],
        csum_off: usize,
    ) -> Result<(), ()>;
    /// Turn the packet into the family's ICMP port unreachable towards its source.
    fn port_unreachable(ctx: &TcContext, p: &Pkt<Self::A>) -> Result<(), ()>;

    /// The destination a socket is connecting/sending to, and its replacement.
    fn user_addr(sa: &bpf_sock_addr) -> Self::A;
    fn set_user_addr(sa: &mut bpf_sock_addr, a: Self::A);
}

struct V4;
struct V6;

#[inline(always)]
fn count(slot: u32, bytes: u32) {
    if let Some(c) = SHUNT_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

/// tcx ingress hook. `TCX_NEXT` hands the packet on to the next program in the chain
/// (kernel include/uapi/linux/bpf.h, enum tcx_action_base), so other tcx users keep working.
#[classifier]
pub fn shunt_tc_ingress(ctx: TcContext) -> i32 {
    count(stat::PACKETS_SEEN, ctx.len());
    let res = match ctx.load::<u16>(12) {
        Ok(ETH_P_IP_BE) => try_ingress::<V4>(&ctx),
        Ok(ETH_P_IPV6_BE) => try_ingress::<V6>(&ctx),
        _ => Ok(TCX_NEXT),
    };
    match res {
        Ok(v) => v,
        Err(()) => {
            count(stat::ERRORS, ctx.len());
            // A packet we started rewriting and could not finish must not leave half-NATed.
            TC_ACT_SHOT
        }
    }
}

impl Fam for V4 {
    type A = u32;
    type SockKey = SockRevNat4Key;
    const BITS: u32 = 32;
    fn svc() -> &'static HashMap<ServiceKey<u32>, Service4Value> {
        &SHUNT_SVC4
    }
    fn be() -> &'static HashMap<u32, Backend<u32>> {
        &SHUNT_BE4
    }
    fn ct() -> &'static LruHashMap<CtKey<u32>, CtValue<u32>> {
        &SHUNT_CT4
    }
    fn aff() -> &'static LruHashMap<AffinityKey<u32>, AffinityValue> {
        &SHUNT_AFF4
    }
    fn srcr() -> &'static LpmTrie<SrcRange<u32>, u8> {
        &SHUNT_SRCR4
    }
    fn cip() -> &'static HashMap<u32, u32> {
        &SHUNT_CIP4
    }
    fn scidr() -> &'static LpmTrie<u32, u8> {
        &SHUNT_SCIDR4
    }
    fn lcidr() -> &'static LpmTrie<u32, u8> {
        &SHUNT_LCIDR4
    }
    fn cfg() -> &'static Array<Config<u32>> {
        &SHUNT_CFG4
    }
    fn skfwd() -> &'static LruHashMap<SockRevNat4Key, SockFwd<u32>> {
        &SHUNT_SKFWD4
    }
    fn skrn() -> &'static LruHashMap<SockRevNat4Key, RevNat<u32>> {
        &SHUNT_SKRN4
    }
    fn frag() -> &'static LruHashMap<FragKey<u32>, FragPorts> {
        &frag::SHUNT_FRAG4
    }
    #[inline(always)]
    fn sock_key(cookie: u64, addr: u32, port: u16) -> SockRevNat4Key {
        SockRevNat4Key {
            cookie,
            addr,
            port,
            pad: 0,
        }
    }

    #[inline(always)]
    fn parse(ctx: &TcContext, out: &mut Pkt<u32>) -> Option<()> {
        out.frag = frag::NONE;
        let vihl: u8 = ctx.load(IP_OFF).ok()?;
        if vihl >> 4 != 4 {
            return None;
        }
        let ihl = vihl & 0x0f;
        if ihl < 5 {
            return None;
        }
        let proto: u8 = ctx.load(IP_OFF + 9).ok()?;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP {
            return None;
        }
        // Flags (MF = 0x2000) and the 13-bit offset. Later fragments carry no L4 header:
        // their ports come from the fragment map (frag.rs).
        let fo = u16::from_be(ctx.load::<u16>(IP_OFF + 6).ok()?);
        if fo & 0x3fff != 0 {
            if fo & 0x1fff != 0 && !frag::handled(proto) {
                return None;
            }
            out.frag = if fo & 0x1fff != 0 {
                frag::LATER
            } else {
                frag::FIRST
            };
        }
        if out.frag == frag::LATER {
            out.saddr = ctx.load(IP_SADDR_OFF).ok()?;
            out.daddr = ctx.load(IP_DADDR_OFF).ok()?;
            out.sport = 0;
            out.dport = 0;
            out.proto = proto;
            out.l4_off = IP_OFF + usize::from(ihl) * 4;
            out.l4_len = 0;
            out.ip_options = ihl != 5;
            return Some(());
        }
        let hlen = u32::from(ihl) * 4;
        let tot_len = u32::from(u16::from_be(ctx.load::<u16>(IP_OFF + 2).ok()?));
        let l4_off = IP_OFF + usize::from(ihl) * 4;
        out.saddr = ctx.load(IP_SADDR_OFF).ok()?;
        out.daddr = ctx.load(IP_DADDR_OFF).ok()?;
        out.sport = ctx.load(l4_off).ok()?;
        out.dport = ctx.load(l4_off + 2).ok()?;
        out.proto = proto;
        out.l4_off = l4_off;
        out.l4_len = tot_len.saturating_sub(hlen);
        out.ip_options = ihl != 5;
        Some(())
    }
    fn scratch() -> &'static PerCpuArray<Scratch<u32>> {
        &SHUNT_SCRATCH4
    }

    #[inline(always)]
    fn set_addr(
        ctx: &TcContext,
        dst: bool,
        old: u32,
        new: u32,
        csum_off: usize,
        mangled: u64,
    ) -> Result<(), ()> {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old),
            u64::from(new),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
            .map_err(|_| ())?;
        let off = if dst { IP_DADDR_OFF } else { IP_SADDR_OFF };
        ctx.store(off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn dec_ttl(ctx: &TcContext) -> Result<(), ()> {
        let ttl_proto: u16 = ctx.load(IP_OFF + 8).map_err(|_| ())?;
        let [ttl, proto] = ttl_proto.to_ne_bytes();
        if ttl <= 1 {
            return Err(());
        }
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(ttl_proto), u64::from(new), 2)
            .map_err(|_| ())?;
        ctx.store(IP_OFF + 8, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn fib_addrs(fib: &mut FibParams, src: u32, dst: u32) {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src;
        fib.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn emit<const N: usize>(
        ctx: &TcContext,
        proto: u8,
        saddr: u32,
        daddr: u32,
        l4: &mut [u8; N],
        csum_off: usize,
    ) -> Result<(), ()> {
        // A fresh IPv4 header: no options, DF, TTL 64, its own checksum.
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + N) as u16).to_be_bytes());
        h[6] = 0x40;
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&saddr.to_ne_bytes());
        h[16..20].copy_from_slice(&daddr.to_ne_bytes());
        let c = fold(sum16(&h, 0));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        // Pseudo-header (RFC 793/768): saddr, daddr, zero, protocol, L4 length. ICMP has none.
        let acc = if proto == IPPROTO_ICMP {
            0
        } else {
            sum_words(&[saddr, daddr], u32::from(proto) + N as u32)
        };
        let c = fold(sum16(l4, acc));
        l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        // SAFETY: helper call on the program's own skb.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + 20 + N) as u32, 0) } != 0 {
            return Err(());
        }
        ctx.store(IP_OFF, &h, 0).map_err(|_| ())?;
        ctx.store(IP_OFF + 20, l4, 0).map_err(|_| ())
    }

    /// ICMP destination unreachable / port unreachable (RFC 792) quoting the original IP
    /// header and the first 8 bytes of its payload.
    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, p: &Pkt<u32>) -> Result<(), ()> {
        let mut icmp = [0u8; 36];
        let quote: &mut [u8; 28] = (&mut icmp[8..]).try_into().map_err(|_| ())?;
        load_buf(ctx, IP_OFF, quote)?;
        icmp[0] = 3;
        icmp[1] = 3;
        Self::emit(ctx, IPPROTO_ICMP, p.daddr, p.saddr, &mut icmp, 2)
    }

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> u32 {
        sa.user_ip4
    }
    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, a: u32) {
        sa.user_ip4 = a;
    }
}

impl Fam for V6 {
    type A = [u32; 4];
    type SockKey = SockRevNat6Key;
    const BITS: u32 = 128;
    fn svc() -> &'static HashMap<ServiceKey<[u32; 4]>, Service4Value> {
        &SHUNT_SVC6
    }
    fn be() -> &'static HashMap<u32, Backend<[u32; 4]>> {
        &SHUNT_BE6
    }
    fn ct() -> &'static LruHashMap<CtKey<[u32; 4]>, CtValue<[u32; 4]>> {
        &SHUNT_CT6
    }
    fn aff() -> &'static LruHashMap<AffinityKey<[u32; 4]>, AffinityValue> {
        &SHUNT_AFF6
    }
    fn srcr() -> &'static LpmTrie<SrcRange<[u32; 4]>, u8> {
        &SHUNT_SRCR6
    }
    fn cip() -> &'static HashMap<[u32; 4], u32> {
        &SHUNT_CIP6
    }
    fn scidr() -> &'static LpmTrie<[u32; 4], u8> {
        &SHUNT_SCIDR6
    }
    fn lcidr() -> &'static LpmTrie<[u32; 4], u8> {
        &SHUNT_LCIDR6
    }
    fn cfg() -> &'static Array<Config<[u32; 4]>> {
        &SHUNT_CFG6
    }
    fn skfwd() -> &'static LruHashMap<SockRevNat6Key, SockFwd<[u32; 4]>> {
        &SHUNT_SKFWD6
    }
    fn skrn() -> &'static LruHashMap<SockRevNat6Key, RevNat<[u32; 4]>> {
        &SHUNT_SKRN6
    }
    fn frag() -> &'static LruHashMap<FragKey<[u32; 4]>, FragPorts> {
        &frag::SHUNT_FRAG6
    }
    #[inline(always)]
    fn sock_key(cookie: u64, addr: [u32; 4], port: u16) -> SockRevNat6Key {
        SockRevNat6Key {
            cookie,
            addr,
            port,
            pad: [0; 3],
        }
    }

    /// TCP, UDP or SCTP after the fixed header and up to four extension headers
    /// (ipv6_ext.rs: later fragments and routing headers with segments left pass).
    #[inline(always)]
    fn parse(ctx: &TcContext, out: &mut Pkt<[u32; 4]>) -> Option<()> {
        out.frag = frag::NONE;
        let v: u8 = ctx.load(IP_OFF).ok()?;
        if v >> 4 != 6 {
            return None;
        }
        let nh: u8 = ctx.load(IP_OFF + 6).ok()?;
        let (proto, l4_off, later) = ipv6_ext::walk(ctx, nh, IP_OFF + IP6_HLEN)?;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP {
            return None;
        }
        if later {
            // No L4 header: frag::ports fills in the addresses and the ports (from the
            // fragment map) in a frame of its own, off this one.
            if !frag::handled(proto) {
                return None;
            }
            out.frag = frag::LATER;
            out.proto = proto;
            out.l4_off = l4_off;
            out.l4_len = 0;
            out.ip_options = false;
            return Some(());
        }
        if l4_off != IP_OFF + IP6_HLEN {
            out.frag = frag::FIRST;
        }
        out.saddr = ctx.load(IP6_SADDR_OFF).ok()?;
        out.daddr = ctx.load(IP6_DADDR_OFF).ok()?;
        out.sport = ctx.load(l4_off).ok()?;
        out.dport = ctx.load(l4_off + 2).ok()?;
        out.proto = proto;
        out.l4_off = l4_off;
        // The payload length counts the extension headers too.
        let payload = usize::from(u16::from_be(ctx.load::<u16>(IP_OFF + 4).ok()?));
        out.l4_len = payload.checked_sub(l4_off - IP_OFF - IP6_HLEN)? as u32;
        out.ip_options = false;
        Some(())
    }
    fn scratch() -> &'static PerCpuArray<Scratch<[u32; 4]>> {
        &SHUNT_SCRATCH6
    }

    /// IPv6 has no header checksum; the 128-bit address change enters the L4 checksum as
    /// one difference (bpf_csum_diff), applied with size 0 = "`to` is a diff"
    /// (bpf_l4_csum_replace -> inet_proto_csum_replace_by_diff, as Cilium's lb6 does).
    #[inline(always)]
    fn set_addr(
        ctx: &TcContext,
        dst: bool,
        old: [u32; 4],
        new: [u32; 4],
        csum_off: usize,
        mangled: u64,
    ) -> Result<(), ()> {
        let mut from = old;
        let mut to = new;
        // SAFETY: helper call with two 16-byte stack buffers.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(
            csum_off,
            0,
            u64::from(diff as u32),
            u64::from(BPF_F_PSEUDO_HDR) | mangled,
        )
        .map_err(|_| ())?;
        let off = if dst { IP6_DADDR_OFF } else { IP6_SADDR_OFF };
        ctx.store(off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn dec_ttl(ctx: &TcContext) -> Result<(), ()> {
        let hl: u8 = ctx.load(IP_OFF + 7).map_err(|_| ())?;
        if hl <= 1 {
            return Err(());
        }
        ctx.store(IP_OFF + 7, &(hl - 1), 0).map_err(|_| ())
    }

    #[inline(always)]
    fn fib_addrs(fib: &mut FibParams, src: [u32; 4], dst: [u32; 4]) {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = src;
        fib.__bindgen_anon_4.ipv6_dst = dst;
    }

    #[inline(always)]
    fn emit<const N: usize>(
        ctx: &TcContext,
        proto: u8,
        saddr: [u32; 4],
        daddr: [u32; 4],
        l4: &mut [u8; N],
        csum_off: usize,
    ) -> Result<(), ()> {
        // Version 6, no traffic class or flow label, hop limit 64.
        let mut h = [0u8; IP6_HLEN];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(N as u16).to_be_bytes());
        h[6] = proto;
        h[7] = 64;
        let mut i = 0;
        while i < 4 {
            h[8 + 4 * i..12 + 4 * i].copy_from_slice(&saddr[i].to_ne_bytes());
            h[24 + 4 * i..28 + 4 * i].copy_from_slice(&daddr[i].to_ne_bytes());
            i += 1;
        }
        // Pseudo-header (RFC 8200 8.1), ICMPv6 included: addresses, length, next header.
        let acc = sum_words(&saddr, sum_words(&daddr, N as u32 + u32::from(proto)));
        let c = fold(sum16(l4, acc));
        l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        // SAFETY: helper call on the program's own skb.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IP6_HLEN + N) as u32, 0) } != 0 {
            return Err(());
        }
        ctx.store(IP_OFF, &h, 0).map_err(|_| ())?;
        ctx.store(IP_OFF + IP6_HLEN, l4, 0).map_err(|_| ())
    }

    /// ICMPv6 destination unreachable / port unreachable (RFC 4443 3.1: type 1, code 4)
    /// quoting the original IPv6 header and the first 8 bytes of its payload (the ports,
    /// all the receiver's udpv6_err/tcp_v6_err need to find the socket).
    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, p: &Pkt<[u32; 4]>) -> Result<(), ()> {
        let mut icmp = [0u8; 8 + IP6_HLEN + 8];
        let quote: &mut [u8; IP6_HLEN + 8] = (&mut icmp[8..]).try_into().map_err(|_| ())?;
        load_buf(ctx, IP_OFF, quote)?;
        icmp[0] = 1;
        icmp[1] = 4;
        Self::emit(ctx, IPPROTO_ICMPV6, p.daddr, p.saddr, &mut icmp, 2)
    }

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> [u32; 4] {
        // One 4-byte load per word at a constant offset from the context pointer: a copy
        // of the array becomes a memcpy through a pointer derived from ctx, which the
        // verifier refuses ("dereference of modified ctx ptr").
        // SAFETY: in-bounds fields of the context.
        unsafe {
            [
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ]
        }
    }
    #[inline(always)]
    fn set_user_addr(sa: &mut bpf_sock_addr, a: [u32; 4]) {
        // As above; the context rewriter accepts 4-byte (or aligned 8-byte) writes of
        // user_ip6 (sock_addr_is_valid_access), each at a constant offset.
        // SAFETY: in-bounds fields of the context.
        unsafe {
            core::ptr::write_volatile(&mut sa.user_ip6[0], a[0]);
            core::ptr::write_volatile(&mut sa.user_ip6[1], a[1]);
            core::ptr::write_volatile(&mut sa.user_ip6[2], a[2]);
            core::ptr::write_volatile(&mut sa.user_ip6[3], a[3]);
        }
    }
}

#[inline(always)]
fn is_zero<A: PartialEq + Default>(a: A) -> bool {
    a == A::default()
}

/// One family's whole ingress path, a BPF-to-BPF call of its own (not inlined): each
/// family then has its own 512-byte stack frame instead of sharing one with the other
/// family's locals, which together exceed the BPF stack limit.
#[inline(never)]
fn try_ingress<F: Fam>(ctx: &TcContext) -> Result<i32, ()> {
    let Some(sc) = F::scratch().get_ptr_mut(0) else {
        return Err(());
    };
    // SAFETY: this CPU's scratch entry; a tc program runs to completion on its CPU before
    // the next one starts there (redirected packets are processed later, from the backlog).
    let sc = unsafe { &mut *sc };
    if F::parse(ctx, &mut sc.p).is_none() {
        // ICMP errors quoting a translated flow (icmp_err.rs); anything else is not ours.
        if !icmp_err::translate::<F>(ctx, &mut sc.p, &mut sc.icmp, &mut sc.ct_key, &mut sc.act)? {
            return Ok(TCX_NEXT);
        }
        return Ok(deliver::<F>(ctx, &sc.p, &sc.act));
    }
    // A later fragment takes its datagram's ports from the first fragment's entry (frag.rs).
    if sc.p.frag == frag::LATER && !frag::ports::<F>(ctx, &mut sc.p, &mut sc.frag_key) {
        return Ok(TCX_NEXT);
    }
    let p = &sc.p;
    sc.ct_key = CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    };
    // Every step below is a call of its own made from here, never from another step: the
    // verifier adds up the stack frames along the deepest call chain (512 bytes at most,
    // check_max_stack_depth), so the chain stays main -> try_ingress -> one step, and the
    // state passed between the steps lives in the scratch map, not in this frame.
    if !ct_hit::<F>(ctx, p, &sc.ct_key, &mut sc.act)? {
        if p.frag == frag::LATER {
            // Never a new flow from a fragment without ports of its own.
            return Ok(TCX_NEXT);
        }
        match new_flow::<F>(ctx, p, &mut sc.flow)? {
            Step::Verdict(v) => return Ok(v),
            Step::Reject => return reject::<F>(ctx, p),
            Step::Commit => commit::<F>(ctx, p, &sc.ct_key, &sc.flow, &mut sc.act)?,
        }
    }
    if p.frag == frag::FIRST {
        frag::record::<F>(ctx, p, &mut sc.frag_key);
    }
    if p.proto == IPPROTO_SCTP {
        sctp::fix_crc::<F>(ctx, p)?;
    }
    Ok(deliver::<F>(ctx, p, &sc.act))
}

/// Carry out a translated packet's `Action` (inlined: `forward` stays a call from
/// `try_ingress`, see there).
#[inline(always)]
fn deliver<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>, act: &Action<F::A>) -> i32 {
    match *act {
        Action::Verdict(v) => v,
        Action::Forward { src, dst } => forward::<F>(ctx, p, src, dst),
        Action::Loopback => to_loopback(ctx),
    }
}

/// Per-CPU scratch memory of one tc program run (map `SHUNT_SCRATCH4`/`6`, not pinned):
/// the state the steps of `try_ingress` hand each other, kept off the 512-byte BPF stack.
pub struct Scratch<A> {
    p: Pkt<A>,
    ct_key: CtKey<A>,
    flow: Flow<A>,
    act: Action<A>,
    icmp: icmp_err::Quote<A>,
    frag_key: FragKey<A>,
}

/// What to do with a translated packet.
pub enum Action<A> {
    Verdict(i32),
    /// Send it to its next hop with `forward` (its source is a node address now).
    Forward {
        src: A,
        dst: A,
    },
    /// Hand it to the node's own socket through loopback ingress (`to_loopback`).
    Loopback,
}

/// The outcome of `new_flow`.
enum Step {
    Verdict(i32),
    Reject,
    /// A backend was chosen (the `Flow` out-parameter): write conntrack and translate.
    Commit,
}

/// A packet of a known flow: a REPLY entry reverse-NATs it, a FORWARD entry re-applies the
/// flow's DNAT (and masquerade). None when the flow is unknown, or its backend is gone.
/// Not inlined, like `try_ingress` (stack frames).
#[inline(never)]
fn ct_hit<F: Fam>(
    ctx: &TcContext,
    p: &Pkt<F::A>,
    ct_key: &CtKey<F::A>,
    act: &mut Action<F::A>,
) -> Result<bool, ()> {
    if let Some(ct) = F::ct().get_ptr_mut(ct_key) {
        // SAFETY: map value pointer valid for this program run; races with other CPUs only
        // affect the timestamp.
        let ct = unsafe { &mut *ct };
        match ct::seen::<F>(ctx, p, ct_key, ct) {
            ct::Seen::Live => {}
            ct::Seen::Gone => return Ok(false),
            ct::Seen::Stale => {
                *act = Action::Verdict(TCX_NEXT);
                return Ok(true);
            }
        }
        if ct.dir == ct_dir::REPLY {
            let (sa, sp, da, dp) = (ct.nat_addr, ct.nat_port, ct.snat_addr, ct.snat_port);
            let redirect = ct.flags & ct_flags::REDIRECT != 0;
            rewrite::<F>(ctx, p, false, sa, sp)?;
            count(stat::REV_NAT, ctx.len());
            let masqueraded = !is_zero(da);
            if masqueraded {
                // Masqueraded flow: the reply was addressed to the node; give it back to
                // the client.
                rewrite::<F>(ctx, p, true, da, dp)?;
            }
            if ct.flags & ct_flags::LOCAL_CLIENT != 0 {
                *act = Action::Loopback;
                return Ok(true);
            }
            if redirect {
                let dst = if masqueraded { da } else { p.daddr };
                *act = Action::Forward { src: sa, dst };
                return Ok(true);
            }
            *act = Action::Verdict(TCX_NEXT);
            return Ok(true);
        }
        // FORWARD: keep the flow on its backend while that backend exists; if it was removed,
        // fall through and choose again (kube-proxy's conntrack entry would point at a dead
        // endpoint; choosing again is what a new connection would get).
        // Ids are reused after a backend is removed, so the id must still name the same
        // address and port.
        let same = match F::be().get_ptr(ct.backend_id) {
            // SAFETY: map value pointer valid for this program run.
            Some(b) => unsafe { (*b).addr == ct.nat_addr && (*b).port == ct.nat_port },
            None => false,
        };
        if same {
            let (addr, port, sa, sp) = (ct.nat_addr, ct.nat_port, ct.snat_addr, ct.snat_port);
            rewrite::<F>(ctx, p, true, addr, port)?;
            count(stat::DNAT, ctx.len());
            if !is_zero(sa) {
                rewrite::<F>(ctx, p, false, sa, sp)?;
                *act = Action::Forward { src: sa, dst: addr };
                return Ok(true);
            }
            *act = Action::Verdict(TCX_NEXT);
            return Ok(true);
        }
    }

    Ok(false)
}

/// A packet without a conntrack entry: the service lookup, the backend choice, both
/// conntrack entries, DNAT and masquerade. Not inlined (stack frames, see `try_ingress`).
#[inline(never)]
fn new_flow<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>, out: &mut Flow<F::A>) -> Result<Step, ()> {
    let mut key = ServiceKey {
        addr: p.daddr,
        dport: p.dport,
        proto: p.proto,
        scope: scope::EXTERNAL,
        backend_slot: 0,
        pad: 0,
    };
    let Some(mut svc) = F::svc().get_ptr(&key) else {
        return Ok(miss::<F>(ctx, p));
    };
    // SAFETY: map value pointer valid for this program run.
    let mut s: Service4Value = unsafe { *svc };
    // Loopback ingress carries only the node's own traffic (here: to a node address, the
    // socket programs leaving it alone). kube-proxy treats local sources (`fib saddr type
    // local`) like pods for a Local policy (cluster-wide endpoints) and masquerades them.
    // Only when userspace attached to loopback for this (HOST_NETNS[LOOPBACK]); otherwise
    // the socket programs balance that traffic and loopback is not ours (BPF_PROG_TEST_RUN
    // also runs on the loopback device).
    // SAFETY: the context pointer is valid for the program run.
    let from_node = unsafe { (*ctx.skb.skb).ifindex } == LOOPBACK_IFINDEX
        && HOSTNS.get(host_ns::LOOPBACK).is_some_and(|v| *v != 0);
    let in_cluster = || F::lcidr().get(Key::new(F::BITS, p.saddr)).is_some();
    if s.flags & svc_flags::TWO_SCOPES != 0 && (from_node || in_cluster()) {
        key.scope = scope::INTERNAL;
        if let Some(v) = F::svc().get_ptr(&key) {
            svc = v;
            // SAFETY: as above.
            s = unsafe { *svc };
        }
    }
    if s.flags & svc_flags::SOURCE_RANGES != 0 {
        let k = Key::new(
            shunt_abi::SRC_RANGE_ID_BITS + F::BITS,
            SrcRange {
                rev_nat_id: s.rev_nat_id,
                pad: 0,
                addr: p.saddr,
            },
        );
        if F::srcr().get(k).is_none() {
            count(stat::DROP_SOURCE_RANGE, ctx.len());
            return Ok(Step::Verdict(TCX_DROP));
        }
    }
    if s.count == 0 {
        if s.flags & svc_flags::REJECT_NO_ENDPOINTS != 0 {
            count(stat::REJECT_NO_ENDPOINTS, ctx.len());
            return Ok(Step::Reject);
        }
        count(stat::DROP_NO_ENDPOINTS, ctx.len());
        return Ok(Step::Verdict(TCX_DROP));
    }

    let now = unsafe { bpf_ktime_get_ns() };
    let aff_key = AffinityKey {
        client: p.saddr,
        rev_nat_id: s.rev_nat_id,
        pad: 0,
    };
    let mut chosen: Option<(u32, Backend<F::A>)> = None;
    if s.flags & svc_flags::AFFINITY != 0
        && let Some(a) = F::aff().get_ptr(&aff_key)
    {
        // SAFETY: map value pointer valid for this program run.
        let a = unsafe { *a };
        let timeout_ns = u64::from(s.affinity_timeout) * 1_000_000_000;
        if now.wrapping_sub(a.last_used_ns) <= timeout_ns
            && let Some(be) = F::be().get_ptr(a.backend_id)
        {
            // SAFETY: as above.
            chosen = Some((a.backend_id, unsafe { *be }));
        }
    }
    let (backend_id, be) = match chosen {
        Some(c) => c,
        None => {
            key.backend_slot = (unsafe { bpf_get_prandom_u32() } % u32::from(s.count)) as u16 + 1;
            let Some(slot) = F::svc().get_ptr(&key) else {
                // A slot missing while slot 0 says it exists: a sync in progress removed it.
                // Userspace writes slots before slot 0 and deletes slot 0 first, so this is
                // only a concurrent shrink; drop like a lost packet rather than pass un-NATed.
                count(stat::ERRORS, ctx.len());
                return Ok(Step::Verdict(TCX_DROP));
            };
            // SAFETY: as above.
            let id = unsafe { (*slot).backend_id };
            let Some(be) = F::be().get_ptr(id) else {
                count(stat::ERRORS, ctx.len());
                return Ok(Step::Verdict(TCX_DROP));
            };
            (id, unsafe { *be })
        }
    };
    if s.flags & svc_flags::AFFINITY != 0 {
        let _ = F::aff().insert(
            &aff_key,
            &AffinityValue {
                backend_id,
                pad: 0,
                last_used_ns: now,
            },
            0,
        );
    }

    // Masquerade (kube-proxy's mark-for-masquerade cases): every source with
    // --masquerade-all; sources outside the cluster CIDR where the frontend says so; and
    // hairpin (a pod reaching itself through the service), whose reply would otherwise never
    // leave the pod.
    let node_ip = F::cfg().get(0).map_or(F::A::default(), |c| c.node_ip);
    let masq = !is_zero(node_ip)
        && (from_node
            || s.flags & svc_flags::MASQUERADE_ALL != 0
            || (s.flags & svc_flags::MASQUERADE != 0 && !in_cluster())
            || p.saddr == be.addr);
    let (snat_addr, snat_port) = if masq {
        match snat_port::<F>(p.proto, node_ip, &be) {
            Some(port) => (node_ip, port),
            None => {
                count(stat::ERRORS, ctx.len());
                return Ok(Step::Verdict(TCX_DROP));
            }
        }
    } else {
        (F::A::default(), 0)
    };

    *out = Flow {
        be,
        backend_id,
        rev_nat_id: s.rev_nat_id,
        snat_addr,
        snat_port,
        masq,
        reply_flags: if from_node {
            ct_flags::LOCAL_CLIENT
        } else if masq || s.flags & svc_flags::NODE_ADDRESS != 0 {
            ct_flags::REDIRECT
        } else {
            0
        },
        now,
    };
    Ok(Step::Commit)
}

/// What `new_flow` decided for a new connection.
pub struct Flow<A> {
    be: Backend<A>,
    backend_id: u32,
    rev_nat_id: u16,
    /// Masquerade source (meaningful when `masq`).
    snat_addr: A,
    snat_port: u16,
    masq: bool,
    /// `ct_flags` of the REPLY entry.
    reply_flags: u8,
    now: u64,
}

/// Write both conntrack entries of a new flow and translate its first packet. Not inlined
/// (stack frames, see `try_ingress`).
#[inline(never)]
fn commit<F: Fam>(
    ctx: &TcContext,
    p: &Pkt<F::A>,
    ct_key: &CtKey<F::A>,
    f: &Flow<F::A>,
    act: &mut Action<F::A>,
) -> Result<(), ()> {
    let be = f.be;
    // One key and one value on the stack, reused for both entries (stack frames, see
    // `try_ingress`).
    let rev_key = CtKey {
        saddr: be.addr,
        daddr: if f.masq { f.snat_addr } else { p.saddr },
        sport: be.port,
        dport: if f.masq { f.snat_port } else { p.sport },
        proto: p.proto,
        pad: [0; 3],
    };
    let mut v = CtValue {
        nat_addr: p.daddr,
        nat_port: p.dport,
        rev_nat_id: f.rev_nat_id,
        backend_id: f.backend_id,
        dir: ct_dir::REPLY,
        flags: f.reply_flags,
        snat_port: if f.masq { p.sport } else { 0 },
        snat_addr: if f.masq { p.saddr } else { F::A::default() },
        pad2: ct::initial(ctx, p),
        last_seen_ns: f.now,
    };
    // Reply entry first: once the forward entry exists a reply may already be on its way.
    if F::ct().insert(&rev_key, &v, 0).is_err() {
        count(stat::ERRORS, ctx.len());
        *act = Action::Verdict(TCX_DROP);
        return Ok(());
    }
    v.nat_addr = be.addr;
    v.nat_port = be.port;
    v.dir = ct_dir::FORWARD;
    v.flags = 0;
    v.snat_port = f.snat_port;
    v.snat_addr = f.snat_addr;
    if F::ct().insert(ct_key, &v, 0).is_err() {
        count(stat::ERRORS, ctx.len());
        *act = Action::Verdict(TCX_DROP);
        return Ok(());
    }
    rewrite::<F>(ctx, p, true, be.addr, be.port)?;
    count(stat::DNAT, ctx.len());
    if f.masq {
        rewrite::<F>(ctx, p, false, f.snat_addr, f.snat_port)?;
        count(stat::SNAT, ctx.len());
        *act = Action::Forward {
            src: f.snat_addr,
            dst: be.addr,
        };
        return Ok(());
    }
    *act = Action::Verdict(TCX_NEXT);
    Ok(())
}

/// A free masquerade source port towards `be` (wire order), or None after a bounded number
/// of random probes: the port is free when no REPLY entry uses (be -> node_ip:port).
#[inline(always)]
fn snat_port<F: Fam>(proto: u8, node_ip: F::A, be: &Backend<F::A>) -> Option<u16> {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    let mut i = 0;
    while i < 16 {
        let port = (SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16;
        let k = CtKey {
            saddr: be.addr,
            daddr: node_ip,
            sport: be.port,
            dport: port.to_be(),
            proto,
            pad: [0; 3],
        };
        if F::ct().get_ptr(&k).is_none() {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}

/// Send a masqueraded packet straight to its next hop. Its source is now a local address,
/// which the kernel's IPv4 input path would drop as martian (fib_validate_source without
/// accept_local), so it must bypass it: bpf_fib_lookup finds the egress interface and MACs,
/// TTL / hop limit is decremented as forwarding would, and bpf_redirect/bpf_redirect_neigh
/// (when the neighbour is not resolved yet) transmits it. Anything else is left to the
/// stack. IPv6 takes the same path: one behaviour for both families, and no dependence on
/// how the IPv6 input path treats a local source.
/// Not inlined, like `reject`.
#[inline(never)]
fn forward<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>, src: F::A, dst: F::A) -> i32 {
    // SAFETY: struct bpf_fib_lookup is plain data; zero is a valid value for every field.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    F::fib_addrs(&mut fib, src, dst);
    fib.l4_protocol = p.proto;
    // SAFETY: the context pointer is valid for the program run.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper with a properly sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if F::dec_ttl(ctx).is_err() {
        return TC_ACT_SHOT;
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        if ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_SHOT;
        }
        // SAFETY: plain helper.
        return unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // SAFETY: plain helper; NULL params = resolve the neighbour of the packet's daddr.
        return unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count(stat::ERRORS, ctx.len());
    TC_ACT_SHOT
}

/// The loopback device's ifindex in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;
/// bpf_redirect flag: deliver to the device's ingress.
const BPF_F_INGRESS: u64 = 1;

/// Deliver a reply to the node's own socket through loopback ingress. Its source is a
/// local address (the frontend), which the input path accepts only there. eth_type_trans
/// on loopback classifies the frame by its destination MAC against the device's all-zero
/// address, so both MACs are zeroed (anything else would be PACKET_OTHERHOST and dropped).
#[inline(always)]
fn to_loopback(ctx: &TcContext) -> i32 {
    if ctx.store(0, &[0u8; 12], 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper.
    unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS) as i32 }
}

/// No frontend matched: kube-proxy rejects a ClusterIP's unknown port and drops any other
/// address inside a service CIDR (it is unallocated).
#[inline(always)]
fn miss<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>) -> Step {
    forget_stale_service_flow::<F>(ctx, p);
    if F::cip().get_ptr(&p.daddr).is_some() {
        count(stat::REJECT_INVALID_PORT, ctx.len());
        return Step::Reject;
    }
    if F::scidr().get(Key::new(F::BITS, p.daddr)).is_some() {
        count(stat::DROP_UNALLOCATED, ctx.len());
        return Step::Verdict(TCX_DROP);
    }
    Step::Verdict(TCX_NEXT)
}

/// A packet that is not service traffic (no conntrack entry, no frontend) whose reversed
/// tuple has a REPLY entry: a connection straight to a backend that reuses the 4-tuple a
/// service flow had after its DNAT (a client reusing its source port for the pod right
/// after a connection through the VIP). Conntrack entries have no TCP state or timeout, so
/// that REPLY entry would otherwise rewrite the backend's answers to this direct connection
/// to come from the frontend, and the client would reset them. Netfilter tells the two
/// apart by conntrack state; like Cilium's lb/ct logic (a non-service packet never takes a
/// service flow's entries), the stale service flow is forgotten here: its REPLY entry and
/// its FORWARD entry (which names the frontend; without its REPLY entry it would DNAT
/// packets whose answers are not reverse-NATed), so a later connection through the
/// frontend from the same port is a new flow with both entries again. One extra hash
/// lookup on packets that are not service traffic; deleting happens only on such a reuse.
///
/// Only a TCP connection's first packet (SYN without ACK) is such a reuse. Any other packet
/// with that tuple belongs to the live service flow itself, seen a second time: while a
/// restart swaps the tc links make-before-break (`replace_link` in the agent), the previous
/// run's program and this one both run on each packet, and this one sees the packet the
/// other already DNATed (client -> backend). Forgetting the flow then would reset every
/// connection that sends a packet during the swap. UDP has no first packet to tell apart, so
/// UDP flows are never forgotten here (their entries name live flows far more often).
#[inline(never)]
fn forget_stale_service_flow<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>) {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    if p.proto != IPPROTO_TCP {
        return;
    }
    // TCP header byte 13 holds the flags (RFC 9293 3.1).
    match ctx.load::<u8>(p.l4_off + 13) {
        Ok(flags) if flags & (SYN | ACK) == SYN => {}
        _ => return,
    }
    let rev = CtKey {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        proto: p.proto,
        pad: [0; 3],
    };
    let Some(ct) = F::ct().get_ptr(&rev) else {
        return;
    };
    // SAFETY: map value pointer valid for this program run.
    let ct = unsafe { *ct };
    if ct.dir != ct_dir::REPLY {
        return;
    }
    // The FORWARD key is the client's original tuple: the pre-masquerade source kept in
    // the REPLY entry when the flow was masqueraded, else this packet's source.
    let masqueraded = !is_zero(ct.snat_addr);
    let fwd = CtKey {
        saddr: if masqueraded { ct.snat_addr } else { p.saddr },
        daddr: ct.nat_addr,
        sport: if masqueraded { ct.snat_port } else { p.sport },
        dport: ct.nat_port,
        proto: p.proto,
        pad: [0; 3],
    };
    let _ = F::ct().remove(&rev);
    let _ = F::ct().remove(&fwd);
}

/// Rewrite the destination (`dst`) or source address and port, fixing the checksums that
/// cover them. A UDP checksum of 0 means "none" (RFC 768) and stays 0: BPF_F_MARK_MANGLED_0
/// makes bpf_l4_csum_replace skip it and turn a computed 0 into 0xffff.
#[inline(always)]
fn rewrite<F: Fam>(
    ctx: &TcContext,
    p: &Pkt<F::A>,
    dst: bool,
    addr: F::A,
    port: u16,
) -> Result<(), ()> {
    if p.frag == frag::LATER {
        // No L4 header in this fragment (frag.rs): the addresses only.
        let old = if dst { p.daddr } else { p.saddr };
        return frag::set_addr::<F>(ctx, dst, old, addr);
    }
    if p.proto == IPPROTO_SCTP {
        // No pseudo-header, a CRC32c instead of the Internet checksum (sctp.rs).
        return sctp::rewrite::<F>(ctx, p, dst, addr, port);
    }
    let (old_addr, port_off, old_port) = if dst {
        (p.daddr, p.l4_off + 2, p.dport)
    } else {
        (p.saddr, p.l4_off, p.sport)
    };
    let (csum_off, mangled) = if p.proto == IPPROTO_UDP {
        (p.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (p.l4_off + 16, 0)
    };
    if old_addr != addr {
        F::set_addr(ctx, dst, old_addr, addr, csum_off, mangled)?;
    }
    if old_port != port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &port, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Copy exactly N bytes at `off` (aya's `load_bytes` clamps the length to the packet, which
/// the verifier rejects as a possibly zero-sized read).
#[inline(always)]
fn load_buf<const N: usize>(ctx: &TcContext, off: usize, buf: &mut [u8; N]) -> Result<(), ()> {
    // SAFETY: helper call with a stack buffer of exactly N bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            buf.as_mut_ptr() as *mut _,
            N as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(()) }
}

/// One's-complement sum of big-endian 16-bit words (RFC 1071), not yet folded.
#[inline(always)]
fn sum16<const N: usize>(buf: &[u8; N], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(u16::from_be_bytes([buf[i], buf[i + 1]]));
        i += 2;
    }
    acc
}

/// `sum16` of addresses in wire order (each u32 holds two big-endian 16-bit words).
#[inline(always)]
fn sum_words<const N: usize>(words: &[u32; N], mut acc: u32) -> u32 {
    let mut i = 0;
    while i < N {
        let b = words[i].to_ne_bytes();
        acc += u32::from(u16::from_be_bytes([b[0], b[1]]))
            + u32::from(u16::from_be_bytes([b[2], b[3]]));
        i += 1;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Answer the packet the way kube-proxy's `reject` verdict does (nft `reject` = TCP RST for
/// TCP, ICMP / ICMPv6 port unreachable otherwise): the packet is rewritten in place into the
/// answer, trimmed/grown with bpf_skb_change_tail, and redirected to the egress of the
/// interface it arrived on, which hands it back towards the sender. Packets with IPv4
/// options, and RSTs (never answered, RFC 793), are dropped instead.
///
/// Not inlined: its packet-building buffers get a stack frame of their own (BPF stack
/// limit, see `try_ingress`).
#[inline(never)]
fn reject<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>) -> Result<i32, ()> {
    if p.ip_options {
        return Ok(TCX_DROP);
    }
    // The answer goes back where the packet came from: its MACs swapped.
    let mut eth = [0u8; 12];
    load_buf(ctx, 0, &mut eth)?;
    let mut i = 0;
    while i < 6 {
        eth.swap(i, i + 6);
        i += 1;
    }
    // SAFETY: the context pointer is valid for the program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if p.proto == IPPROTO_TCP {
        let flags: u8 = ctx.load(p.l4_off + 13).map_err(|_| ())?;
        if flags & TCP_RST != 0 {
            return Ok(TCX_DROP);
        }
        let seq = u32::from_be(ctx.load::<u32>(p.l4_off + 4).map_err(|_| ())?);
        let ack = u32::from_be(ctx.load::<u32>(p.l4_off + 8).map_err(|_| ())?);
        let doff: u8 = ctx.load(p.l4_off + 12).map_err(|_| ())?;
        let payload = p.l4_len.saturating_sub(u32::from(doff >> 4) * 4);
        // RFC 793 "Reset Generation": answer an ACK with seq = its ack; otherwise seq 0 and
        // ACK everything the segment occupied (SYN and FIN count one each).
        let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
            (ack, 0, TCP_RST)
        } else {
            let occ = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
            (0, seq.wrapping_add(occ), TCP_RST | TCP_ACK)
        };
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&p.dport.to_ne_bytes());
        tcp[2..4].copy_from_slice(&p.sport.to_ne_bytes());
        tcp[4..8].copy_from_slice(&rseq.to_be_bytes());
        tcp[8..12].copy_from_slice(&rack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = rflags;
        F::emit(ctx, IPPROTO_TCP, p.daddr, p.saddr, &mut tcp, 16)?;
    } else {
        F::port_unreachable(ctx, p)?;
    }
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    // SAFETY: plain helper; returns TC_ACT_REDIRECT (== TCX_REDIRECT) on success.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

// ---- Node-originated traffic: cgroup/sock_addr hooks (socket-level load balancing) ----
//
// Packets a node process sends never pass a tc ingress hook of ours, so the translation is
// done where the socket picks its destination (connect(2), sendmsg(2) for unconnected UDP),
// as Cilium's bpf_sock does; recvmsg/getpeername show the frontend again so the application
// never sees the backend. Return 1 lets the syscall proceed, 0 fails it with the value set
// by bpf_set_retval (default EPERM). The 4 and 6 hooks share this code through `Fam`; an
// IPv4-mapped address (::ffff:a.b.c.d) given to an IPv6 socket goes through the IPv4 maps
// (v4mapped.rs).

// A child module (it uses this file's private items); the file sits next to this one.
#[path = "v4mapped.rs"]
mod v4mapped;
use v4mapped::{Native, SockUser};

const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

#[inline(always)]
fn sock_proto(sa: &bpf_sock_addr) -> Option<u8> {
    let p = sa.protocol as u8;
    (p == IPPROTO_TCP || p == IPPROTO_UDP).then_some(p)
}

/// Fail the syscall with `errno` (connect/sendmsg hooks accept bpf_set_retval, kernel
/// cgroup_current_func_proto).
#[inline(always)]
fn sock_fail(errno: i32) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_set_retval(-errno) };
    0
}

#[inline(always)]
fn sock_forward<F: Fam, U: SockUser<F>>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = sock_proto(sa) else {
        return 1;
    };
    // Only the node's own sockets are balanced here (Cilium's bpf-lb-sock-hostns-only).
    // A pod's packets cross its host-side veth, where the tc program translates them with
    // kube-proxy's full semantics: hairpin masquerade and ICMP/RST rejects that a socket
    // hook cannot give (it can only fail the syscall). A cgroup hook sees every namespace's
    // sockets, pods' included when they share the cgroup.
    if let Some(host) = HOSTNS.get(host_ns::COOKIE)
        && *host != 0
        // SAFETY: helper on the program's own context (sock_addr programs, kernel >= 5.7).
        && unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) } != *host
    {
        return 1;
    }
    let addr = U::get(sa);
    let port = sa.user_port as u16;
    let mut key = ServiceKey {
        addr,
        dport: port,
        proto,
        scope: scope::EXTERNAL,
        backend_slot: 0,
        pad: 0,
    };
    let Some(svc) = F::svc().get_ptr(&key) else {
        if F::cip().get_ptr(&addr).is_some() {
            return sock_fail(ECONNREFUSED);
        }
        if F::scidr().get(Key::new(F::BITS, addr)).is_some() {
            return sock_fail(EPERM);
        }
        return 1;
    };
    // SAFETY: map value pointer valid for this program run.
    let mut s = unsafe { *svc };
    // A node address: the packet loops through loopback, where the tc program applies
    // kube-proxy's rules for local sources (masquerade, cluster-wide endpoints); at the
    // socket the source cannot be masqueraded.
    if s.flags & svc_flags::NODE_ADDRESS != 0
        && HOSTNS.get(host_ns::LOOPBACK).is_some_and(|v| *v != 0)
    {
        return 1;
    }
    // The node is not "external": kube-proxy sends node-originated traffic to an eTP=Local
    // service's external addresses to the cluster-wide endpoints (like pod traffic).
    if s.flags & svc_flags::TWO_SCOPES != 0 {
        key.scope = scope::INTERNAL;
        if let Some(v) = F::svc().get_ptr(&key) {
            // SAFETY: as above.
            s = unsafe { *v };
        }
    }
    if s.count == 0 {
        return if s.flags & svc_flags::REJECT_NO_ENDPOINTS != 0 {
            sock_fail(ECONNREFUSED)
        } else {
            // A socket hook cannot drop silently; EPERM is the nearest to "dropped".
            sock_fail(EPERM)
        };
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let fk = F::sock_key(cookie, addr, port);
    // The socket's earlier choice, while its backend id still names that backend.
    let mut be: Option<Backend<F::A>> = None;
    if let Some(f) = F::skfwd().get_ptr(&fk) {
        // SAFETY: map value pointers valid for this program run.
        let f = unsafe { *f };
        if let Some(b) = F::be().get_ptr(f.backend_id) {
            let b = unsafe { *b };
            if b.addr == f.addr && b.port == f.port && f.rev_nat_id == s.rev_nat_id {
                be = Some(b);
            }
        }
    }
    let be = match be {
        Some(b) => b,
        None => {
            key.backend_slot = (unsafe { bpf_get_prandom_u32() } % u32::from(s.count)) as u16 + 1;
            let Some(slot) = F::svc().get_ptr(&key) else {
                return sock_fail(EPERM);
            };
            // SAFETY: as above.
            let id = unsafe { (*slot).backend_id };
            let Some(b) = F::be().get_ptr(id) else {
                return sock_fail(EPERM);
            };
            // SAFETY: as above.
            let b = unsafe { *b };
            let fv = SockFwd {
                backend_id: id,
                addr: b.addr,
                port: b.port,
                rev_nat_id: s.rev_nat_id,
            };
            if F::skfwd().insert(&fk, &fv, 0).is_err() {
                return sock_fail(EPERM);
            }
            b
        }
    };
    let rk = F::sock_key(cookie, be.addr, be.port);
    let rv = RevNat { addr, port, pad: 0 };
    if F::skrn().insert(&rk, &rv, 0).is_err() {
        return sock_fail(EPERM);
    }
    U::set(sa, be.addr);
    sa.user_port = u32::from(be.port);
    count(stat::SOCK_XLATE, 0);
    1
}

#[inline(always)]
fn sock_reverse<F: Fam, U: SockUser<F>>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sock_proto(sa).is_none() {
        return 1;
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let rk = F::sock_key(cookie, U::get(sa), sa.user_port as u16);
    if let Some(v) = F::skrn().get_ptr(&rk) {
        // SAFETY: map value pointer valid for this program run.
        let v = unsafe { *v };
        U::set(sa, v.addr);
        sa.user_port = u32::from(v.port);
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn shunt_connect4(ctx: SockAddrContext) -> i32 {
    sock_forward::<V4, Native>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn shunt_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_forward::<V4, Native>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn shunt_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V4, Native>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn shunt_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_reverse::<V4, Native>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn shunt_connect6(ctx: SockAddrContext) -> i32 {
    v4mapped::forward6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn shunt_sendmsg6(ctx: SockAddrContext) -> i32 {
    v4mapped::forward6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn shunt_recvmsg6(ctx: SockAddrContext) -> i32 {
    v4mapped::reverse6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn shunt_getpeername6(ctx: SockAddrContext) -> i32 {
    v4mapped::reverse6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
