//! SCTP translation: the same DNAT, reverse NAT and masquerade as TCP/UDP (the SCTP common
//! header starts with the two ports too, RFC 9260 3.1), only the checksum differs.
//!
//! SCTP's checksum is a CRC32c over the common header and the chunks, without any
//! pseudo-header: an address change leaves it valid (only the IPv4 header checksum
//! follows), a port change does not (the kernel's nf_nat_proto `sctp_manip_pkt` recomputes it
//! over the whole packet). Recomputing in the program would mean reading every byte of a
//! packet of up to 64 KiB. Instead the update is incremental, from the CRC's linearity over
//! GF(2): for two messages of the same length L, crc(M) ^ crc(M') = crc0(M ^ M'), where crc0
//! is the CRC without initial value and final inversion (the affine parts cancel). M ^ M' is
//! zero except in the 4 port bytes at its start, so crc0 of it is the CRC register after
//! those 4 bytes, carried through L - 4 zero bytes; carrying through n zero bytes is a
//! multiplication by x^(8n) mod P, done with O(log n) GF(2) multiplications (the method of
//! zlib's crc32_combine). A constant number of bounded, branch-free loops: cheap for the
//! verifier whatever the packet length.
//!
//! GSO and CHECKSUM_PARTIAL skbs (an SCTP socket behind a device with NETIF_F_SCTP_CRC, a
//! pod's veth for one) carry no final CRC yet: the stack or the NIC computes it later over
//! the bytes as they are then (skb_crc32c_csum_help, sctp_gso_segment), overwriting what
//! this update wrote, so the update is harmless there and right everywhere else.
use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};

use super::{Fam, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IP6_DADDR_OFF, IP6_SADDR_OFF, Pkt};

/// CRC32c (Castagnoli) polynomial, bit-reflected (RFC 9260 appendix A).
const POLY: u32 = 0x82f6_3b78;
/// x^0 in the reflected representation (the highest bit is the lowest power).
const ONE: u32 = 1 << 31;
/// x^8 mod P: carrying the register through one zero byte is a multiplication by it.
const X8: u32 = ONE >> 8;

/// `v * bit` for a bit (0 or 1) the compiler cannot see through. Every select here must be
/// a multiplication: a branch, or the mask LLVM makes of a 0/1 value (`-bit & v`, an
/// arithmetic shift to 0 or -1), makes the verifier (Linux 6.18) walk both values, and with
/// hundreds of them in a row without a pruning point in between it gives up (1M insns).
/// The volatile read hides that `bit` is 0 or 1 from LLVM.
#[inline(always)]
fn times_bit(v: u32, bit: u32) -> u32 {
    // SAFETY: read of a local.
    v.wrapping_mul(unsafe { core::ptr::read_volatile(&bit) })
}

/// b * x mod P (reflected: a right shift, the polynomial folded in for the dropped x^31).
#[inline(always)]
fn times_x(b: u32) -> u32 {
    (b >> 1) ^ times_bit(POLY, b & 1)
}

/// a * b mod P, both reflected.
#[inline(always)]
fn mul(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        // Bit i of `a` (from the top) is the coefficient of x^i.
        p ^= times_bit(b, (a >> (31 - i)) & 1);
        b = times_x(b);
        i += 1;
    }
    p
}

/// crc0 of `delta` (4 bytes, as loaded from the packet) followed by `zeros` zero bytes:
/// the value to XOR into the stored CRC. Not inlined: a call without stack of its own,
/// instead of a copy of the loops at every rewrite.
#[inline(never)]
fn crc_delta(delta: u32, zeros: u32) -> u32 {
    // The register after the 4 bytes (byte 0 enters first: the low byte when loaded
    // little-endian, bpfel).
    let mut r = u32::from_le(delta);
    let mut i = 0;
    while i < 32 {
        r = times_x(r);
        i += 1;
    }
    // r * x^(8 * zeros): one factor x^(8 * 2^k) per set bit k of `zeros` (< 2^16: an IP
    // payload length), each factor the previous one squared.
    // The factor is x^0 where the bit is clear, picked arithmetically (see `times_bit`).
    let mut f = X8;
    let mut k = 0;
    while k < 16 {
        r = mul(ONE ^ times_bit(f ^ ONE, (zeros >> k) & 1), r);
        f = mul(f, f);
        k += 1;
    }
    r
}

/// Rewrite the destination (`dst`) or source address and port of an SCTP packet. The
/// address: IPv4 header checksum only (no pseudo-header in the CRC). The CRC is fixed once
/// for all rewrites of the packet by [`fix_crc`], called from `try_ingress` after the
/// translation steps: one call site per family keeps the verifier's work (it walks a
/// callee once per call site) small.
#[inline(always)]
pub fn rewrite<F: Fam>(
    ctx: &TcContext,
    p: &Pkt<F::A>,
    dst: bool,
    addr: F::A,
    port: u16,
) -> Result<(), ()> {
    let (old_addr, old_port) = if dst {
        (p.daddr, p.dport)
    } else {
        (p.saddr, p.sport)
    };
    if old_addr != addr {
        let off = if F::BITS == 32 {
            let mut from = old_addr;
            let mut to = addr;
            // SAFETY: helper call with two 4-byte stack buffers.
            let d = unsafe {
                bpf_csum_diff(
                    &mut from as *mut F::A as *mut u32,
                    4,
                    &mut to as *mut F::A as *mut u32,
                    4,
                    0,
                )
            };
            if d < 0 {
                return Err(());
            }
            ctx.l3_csum_replace(IP_CSUM_OFF, 0, u64::from(d as u32), 0)
                .map_err(|_| ())?;
            if dst { IP_DADDR_OFF } else { IP_SADDR_OFF }
        } else if dst {
            IP6_DADDR_OFF
        } else {
            IP6_SADDR_OFF
        };
        ctx.store(off, &addr, 0).map_err(|_| ())?;
    }
    if old_port != port {
        ctx.store(p.l4_off + if dst { 2 } else { 0 }, &port, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// After the translation of an SCTP packet: update its CRC32c for the port change, the
/// difference between the ports the packet arrived with (`p`, as parsed) and the ones it
/// has now (see the module docs). Nothing when the ports are unchanged.
#[inline(never)]
pub fn fix_crc<F: Fam>(ctx: &TcContext, p: &Pkt<F::A>) -> Result<(), ()> {
    let now: u32 = ctx.load(p.l4_off).map_err(|_| ())?;
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&p.sport.to_ne_bytes());
    b[2..].copy_from_slice(&p.dport.to_ne_bytes());
    let before = u32::from_ne_bytes(b);
    if now == before {
        return Ok(());
    }
    // The CRC covers the whole SCTP packet: the IP payload.
    let zeros = p.l4_len.checked_sub(4).ok_or(())?;
    let d = crc_delta(now ^ before, zeros);
    let crc: u32 = ctx.load(p.l4_off + 8).map_err(|_| ())?;
    // Stored little-endian (the kernel's sctp_compute_cksum: cpu_to_le32).
    let crc = (u32::from_le(crc) ^ d).to_le();
    ctx.store(p.l4_off + 8, &crc, 0).map_err(|_| ())
}
