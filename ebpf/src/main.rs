//! shunt's kernel programs. Built for `bpfel-unknown-none` by `proxy/build.rs` (aya-build);
//! on the host this crate is an empty binary so that `cargo test` and `clippy` can include it.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
