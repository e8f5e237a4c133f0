//! IMPURE: backends that apply a plan to the kernel and read state back.
//!
//! A backend never decides Kubernetes semantics; it asks `plan` what to do and does it.
mod command;
pub mod conntrack;
pub mod conntrack_sysctl;
pub mod ebpf;
pub mod iptables;
pub mod kube_proxy_cleanup;
pub mod nftables;

pub use crate::model::Changed;
use crate::model::Snapshot;

/// One sync: the desired state of every programmed family and what changed.
#[derive(Clone, Copy, Debug)]
pub struct SyncRequest<'a> {
    /// One snapshot per family, primary family first.
    pub snapshots: &'a [Snapshot],
    pub changed: &'a Changed,
}

/// What a successful sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// True if the sync rewrote everything (a partial request may still become full).
    pub full: bool,
    /// Rules (nft rules, iptables rules, or map entries) in the programmed state, by table
    /// name as kube-proxy's `kubeproxy_sync_proxy_rules_*_total` metrics count them.
    pub rules_total: Vec<(String, u64)>,
    /// Stale UDP conntrack entries deleted.
    pub conntrack_deleted: u64,
}

/// Errors a backend reports. Each names what failed and carries the tool's own words.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{tool} failed: {stderr}")]
    Tool { tool: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// A proxy mode's backend. `sync` must be atomic per family: either the whole new state is
/// in place or the old one still is. Neither `sync` nor dropping the backend flushes state.
pub trait Dataplane: Send {
    /// `--proxy-mode` name.
    fn mode(&self) -> &'static str;
    /// Bring the kernel to the requested state.
    fn sync(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError>;
    /// Remove everything this backend ever created, and nothing else (`--cleanup`).
    fn cleanup(&mut self) -> Result<(), DataplaneError>;
}
