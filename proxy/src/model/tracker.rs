//! The change tracker: holds every object shunt consumes, validates them, and keeps the
//! per-family snapshots up to date, recomputing only the Services that changed
//! (kube-proxy's ServiceChangeTracker + EndpointsChangeTracker, in one place).
//!
//! SIGNATURES ONLY: bodies are written on the `model` branch.
use std::net::IpAddr;
use std::time::SystemTime;

use super::{Changed, NodeConfig, Object, ObjectRef, Snapshot};

/// Why an object was skipped. Names the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{object}: field {field}: {reason}")]
    Invalid {
        object: ObjectRef,
        field: String,
        reason: String,
    },
}

/// Changes received but not yet synced (kube-proxy's *_changes_pending gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingChanges {
    pub services: usize,
    pub endpoint_slices: usize,
}

/// What `take_update` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub changed: Changed,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlice (and Service)
    /// changes folded into this update, for kubeproxy_network_programming_duration_seconds.
    pub trigger_times: Vec<SystemTime>,
}

pub struct Tracker {}

impl Tracker {
    pub fn new(config: NodeConfig) -> Tracker {
        let _ = config;
        todo!("model branch")
    }
    /// Validate and store an object. `Err`: the object is skipped (an earlier valid version of
    /// it is removed, as if deleted) and nothing else is affected.
    pub fn apply(&mut self, object: Object) -> Result<(), ModelError> {
        let _ = object;
        todo!("model branch")
    }
    pub fn delete(&mut self, object: &ObjectRef) {
        let _ = object;
        todo!("model branch")
    }
    /// Addresses currently on this node's interfaces, for --nodeport-addresses CIDRs.
    pub fn set_local_addresses(&mut self, addrs: Vec<IpAddr>) {
        let _ = addrs;
        todo!("model branch")
    }
    pub fn pending_changes(&self) -> PendingChanges {
        todo!("model branch")
    }
    /// Recompute what is dirty; report what changed since the last call.
    pub fn take_update(&mut self) -> Update {
        todo!("model branch")
    }
    /// One snapshot per configured family, in `NodeConfig::families` order.
    pub fn snapshots(&self) -> &[Snapshot] {
        todo!("model branch")
    }
    /// Make the next update `Changed::All` (after a failed sync, for the periodic resync).
    pub fn mark_all_dirty(&mut self) {
        todo!("model branch")
    }
}
