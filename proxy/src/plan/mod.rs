//! (being written)
pub mod ebpf;
