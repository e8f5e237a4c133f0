//! The change tracker: holds every object shunt consumes, validates them, and keeps the
//! per-family snapshots up to date, recomputing only the Services that changed
//! (kube-proxy's ServiceChangeTracker + EndpointsChangeTracker, in one place).
//!
//! Objects are validated when applied (a bad one is dropped as if deleted and reported);
//! every change marks the Services it affects dirty, and `take_update` recomputes only those
//! Services' ports into the cached per-family snapshots. Node-wide inputs (the Node object,
//! ServiceCIDRs, local addresses) recompute everything.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::IpNet;

use super::categorize::port_state;
use super::endpoints::{SliceInfo, merge_endpoints, parse_slice};
use super::network::{NodeInfo, node_network, parse_node, parse_service_cidr};
use super::service::parse_service;
use super::validate::{Parsed, object_ref};
use super::{
    Changed, Kind, NodeConfig, Object, ObjectRef, ServiceKey, ServicePort, ServicePortName,
    Snapshot,
};

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

/// An EndpointSlice by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SliceKey {
    namespace: String,
    name: String,
}

impl SliceKey {
    fn of(object: &ObjectRef) -> SliceKey {
        SliceKey {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
        }
    }
}

/// True if two versions of a slice program the same thing (the trigger-time annotation alone
/// changes nothing, as in kube-proxy's esInfoChanged which compares only ports and endpoints).
fn same_slice(a: &SliceInfo, b: &SliceInfo) -> bool {
    a.service == b.service
        && a.family == b.family
        && a.ports == b.ports
        && a.endpoints == b.endpoints
}

pub struct Tracker {
    config: NodeConfig,
    /// Valid, programmed Services: their ports in every family.
    services: HashMap<ServiceKey, Vec<ServicePort>>,
    /// Valid IPv4/IPv6 EndpointSlices.
    slices: HashMap<SliceKey, SliceInfo>,
    /// Slice names of each Service, ordered so that merging is deterministic.
    slices_by_service: HashMap<ServiceKey, BTreeSet<String>>,
    /// Our own Node object, if seen and valid.
    node: Option<NodeInfo>,
    service_cidrs: BTreeMap<String, Vec<IpNet>>,
    local_addresses: Vec<IpAddr>,
    /// Services to recompute at the next take_update.
    dirty: BTreeSet<ServiceKey>,
    /// Recompute everything (and report Changed::All) at the next take_update.
    all_dirty: bool,
    pending_services: HashSet<ServiceKey>,
    pending_slices: HashSet<SliceKey>,
    trigger_times: Vec<SystemTime>,
    snapshots: Vec<Snapshot>,
}

impl Tracker {
    pub fn new(config: NodeConfig) -> Tracker {
        let snapshots = config
            .families
            .iter()
            .map(|f| Snapshot {
                network: node_network(&config, *f, None, [], &[]),
                services: BTreeMap::new(),
            })
            .collect();
        Tracker {
            config,
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            node: None,
            service_cidrs: BTreeMap::new(),
            local_addresses: Vec::new(),
            dirty: BTreeSet::new(),
            // The first update always programs everything.
            all_dirty: true,
            pending_services: HashSet::new(),
            pending_slices: HashSet::new(),
            trigger_times: Vec::new(),
            snapshots,
        }
    }
    /// Validate and store an object. `Err`: the object is skipped (an earlier valid version of
    /// it is removed, as if deleted) and nothing else is affected.
    pub fn apply(&mut self, object: Object) -> Result<(), ModelError> {
        match object {
            Object::Service(svc) => {
                let r = object_ref(Kind::Service, &svc.metadata);
                match parse_service(&svc) {
                    Ok(Parsed::Valid(ports)) => {
                        self.set_service(&r, Some(ports));
                        Ok(())
                    }
                    Ok(Parsed::Ignored(_)) => {
                        self.set_service(&r, None);
                        Ok(())
                    }
                    Err(e) => {
                        self.set_service(&r, None);
                        Err(e)
                    }
                }
            }
            Object::EndpointSlice(slice) => {
                let r = object_ref(Kind::EndpointSlice, &slice.metadata);
                match parse_slice(&slice) {
                    Ok(Parsed::Valid(info)) => {
                        self.set_slice(&r, Some(info));
                        Ok(())
                    }
                    Ok(Parsed::Ignored(_)) => {
                        self.set_slice(&r, None);
                        Ok(())
                    }
                    Err(e) => {
                        self.set_slice(&r, None);
                        Err(e)
                    }
                }
            }
            Object::ServiceCidr(sc) => {
                let r = object_ref(Kind::ServiceCidr, &sc.metadata);
                match parse_service_cidr(&sc) {
                    Ok(cidrs) => {
                        self.set_service_cidr(&r.name, Some(cidrs));
                        Ok(())
                    }
                    Err(e) => {
                        self.set_service_cidr(&r.name, None);
                        Err(e)
                    }
                }
            }
            Object::Node(node) => {
                // Only this node's own object matters (addresses, zone); kube-proxy watches
                // just that one.
                if node.metadata.name.as_deref() != Some(self.config.node_name.as_str()) {
                    return Ok(());
                }
                match parse_node(&node) {
                    Ok(info) => {
                        self.set_node(Some(info));
                        Ok(())
                    }
                    Err(e) => {
                        self.set_node(None);
                        Err(e)
                    }
                }
            }
        }
    }
    pub fn delete(&mut self, object: &ObjectRef) {
        match object.kind {
            Kind::Service => self.set_service(object, None),
            Kind::EndpointSlice => self.set_slice(object, None),
            Kind::ServiceCidr => self.set_service_cidr(&object.name, None),
            Kind::Node => {
                if object.name == self.config.node_name {
                    self.set_node(None);
                }
            }
        }
    }
    /// Addresses currently on this node's interfaces, for --nodeport-addresses CIDRs.
    pub fn set_local_addresses(&mut self, addrs: Vec<IpAddr>) {
        let mut addrs = addrs;
        addrs.sort();
        addrs.dedup();
        if addrs != self.local_addresses {
            self.local_addresses = addrs;
            self.all_dirty = true;
        }
    }
    pub fn pending_changes(&self) -> PendingChanges {
        PendingChanges {
            services: self.pending_services.len(),
            endpoint_slices: self.pending_slices.len(),
        }
    }
    /// Recompute what is dirty; report what changed since the last call.
    pub fn take_update(&mut self) -> Update {
        let changed = if self.all_dirty {
            self.all_dirty = false;
            self.dirty.clear();
            self.rebuild_all();
            Changed::All
        } else {
            let dirty = std::mem::take(&mut self.dirty);
            for key in &dirty {
                self.recompute_service(key);
            }
            Changed::Services(dirty)
        };
        self.pending_services.clear();
        self.pending_slices.clear();
        Update {
            changed,
            trigger_times: std::mem::take(&mut self.trigger_times),
        }
    }
    /// One snapshot per configured family, in `NodeConfig::families` order.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }
    /// Make the next update `Changed::All` (after a failed sync, for the periodic resync).
    pub fn mark_all_dirty(&mut self) {
        self.all_dirty = true;
    }

