//! IPv6 extension headers between the fixed header and the upper-layer header (RFC 8200
//! 4.1): hop-by-hop options, routing, fragment and destination options are walked, at most
//! [`MAX_EXT`] of them (a bound for the verifier; more is not a packet a Service sees),
//! like netfilter's ipv6_skip_exthdr that nf_conntrack and nf_nat use to find the ports.
//!
//! - Fragments: the first fragment (offset 0) carries the upper-layer header and is
//!   translated; its L4 checksum covers the whole datagram, and the incremental update is
//!   right for it anyway (it only adds the difference). For the tc path ([`walk`]) a later
//!   fragment ends the walk at its fragment header, its identification kept: frag.rs gives
//!   it the first fragment's ports. For ICMP quotes ([`skip`]) it is not followed.
//! - Routing header with segments left: the IPv6 destination is not the final one, and the
//!   L4 pseudo-header uses the final destination (RFC 8200 8.1), so such a packet passes
//!   untranslated (it is in transit, not addressed to a Service yet).
//! - Anything else (AH, ESP, no next header, unknown) ends the walk: not translated.
use aya_ebpf::programs::TcContext;

use super::frag;

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;
/// Most extension headers walked.
const MAX_EXT: usize = 4;

/// From the next-header value `nh` of the fixed header and the offset after it, the
/// upper-layer protocol and its offset; None for a non-first fragment, a routing header
/// with segments left, more than [`MAX_EXT`] extension headers, or a cut packet.
#[inline(always)]
pub fn skip(ctx: &TcContext, nh: u8, off: usize) -> Option<(u8, usize)> {
    let (nh, off, later) = walk(ctx, nh, off)?;
    if later {
        return None;
    }
    Some((nh, off))
}

/// [`skip`], except that a later fragment (fragment offset > 0) ends the walk after its
/// fragment header: the protocol named there, the offset of the fragment's data, and
/// true. The caller reads the fragment header (8 bytes before a fragment's data: the
/// fragment header is the last header walked; see [`frag_header`]).
#[inline(always)]
pub fn walk(ctx: &TcContext, mut nh: u8, mut off: usize) -> Option<(u8, usize, bool)> {
    let mut i = 0;
    while i < MAX_EXT {
        match nh {
            HOPOPTS | DSTOPTS | ROUTING => {
                // Next header, length in 8-octet units not counting the first 8; the
                // routing header's type and segments left follow.
                let h: [u8; 4] = ctx.load(off).ok()?;
                if nh == ROUTING && h[3] != 0 {
                    return None;
                }
                nh = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            FRAGMENT => {
                // Next header, reserved, offset (13 bits) + 2 reserved bits + M; 8 bytes.
                let h: [u8; 4] = ctx.load(off).ok()?;
                nh = h[0];
                off += 8;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Some((nh, off, true));
                }
            }
            _ => return Some((nh, off, false)),
        }
        i += 1;
    }
    match nh {
        HOPOPTS | DSTOPTS | ROUTING | FRAGMENT => None,
        _ => Some((nh, off, false)),
    }
}

/// The fragment kind (`frag::FIRST`/`LATER`, `NONE` when unfragmented or atomic) and the
/// identification (wire order) of an IPv6 packet whose fixed header names `nh` first:
/// a second, short walk, done only when the packet was translated or is a later fragment
/// (frag.rs), so the common path does not carry these values.
#[inline(always)]
pub fn frag_header(ctx: &TcContext, mut nh: u8, mut off: usize) -> Option<(u8, u32)> {
    let mut i = 0;
    while i < MAX_EXT {
        match nh {
            HOPOPTS | DSTOPTS | ROUTING => {
                let h: [u8; 2] = ctx.load(off).ok()?;
                nh = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            FRAGMENT => {
                // RFC 8200 4.5: offset (13 bits) + 2 reserved + M, then the identification.
                let h: [u8; 4] = ctx.load(off).ok()?;
                let id: u32 = ctx.load(off + 4).ok()?;
                let fo = u16::from_be_bytes([h[2], h[3]]);
                let kind = if fo & 0xfff8 != 0 {
                    frag::LATER
                } else if fo & 1 != 0 {
                    frag::FIRST
                } else {
                    frag::NONE
                };
                return Some((kind, id));
            }
            _ => return None,
        }
        i += 1;
    }
    None
}
