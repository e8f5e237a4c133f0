//! IPv4-mapped destinations (`::ffff:a.b.c.d`, RFC 4291 2.5.5.2) at the IPv6 socket hooks.
//!
//! A dual-stack `AF_INET6` socket (IPV6_V6ONLY off, Linux's default) reaches IPv4 peers
//! through mapped addresses, and the kernel runs only the *6 hooks for them where it runs
//! any: connect(2) runs `connect6` (`pre_connect` of tcpv6/udpv6, before tcp_v6_connect and
//! __ip6_datagram_connect hand a mapped address to their IPv4 halves, which run no hook);
//! recvmsg and getpeername run `recvmsg6`/`getpeername6` with the peer mapped
//! (udpv6_recvmsg, inet6_getname). An unconnected UDP `sendto` is the exception:
//! udpv6_sendmsg hands a mapped destination to udp_sendmsg before its own hook, and
//! udp_sendmsg runs `sendmsg4` on the IPv6 socket; `sendmsg6` still handles a mapped address
//! so that it stays right should the kernel move its hook.
//!
//! Without this, a node process with such a socket reaches a ClusterIP untranslated (it
//! bypasses the Service). The mapped address is looked up in the IPv4 maps and the chosen
//! IPv4 backend written back mapped, so the socket stays IPv6; the reverse maps are the
//! IPv4 ones (socket cookies are unique across families), which is also where `sendmsg4`
//! records the UDP case above, so `recvmsg6` shows the frontend either way. Cilium's sock6
//! hooks do the same for v4-in-v6 (bpf/bpf_sock.c: a v4 view of the address, then the
//! sock4 translation).
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::programs::SockAddrContext;

use super::{Fam, V4, V6, sock_forward, sock_reverse};

/// How a socket hook reads and writes the user address in family `F`'s form.
pub(super) trait SockUser<F: Fam> {
    fn get(sa: &bpf_sock_addr) -> F::A;
    fn set(sa: &mut bpf_sock_addr, a: F::A);
}

/// The hook's own family: `user_ip4` for the *4 hooks, `user_ip6` for the *6 hooks.
pub(super) struct Native;

impl<F: Fam> SockUser<F> for Native {
    #[inline(always)]
    fn get(sa: &bpf_sock_addr) -> F::A {
        F::user_addr(sa)
    }
    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, a: F::A) {
        F::set_user_addr(sa, a)
    }
}

/// An IPv4 address mapped into an *6 hook's `user_ip6` (words in network order, as in
/// `user_ip4` and the IPv4 maps).
struct Mapped;

impl SockUser<V4> for Mapped {
    #[inline(always)]
    fn get(sa: &bpf_sock_addr) -> u32 {
        // One 4-byte load at a constant offset (see V6::user_addr).
        // SAFETY: in-bounds field of the context.
        unsafe { core::ptr::read_volatile(&sa.user_ip6[3]) }
    }
    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, a: u32) {
        // The prefix words are rewritten too: 4-byte writes at constant offsets, which the
        // context rewriter accepts (sock_addr_is_valid_access).
        // SAFETY: in-bounds fields of the context.
        unsafe {
            core::ptr::write_volatile(&mut sa.user_ip6[0], 0);
            core::ptr::write_volatile(&mut sa.user_ip6[1], 0);
            core::ptr::write_volatile(&mut sa.user_ip6[2], 0xffffu32.to_be());
            core::ptr::write_volatile(&mut sa.user_ip6[3], a);
        }
    }
}

/// `::ffff:0:0/96`.
#[inline(always)]
fn is_mapped(sa: &bpf_sock_addr) -> bool {
    // SAFETY: in-bounds fields of the context, one 4-byte load each.
    let (w0, w1, w2) = unsafe {
        (
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
        )
    };
    w0 == 0 && w1 == 0 && u32::from_be(w2) == 0xffff
}

/// connect6/sendmsg6: a mapped destination through the IPv4 services, else IPv6.
#[inline(always)]
pub(super) fn forward6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    if is_mapped(unsafe { &*ctx.sock_addr }) {
        sock_forward::<V4, Mapped>(ctx)
    } else {
        sock_forward::<V6, Native>(ctx)
    }
}

/// recvmsg6/getpeername6: a mapped peer through the IPv4 reverse map, else IPv6.
#[inline(always)]
pub(super) fn reverse6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    if is_mapped(unsafe { &*ctx.sock_addr }) {
        sock_reverse::<V4, Mapped>(ctx)
    } else {
        sock_reverse::<V6, Native>(ctx)
    }
}
