//! PURE: model snapshots -> the nftables ruleset of table `shunt` (families `ip` and `ip6`)
//! and the transaction that programs it, modelled on kube-proxy's nftables proxier
//! (pkg/proxy/nftables/proxier.go).
//!
//! Layout of each family's table (same hooks and priorities as kube-proxy):
//! - base chains `filter-{prerouting,input,forward,output}` (filter, dstnat-10),
//!   `filter-output-post-dnat` (filter, output, dstnat+10), `nat-{prerouting,output}`
//!   (nat, dstnat) and `nat-postrouting` (nat, srcnat);
//! - `services`: `daddr . l4proto . dport vmap @service-ips` and, for NodePort destinations
//!   (`@nodeport-ips` or `fib daddr type local`), `l4proto . dport vmap @service-nodeports`;
//! - `service-endpoints-check` / `nodeport-endpoints-check`: `@no-endpoint-services` /
//!   `@no-endpoint-nodeports` (drop, or goto `reject-chain`);
//! - `firewall-check`: `@firewall-ips` -> per-service `firewall-*` chains (source ranges);
//! - `cluster-ips-check`: reject traffic to `@cluster-ips` that DNAT left alone (wrong
//!   port/protocol), drop the rest of the service CIDRs (unallocated ClusterIPs);
//! - `mark-for-masquerade` (mark |= 0x4000) and `masquerading` (postrouting);
//! - per service port: `service-*` (Cluster policy), `local-*` (Local policy), `external-*`,
//!   `firewall-*`, `endpoint-*` chains and `affinity-*` timed sets; the service chains pick
//!   an endpoint with `numgen random mod N offset K vmap @endpoint-picks`, each chain owning
//!   the slots `[K, K + N)` of that one map (see `ir::Verdict::Pick` for why).
pub mod build;
pub mod ir;
pub mod names;
pub mod text;
pub mod tx;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
pub mod trace;

pub use build::{NodeFragment, PickSlots, Ruleset, ServiceFragment, ruleset, ruleset_reusing};
pub use tx::{FamilyOps, KernelSet, KernelTable, NeedsFull, Op, Transaction};
