//! ICMP / ICMPv6 errors about translated flows, translated the way netfilter's
//! `nf_nat_icmp_reply_translation` / `nf_nat_icmpv6_reply_translation` do (net/netfilter/
//! nf_nat_proto.c). Without this a backend's or a router's error (fragmentation needed,
//! packet too big, unreachable, time exceeded, parameter problem) names the backend (or the
//! masquerade address) in its quote, and the client's stack (icmp_rcv -> tcp_v4_err /
//! udp_err, icmpv6_rcv -> tcp_v6_err ...) finds no socket for it: PMTU discovery through a
//! Service breaks.
//!
//! The quoted (inner) packet is one this node translated. Its reversed tuple is the key of
//! the conntrack entry of the direction the error travels in, exactly like the packets of
//! that direction:
//! - a REPLY entry: the error comes from the backend's side (the backend, or a router
//!   between node and backend) about a client packet after DNAT (and masquerade);
//! - a FORWARD entry: the error comes from the client's side (the client, or a router
//!   on the way back) about a backend's answer after reverse NAT.
//!
//! The entry translates the reversed tuple K into K' as it would translate a packet of that
//! direction; the inner header becomes K' reversed (addresses and ports), and each outer
//! address the entry changes becomes K''s (netfilter: `manip_pkt` on the inner with the
//! inverse manip, then the outer with the inverted tuple, only for the manip types the
//! connection has). So a backend's error reaches the client from the frontend address,
//! quoting the packet the client sent; a masqueraded flow's error is also re-addressed from
//! the node to the client.
//!
//! Checksums, all fixed incrementally (RFC 1624) with the one's-complement sum's byte-order
//! independence, i.e. on the wire bytes as loaded:
//! - inner IPv4 header checksum: follows the inner address change. Since header + checksum
//!   sum to the same value again, the ICMP checksum needs nothing for it;
//! - inner TCP/UDP checksum, when the quote reaches it (RFC 792 promises only 8 bytes; Linux
//!   quotes up to 576 / 1280): pseudo-header addresses and ports. A zero UDP checksum ("none")
//!   stays zero, as netfilter's udp_manip_pkt leaves it;
//! - ICMP / ICMPv6 checksum: the inner ports, the inner L4 checksum field, and with ICMPv6 the
//!   inner addresses (no inner header checksum compensates them there);
//! - outer: IPv4 header checksum; ICMPv6 pseudo-header through `bpf_l4_csum_replace` with
//!   `BPF_F_PSEUDO_HDR`, which also keeps a CHECKSUM_COMPLETE skb's `csum` right (every
//!   other change is balanced inside the checksummed area: data and checksum change by
//!   opposite amounts). ICMP errors are built with a full checksum by the sender's stack
//!   (icmp_push_reply / icmpv6_push_pending_frames), never CHECKSUM_PARTIAL.
//!
//! Quotes of TCP, UDP and SCTP packets are translated (SCTP: ports only, see below). Not
//! handled (passes as before): errors in an IPv4 fragment, quotes of non-first fragments (no
//! ports), quotes of ICMP packets. IPv6 extension headers are walked in the error and in the
//! quote (ipv6_ext.rs).
use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR, bindings::tcx_action_base::TCX_NEXT, helpers::bpf_csum_diff,
    programs::TcContext,
};
use shunt_abi::{CtKey, ct_dir, ct_flags, stat};

use super::{
    Action, Fam, IP_CSUM_OFF, IP_DADDR_OFF, IP_OFF, IP_SADDR_OFF, IP6_DADDR_OFF, IP6_HLEN,
    IP6_SADDR_OFF, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Pkt,
    count, ipv6_ext, is_zero,
};

/// Where the parts of one ICMP error are, and what its quote says (per-CPU scratch memory,
/// see `Scratch`).
pub struct Quote<A> {
    /// Outer source and destination.
    osaddr: A,
    odaddr: A,
    /// Offset of the ICMP / ICMPv6 checksum.
    icmp_csum_off: usize,
    /// Offsets of the quoted IP header and of its L4 header.
    inner_ip: usize,
    inner_l4: usize,
    isaddr: A,
    idaddr: A,
    isport: u16,
    idport: u16,
    iproto: u8,
}

