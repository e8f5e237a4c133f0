//! (being written)
pub mod iptables;
