//! Conntrack state and timeouts of the tc program's flows (`SHUNT_CT4`/`6`).
//!
//! Both entries of a flow (FORWARD, keyed by the client's packets, and REPLY, keyed by the
//! backend's) carry the same state (`shunt_abi::ct_state`, in `CtValue::pad2`) and
//! timestamp: a packet that changes the state, or comes a second or more after the last
//! refresh, updates its own entry and its partner (one more lookup), so an idle direction
//! does not expire while the other is busy, and the map is written about once per second
//! per flow rather than on every packet (Cilium's CT report interval idea, conntrack.h).
//! An entry idle longer than its state's timeout is gone: deleted here when met, and by the
//! agent's periodic sweep otherwise (the LRU is not the only reclaim).
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::Array, programs::TcContext};
use shunt_abi::{CtKey, CtTimeouts, CtValue, ct_dir, ct_state};

use super::{Fam, IPPROTO_TCP, Pkt};

#[map(name = "SHUNT_CTTMO")]
static CT_TIMEOUTS: Array<CtTimeouts> = Array::with_max_entries(1, 0);

/// How often (at most) a live flow's timestamp is written.
const REFRESH_NS: u64 = 1_000_000_000;

/// What a conntrack entry means for the packet that found it.
pub enum Seen {
    /// A live flow: translate as the entry says.
    Live,
    /// Expired (deleted now) or a finished TCP connection's tuple reused by a new SYN: the
    /// packet is a new flow's first packet.
    Gone,
    /// Expired, and the packet is not a TCP connection's first (SYN) packet: a leftover of
    /// a flow that timed out; it is passed on untranslated, as netfilter does with a packet
    /// it cannot match (the receiver resets it).
    Stale,
}

/// The TCP flags byte (header byte 13, RFC 9293 3.1); 0 for other protocols.
#[inline(always)]
pub fn tcp_flags<A>(ctx: &TcContext, p: &Pkt<A>) -> u8 {
    // A later fragment (frag.rs) has no TCP header: no flags.
    if p.proto != IPPROTO_TCP || p.frag == super::frag::LATER {
        return 0;
    }
    ctx.load::<u8>(p.l4_off + 13).unwrap_or(0)
}

/// The state of a new flow's entries (`CtValue::pad2`), from its first packet.
#[inline(always)]
pub fn initial<A>(ctx: &TcContext, p: &Pkt<A>) -> u32 {
    ct_state::initial(p.proto, tcp_flags(ctx, p))
}

/// Check an entry found for `key` against its timeout and advance its state. Not inlined:
/// its frame (the partner key) stays off `ct_hit`'s.
#[inline(never)]
pub fn seen<F: Fam>(
    ctx: &TcContext,
    p: &Pkt<F::A>,
    key: &CtKey<F::A>,
    ct: &mut CtValue<F::A>,
) -> Seen {
    // SAFETY: plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = tcp_flags(ctx, p);
    let t = CT_TIMEOUTS.get(0).copied().unwrap_or_default();
    let idle = now.saturating_sub(ct.last_seen_ns);
    let expired = idle > t.secs(p.proto, ct.pad2).saturating_mul(1_000_000_000);
    if expired || ct_state::reopens(ct.pad2, flags) {
        let _ = F::ct().remove(key);
        // TCP: only a SYN starts a connection; anything else of an expired flow is stale.
        if expired && p.proto == IPPROTO_TCP && flags & 0x12 != 0x02 {
            return Seen::Stale;
        }
        return Seen::Gone;
    }
    let next = ct_state::next(ct.pad2, ct.dir, p.proto, flags);
    if next == ct.pad2 && idle < REFRESH_NS {
        return Seen::Live;
    }
    ct.pad2 = next;
    ct.last_seen_ns = now;
    // The partner entry's key, from this entry (see `commit`): FORWARD names the backend
    // and the masquerade source; REPLY names the frontend and the original client.
    let masq = ct.snat_addr != F::A::default();
    let partner = if ct.dir == ct_dir::FORWARD {
        CtKey {
            saddr: ct.nat_addr,
            daddr: if masq { ct.snat_addr } else { key.saddr },
            sport: ct.nat_port,
            dport: if masq { ct.snat_port } else { key.sport },
            proto: key.proto,
            pad: [0; 3],
        }
    } else {
        CtKey {
            saddr: if masq { ct.snat_addr } else { key.daddr },
            daddr: ct.nat_addr,
            sport: if masq { ct.snat_port } else { key.dport },
            dport: ct.nat_port,
            proto: key.proto,
            pad: [0; 3],
        }
    };
    if let Some(o) = F::ct().get_ptr_mut(&partner) {
        // SAFETY: map value pointer valid for this program run; a concurrent writer on
        // another CPU can only make the state or timestamp a packet older.
        let o = unsafe { &mut *o };
        o.pad2 = next;
        o.last_seen_ns = now;
    }
    Seen::Live
}