/// Parse an ICMP / ICMPv6 error quoting a TCP or UDP packet (with its ports) into `q`.
/// One body for both families: `F::BITS` is a constant, so each instance keeps one branch.
#[inline(always)]
fn parse<F: Fam>(ctx: &TcContext, q: &mut Quote<F::A>) -> Option<()> {
    let v4 = F::BITS == 32;
    let (icmp, inner) = if v4 {
        let vihl: u8 = ctx.load(IP_OFF).ok()?;
        let ihl = usize::from(vihl & 0x0f);
        if vihl >> 4 != 4 || ihl < 5 {
            return None;
        }
        // A fragmented error (MF or an offset) is not ours: its quote may be cut.
        let frag: u16 = ctx.load(IP_OFF + 6).ok()?;
        if u16::from_be(frag) & 0x3fff != 0 || ctx.load::<u8>(IP_OFF + 9).ok()? != IPPROTO_ICMP {
            return None;
        }
        let icmp = IP_OFF + ihl * 4;
        // RFC 792: 3 destination unreachable (fragmentation needed is code 4), 11 time
        // exceeded, 12 parameter problem: the errors that quote a packet.
        if !matches!(ctx.load::<u8>(icmp).ok()?, 3 | 11 | 12) {
            return None;
        }
        (icmp, icmp + 8)
    } else {
        let v: u8 = ctx.load(IP_OFF).ok()?;
        if v >> 4 != 6 {
            return None;
        }
        let (nh, icmp) = ipv6_ext::skip(ctx, ctx.load(IP_OFF + 6).ok()?, IP_OFF + IP6_HLEN)?;
        if nh != IPPROTO_ICMPV6 {
            return None;
        }
        // RFC 4443: 1 destination unreachable, 2 packet too big, 3 time exceeded,
        // 4 parameter problem.
        if !matches!(ctx.load::<u8>(icmp).ok()?, 1..=4) {
            return None;
        }
        (icmp, icmp + 8)
    };
    let (iproto, inner_l4, isaddr_off, idaddr_off) = if v4 {
        let vihl: u8 = ctx.load(inner).ok()?;
        let ihl = usize::from(vihl & 0x0f);
        if vihl >> 4 != 4 || ihl < 5 {
            return None;
        }
        // Only a first fragment carries the ports.
        let frag: u16 = ctx.load(inner + 6).ok()?;
        if u16::from_be(frag) & 0x1fff != 0 {
            return None;
        }
        (
            ctx.load::<u8>(inner + 9).ok()?,
            inner + ihl * 4,
            inner + 12,
            inner + 16,
        )
    } else {
        if ctx.load::<u8>(inner).ok()? >> 4 != 6 {
            return None;
        }
        let (nh, l4) = ipv6_ext::skip(ctx, ctx.load(inner + 6).ok()?, inner + IP6_HLEN)?;
        (nh, l4, inner + 8, inner + 24)
    };
    if iproto != IPPROTO_TCP && iproto != IPPROTO_UDP && iproto != IPPROTO_SCTP {
        return None;
    }
    let (so, d) = if v4 {
        (IP_SADDR_OFF, IP_DADDR_OFF)
    } else {
        (IP6_SADDR_OFF, IP6_DADDR_OFF)
    };
    q.osaddr = ctx.load(so).ok()?;
    q.odaddr = ctx.load(d).ok()?;
    q.icmp_csum_off = icmp + 2;
    q.inner_ip = inner;
    q.inner_l4 = inner_l4;
    q.isaddr = ctx.load(isaddr_off).ok()?;
    q.idaddr = ctx.load(idaddr_off).ok()?;
    q.isport = ctx.load(inner_l4).ok()?;
    q.idport = ctx.load(inner_l4 + 2).ok()?;
    q.iproto = iproto;
    Some(())
}

