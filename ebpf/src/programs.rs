//! Program entry points. Every map is a `#[map]` static (never `static mut`).
//!
//! The tc program runs at tcx ingress of the node's uplink and of every pod's host-side veth,
//! i.e. before the kernel routes the packet. For IPv4 TCP/UDP it:
//!  1. looks the packet's 5-tuple up in the conntrack map: a FORWARD entry re-applies the DNAT
//!     chosen for the flow's first packet, a REPLY entry rewrites the source back to the
//!     frontend (reverse NAT of a backend's answer);
//!  2. otherwise looks the destination up as a service frontend (slot 0), picks a backend
//!     (ClientIP affinity first, else `bpf_get_prandom_u32() % count`), writes both conntrack
//!     entries and DNATs the packet;
//!  3. with no endpoint: rejects (TCP RST or ICMP port unreachable, built in place and sent
//!     back out of the interface it came in on) or drops, as slot 0's flags say; traffic to an
//!     unallocated address of a service CIDR is dropped and to a ClusterIP's unknown port
//!     rejected, as kube-proxy's nftables proxier does (chains `cluster-ips-check`).
//!
//! Every header access goes through `bpf_skb_load_bytes`/`bpf_skb_store_bytes` (aya's
//! `load`/`store`), so the verifier sees helper calls with runtime bounds checks rather than
//! direct packet pointers; checksums are patched incrementally with
//! `bpf_l3_csum_replace`/`bpf_l4_csum_replace` (include/uapi/linux/bpf.h) and computed from
//! scratch only for the packets this program builds itself.
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
        tcx_action_base::{TCX_DROP, TCX_NEXT},
    },
    helpers::{
        bpf_fib_lookup, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_set_retval, bpf_skb_change_tail,
        bpf_skb_load_bytes,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SockAddrContext, TcContext},
};
use shunt_abi::{
    Affinity4Key, AffinityValue, Backend4, Config4, Counter, Ct4Key, Ct4Value, RevNat4,
    SNAT_PORT_MAX, SNAT_PORT_MIN, Service4Key, Service4Value, SockFwd4, SockRevNat4Key, SrcRange4,
    ct_dir, ct_flags, host_ns, limits, scope, stat, svc_flags,
};

#[map(name = "SHUNT_STATS")]
static SHUNT_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map(name = "SHUNT_SVC4")]
static SVC4: HashMap<Service4Key, Service4Value> = HashMap::with_max_entries(limits::SERVICES, 0);
#[map(name = "SHUNT_BE4")]
static BE4: HashMap<u32, Backend4> = HashMap::with_max_entries(limits::BACKENDS, 0);
#[map(name = "SHUNT_REVNAT4")]
static REVNAT4: HashMap<u32, RevNat4> = HashMap::with_max_entries(limits::REVNAT, 0);
#[map(name = "SHUNT_CT4")]
static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::with_max_entries(limits::CT, 0);
#[map(name = "SHUNT_AFF4")]
static AFF4: LruHashMap<Affinity4Key, AffinityValue> =
    LruHashMap::with_max_entries(limits::AFFINITY, 0);
#[map(name = "SHUNT_SRCR4")]
static SRCR4: LpmTrie<SrcRange4, u8> = LpmTrie::with_max_entries(limits::SRC_RANGES, 0);
#[map(name = "SHUNT_CIP4")]
static CIP4: HashMap<u32, u32> = HashMap::with_max_entries(limits::CLUSTER_IPS, 0);
#[map(name = "SHUNT_SCIDR4")]
static SCIDR4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(limits::CIDRS, 0);
#[map(name = "SHUNT_LCIDR4")]
static LCIDR4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(limits::CIDRS, 0);
#[map(name = "SHUNT_SKFWD4")]
static SKFWD4: LruHashMap<SockRevNat4Key, SockFwd4> =
    LruHashMap::with_max_entries(limits::SOCK_REVNAT, 0);
