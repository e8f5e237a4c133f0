//! PURE: Kubernetes objects in, per-node service ports and endpoint sets out.
//!
//! kube-proxy's semantics live here (pkg/proxy: servicechangetracker.go,
//! endpointschangetracker.go, topology.go's CategorizeEndpoints). Nothing in this module does
//! I/O; the tracker is fed objects by `source/` and read by `sync.rs`.
pub mod categorize;
pub mod endpoints;
pub mod network;
pub mod service;
mod tracker;
mod types;
pub mod validate;

#[cfg(test)]
pub(crate) mod scenario_fixture;
#[cfg(test)]
mod scenario_tests;

pub use tracker::{ModelError, PendingChanges, Tracker, Update};
pub use types::*;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

/// The kinds of object shunt consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    ServiceCidr,
    Node,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceCidr => "ServiceCIDR",
            Kind::Node => "Node",
        })
    }
}

/// An object of one of those kinds.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    ServiceCidr(Box<ServiceCIDR>),
    Node(Box<Node>),
}

/// Identity of an object: kind, namespace ("" for cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}
