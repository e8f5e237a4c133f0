//! PURE: model -> what a backend programs. No I/O here; everything is table-tested.
//!
//! - `nft`: the nftables ruleset and its (full or partial) transactions.
//! - `iptables`: the iptables-restore text.
//! - `ebpf`: the BPF map contents of the eBPF datapath.
//! - `conntrack`: which stale UDP conntrack entries a sync must delete.
pub mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod nft;
