//! Later fragments of a translated datagram (IPv4, and IPv6 through the fragment header
//! that ipv6_ext.rs walks).
//!
//! In nftables/iptables mode netfilter reassembles before NAT (nf_defrag_ipv4/ipv6 run
//! ahead of conntrack), so a datagram bigger than the MTU to a Service is translated whole.
//! Here the tc program sees each fragment: the first one (offset 0) carries the L4 header,
//! is looked up and translated like any packet, and its L4 checksum, which covers the
//! whole datagram, is updated incrementally there. Later fragments carry no ports, so,
//! as Cilium does (bpf/lib/ipv4.h / ipv6.h `ipv4_handle_fragmentation`, its
//! `IPV4_FRAG_DATAGRAMS_MAP`), the first fragment's ports are kept in an LRU map
//! (`SHUNT_FRAG4`/`6`) keyed by the datagram's identity as it arrives: source,
//! destination, IP identification (IPv6: the fragment header's) and protocol. A later
//! fragment finds its ports there and then takes the same conntrack entry, FORWARD or
//! REPLY, as its first fragment; only its IP addresses change (and the IPv4 header
//! checksum): it carries no L4 header and no L4 checksum.
//!
//! A later fragment that arrives before its first fragment (reordering) finds nothing
//! and passes untranslated (lost, as before: the frontend is no host), as in Cilium.
//! Entries are not deleted by the last fragment (fragments may arrive out of order);
//! LRU eviction and the next datagram with the same identity replace them. A later
//! fragment never starts a flow: without a conntrack entry it passes untranslated.
//! TCP and UDP only: SCTP's CRC32c fix (sctp.rs) needs the whole chunk data of the packet.
use aya_ebpf::{helpers::bpf_csum_diff, macros::map, maps::LruHashMap, programs::TcContext};
use shunt_abi::{FragKey, FragPorts, limits};

use super::{
    Fam, IP_CSUM_OFF, IP_DADDR_OFF, IP_OFF, IP_SADDR_OFF, IP6_DADDR_OFF, IP6_HLEN, IP6_SADDR_OFF,
    IPPROTO_TCP, IPPROTO_UDP, Pkt, ipv6_ext,
};

/// `Pkt::frag`: not a fragment (or an atomic one: offset 0, no more fragments).
pub const NONE: u8 = 0;
/// Offset 0 with more fragments to come: carries the L4 header.
pub const FIRST: u8 = 1;
/// Offset > 0: no L4 header.
pub const LATER: u8 = 2;

#[map]
pub static SHUNT_FRAG4: LruHashMap<FragKey<u32>, FragPorts> =
    LruHashMap::with_max_entries(limits::FRAGS, 0);
#[map]
pub static SHUNT_FRAG6: LruHashMap<FragKey<[u32; 4]>, FragPorts> =
    LruHashMap::with_max_entries(limits::FRAGS, 0);

/// Whether fragments of `proto` are followed (see the module docs).
#[inline(always)]
pub fn handled(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

#[inline(always)]
fn key<A: Copy>(p: &Pkt<A>, id: u32) -> FragKey<A> {
    FragKey {
        saddr: p.saddr,
        daddr: p.daddr,
        id,
        proto: p.proto,
        pad: [0; 3],
    }
}

/// The packet's fragment kind and identification (wire order), read again here rather
/// than carried from parsing, so `try_ingress`'s inlined parse keeps no more live values
/// (its frame, see ebpf/README.md "Stack"). IPv4: the header's identification and
/// fragment field; IPv6: the fragment header, if the walk finds one.
#[inline(always)]
fn ident<F: Fam>(ctx: &TcContext) -> Option<(u8, u32)> {
    if core::mem::size_of::<F::A>() == 4 {
        let id: u16 = ctx.load(IP_OFF + 4).ok()?;
        let fo = u16::from_be(ctx.load::<u16>(IP_OFF + 6).ok()?);
        let kind = if fo & 0x1fff != 0 {
            LATER
        } else if fo & 0x2000 != 0 {
            FIRST
        } else {
            NONE
        };
        return Some((kind, u32::from(id)));
    }
    ipv6_ext::frag_header(ctx, ctx.load(IP_OFF + 6).ok()?, IP_OFF + IP6_HLEN)
}

/// A later fragment: fill in its addresses, and its datagram's ports from the first
/// fragment's entry; false
/// when there is none (the packet then passes untranslated). Not inlined: its key lives in
/// the scratch map (`k`), its frame off `try_ingress`'s.
#[inline(never)]
pub fn ports<F: Fam>(ctx: &TcContext, p: &mut Pkt<F::A>, k: &mut FragKey<F::A>) -> bool {
    let Some((LATER, id)) = ident::<F>(ctx) else {
        return false;
    };
    // IPv6's parse leaves a later fragment's addresses to this frame (see there).
    let v4 = core::mem::size_of::<F::A>() == 4;
    let (Ok(sa), Ok(da)) = (
        ctx.load::<F::A>(if v4 { IP_SADDR_OFF } else { IP6_SADDR_OFF }),
        ctx.load::<F::A>(if v4 { IP_DADDR_OFF } else { IP6_DADDR_OFF }),
    ) else {
        return false;
    };
    p.saddr = sa;
    p.daddr = da;
    p.frag_id = id;
    *k = key(p, id);
    match F::frag().get_ptr(k) {
        Some(v) => {
            // SAFETY: map value pointer valid for this program run.
            let v = unsafe { *v };
            p.sport = v.sport;
            p.dport = v.dport;
            true
        }
        None => false,
    }
}

/// A translated first fragment: keep its ports (as it arrived) for the later fragments.
/// For IPv6, `p.frag` == FIRST only says extension headers were present: a packet without
/// a fragment header (or an atomic fragment) is not recorded.
#[inline(never)]
pub fn record<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>, k: &mut FragKey<F::A>) {
    let Some((FIRST, id)) = ident::<F>(ctx) else {
        return;
    };
    *k = key(p, id);
    let v = FragPorts {
        sport: p.sport,
        dport: p.dport,
    };
    // A full map evicts its least recently used entry; an error only loses this datagram.
    let _ = F::frag().insert(k, &v, 0);
}

/// Rewrite a later fragment's destination (`dst`) or source address: the IP header only.
/// IPv4's header checksum is patched by the difference (bpf_l3_csum_replace with size 0
/// = "`to` is a diff", csum_replace_by_diff); IPv6 has no header checksum.
#[inline(always)]
pub fn set_addr<F: Fam>(ctx: &TcContext, dst: bool, old: F::A, new: F::A) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let v4 = core::mem::size_of::<F::A>() == 4;
    if v4 {
        let mut from = old;
        let mut to = new;
        // SAFETY: helper call with two 4-byte stack buffers.
        let diff = unsafe {
            bpf_csum_diff(
                &mut from as *mut F::A as *mut u32,
                4,
                &mut to as *mut F::A as *mut u32,
                4,
                0,
            )
        };
        if diff < 0 {
            return Err(());
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, 0, u64::from(diff as u32), 0)
            .map_err(|_| ())?;
    }
    let off = match (v4, dst) {
        (true, true) => IP_DADDR_OFF,
        (true, false) => IP_SADDR_OFF,
        (false, true) => IP6_DADDR_OFF,
        (false, false) => IP6_SADDR_OFF,
    };
    ctx.store(off, &new, 0).map_err(|_| ())
}
