//! Map keys and values shared by the kernel programs (`shunt-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with integer fields only and explicit padding, so that the
//! layout the verifier sees is the layout userspace writes; each size is asserted at compile
//! time. With the `user` feature each type implements `aya::Pod`, which is sound only because
//! of those rules (no enums, no `Option`, no implicit padding).
#![no_std]

/// Per-CPU counter slots of the `SHUNT_STATS` array.
pub mod stat {
    pub const PACKETS_SEEN: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// One per-CPU counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), integer fields only, no padding (asserted above).
    unsafe impl aya::Pod for super::Counter {}
}
