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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DetectLocal, IpFamily, NodePortIps};
    use serde_json::{Value, json};

    fn config(families: Vec<IpFamily>) -> NodeConfig {
        NodeConfig {
            node_name: "me".into(),
            families,
            detect_local: DetectLocal::None,
            masquerade_all: false,
            node_port_addresses: vec![],
        }
    }

    fn service(ns: &str, name: &str, spec: Value) -> Object {
        Object::Service(Box::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name}, "spec": spec}))
            .unwrap(),
        ))
    }

    fn simple_service(ns: &str, name: &str, ip: &str) -> Object {
        service(
            ns,
            name,
            json!({"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}),
        )
    }

    fn slice_json(ns: &str, name: &str, svc: &str, family: &str, addrs: &[&str]) -> Value {
        let eps: Vec<Value> = addrs
            .iter()
            .map(|a| json!({"addresses": [a], "nodeName": "me"}))
            .collect();
        json!({
            "metadata": {"namespace": ns, "name": name,
                "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family,
            "ports": [{"name": "p", "port": 8080}],
            "endpoints": eps,
        })
    }

    fn slice(ns: &str, name: &str, svc: &str, addrs: &[&str]) -> Object {
        slice_obj(slice_json(ns, name, svc, "IPv4", addrs))
    }

    fn slice_obj(v: Value) -> Object {
        Object::EndpointSlice(Box::new(serde_json::from_value(v).unwrap()))
    }

    fn node(name: &str, zone: Option<&str>, addrs: &[&str]) -> Object {
        let addresses: Vec<Value> = addrs
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .collect();
        let mut meta = json!({"name": name});
        if let Some(z) = zone {
            meta["labels"] = json!({"topology.kubernetes.io/zone": z});
        }
        Object::Node(Box::new(
            serde_json::from_value(json!({"metadata": meta,
                "status": {"addresses": addresses}}))
            .unwrap(),
        ))
    }

    fn service_cidr(name: &str, cidrs: &[&str]) -> Object {
        Object::ServiceCidr(Box::new(
            serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"cidrs": cidrs}}))
            .unwrap(),
        ))
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn oref(kind: Kind, ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn services(keys: &[(&str, &str)]) -> Changed {
        Changed::Services(keys.iter().map(|(n, s)| key(n, s)).collect())
    }

    /// Endpoint addresses of every port of a Service in the first snapshot.
    fn endpoints_of(t: &Tracker, ns: &str, name: &str) -> Vec<String> {
        let k = key(ns, name);
        t.snapshots()[0]
            .ports_of(&k)
            .flat_map(|s| s.endpoints.iter().map(|e| e.addr().to_string()))
            .collect()
    }

    /// A tracker with two Services (a, b) each with one slice, already taken once.
    fn settled() -> Tracker {
        let mut t = Tracker::new(config(vec![IpFamily::V4]));
        t.apply(simple_service("ns", "a", "10.96.0.1")).unwrap();
        t.apply(simple_service("ns", "b", "10.96.0.2")).unwrap();
        t.apply(slice("ns", "a-1", "a", &["10.0.0.1"])).unwrap();
        t.apply(slice("ns", "b-1", "b", &["10.0.1.1"])).unwrap();
        assert_eq!(t.take_update().changed, Changed::All);
        t
    }

    enum Step {
        Apply(Object),
        Delete(ObjectRef),
        LocalAddresses(Vec<&'static str>),
        MarkAll,
    }

    #[test]
    fn changes_table() {
        use Step::*;
        struct Case {
            name: &'static str,
            steps: Vec<Step>,
            changed: Changed,
            /// Endpoints of Services a and b afterwards.
            a: Vec<&'static str>,
            b: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "nothing",
                steps: vec![],
                changed: services(&[]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "re-applying an identical object changes nothing",
                steps: vec![
                    Apply(simple_service("ns", "a", "10.96.0.1")),
                    Apply(slice("ns", "a-1", "a", &["10.0.0.1"])),
                ],
                changed: services(&[]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "slice changed",
                steps: vec![Apply(slice("ns", "a-1", "a", &["10.0.0.1", "10.0.0.2"]))],
                changed: services(&[("ns", "a")]),
                a: vec!["10.0.0.1:8080", "10.0.0.2:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "slice added",
                steps: vec![Apply(slice("ns", "b-2", "b", &["10.0.1.2"]))],
                changed: services(&[("ns", "b")]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080", "10.0.1.2:8080"],
            },
            Case {
                name: "slice deleted",
                steps: vec![Delete(oref(Kind::EndpointSlice, "ns", "a-1"))],
                changed: services(&[("ns", "a")]),
                a: vec![],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "slice moved from a to b",
                steps: vec![Apply(slice("ns", "a-1", "b", &["10.0.0.1"]))],
                changed: services(&[("ns", "a"), ("ns", "b")]),
                a: vec![],
                b: vec!["10.0.0.1:8080", "10.0.1.1:8080"],
            },
            Case {
                name: "slice in another namespace does not attach",
                steps: vec![Apply(slice("other", "a-9", "a", &["10.0.0.9"]))],
                changed: services(&[("other", "a")]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "service deleted",
                steps: vec![Delete(oref(Kind::Service, "ns", "b"))],
                changed: services(&[("ns", "b")]),
                a: vec!["10.0.0.1:8080"],
                b: vec![],
            },
            Case {
                name: "service deleted and re-added finds its slices again",
                steps: vec![
                    Delete(oref(Kind::Service, "ns", "b")),
                    Apply(simple_service("ns", "b", "10.96.0.2")),
                ],
                // Listed although the end state equals the start: allowed, and cheap.
                changed: services(&[("ns", "b")]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "service port renamed: slices no longer match",
                steps: vec![Apply(service(
                    "ns",
                    "b",
                    json!({"clusterIP": "10.96.0.2", "ports": [{"name": "q", "port": 80}]}),
                ))],
                changed: services(&[("ns", "b")]),
                a: vec!["10.0.0.1:8080"],
                b: vec![],
            },
            Case {
                name: "service becomes ignored (label)",
                steps: vec![Apply(Object::Service(Box::new(
                    serde_json::from_value(json!({
                        "metadata": {"namespace": "ns", "name": "b",
                            "labels": {"service.kubernetes.io/service-proxy-name": "x"}},
                        "spec": {"clusterIP": "10.96.0.2", "ports": [{"name": "p", "port": 80}]}}))
                    .unwrap(),
                )))],
                changed: services(&[("ns", "b")]),
                a: vec!["10.0.0.1:8080"],
                b: vec![],
            },
            Case {
                name: "slice becomes ignored (label)",
                steps: vec![Apply(slice_obj({
                    let mut v = slice_json("ns", "a-1", "a", "IPv4", &["10.0.0.1"]);
                    v["metadata"]["labels"]["service.kubernetes.io/headless"] = "".into();
                    v
                }))],
                changed: services(&[("ns", "a")]),
                a: vec![],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "invalid service version removes the old one",
                steps: vec![Apply(service(
                    "ns",
                    "a",
                    json!({"clusterIP": "10.96.0.1", "ports": [{"name": "p", "port": 0}]}),
                ))],
                changed: services(&[("ns", "a")]),
                a: vec![],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "invalid slice version removes the old one",
                steps: vec![Apply(slice("ns", "b-1", "b", &["10.0.1.x"]))],
                changed: services(&[("ns", "b")]),
                a: vec!["10.0.0.1:8080"],
                b: vec![],
            },
            Case {
                name: "several changes to several services",
                steps: vec![
                    Apply(slice("ns", "a-1", "a", &["10.0.0.5"])),
                    Apply(slice("ns", "b-1", "b", &["10.0.1.5"])),
                    Apply(slice("ns", "a-1", "a", &["10.0.0.6"])),
                ],
                changed: services(&[("ns", "a"), ("ns", "b")]),
                a: vec!["10.0.0.6:8080"],
                b: vec!["10.0.1.5:8080"],
            },
            Case {
                name: "node changed",
                steps: vec![Apply(node("me", None, &["192.168.0.2"]))],
                changed: Changed::All,
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "another node is ignored",
                steps: vec![Apply(node("other", None, &["192.168.0.3"]))],
                changed: services(&[]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "service CIDR added",
                steps: vec![Apply(service_cidr("kubernetes", &["10.96.0.0/16"]))],
                changed: Changed::All,
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "deleting an unknown service CIDR changes nothing",
                steps: vec![Delete(oref(Kind::ServiceCidr, "", "nope"))],
                changed: services(&[]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "local addresses changed",
                steps: vec![LocalAddresses(vec!["192.168.0.2"])],
                changed: Changed::All,
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "local addresses unchanged",
                steps: vec![LocalAddresses(vec![])],
                changed: services(&[]),
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
            Case {
                name: "mark_all_dirty",
                steps: vec![MarkAll],
                changed: Changed::All,
                a: vec!["10.0.0.1:8080"],
                b: vec!["10.0.1.1:8080"],
            },
        ];
        for c in cases {
            let mut t = settled();
            for step in c.steps {
                match step {
                    Apply(o) => {
                        let _ = t.apply(o);
                    }
                    Delete(r) => t.delete(&r),
                    LocalAddresses(a) => {
                        t.set_local_addresses(a.iter().map(|s| s.parse().unwrap()).collect())
                    }
                    MarkAll => t.mark_all_dirty(),
                }
            }
            assert_eq!(t.take_update().changed, c.changed, "{}", c.name);
            assert_eq!(endpoints_of(&t, "ns", "a"), c.a, "{}: a", c.name);
            assert_eq!(endpoints_of(&t, "ns", "b"), c.b, "{}: b", c.name);
            // Everything was consumed: the next update is empty.
            assert_eq!(t.take_update().changed, services(&[]), "{}: again", c.name);
        }
    }

    #[test]
    fn first_update_is_all_even_when_empty() {
        let mut t = Tracker::new(config(vec![IpFamily::V4, IpFamily::V6]));
        assert_eq!(t.snapshots().len(), 2);
        assert_eq!(t.take_update().changed, Changed::All);
        assert_eq!(t.take_update().changed, services(&[]));
        let fams: Vec<IpFamily> = t.snapshots().iter().map(|s| s.network.family).collect();
        assert_eq!(fams, vec![IpFamily::V4, IpFamily::V6]);
    }

    #[test]
    fn invalid_objects_are_reported_and_isolated() {
        let cases: Vec<(Object, &str, &str)> = vec![
            (
                service(
                    "ns",
                    "bad",
                    json!({"clusterIP": "10.96.0.9",
                        "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 0}]}),
                ),
                "Service ns/bad",
                "spec.ports[1].port",
            ),
            (
                slice_obj(json!({"metadata": {"namespace": "ns", "name": "orphan"},
                    "addressType": "IPv4", "endpoints": []})),
                "EndpointSlice ns/orphan",
                "metadata.labels[kubernetes.io/service-name]",
            ),
            (
                node("me", None, &["not-an-ip"]),
                "Node me",
                "status.addresses[0].address",
            ),
            (
                service_cidr("kubernetes", &["10.96.0.0/16", "x"]),
                "ServiceCIDR kubernetes",
                "spec.cidrs[1]",
            ),
        ];
        for (obj, want_obj, want_field) in cases {
            let mut t = settled();
            let err = t.apply(obj).expect_err(want_field);
            let ModelError::Invalid { object, field, .. } = &err;
            assert_eq!(object.to_string(), want_obj);
            assert_eq!(field, want_field);
            assert!(err.to_string().contains(want_field), "{err}");
            t.take_update();
            // Every other Service unaffected.
            assert_eq!(endpoints_of(&t, "ns", "a"), vec!["10.0.0.1:8080"]);
            assert_eq!(endpoints_of(&t, "ns", "b"), vec!["10.0.1.1:8080"]);
        }
    }

    #[test]
    fn pending_changes_count_distinct_objects() {
        let mut t = settled();
        assert_eq!(t.pending_changes(), PendingChanges::default());
        t.apply(simple_service("ns", "c", "10.96.0.3")).unwrap();
        t.apply(simple_service("ns", "c", "10.96.0.4")).unwrap();
        t.apply(slice("ns", "a-1", "a", &["10.0.0.7"])).unwrap();
        t.apply(slice("ns", "a-1", "a", &["10.0.0.8"])).unwrap();
        t.apply(slice("ns", "a-2", "a", &["10.0.0.9"])).unwrap();
        t.delete(&oref(Kind::Service, "ns", "b"));
        assert_eq!(
            t.pending_changes(),
            PendingChanges {
                services: 2,
                endpoint_slices: 2
            }
        );
        t.take_update();
        assert_eq!(t.pending_changes(), PendingChanges::default());
    }

    #[test]
    fn trigger_times_are_collected_once() {
        let mut t = settled();
        let mut v = slice_json("ns", "a-1", "a", "IPv4", &["10.0.0.2"]);
        v["metadata"]["annotations"] =
            json!({"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"});
        t.apply(slice_obj(v)).unwrap();
        let mut v = slice_json("ns", "b-1", "b", "IPv4", &["10.0.1.2"]);
        v["metadata"]["annotations"] =
            json!({"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:01Z"});
        t.apply(slice_obj(v)).unwrap();
        let u = t.take_update();
        let base = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_714_557_600);
        assert_eq!(
            u.trigger_times,
            vec![base, base + std::time::Duration::from_secs(1)]
        );
        assert!(t.take_update().trigger_times.is_empty());
    }

    #[test]
    fn dual_stack_snapshots() {
        let mut t = Tracker::new(config(vec![IpFamily::V6, IpFamily::V4]));
        t.apply(node("me", None, &["192.168.0.2", "2001:db8::2"]))
            .unwrap();
        t.apply(service_cidr(
            "kubernetes",
            &["10.96.0.0/16", "fd00:96::/112"],
        ))
        .unwrap();
        t.apply(service(
            "ns",
            "ds",
            json!({"type": "NodePort", "clusterIPs": ["10.96.0.1", "fd00:96::1"],
                "ports": [{"name": "p", "port": 80, "nodePort": 30080}]}),
        ))
        .unwrap();
        t.apply(slice("ns", "ds-v4", "ds", &["10.0.0.1"])).unwrap();
        t.apply(slice_obj(slice_json(
            "ns",
            "ds-v6",
            "ds",
            "IPv6",
            &["fd00:1::1"],
        )))
        .unwrap();
        t.take_update();
        let snaps = t.snapshots();
        let k = key("ns", "ds");
        let summary = |s: &Snapshot| -> (IpFamily, Option<String>, Vec<String>, Vec<String>) {
            let st: Vec<&crate::model::ServicePortState> = s.ports_of(&k).collect();
            (
                s.network.family,
                s.network.primary_ip.map(|i| i.to_string()),
                s.network
                    .service_cidrs
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
                st.iter()
                    .flat_map(|p| {
                        std::iter::once(p.port.cluster_ip.to_string())
                            .chain(p.endpoints.iter().map(|e| e.addr().to_string()))
                    })
                    .collect(),
            )
        };
        assert_eq!(
            summary(&snaps[0]),
            (
                IpFamily::V6,
                Some("2001:db8::2".into()),
                vec!["fd00:96::/112".into()],
                vec!["fd00:96::1".into(), "[fd00:1::1]:8080".into()]
            )
        );
        assert_eq!(
            summary(&snaps[1]),
            (
                IpFamily::V4,
                Some("192.168.0.2".into()),
                vec!["10.96.0.0/16".into()],
                vec!["10.96.0.1".into(), "10.0.0.1:8080".into()]
            )
        );
        assert_eq!(
            snaps[1].network.node_port_ips,
            NodePortIps::Addresses(vec!["192.168.0.2".parse().unwrap()])
        );
    }

    #[test]
    fn node_zone_drives_topology() {
        let mut t = Tracker::new(config(vec![IpFamily::V4]));
        t.apply(simple_service("ns", "a", "10.96.0.1")).unwrap();
        t.apply(slice_obj(json!({
            "metadata": {"namespace": "ns", "name": "a-1",
                "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "zone-a"}]}},
                {"addresses": ["10.0.0.2"], "hints": {"forZones": [{"name": "zone-b"}]}},
            ],
        })))
        .unwrap();
        let cluster = |t: &Tracker| -> Vec<String> {
            t.snapshots()[0]
                .ports_of(&key("ns", "a"))
                .flat_map(|s| s.cluster_endpoints.iter().map(|e| e.ip.to_string()))
                .collect()
        };
        // (node zone, cluster endpoints)
        let cases: Vec<(Option<&str>, Vec<&str>)> = vec![
            (None, vec!["10.0.0.1", "10.0.0.2"]),
            (Some("zone-a"), vec!["10.0.0.1"]),
            (Some("zone-b"), vec!["10.0.0.2"]),
            (Some("zone-c"), vec!["10.0.0.1", "10.0.0.2"]),
        ];
        for (zone, want) in cases {
            t.apply(node("me", zone, &["192.168.0.2"])).unwrap();
            t.take_update();
            assert_eq!(t.node_zone(), zone);
            assert_eq!(cluster(&t), want, "{zone:?}");
        }
    }

    #[test]
    fn deleting_our_node_clears_network() {
        let mut t = Tracker::new(config(vec![IpFamily::V4]));
        t.apply(node("me", None, &["192.168.0.2"])).unwrap();
        t.take_update();
        assert!(t.snapshots()[0].network.primary_ip.is_some());
        t.delete(&oref(Kind::Node, "", "other"));
        assert_eq!(t.take_update().changed, services(&[]));
        t.delete(&oref(Kind::Node, "", "me"));
        assert_eq!(t.take_update().changed, Changed::All);
        assert_eq!(t.snapshots()[0].network.primary_ip, None);
    }

    /// 10,000 Services x 10 endpoints: one slice change recomputes only its Service, and the
    /// cached state of every other Service stays as it was.
    #[test]
    fn ten_thousand_services_one_change() {
        const N: usize = 10_000;
        let mut t = Tracker::new(config(vec![IpFamily::V4]));
        for i in 0..N {
            let name = format!("svc-{i}");
            let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            t.apply(simple_service("ns", &name, &ip)).unwrap();
            let addrs: Vec<String> = (0..10)
                .map(|j| format!("10.{}.{}.{}", 1 + i / 250, i % 250, j + 1))
                .collect();
            let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            t.apply(slice("ns", &format!("{name}-x"), &name, &addrs))
                .unwrap();
        }
        assert_eq!(
            t.pending_changes(),
            PendingChanges {
                services: N,
                endpoint_slices: N
            }
        );
        assert_eq!(t.take_update().changed, Changed::All);
        assert_eq!(t.snapshots()[0].services.len(), N);
        let before = t.snapshots()[0].clone();

        t.apply(slice("ns", "svc-42-x", "svc-42", &["10.250.0.1"]))
            .unwrap();
        let u = t.take_update();
        assert_eq!(u.changed, services(&[("ns", "svc-42")]));
        assert_eq!(endpoints_of(&t, "ns", "svc-42"), vec!["10.250.0.1:8080"]);
        let after = &t.snapshots()[0];
        assert_eq!(after.services.len(), N);
        let differing: Vec<&ServicePortName> = after
            .services
            .iter()
            .filter(|(k, v)| before.services.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(differing.len(), 1);
        assert_eq!(differing[0].service, key("ns", "svc-42"));
        for s in after.services.values() {
            assert_eq!(
                s.endpoints.len(),
                if s.port.name.service.name == "svc-42" {
                    1
                } else {
                    10
                }
            );
        }
    }
}