#[map(name = "SHUNT_HOSTNS")]
static HOSTNS: Array<u64> = Array::with_max_entries(host_ns::COUNT, 0);
#[map(name = "SHUNT_CFG4")]
static CFG4: Array<Config4> = Array::with_max_entries(1, 0);
#[map(name = "SHUNT_SKRN4")]
static SKRN4: LruHashMap<SockRevNat4Key, RevNat4> =
    LruHashMap::with_max_entries(limits::SOCK_REVNAT, 0);

const ETH_HLEN: usize = 14;
const IP_OFF: usize = ETH_HLEN;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SADDR_OFF: usize = IP_OFF + 12;
const IP_DADDR_OFF: usize = IP_OFF + 16;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IPPROTO_ICMP: u8 = 1;
const AF_INET: u8 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The parsed IPv4 L4 packet: wire-order addresses and ports.
struct Pkt {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    l4_off: usize,
    ihl: u8,
}

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
    match try_ingress(&ctx) {
        Ok(v) => v,
        Err(()) => {
            count(stat::ERRORS, ctx.len());
            // A packet we started rewriting and could not finish must not leave half-NATed.
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Pkt> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP_BE {
        return None;
    }
    let vihl: u8 = ctx.load(IP_OFF).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = vihl & 0x0f;
    if ihl < 5 {
        return None;
    }
    // Non-first fragments carry no L4 header; they pass untouched (see the crate docs).
    let frag: u16 = ctx.load(IP_OFF + 6).ok()?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(IP_OFF + 9).ok()?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4_off = IP_OFF + usize::from(ihl) * 4;
    Some(Pkt {
        saddr: ctx.load(IP_SADDR_OFF).ok()?,
        daddr: ctx.load(IP_DADDR_OFF).ok()?,
        sport: ctx.load(l4_off).ok()?,
        dport: ctx.load(l4_off + 2).ok()?,
        proto,
        l4_off,
        ihl,
    })
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let Some(p) = parse(ctx) else {
        return Ok(TCX_NEXT);
    };
    let ct_key = Ct4Key {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        pad: [0; 3],
    };
    if let Some(ct) = CT4.get_ptr_mut(&ct_key) {
        // SAFETY: map value pointer valid for this program run; races with other CPUs only
        // affect the timestamp.
        let ct = unsafe { &mut *ct };
        ct.last_seen_ns = unsafe { bpf_ktime_get_ns() };
        if ct.dir == ct_dir::REPLY {
            let (sa, sp, da, dp) = (ct.nat_addr, ct.nat_port, ct.snat_addr, ct.snat_port);
            let redirect = ct.flags & ct_flags::REDIRECT != 0;
            rewrite(ctx, &p, false, sa, sp)?;
            count(stat::REV_NAT, ctx.len());
            if da != 0 {
                // Masqueraded flow: the reply was addressed to the node; give it back to
                // the client.
                rewrite(ctx, &p, true, da, dp)?;
            }
            if ct.flags & ct_flags::LOCAL_CLIENT != 0 {
                return Ok(to_loopback(ctx));
            }
            if redirect {
                let dst = if da != 0 { da } else { p.daddr };
                return Ok(forward(ctx, &p, sa, dst));
            }
            return Ok(TCX_NEXT);
        }
        // FORWARD: keep the flow on its backend while that backend exists; if it was removed,
        // fall through and choose again (kube-proxy's conntrack entry would point at a dead
        // endpoint; choosing again is what a new connection would get).
        // Ids are reused after a backend is removed, so the id must still name the same
        // address and port.
        let same = match BE4.get_ptr(ct.backend_id) {
            // SAFETY: map value pointer valid for this program run.
            Some(b) => unsafe { (*b).addr == ct.nat_addr && (*b).port == ct.nat_port },
            None => false,
        };
        if same {
            let (addr, port, sa, sp) = (ct.nat_addr, ct.nat_port, ct.snat_addr, ct.snat_port);
            rewrite(ctx, &p, true, addr, port)?;
            count(stat::DNAT, ctx.len());
            if sa != 0 {
                rewrite(ctx, &p, false, sa, sp)?;
                return Ok(forward(ctx, &p, sa, addr));
            }
            return Ok(TCX_NEXT);
        }
    }

    let mut key = Service4Key {
        addr: p.daddr,
        dport: p.dport,
        proto: p.proto,
        scope: scope::EXTERNAL,
        backend_slot: 0,
        pad: 0,
    };
    let Some(mut svc) = SVC4.get_ptr(&key) else {
        return miss(ctx, &p);
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
    if s.flags & svc_flags::TWO_SCOPES != 0
        && (from_node || LCIDR4.get(Key::new(32, p.saddr)).is_some())
    {
        key.scope = scope::INTERNAL;
        if let Some(v) = SVC4.get_ptr(&key) {
            svc = v;
            // SAFETY: as above.
            s = unsafe { *svc };
        }
    }
    if s.flags & svc_flags::SOURCE_RANGES != 0 {
        let k = Key::new(
            shunt_abi::SRC_RANGE_ID_BITS + 32,
            SrcRange4 {
                rev_nat_id: s.rev_nat_id,
                pad: 0,
                addr: p.saddr,
            },
        );
        if SRCR4.get(k).is_none() {
            count(stat::DROP_SOURCE_RANGE, ctx.len());
            return Ok(TCX_DROP);
        }
    }
    if s.count == 0 {
        if s.flags & svc_flags::REJECT_NO_ENDPOINTS != 0 {
            count(stat::REJECT_NO_ENDPOINTS, ctx.len());
            return reject(ctx, &p);
        }
        count(stat::DROP_NO_ENDPOINTS, ctx.len());
        return Ok(TCX_DROP);
    }

    let now = unsafe { bpf_ktime_get_ns() };
    let aff_key = Affinity4Key {
        client: p.saddr,
        rev_nat_id: s.rev_nat_id,
        pad: 0,
    };
    let mut chosen: Option<(u32, Backend4)> = None;
    if s.flags & svc_flags::AFFINITY != 0
        && let Some(a) = AFF4.get_ptr(&aff_key)
    {
        // SAFETY: map value pointer valid for this program run.
        let a = unsafe { *a };
        let timeout_ns = u64::from(s.affinity_timeout) * 1_000_000_000;
        if now.wrapping_sub(a.last_used_ns) <= timeout_ns
            && let Some(be) = BE4.get_ptr(a.backend_id)
        {
            // SAFETY: as above.
            chosen = Some((a.backend_id, unsafe { *be }));
        }
    }
    let (backend_id, be) = match chosen {
        Some(c) => c,
        None => {
            key.backend_slot = (unsafe { bpf_get_prandom_u32() } % u32::from(s.count)) as u16 + 1;
            let Some(slot) = SVC4.get_ptr(&key) else {
                // A slot missing while slot 0 says it exists: a sync in progress removed it.
                // Userspace writes slots before slot 0 and deletes slot 0 first, so this is
                // only a concurrent shrink; drop like a lost packet rather than pass un-NATed.
                count(stat::ERRORS, ctx.len());
                return Ok(TCX_DROP);
            };
            // SAFETY: as above.
            let id = unsafe { (*slot).backend_id };
            let Some(be) = BE4.get_ptr(id) else {
                count(stat::ERRORS, ctx.len());
                return Ok(TCX_DROP);
            };
            (id, unsafe { *be })
        }
    };
    if s.flags & svc_flags::AFFINITY != 0 {
        let _ = AFF4.insert(
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
    let node_ip = CFG4.get(0).map_or(0, |c| c.node_ip);
    let masq = node_ip != 0
        && (from_node
            || s.flags & svc_flags::MASQUERADE_ALL != 0
            || (s.flags & svc_flags::MASQUERADE != 0
                && LCIDR4.get(Key::new(32, p.saddr)).is_none())
            || p.saddr == be.addr);
    let (snat_addr, snat_port) = if masq {
        match snat_port(p.proto, node_ip, &be) {
            Some(port) => (node_ip, port),
            None => {
                count(stat::ERRORS, ctx.len());
                return Ok(TCX_DROP);
            }
        }
    } else {
        (0, 0)
    };

    let fwd = Ct4Value {
        nat_addr: be.addr,
        nat_port: be.port,
        rev_nat_id: s.rev_nat_id,
        backend_id,
        dir: ct_dir::FORWARD,
        flags: 0,
        snat_port,
        snat_addr,
        pad2: 0,
        last_seen_ns: now,
    };
    let rev_key = Ct4Key {
        saddr: be.addr,
        daddr: if masq { snat_addr } else { p.saddr },
        sport: be.port,
        dport: if masq { snat_port } else { p.sport },
        proto: p.proto,
        pad: [0; 3],
    };
    let rev = Ct4Value {
        nat_addr: p.daddr,
        nat_port: p.dport,
        rev_nat_id: s.rev_nat_id,
        backend_id,
        dir: ct_dir::REPLY,
        flags: if from_node {
            ct_flags::LOCAL_CLIENT
        } else if masq || s.flags & svc_flags::NODE_ADDRESS != 0 {
            ct_flags::REDIRECT
        } else {
            0
        },
        snat_port: if masq { p.sport } else { 0 },
        snat_addr: if masq { p.saddr } else { 0 },
        pad2: 0,
        last_seen_ns: now,
    };
    // Reply entry first: once the forward entry exists a reply may already be on its way.
    if CT4.insert(&rev_key, &rev, 0).is_err() || CT4.insert(&ct_key, &fwd, 0).is_err() {
        count(stat::ERRORS, ctx.len());
        return Ok(TCX_DROP);
    }
    rewrite(ctx, &p, true, be.addr, be.port)?;
    count(stat::DNAT, ctx.len());
    if masq {
        rewrite(ctx, &p, false, snat_addr, snat_port)?;
        count(stat::SNAT, ctx.len());
        return Ok(forward(ctx, &p, snat_addr, be.addr));
    }
    Ok(TCX_NEXT)
}

/// A free masquerade source port towards `be` (wire order), or None after a bounded number
/// of random probes: the port is free when no REPLY entry uses (be -> node_ip:port).
#[inline(always)]
fn snat_port(proto: u8, node_ip: u32, be: &Backend4) -> Option<u16> {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    let mut i = 0;
    while i < 16 {
        let port = (SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16;
        let k = Ct4Key {
            saddr: be.addr,
            daddr: node_ip,
            sport: be.port,
            dport: port.to_be(),
            proto,
            pad: [0; 3],
        };
        if CT4.get_ptr(&k).is_none() {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}

/// Send a masqueraded packet straight to its next hop. Its source is now a local address,
/// which the kernel's input path would drop as martian (fib_validate_source without
/// accept_local), so it must bypass it: bpf_fib_lookup finds the egress interface and MACs,
/// TTL is decremented as forwarding would, and bpf_redirect/bpf_redirect_neigh (when the
/// neighbour is not resolved yet) transmits it. Anything else is left to the stack.
#[inline(always)]
fn forward(ctx: &TcContext, p: &Pkt, src: u32, dst: u32) -> i32 {
    // SAFETY: struct bpf_fib_lookup is plain data; zero is a valid value for every field.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    // SAFETY: the context pointer is valid for the program run.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: helper with a properly sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let ttl_proto: u16 = match ctx.load(IP_OFF + 8) {
        Ok(v) => v,
        Err(_) => return TC_ACT_SHOT,
    };
    let ttl = ttl_proto.to_ne_bytes()[0];
    if ttl <= 1 {
        return TC_ACT_SHOT;
    }
    let new = u16::from_ne_bytes([ttl - 1, ttl_proto.to_ne_bytes()[1]]);
    if ctx
        .l3_csum_replace(IP_CSUM_OFF, u64::from(ttl_proto), u64::from(new), 2)
        .is_err()
        || ctx.store(IP_OFF + 8, &new, 0).is_err()
    {
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
fn miss(ctx: &TcContext, p: &Pkt) -> Result<i32, ()> {
    if CIP4.get_ptr(p.daddr).is_some() {
        count(stat::REJECT_INVALID_PORT, ctx.len());
        return reject(ctx, p);
    }
    if SCIDR4.get(Key::new(32, p.daddr)).is_some() {
        count(stat::DROP_UNALLOCATED, ctx.len());
        return Ok(TCX_DROP);
    }
    Ok(TCX_NEXT)
}

/// Rewrite the destination (`dst`) or source address and port, fixing the IPv4 header
/// checksum and the TCP/UDP checksum (pseudo-header included). A UDP checksum of 0 means
/// "none" (RFC 768) and stays 0: BPF_F_MARK_MANGLED_0 makes bpf_l4_csum_replace skip it and
/// turn a computed 0 into 0xffff.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Pkt, dst: bool, addr: u32, port: u16) -> Result<(), ()> {
    let (addr_off, old_addr, port_off, old_port) = if dst {
        (IP_DADDR_OFF, p.daddr, p.l4_off + 2, p.dport)
    } else {
        (IP_SADDR_OFF, p.saddr, p.l4_off, p.sport)
    };
    let (csum_off, mangled) = if p.proto == IPPROTO_UDP {
        (p.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (p.l4_off + 16, 0)
    };
    if old_addr != addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(addr), 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &addr, 0).map_err(|_| ())?;
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

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// A fresh IPv4 header (no options, DF, TTL 64) with its checksum.
#[inline(always)]
fn ip_header(tot_len: u16, proto: u8, saddr: u32, daddr: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&saddr.to_ne_bytes());
    h[16..20].copy_from_slice(&daddr.to_ne_bytes());
    let c = fold(sum16(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// Answer the packet the way kube-proxy's `reject` verdict does (nft `reject` = TCP RST for
/// TCP, ICMP port unreachable otherwise): the packet is rewritten in place into the answer,
/// trimmed/grown with bpf_skb_change_tail, and redirected to the egress of the interface it
/// arrived on, which hands it back towards the sender. Packets with IPv4 options, and RSTs
/// (never answered, RFC 793), are dropped instead.
#[inline(always)]
fn reject(ctx: &TcContext, p: &Pkt) -> Result<i32, ()> {
    if p.ihl != 5 {
        return Ok(TCX_DROP);
    }
    let mut eth = [0u8; 12];
    load_buf(ctx, 0, &mut eth)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..12]);
    swapped[6..].copy_from_slice(&eth[..6]);
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
        let tot_len = u16::from_be(ctx.load::<u16>(IP_OFF + 2).map_err(|_| ())?);
        let hdrs = 20u32 + u32::from(doff >> 4) * 4;
        let payload = u32::from(tot_len).saturating_sub(hdrs);
        // RFC 793 "Reset Generation": answer an ACK with seq = its ack; otherwise seq 0 and
        // ACK everything the segment occupied (SYN and FIN count one each).
        let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
            (ack, 0, TCP_RST)
        } else {
            let occ = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
            (0, seq.wrapping_add(occ), TCP_RST | TCP_ACK)
        };
        let ip = ip_header(40, IPPROTO_TCP, p.daddr, p.saddr);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&p.dport.to_ne_bytes());
        tcp[2..4].copy_from_slice(&p.sport.to_ne_bytes());
        tcp[4..8].copy_from_slice(&rseq.to_be_bytes());
        tcp[8..12].copy_from_slice(&rack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = rflags;
        // Pseudo-header: saddr, daddr, zero+protocol, TCP length.
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = IPPROTO_TCP;
        pseudo[11] = 20;
        let c = fold(sum16(&tcp, sum16(&pseudo, 0)));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        // SAFETY: helper call on the program's own skb.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + 40) as u32, 0) } != 0 {
            return Err(());
        }
        ctx.store(0, &swapped, 0).map_err(|_| ())?;
        ctx.store(IP_OFF, &ip, 0).map_err(|_| ())?;
        ctx.store(IP_OFF + 20, &tcp, 0).map_err(|_| ())?;
    } else {
        // ICMP destination unreachable / port unreachable (RFC 792) quoting the original
        // IP header and the first 8 bytes of its payload.
        let mut quote = [0u8; 28];
        load_buf(ctx, IP_OFF, &mut quote)?;
        let ip = ip_header(20 + 8 + 28, IPPROTO_ICMP, p.daddr, p.saddr);
        let mut icmp = [0u8; 36];
        icmp[0] = 3;
        icmp[1] = 3;
        icmp[8..36].copy_from_slice(&quote);
        let c = fold(sum16(&icmp, 0));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: helper call on the program's own skb.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + 20 + 36) as u32, 0) } != 0 {
            return Err(());
        }
        ctx.store(0, &swapped, 0).map_err(|_| ())?;
        ctx.store(IP_OFF, &ip, 0).map_err(|_| ())?;
        ctx.store(IP_OFF + 20, &icmp, 0).map_err(|_| ())?;
    }
    // SAFETY: plain helper; returns TC_ACT_REDIRECT (== TCX_REDIRECT) on success.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

// ---- Node-originated traffic: cgroup/sock_addr hooks (socket-level load balancing) ----
//
// Packets a node process sends never pass a tc ingress hook of ours, so the translation is
// done where the socket picks its destination (connect(2), sendmsg(2) for unconnected UDP),
// as Cilium's bpf_sock does; recvmsg/getpeername show the frontend again so the application
// never sees the backend. Return 1 lets the syscall proceed, 0 fails it with the value set
// by bpf_set_retval (default EPERM).

const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

#[inline(always)]
fn sock_proto(sa: &aya_ebpf::bindings::bpf_sock_addr) -> Option<u8> {
    let p = sa.protocol as u8;
    (p == IPPROTO_TCP || p == IPPROTO_UDP).then_some(p)
}

/// Fail the syscall with `errno` (connect4/sendmsg4 accept bpf_set_retval, kernel
/// cgroup_current_func_proto).
#[inline(always)]
fn sock_fail(errno: i32) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_set_retval(-errno) };
    0
}

#[inline(always)]
fn sock_forward(ctx: &SockAddrContext) -> i32 {
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
    let addr = sa.user_ip4;
    let port = sa.user_port as u16;
    let mut key = Service4Key {
        addr,
        dport: port,
        proto,
        scope: scope::EXTERNAL,
        backend_slot: 0,
        pad: 0,
    };
    let Some(svc) = SVC4.get_ptr(&key) else {
        if CIP4.get_ptr(addr).is_some() {
            return sock_fail(ECONNREFUSED);
        }
        if SCIDR4.get(Key::new(32, addr)).is_some() {
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
        if let Some(v) = SVC4.get_ptr(&key) {
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
    let fk = SockRevNat4Key {
        cookie,
        addr,
        port,
        pad: 0,
    };
    // The socket's earlier choice, while its backend id still names that backend.
    let mut be: Option<Backend4> = None;
    if let Some(f) = SKFWD4.get_ptr(&fk) {
        // SAFETY: map value pointers valid for this program run.
        let f = unsafe { *f };
        if let Some(b) = BE4.get_ptr(f.backend_id) {
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
            let Some(slot) = SVC4.get_ptr(&key) else {
                return sock_fail(EPERM);
            };
            // SAFETY: as above.
            let id = unsafe { (*slot).backend_id };
            let Some(b) = BE4.get_ptr(id) else {
                return sock_fail(EPERM);
            };
            // SAFETY: as above.
            let b = unsafe { *b };
            let fv = SockFwd4 {
                backend_id: id,
                addr: b.addr,
                port: b.port,
                rev_nat_id: s.rev_nat_id,
            };
            if SKFWD4.insert(&fk, &fv, 0).is_err() {
                return sock_fail(EPERM);
            }
            b
        }
    };
    let rk = SockRevNat4Key {
        cookie,
        addr: be.addr,
        port: be.port,
        pad: 0,
    };
    let rv = RevNat4 { addr, port, pad: 0 };
    if SKRN4.insert(&rk, &rv, 0).is_err() {
        return sock_fail(EPERM);
    }
    sa.user_ip4 = be.addr;
    sa.user_port = u32::from(be.port);
    count(stat::SOCK_XLATE, 0);
    1
}

#[inline(always)]
fn sock_reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sock_proto(sa).is_none() {
        return 1;
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let rk = SockRevNat4Key {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad: 0,
    };
    if let Some(v) = SKRN4.get_ptr(&rk) {
        // SAFETY: map value pointer valid for this program run.
        let v = unsafe { *v };
        sa.user_ip4 = v.addr;
        sa.user_port = u32::from(v.port);
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn shunt_connect4(ctx: SockAddrContext) -> i32 {
    sock_forward(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn shunt_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_forward(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn shunt_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn shunt_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
