//! The per-node model every mode programs from. Plain data: no I/O, no Kubernetes client
//! types, so that plans can be computed and tested in isolation.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

/// L4 protocol of a service port (Kubernetes `Protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case name, as nft and iptables spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    /// IANA protocol number (IPPROTO_*).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// IP family. Each proxier instance programs one family, as kube-proxy's do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
    pub fn of_net(net: &IpNet) -> IpFamily {
        match net {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }
    /// nft's table family / address keyword (`ip`, `ip6`).
    pub fn nft(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
}

/// A Service by namespace and name (kube's NamespacedName).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service in one family: kube-proxy's `ServicePortName` plus family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub service: ServiceKey,
    /// The Service port's `name` ("" for a single unnamed port).
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// kube-proxy's spelling: `ns/name:port` (`ns/name` when the port is unnamed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// `trafficDistribution` of a Service (spec.trafficDistribution).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TrafficDistribution {
    PreferClose,
    PreferSameZone,
    PreferSameNode,
    /// A value this version does not know: kube-proxy ignores it.
    Other(String),
}

/// Everything about one service port that does not depend on endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub family: IpFamily,
    /// The ClusterIP of this family.
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// spec.externalIPs of this family.
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress[].ip of this family (ipMode VIP or unset).
    pub load_balancer_ips: Vec<IpAddr>,
    /// spec.loadBalancerSourceRanges of this family, whitespace trimmed.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// ClientIP session affinity timeout in seconds; None for affinity None.
    pub affinity_timeout_seconds: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// spec.healthCheckNodePort, for eTP Local LoadBalancer Services.
    pub health_check_node_port: Option<u16>,
    pub traffic_distribution: Option<TrafficDistribution>,
}

impl ServicePort {
    /// True if anything but the ClusterIP reaches this port (kube-proxy's "external" traffic).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// One endpoint (address and target port) of a service port, merged from EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// endpoints[].nodeName == this node.
    pub is_local: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// hints.forZones[].name
    pub zone_hints: Vec<String>,
    /// hints.forNodes[].name
    pub node_hints: Vec<String>,
}

impl Endpoint {
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

/// A service port with its endpoints categorized as kube-proxy's CategorizeEndpoints does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortState {
    pub port: ServicePort,
    /// Every endpoint from every slice, deduplicated, in a stable order.
    pub endpoints: Vec<Endpoint>,
    /// Endpoints for Cluster traffic policy (empty when no policy uses them).
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints for Local traffic policy (empty when no policy uses them).
    pub local_endpoints: Vec<Endpoint>,
    /// True if the Service has any usable endpoint anywhere in the cluster.
    pub has_any_endpoints: bool,
}

impl ServicePortState {
    /// Endpoints internal (ClusterIP) traffic may use.
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        if self.port.internal_policy_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }
    /// Endpoints external (NodePort, LB, externalIP) traffic may use.
    pub fn external_endpoints(&self) -> &[Endpoint] {
        if self.port.external_policy_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }
}

/// How pod traffic is told apart from other traffic (kube-proxy --detect-local-mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LocalDetector {
    /// No way to tell: every source is treated as non-local (kube-proxy's no-op detector).
    None,
    /// Sources inside these CIDRs (of this family) are pods.
    ClusterCidr(Vec<IpNet>),
}

/// Which destination addresses accept NodePort traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum NodePortIps {
    /// Every local address (nodePortAddresses contains 0.0.0.0/0 or ::/0): `fib daddr type local`.
    AllLocal,
    /// Exactly these node addresses.
    Addresses(Vec<IpAddr>),
}

/// Per-node, per-family facts the plan needs besides services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeNetwork {
    pub family: IpFamily,
    pub node_name: String,
    /// Primary node IP of this family (first matching InternalIP of the Node object).
    pub primary_ip: Option<IpAddr>,
    pub node_port_ips: NodePortIps,
    pub local_detector: LocalDetector,
    pub masquerade_all: bool,
    /// ServiceCIDRs of this family (from ServiceCIDR objects): unallocated IPs inside are dropped.
    pub service_cidrs: Vec<IpNet>,
}

/// The whole desired state for one family on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub network: NodeNetwork,
    pub services: BTreeMap<ServicePortName, ServicePortState>,
}

impl Snapshot {
    /// The service ports of one Service (all its ports in this family).
    pub fn ports_of<'a>(
        &'a self,
        key: &'a ServiceKey,
    ) -> impl Iterator<Item = &'a ServicePortState> + 'a {
        // ServicePortName orders by service first, so one Service's ports are one range.
        let first = ServicePortName {
            service: key.clone(),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        self.services
            .range(first..)
            .take_while(move |(n, _)| &n.service == key)
            .map(|(_, s)| s)
    }
}

/// kube-proxy --detect-local-mode, as configured (both families' CIDRs together).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum DetectLocal {
    None,
    ClusterCidr(Vec<IpNet>),
}

/// Node-wide settings from flags and the config file that the model needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    /// --hostname-override (or the host name): endpoints with this nodeName are local.
    pub node_name: String,
    /// Families to program, primary first.
    pub families: Vec<IpFamily>,
    pub detect_local: DetectLocal,
    pub masquerade_all: bool,
    /// --nodeport-addresses as CIDRs (both families); empty means kube-proxy's default,
    /// the node's primary IP of each family.
    pub node_port_addresses: Vec<IpNet>,
}

/// What changed since the last successful sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// Resynchronise everything (first sync, node-wide change, periodic resync, after a failure).
    All,
    /// Only these Services (added, changed or removed) need their rules rewritten.
    Services(BTreeSet<ServiceKey>),
}
