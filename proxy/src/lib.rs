//! shunt: a drop-in replacement for kube-proxy.
//!
//! Data flows one way: `source` (API watchers or a manifest directory) → `model` (pure
//! kube-proxy semantics) → `plan` (pure: model → nft transaction, iptables-restore text or map
//! operations) → `dataplane` (applies a plan, reads state back) → kernel. `sync` paces the
//! syncs; `serve` answers health checks and metrics. `inspect` reads what a running shunt
//! programmed back from the kernel and traces packets through it (`shunt inspect`,
//! `shunt trace`).
pub mod config;
pub mod dataplane;
pub mod inspect;
pub mod model;
pub mod plan;
pub mod serve;
pub mod source;
pub mod sync;
