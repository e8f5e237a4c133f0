//! Where objects come from: the Kubernetes API (kube-rs watchers) or a directory of manifests.
//! Both send `SourceEvent`s to the sync runner over one channel.
pub mod addresses;
pub mod kube;
pub mod manifests;
mod object;

use std::net::IpAddr;
use std::path::PathBuf;

use crate::model::{Object, ObjectRef};

/// Where an event came from, for warnings that must name the file and object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Api,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Api => f.write_str("API"),
        }
    }
}

#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// An object was added or changed.
    Apply { origin: Origin, object: Object },
    /// An object is gone.
    Delete { origin: Origin, object: ObjectRef },
    /// Input that could not be read as objects (garbage YAML, unknown kind, …); skipped.
    Invalid { origin: Origin, reason: String },
    /// The addresses now assigned to this node's interfaces (all families).
    LocalAddresses(Vec<IpAddr>),
    /// Every initial list is complete: the first sync may run.
    Synced,
}