/// One's-complement difference `new - old` of two equally sized values (bpf_csum_diff over
/// their bytes), as a 32-bit partial sum.
#[inline(always)]
fn diff<T: Copy>(old: T, new: T) -> Result<u64, ()> {
    let mut from = old;
    let mut to = new;
    let n = core::mem::size_of::<T>() as u32;
    // SAFETY: helper call with two stack buffers of `n` bytes (4 or 16: a multiple of 4).
    let d = unsafe {
        bpf_csum_diff(
            &mut from as *mut T as *mut u32,
            n,
            &mut to as *mut T as *mut u32,
            n,
            0,
        )
    };
    if d < 0 {
        Err(())
    } else {
        Ok(u64::from(d as u32))
    }
}

/// A checksum field after the data it covers changed by `delta` (RFC 1624 eqn. 3:
/// HC' = ~(~HC + m')), in the byte order it was loaded in.
#[inline(always)]
fn csum_update(old: u16, delta: u64) -> u16 {
    let mut s = u64::from(!old) + delta;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Load the checksum at `off`, apply `delta`, store it back.
#[inline(always)]
fn fix_csum(ctx: &TcContext, off: usize, delta: u64) -> Result<(u16, u16), ()> {
    let old: u16 = ctx.load(off).map_err(|_| ())?;
    let new = csum_update(old, delta);
    ctx.store(off, &new, 0).map_err(|_| ())?;
    Ok((old, new))
}

/// Translate an ICMP error quoting a packet of a translated flow; `Ok(false)` when the
/// packet is not such an error (it passes untouched). On success `act` says where the
/// packet goes, as for the flow's own packets of that direction, and `p` holds its outer
/// addresses and protocol (what `forward` needs). Called from `try_ingress` (stack frames,
/// see there); `q` and `key` are scratch memory.
#[inline(never)]
pub fn translate<F: Fam>(
    ctx: &TcContext,
    p: &mut Pkt<F::A>,
    q: &mut Quote<F::A>,
    key: &mut CtKey<F::A>,
    act: &mut Action<F::A>,
) -> Result<bool, ()> {
    if parse::<F>(ctx, q).is_none() {
        return Ok(false);
    }
    // The quoted packet went from isaddr to idaddr; the direction the error travels in is
    // the reverse one, whose packets are keyed by the reversed tuple.
    *key = CtKey {
        saddr: q.idaddr,
        daddr: q.isaddr,
        sport: q.idport,
        dport: q.isport,
        proto: q.iproto,
        pad: [0; 3],
    };
    let Some(ct) = F::ct().get_ptr(&*key) else {
        return Ok(false);
    };
    // SAFETY: map value pointer valid for this program run.
    let ct = unsafe { *ct };
    let masq = !is_zero(ct.snat_addr);
    // K' = the entry's translation of the reversed tuple.
    let (ns, nsp, nd, ndp) = if ct.dir == ct_dir::REPLY {
        // Reverse NAT: the source becomes the frontend, a masqueraded flow's destination
        // the client again.
        let (d, dp) = if masq {
            (ct.snat_addr, ct.snat_port)
        } else {
            (key.daddr, key.dport)
        };
        (ct.nat_addr, ct.nat_port, d, dp)
    } else {
        // DNAT to the backend (and masquerade).
        let (s, sp) = if masq {
            (ct.snat_addr, ct.snat_port)
        } else {
            (key.saddr, key.sport)
        };
        (s, sp, ct.nat_addr, ct.nat_port)
    };
    let v4 = F::BITS == 32;

    // Inner addresses: the quote becomes K' reversed.
    let d_addr = diff(q.isaddr, nd)? + diff(q.idaddr, ns)?;
    let (isaddr_off, idaddr_off) = if v4 {
        (q.inner_ip + 12, q.inner_ip + 16)
    } else {
        (q.inner_ip + 8, q.inner_ip + 24)
    };
    ctx.store(isaddr_off, &nd, 0).map_err(|_| ())?;
    ctx.store(idaddr_off, &ns, 0).map_err(|_| ())?;
    // IPv4: the inner header checksum absorbs the change, leaving the ICMP sum as it was;
    // IPv6 has no header checksum, so the ICMPv6 checksum takes it.
    let mut d_icmp = if v4 {
        fix_csum(ctx, q.inner_ip + 10, d_addr)?;
        0
    } else {
        d_addr
    };
    // Inner ports, one 4-byte word.
    let old_ports: u32 = ctx.load(q.inner_l4).map_err(|_| ())?;
    let mut np = [0u8; 4];
    np[..2].copy_from_slice(&ndp.to_ne_bytes());
    np[2..].copy_from_slice(&nsp.to_ne_bytes());
    let new_ports = u32::from_ne_bytes(np);
    let d_ports = diff(old_ports, new_ports)?;
    ctx.store(q.inner_l4, &new_ports, 0).map_err(|_| ())?;
    d_icmp += d_ports;
    // The inner L4 checksum, where the quote holds it (netfilter updates it likewise,
    // l4proto manip_pkt on the inner header, pseudo-header included).
    let l4_csum_off = q.inner_l4 + if q.iproto == IPPROTO_UDP { 6 } else { 16 };
    // A quoted SCTP packet's CRC32c is left alone: the receiver (sctp_v4_err / sctp_v6_err)
    // reads only the ports and verification tag, and a quote is usually cut anyway.
    if q.iproto != IPPROTO_SCTP
        && let Ok(old) = ctx.load::<u16>(l4_csum_off)
        && !(q.iproto == IPPROTO_UDP && old == 0)
    {
        let mut new = csum_update(old, d_addr + d_ports);
        if q.iproto == IPPROTO_UDP && new == 0 {
            new = 0xffff;
        }
        ctx.store(l4_csum_off, &new, 0).map_err(|_| ())?;
        d_icmp += u64::from(!old) + u64::from(new);
    }
    fix_csum(ctx, q.icmp_csum_off, d_icmp)?;

    // Outer addresses the entry changes (netfilter manipulates the outer header only for
    // the manip types the connection has).
    let (mut osaddr, mut odaddr) = (q.osaddr, q.odaddr);
    if ns != key.saddr {
        set_outer::<F>(ctx, q, false, q.osaddr, ns)?;
        osaddr = ns;
    }
    if nd != key.daddr {
        set_outer::<F>(ctx, q, true, q.odaddr, nd)?;
        odaddr = nd;
    }
    p.saddr = osaddr;
    p.daddr = odaddr;
    p.proto = if v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };

    // Deliver it like the flow's packets of this direction (`ct_hit`).
    *act = if ct.dir == ct_dir::REPLY {
        count(stat::REV_NAT, ctx.len());
        if ct.flags & ct_flags::LOCAL_CLIENT != 0 {
            Action::Loopback
        } else if ct.flags & ct_flags::REDIRECT != 0 {
            Action::Forward {
                src: osaddr,
                dst: odaddr,
            }
        } else {
            Action::Verdict(TCX_NEXT)
        }
    } else {
        count(stat::DNAT, ctx.len());
        if masq {
            Action::Forward {
                src: osaddr,
                dst: odaddr,
            }
        } else {
            Action::Verdict(TCX_NEXT)
        }
    };
    Ok(true)
}

/// Rewrite an outer address: IPv4 fixes its header checksum (ICMP has no pseudo-header);
/// IPv6 folds the change into the ICMPv6 checksum's pseudo-header.
#[inline(always)]
fn set_outer<F: Fam>(
    ctx: &TcContext,
    q: &Quote<F::A>,
    dst: bool,
    old: F::A,
    new: F::A,
) -> Result<(), ()> {
    let d = diff(old, new)?;
    let off = if F::BITS == 32 {
        fix_csum(ctx, IP_CSUM_OFF, d)?;
        if dst { IP_DADDR_OFF } else { IP_SADDR_OFF }
    } else {
        // Size 0: `to` is a difference (inet_proto_csum_replace_by_diff), which also keeps
        // a CHECKSUM_COMPLETE skb's csum right for the changed header bytes.
        ctx.l4_csum_replace(q.icmp_csum_off, 0, d, u64::from(BPF_F_PSEUDO_HDR))
            .map_err(|_| ())?;
        if dst { IP6_DADDR_OFF } else { IP6_SADDR_OFF }
    };
    ctx.store(off, &new, 0).map_err(|_| ())
}