    /// This node's zone label, for topology hints.
    pub fn node_zone(&self) -> Option<&str> {
        self.node.as_ref().and_then(|n| n.zone.as_deref())
    }

    fn set_service(&mut self, object: &ObjectRef, ports: Option<Vec<ServicePort>>) {
        let key = ServiceKey {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
        };
        if key.name.is_empty() {
            // Nameless: it cannot have been stored before.
            return;
        }
        let changed = match ports {
            Some(ports) => {
                self.services.insert(key.clone(), ports.clone()).as_ref() != Some(&ports)
            }
            None => self.services.remove(&key).is_some(),
        };
        if changed {
            self.pending_services.insert(key.clone());
            self.dirty.insert(key);
        }
    }

    fn set_slice(&mut self, object: &ObjectRef, info: Option<SliceInfo>) {
        let key = SliceKey::of(object);
        if key.name.is_empty() {
            return;
        }
        if let (Some(new), Some(old)) = (&info, self.slices.get(&key))
            && same_slice(new, old)
        {
            return;
        }
        if let Some(old) = self.slices.remove(&key) {
            if let Some(names) = self.slices_by_service.get_mut(&old.service) {
                names.remove(&key.name);
                if names.is_empty() {
                    self.slices_by_service.remove(&old.service);
                }
            }
            self.dirty.insert(old.service);
            self.pending_slices.insert(key.clone());
        }
        if let Some(info) = info {
            if let Some(t) = info.trigger_time {
                self.trigger_times.push(t);
            }
            self.slices_by_service
                .entry(info.service.clone())
                .or_default()
                .insert(key.name.clone());
            self.dirty.insert(info.service.clone());
            self.pending_slices.insert(key.clone());
            self.slices.insert(key, info);
        }
    }

    fn set_service_cidr(&mut self, name: &str, cidrs: Option<Vec<IpNet>>) {
        let changed = match cidrs {
            Some(c) => {
                self.service_cidrs
                    .insert(name.to_string(), c.clone())
                    .as_ref()
                    != Some(&c)
            }
            None => self.service_cidrs.remove(name).is_some(),
        };
        self.all_dirty |= changed;
    }

    fn set_node(&mut self, node: Option<NodeInfo>) {
        if self.node != node {
            self.node = node;
            self.all_dirty = true;
        }
    }

    fn rebuild_all(&mut self) {
        for snap in &mut self.snapshots {
            snap.network = node_network(
                &self.config,
                snap.network.family,
                self.node.as_ref(),
                self.service_cidrs.values().flatten(),
                &self.local_addresses,
            );
            snap.services.clear();
        }
        let keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
        for key in &keys {
            self.recompute_service(key);
        }
    }

    /// Replace one Service's entries in every family's snapshot.
    fn recompute_service(&mut self, key: &ServiceKey) {
        let zone = self.node.as_ref().and_then(|n| n.zone.as_deref());
        let slices: Vec<&SliceInfo> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.slices.get(&SliceKey {
                    namespace: key.namespace.clone(),
                    name: name.clone(),
                })
            })
            .collect();
        let ports = self.services.get(key);
        for snap in &mut self.snapshots {
            let old: Vec<ServicePortName> =
                snap.ports_of(key).map(|s| s.port.name.clone()).collect();
            for name in old {
                snap.services.remove(&name);
            }
            let family = snap.network.family;
            for port in ports.into_iter().flatten().filter(|p| p.family == family) {
                let endpoints = merge_endpoints(
                    slices.iter().copied(),
                    &port.name,
                    family,
                    &self.config.node_name,
                );
                let state = port_state(port.clone(), endpoints, &self.config.node_name, zone);
                snap.services.insert(port.name.clone(), state);
            }
        }
    }
}
