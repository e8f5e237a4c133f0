//! Object names in the `shunt` tables.
//!
//! Per-service chain names follow kube-proxy's nftables proxier (servicePortChainNameBase,
//! servicePortEndpointChainNameBase, hashAndTruncate): a prefix naming the role, the first 8
//! base32 characters of the SHA-256 of the readable name (so that names differing in one digit
//! are told apart at a glance and a truncated name stays unique), then the readable name with `/`
//! separators, a character Kubernetes names never contain. Fixed chains never contain `/`, which
//! is how the backend tells service-owned chains from the fixed ones when it reads state back.
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// Our table, in both the `ip` and the `ip6` family.
pub const TABLE: &str = "shunt";

/// nft's NFT_NAME_MAXLEN (include/uapi/linux/netfilter/nf_tables.h) is 256 including the NUL.
const NAME_LENGTH_MAX: usize = 255;
/// Longest role prefix we use, with its hyphen ("endpoint-", "affinity-", ...), rounded up.
const PREFIX_LENGTH_MAX: usize = 16;
const BASE_LENGTH_MAX: usize = NAME_LENGTH_MAX - PREFIX_LENGTH_MAX;

// Fixed chains (kube-proxy's names, so that operators can read both rulesets the same way).
pub const FILTER_PREROUTING: &str = "filter-prerouting";
pub const FILTER_INPUT: &str = "filter-input";
pub const FILTER_FORWARD: &str = "filter-forward";
pub const FILTER_OUTPUT: &str = "filter-output";
pub const FILTER_OUTPUT_POST_DNAT: &str = "filter-output-post-dnat";
pub const NAT_PREROUTING: &str = "nat-prerouting";
pub const NAT_OUTPUT: &str = "nat-output";
pub const NAT_POSTROUTING: &str = "nat-postrouting";
pub const SERVICES: &str = "services";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const REJECT_CHAIN: &str = "reject-chain";
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const MARK_MASQ: &str = "mark-for-masquerade";
pub const MASQUERADING: &str = "masquerading";

// Fixed sets and verdict maps.
pub const CLUSTER_IPS: &str = "cluster-ips";
pub const NODEPORT_IPS: &str = "nodeport-ips";
pub const SERVICE_IPS: &str = "service-ips";
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const FIREWALL_IPS: &str = "firewall-ips";

/// Prefix of the per-endpoint ClientIP affinity sets.
pub const AFFINITY_PREFIX: &str = "affinity-";

/// `HASH-readable`, truncated with "..." if longer than the base budget.
fn hash_and_truncate(readable: String) -> String {
    let digest = Sha256::digest(readable.as_bytes());
    let encoded = base32::encode(base32::Alphabet::Rfc4648 { padding: true }, &digest);
    let mut name = format!("{}-{}", &encoded[..8], readable);
    if name.len() > BASE_LENGTH_MAX {
        // Every character is ASCII (Kubernetes names, digits, '.', '/', '_'), so byte
        // truncation never splits a character.
        name.truncate(BASE_LENGTH_MAX - 3);
        name.push_str("...");
    }
    name
}

/// `HASH-ns/name/proto/port` for one service port.
pub fn service_port_base(name: &ServicePortName) -> String {
    hash_and_truncate(format!(
        "{}/{}/{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.as_str(),
        name.port
    ))
}

/// `HASH-ns/name/proto/port__ip/port` for one endpoint of one service port. IPv6 colons are
/// not allowed in nft names, so they become dots (as upstream does).
pub fn endpoint_base(name: &ServicePortName, ep: &Endpoint) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    hash_and_truncate(format!(
        "{}/{}/{}/{}__{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.as_str(),
        name.port,
        ip,
        ep.port
    ))
}

/// Chain holding the endpoints of Cluster traffic policy.
pub fn cluster_chain(name: &ServicePortName) -> String {
    format!("service-{}", service_port_base(name))
}
/// Chain holding the endpoints of Local traffic policy.
pub fn local_chain(name: &ServicePortName) -> String {
    format!("local-{}", service_port_base(name))
}
/// Chain all external (NodePort, LoadBalancer, externalIP) traffic goes to.
pub fn external_chain(name: &ServicePortName) -> String {
    format!("external-{}", service_port_base(name))
}
/// Chain enforcing loadBalancerSourceRanges.
pub fn firewall_chain(name: &ServicePortName) -> String {
    format!("firewall-{}", service_port_base(name))
}
/// Chain DNATing to one endpoint.
pub fn endpoint_chain(name: &ServicePortName, ep: &Endpoint) -> String {
    format!("endpoint-{}", endpoint_base(name, ep))
}
/// Timed set of client addresses with ClientIP affinity to one endpoint.
pub fn affinity_set(name: &ServicePortName, ep: &Endpoint) -> String {
    format!("{AFFINITY_PREFIX}{}", endpoint_base(name, ep))
}

/// True for chains owned by a service port (see the module comment).
pub fn is_service_chain(chain: &str) -> bool {
    chain.contains('/')
}
