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
    let mut kind = frag::NONE;
    let mut id = 0;
    let r = walk(ctx, nh, off, &mut kind, &mut id)?;
    if kind == frag::LATER {
        return None;
    }
    Some(r)
}

/// [`skip`], except that a later fragment (fragment offset > 0) ends the walk after its
/// fragment header: the protocol named there and the offset of the fragment's data, with
/// `kind` = `frag::LATER`. A first fragment (offset 0, M set) gives `frag::FIRST`; both
/// set `id` to the fragment header's identification (wire order). `kind` is left alone
/// for an unfragmented packet.
#[inline(always)]
pub fn walk(
    ctx: &TcContext,
    mut nh: u8,
    mut off: usize,
    kind: &mut u8,
    id: &mut u32,
) -> Option<(u8, usize)> {
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
                // Next header, reserved, offset (13 bits) + 2 reserved bits + M,
                // identification (32 bits); 8 bytes in all (RFC 8200 4.5).
                let h: [u8; 4] = ctx.load(off).ok()?;
                let fo = u16::from_be_bytes([h[2], h[3]]);
                nh = h[0];
                if fo & 0xfff9 != 0 {
                    *id = ctx.load(off + 4).ok()?;
                }
                off += 8;
                if fo & 0xfff8 != 0 {
                    *kind = frag::LATER;
                    return Some((nh, off));
                }
                if fo & 1 != 0 {
                    *kind = frag::FIRST;
                }
            }
            _ => return Some((nh, off)),
        }
        i += 1;
    }
    match nh {
        HOPOPTS | DSTOPTS | ROUTING | FRAGMENT => None,
        _ => Some((nh, off)),
    }
}
