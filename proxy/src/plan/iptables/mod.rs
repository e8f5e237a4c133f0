//! PURE: a per-family [`Snapshot`] -> the iptables rules of `--proxy-mode iptables`.
//!
//! The chain layout follows kube-proxy's iptables proxier (kubernetes pkg/proxy/iptables/
//! proxier.go, `syncProxyRules`) with our own `SHUNT-` prefix, so shunt never touches a
//! `KUBE-*` or any other foreign chain:
//!
//! * nat `SHUNT-SERVICES` (from PREROUTING and OUTPUT) dispatches ClusterIPs to the internal
//!   policy chain, externalIPs to `SHUNT-EXT-*`, LoadBalancer IPs to `SHUNT-FW-*` (with source
//!   ranges) or `SHUNT-EXT-*`, and node addresses to `SHUNT-NODEPORTS` as its last rule.
//! * `SHUNT-SVC-*` (Cluster endpoints, statistic-random choice, ClientIP affinity through
//!   `-m recent`), `SHUNT-SVL-*` (Local endpoints), `SHUNT-SEP-*` (hairpin mark + DNAT).
//! * `SHUNT-MARK-MASQ` sets mark 0x4000 (kube-proxy's default `--iptables-masquerade-bit` 14),
//!   `SHUNT-POSTROUTING` masquerades marked packets.
//! * filter `SHUNT-SERVICES`/`SHUNT-EXTERNAL-SERVICES` reject Services without endpoints and
//!   drop eTP/iTP Local Services without local endpoints, `SHUNT-PROXY-FIREWALL` drops LB
//!   traffic the source ranges did not accept, `SHUNT-NODEPORTS` accepts healthCheckNodePorts,
//!   `SHUNT-FORWARD` accepts masquerade-marked and established traffic.
//!
//! Differences from kube-proxy's iptables mode (kept on purpose; shunt's iptables mode has
//! the nftables mode's behaviour, which the conformance scenarios describe):
//!
//! * A packet to an active ClusterIP on a port/protocol no Service exposes is REJECTed, and a
//!   packet to an address inside a ServiceCIDR that no Service holds is DROPped (kube-proxy's
//!   nftables `cluster-ips`/service-CIDR checks; its iptables mode lets both through). Done in
//!   filter `SHUNT-SERVICES` after DNAT: a packet that nat turned into an endpoint no longer
//!   has the ClusterIP as destination, so only unmatched packets hit these rules.
//! * The filter chains for Services without (local) endpoints are also hooked from OUTPUT,
//!   so node-originated traffic to such an externalIP/LB IP/NodePort is refused too, as the
//!   nftables mode does (kube-proxy's iptables mode hooks KUBE-EXTERNAL-SERVICES only from
//!   INPUT and FORWARD).
//! * NodePorts with `--nodeport-addresses` match `-d IP` per address, and the no-endpoint
//!   REJECT/DROP for NodePorts uses the same destination match (kube-proxy's iptables mode uses
//!   `--dst-type LOCAL` for the filter rule whatever nodePortAddresses says).
//! * With `--nodeport-addresses` 0.0.0.0/0 (all local addresses), loopback addresses do not
//!   accept NodePorts (nftables-mode behaviour; kube-proxy's iptables mode accepts
//!   127.0.0.1 NodePorts by setting `route_localnet`, a sysctl shunt never changes).
//! * More than one cluster CIDR per family is supported by `SHUNT-MASQ-NONPOD` (RETURN for
//!   each pod CIDR, then mark) instead of a single `! -s CIDR` match.
//! * `-m recent` affinity lists and chain names use the `SHUNT-` prefix; names are
//!   `SHUNT-SVC-` + the first 16 base32 characters of sha256(servicePortName + protocol), as
//!   upstream's `servicePortChainName` computes them.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::model::{
    Endpoint, IpFamily, LocalDetector, NodePortIps, ServiceKey, ServicePortName, ServicePortState,
    Snapshot,
};

pub mod nft_cache;
pub mod render;
#[cfg(test)]
pub(crate) mod tests;
pub mod tracer;

pub use render::{ChainMentions, RenderScope, Restore, render};

/// Every chain shunt creates starts with this (so cleanup can find them in iptables-save).
pub const CHAIN_PREFIX: &str = "SHUNT-";
/// iptables' chain name limit (XT_EXTENSION_MAXNAMELEN - 1 = 28 usable characters).
pub const MAX_CHAIN_LEN: usize = 28;
/// The masquerade mark bit, kube-proxy's default `--iptables-masquerade-bit` 14.
pub const MASQ_MARK: &str = "0x4000";

pub const SERVICES: &str = "SHUNT-SERVICES";
pub const EXTERNAL_SERVICES: &str = "SHUNT-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "SHUNT-NODEPORTS";
pub const POSTROUTING: &str = "SHUNT-POSTROUTING";
pub const MARK_MASQ: &str = "SHUNT-MARK-MASQ";
pub const MASQ_NONPOD: &str = "SHUNT-MASQ-NONPOD";
pub const FORWARD: &str = "SHUNT-FORWARD";
pub const PROXY_FIREWALL: &str = "SHUNT-PROXY-FIREWALL";

/// The two tables shunt writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];
}

/// A chain of one table.
pub type ChainId = (Table, String);

/// One chain and its rules; each rule is the argument text that follows `-A CHAIN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub table: Table,
    pub name: String,
    pub rules: Vec<String>,
}

impl Chain {
    fn new(table: Table, name: &str) -> Chain {
        Chain {
            table,
            name: name.to_string(),
            rules: Vec::new(),
        }
    }
    fn push(&mut self, rule: String) {
        self.rules.push(rule);
    }
    pub fn id(&self) -> ChainId {
        (self.table, self.name.clone())
    }
}

/// The complete desired rule set of one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub family: IpFamily,
    /// Node-wide chains (dispatch, masquerade, filter): rewritten on every sync.
    pub shared: Vec<Chain>,
    /// Chains that belong to exactly one Service (all its ports): rewritten only when that
    /// Service changed (or on a full sync).
    pub services: BTreeMap<ServiceKey, Vec<Chain>>,
}

impl Ruleset {
    /// Every chain of the rule set, shared first.
    pub fn chains(&self) -> impl Iterator<Item = &Chain> {
        self.shared.iter().chain(self.services.values().flatten())
    }
    /// Number of rules per table, as kube-proxy's `kubeproxy_sync_proxy_rules_iptables_total`
    /// counts them (every rule of the restore input, whether or not this sync rewrote it).
    pub fn rule_counts(&self) -> BTreeMap<Table, u64> {
        let mut counts = BTreeMap::from([(Table::Filter, 0u64), (Table::Nat, 0u64)]);
        for c in self.chains() {
            *counts.entry(c.table).or_default() += c.rules.len() as u64;
        }
        counts
    }
    /// Chain ids per Service, for the next partial sync's stale-chain bookkeeping.
    pub fn ownership(&self) -> BTreeMap<ServiceKey, BTreeSet<ChainId>> {
        self.services
            .iter()
            .map(|(k, cs)| (k.clone(), cs.iter().map(Chain::id).collect()))
            .collect()
    }
}

/// A rule in a built-in chain that sends traffic into ours (kube-proxy's iptablesJumpChains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: Table,
    /// The built-in chain (PREROUTING, INPUT, ...).
    pub chain: &'static str,
    /// Arguments after `-A chain` / `-C chain` / `-I chain`, already split.
    pub args: Vec<String>,
}

/// The jump rules from the built-in chains. Filter chains that refuse connections are only
/// consulted for new connections (`--ctstate NEW`), as kube-proxy does.
pub fn jump_rules() -> Vec<JumpRule> {
    let rule = |table, chain, new_only: bool, comment: &str, target: &str| {
        let mut args: Vec<String> = Vec::new();
        if new_only {
            args.extend(["-m", "conntrack", "--ctstate", "NEW"].map(String::from));
        }
        args.extend(["-m", "comment", "--comment", comment, "-j", target].map(String::from));
        JumpRule { table, chain, args }
    };
    let mut v = Vec::new();
    for chain in ["INPUT", "FORWARD", "OUTPUT"] {
        v.push(rule(
            Table::Filter,
            chain,
            true,
            "shunt load balancer firewall",
            PROXY_FIREWALL,
        ));
    }
    v.push(rule(
        Table::Filter,
        "INPUT",
        false,
        "shunt health check service ports",
        NODEPORTS,
    ));
    for chain in ["INPUT", "FORWARD", "OUTPUT"] {
        v.push(rule(
            Table::Filter,
            chain,
            true,
            "shunt externally-visible service portals",
            EXTERNAL_SERVICES,
        ));
    }
    for chain in ["FORWARD", "OUTPUT"] {
        v.push(rule(
            Table::Filter,
            chain,
            true,
            "shunt service portals",
            SERVICES,
        ));
    }
    v.push(rule(
        Table::Filter,
        "FORWARD",
        false,
        "shunt forwarding rules",
        FORWARD,
    ));
    for chain in ["PREROUTING", "OUTPUT"] {
        v.push(rule(
            Table::Nat,
            chain,
            false,
            "shunt service portals",
            SERVICES,
        ));
    }
    v.push(rule(
        Table::Nat,
        "POSTROUTING",
        false,
        "shunt postrouting rules",
        POSTROUTING,
    ));
    v
}

/// First 16 base32 characters of sha256(input), upstream's portProtoHash.
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = base32::encode(base32::Alphabet::Rfc4648 { padding: false }, &digest);
    s.truncate(16);
    s
}

/// The kind of a per-Service chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainKind {
    /// Cluster-policy endpoints.
    Svc,
    /// Local-policy endpoints.
    Svl,
    /// External traffic (NodePort, externalIPs, LB IPs).
    Ext,
    /// LoadBalancer source ranges.
    Fw,
}

/// `SHUNT-SVC-<hash>` etc: like upstream's servicePortChainName, the hash covers the
/// servicePortName's string form and the lower-case protocol, so names never carry raw object
/// names and always fit in [`MAX_CHAIN_LEN`].
pub fn port_chain(kind: ChainKind, name: &ServicePortName) -> String {
    let prefix = match kind {
        ChainKind::Svc => "SHUNT-SVC-",
        ChainKind::Svl => "SHUNT-SVL-",
        ChainKind::Ext => "SHUNT-EXT-",
        ChainKind::Fw => "SHUNT-FW-",
    };
    format!(
        "{prefix}{}",
        hash16(&format!("{name}{}", name.protocol.as_str()))
    )
}

/// `SHUNT-SEP-<hash>`: upstream's servicePortEndpointChainName (servicePortName + protocol +
/// endpoint "ip:port").
pub fn endpoint_chain(name: &ServicePortName, ep: &Endpoint) -> String {
    format!(
        "SHUNT-SEP-{}",
        hash16(&format!("{name}{}{}", name.protocol.as_str(), ep.addr()))
    )
}

/// `-m comment --comment "<text>"`. Comments are Service names, ports and addresses, which
/// never contain a double quote.
fn comment(text: &str) -> String {
    format!("-m comment --comment \"{text}\"")
}

/// `-p tcp -m tcp --dport N`.
fn proto_port(sp: &ServicePortState, port: u16) -> String {
    let p = sp.port.name.protocol.as_str();
    format!("-p {p} -m {p} --dport {port}")
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// Endpoints a port's chains may DNAT to: the union of its Cluster and Local endpoints,
/// deduplicated, in the model's order.
fn reachable_endpoints(st: &ServicePortState) -> Vec<&Endpoint> {
    let mut seen = BTreeSet::new();
    st.cluster_endpoints
        .iter()
        .chain(st.local_endpoints.iter())
        .filter(|e| seen.insert(e.addr()))
        .collect()
}

/// Rules of `SHUNT-SVC-*`/`SHUNT-SVL-*` choosing among `eps`: with ClientIP affinity first one
/// `-m recent --rcheck` rule per endpoint (a client seen within the timeout goes back to the
/// endpoint it had), then kube-proxy's statistic cascade: endpoint i of n is taken with
/// probability 1/(n-i), the last one unconditionally, which is uniform overall.
fn endpoint_jumps(chain: &mut Chain, st: &ServicePortState, eps: &[Endpoint], family: IpFamily) {
    let name = &st.port.name;
    if let Some(timeout) = st.port.affinity_timeout_seconds {
        for ep in eps {
            let sep = endpoint_chain(name, ep);
            chain.push(format!(
                "{} -m recent --name {sep} --mask {} --rcheck --seconds {timeout} --reap -j {sep}",
                comment(&format!("{name} -> {}", ep.addr())),
                full_mask(family),
            ));
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let sep = endpoint_chain(name, ep);
        let mut rule = comment(&format!("{name} -> {}", ep.addr()));
        if i + 1 < n {
            let _ = write!(
                rule,
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            );
        }
        let _ = write!(rule, " -j {sep}");
        chain.push(rule);
    }
}

fn full_mask(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// Build the whole rule set of one family.
pub fn build(snap: &Snapshot) -> Ruleset {
    let net = &snap.network;
    let family = net.family;
    let mut nat_services = Chain::new(Table::Nat, SERVICES);
    let mut nat_nodeports = Chain::new(Table::Nat, NODEPORTS);
    let mut filter_services = Chain::new(Table::Filter, SERVICES);
    let mut filter_external = Chain::new(Table::Filter, EXTERNAL_SERVICES);
    let mut filter_nodeports = Chain::new(Table::Filter, NODEPORTS);
    let mut filter_firewall = Chain::new(Table::Filter, PROXY_FIREWALL);
    let mut services: BTreeMap<ServiceKey, Vec<Chain>> = BTreeMap::new();

    let pod_cidrs = match &net.local_detector {
        LocalDetector::ClusterCidr(c) => c
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .cloned()
            .collect(),
        LocalDetector::None => Vec::new(),
    };
    let detector = !pod_cidrs.is_empty();
    // "Not from a pod": one `! -s` match when there is one pod CIDR, else a helper chain.
    let masq_not_pod = |prefix: &str| -> String {
        if pod_cidrs.len() == 1 {
            format!("{prefix} ! -s {} -j {MARK_MASQ}", pod_cidrs[0])
        } else {
            format!("{prefix} -j {MASQ_NONPOD}")
        }
    };
    // Destination matches of NodePort traffic.
    let nodeport_dsts: Vec<String> = match &net.node_port_ips {
        // Loopback is excluded: like the nftables mode (and the model's address lists),
        // shunt does not support localhost NodePorts (kube-proxy's iptables mode needs
        // route_localnet for them, which shunt never sets).
        NodePortIps::AllLocal => vec![format!(
            "-m addrtype --dst-type LOCAL ! -d {}",
            match family {
                IpFamily::V4 => "127.0.0.0/8",
                IpFamily::V6 => "::1/128",
            }
        )],
        NodePortIps::Addresses(a) => a
            .iter()
            .filter(|ip| IpFamily::of(ip) == family)
            .map(|ip| format!("-d {}", host(ip)))
            .collect(),
    };

    for st in snap.services.values() {
        let sp = &st.port;
        let name = &sp.name;
        let svc_chain = port_chain(ChainKind::Svc, name);
        let svl_chain = port_chain(ChainKind::Svl, name);
        let ext_chain = port_chain(ChainKind::Ext, name);
        let fw_chain = port_chain(ChainKind::Fw, name);
        let uses_svc = sp.uses_cluster_endpoints() && !st.cluster_endpoints.is_empty();
        let uses_svl = sp.uses_local_endpoints() && !st.local_endpoints.is_empty();
        let internal_chain = if sp.internal_policy_local {
            &svl_chain
        } else {
            &svc_chain
        };
        let external_policy_chain = if sp.external_policy_local {
            &svl_chain
        } else {
            &svc_chain
        };
        let has_internal = !st.internal_endpoints().is_empty();
        let has_external = !st.external_endpoints().is_empty();
        let uses_ext = has_external && sp.externally_accessible();
        let uses_fw = uses_ext
            && !sp.load_balancer_ips.is_empty()
            && !sp.load_balancer_source_ranges.is_empty();
        // Upstream: REJECT when the Service has no endpoints at all, DROP when it has some but
        // none this policy may use ("has no local endpoints").
        let refuse = |has_any: bool| if has_any { "DROP" } else { "REJECT" };
        let internal_target = if has_internal {
            None
        } else {
            Some(refuse(st.has_any_endpoints))
        };
        let external_target = if has_external {
            None
        } else {
            Some(refuse(st.has_any_endpoints))
        };
        let pp = proto_port(st, sp.port);
        let cip = host(&sp.cluster_ip);
        let mut own: Vec<Chain> = Vec::new();

        // ClusterIP.
        match internal_target {
            None => nat_services.push(format!(
                "{} -d {cip} {pp} -j {internal_chain}",
                comment(&format!("{name} cluster IP"))
            )),
            Some(t) => filter_services.push(format!(
                "{} -d {cip} {pp} -j {t}",
                comment(&format!(
                    "{name} has no {}endpoints",
                    if t == "DROP" { "local " } else { "" }
                ))
            )),
        }

        // externalIPs and LoadBalancer IPs.
        let ext_comment = |kind: &str| comment(&format!("{name} {kind}"));
        for ip in &sp.external_ips {
            let d = host(ip);
            match external_target {
                None => nat_services.push(format!(
                    "{} -d {d} {pp} -j {ext_chain}",
                    ext_comment("external IP")
                )),
                Some(t) => filter_external.push(format!(
                    "{} -d {d} {pp} -j {t}",
                    ext_comment("external IP has no usable endpoints")
                )),
            }
        }
        for ip in &sp.load_balancer_ips {
            let d = host(ip);
            match external_target {
                None => {
                    let target = if uses_fw { &fw_chain } else { &ext_chain };
                    nat_services.push(format!(
                        "{} -d {d} {pp} -j {target}",
                        ext_comment("loadbalancer IP")
                    ));
                    if uses_fw {
                        // Traffic the FW chain accepted was DNATed in nat and no longer has
                        // the LB IP as destination here; whatever still has it was refused.
                        filter_firewall.push(format!(
                            "{} -d {d} {pp} -j DROP",
                            comment(&format!("{name} traffic not accepted by {fw_chain}"))
                        ));
                    }
                }
                Some(t) => filter_external.push(format!(
                    "{} -d {d} {pp} -j {t}",
                    ext_comment("loadbalancer IP has no usable endpoints")
                )),
            }
        }
        if let Some(np) = sp.node_port {
            let npp = proto_port(st, np);
            match external_target {
                None => nat_nodeports.push(format!(
                    "{} {npp} -j {ext_chain}",
                    comment(&format!("{name}"))
                )),
                Some(t) => {
                    for dst in &nodeport_dsts {
                        filter_external.push(format!(
                            "{} {dst} {npp} -j {t}",
                            ext_comment("nodePort has no usable endpoints")
                        ));
                    }
                }
            }
        }
        if let Some(hc) = sp.health_check_node_port {
            filter_nodeports.push(format!(
                "{} -p tcp -m tcp --dport {hc} -j ACCEPT",
                comment(&format!("{name} health check node port"))
            ));
        }

        // SHUNT-SVC-*: masquerade off-pod ClusterIP traffic, then choose a Cluster endpoint.
        if uses_svc {
            let mut c = Chain::new(Table::Nat, &svc_chain);
            let m = format!("{} -d {cip} {pp}", comment(&format!("{name} cluster IP")));
            if net.masquerade_all {
                c.push(format!("{m} -j {MARK_MASQ}"));
            } else if detector {
                c.push(masq_not_pod(&m));
            }
            endpoint_jumps(&mut c, st, &st.cluster_endpoints, family);
            own.push(c);
        }
        if uses_svl {
            let mut c = Chain::new(Table::Nat, &svl_chain);
            endpoint_jumps(&mut c, st, &st.local_endpoints, family);
            own.push(c);
        }
        // SHUNT-EXT-*: external traffic.
        if uses_ext {
            let mut c = Chain::new(Table::Nat, &ext_chain);
            if sp.external_policy_local {
                // Pods and the node itself are short-circuited to the Cluster endpoints
                // (a local-only choice would blackhole them on nodes without endpoints);
                // node-originated traffic must be masqueraded for the reply to come back.
                if uses_svc {
                    for cidr in &pod_cidrs {
                        c.push(format!(
                            "{} -s {cidr} -j {svc_chain}",
                            comment(&format!("pod traffic for {name} external destinations"))
                        ));
                    }
                    c.push(format!(
                        "{} -m addrtype --src-type LOCAL -j {MARK_MASQ}",
                        comment(&format!(
                            "masquerade LOCAL traffic for {name} external destinations"
                        ))
                    ));
                    c.push(format!(
                        "{} -m addrtype --src-type LOCAL -j {svc_chain}",
                        comment(&format!(
                            "route LOCAL traffic for {name} external destinations"
                        ))
                    ));
                }
            } else {
                c.push(format!(
                    "{} -j {MARK_MASQ}",
                    comment(&format!(
                        "masquerade traffic for {name} external destinations"
                    ))
                ));
            }
            c.push(format!("-j {external_policy_chain}"));
            own.push(c);
        }
        // SHUNT-FW-*: LoadBalancer source ranges.
        if uses_fw {
            let mut c = Chain::new(Table::Nat, &fw_chain);
            for range in &sp.load_balancer_source_ranges {
                c.push(format!(
                    "{} -s {range} -j {ext_chain}",
                    comment(&format!("{name} loadbalancer IP"))
                ));
            }
            // Upstream allows node-originated traffic when a source range holds the node IP.
            if let Some(node_ip) = net.primary_ip
                && sp
                    .load_balancer_source_ranges
                    .iter()
                    .any(|r| r.contains(&node_ip))
            {
                c.push(format!(
                    "{} -m addrtype --src-type LOCAL -j {ext_chain}",
                    comment(&format!("{name} loadbalancer IP"))
                ));
            }
            own.push(c);
        }
        // SHUNT-SEP-*: hairpin masquerade, affinity bookkeeping, DNAT.
        if uses_svc || uses_svl {
            for ep in reachable_endpoints(st) {
                let sep = endpoint_chain(name, ep);
                let mut c = Chain::new(Table::Nat, &sep);
                let cm = comment(&name.to_string());
                c.push(format!("{cm} -s {} -j {MARK_MASQ}", host(&ep.ip)));
                let p = name.protocol.as_str();
                let affinity = match sp.affinity_timeout_seconds {
                    Some(_) => {
                        format!(" -m recent --name {sep} --mask {} --set", full_mask(family))
                    }
                    None => String::new(),
                };
                c.push(format!(
                    "{cm}{affinity} -p {p} -m {p} -j DNAT --to-destination {}",
                    ep.addr()
                ));
                own.push(c);
            }
        }
        if !own.is_empty() {
            services
                .entry(name.service.clone())
                .or_default()
                .extend(own);
        }
    }

    // ClusterIP ports nobody exposes are refused and unallocated ServiceCIDR addresses
    // dropped (kube-proxy's nftables behaviour; see the module comment).
    let cluster_ips: BTreeSet<IpAddr> = snap.services.values().map(|s| s.port.cluster_ip).collect();
    for ip in &cluster_ips {
        filter_services.push(format!(
            "{} -d {} -j REJECT",
            comment("reject traffic to invalid ports of ClusterIPs"),
            host(ip)
        ));
    }
    for cidr in net
        .service_cidrs
        .iter()
        .filter(|n| IpFamily::of_net(n) == family)
    {
        filter_services.push(format!(
            "{} -d {cidr} -j DROP",
            comment("drop traffic to unallocated ClusterIPs")
        ));
    }
    // NodePorts: must be the last rule of nat SHUNT-SERVICES.
    for dst in &nodeport_dsts {
        nat_services.push(format!(
            "{} {dst} -j {NODEPORTS}",
            comment("shunt service nodeports; NOTE: this must be the last rule in this chain")
        ));
    }

    let mut mark = Chain::new(Table::Nat, MARK_MASQ);
    mark.push(format!("-j MARK --or-mark {MASQ_MARK}"));
    let mut nonpod = Chain::new(Table::Nat, MASQ_NONPOD);
    for cidr in &pod_cidrs {
        nonpod.push(format!("{} -s {cidr} -j RETURN", comment("pod traffic")));
    }
    nonpod.push(format!("-j {MARK_MASQ}"));
    let mut post = Chain::new(Table::Nat, POSTROUTING);
    post.push(format!(
        "-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    ));
    // The mark is cleared so a packet that is re-routed (e.g. through a tunnel) is not
    // masqueraded twice.
    post.push(format!("-j MARK --xor-mark {MASQ_MARK}"));
    post.push(format!(
        "{} -j MASQUERADE --random-fully",
        comment("shunt service traffic requiring SNAT")
    ));
    let mut forward = Chain::new(Table::Filter, FORWARD);
    forward.push(format!(
        "{} -m conntrack --ctstate INVALID -j DROP",
        comment("shunt: drop packets conntrack considers invalid")
    ));
    forward.push(format!(
        "{} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        comment("shunt forwarding rules")
    ));
    forward.push(format!(
        "{} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        comment("shunt forwarding conntrack rule")
    ));

    Ruleset {
        family,
        shared: vec![
            filter_services,
            filter_external,
            filter_nodeports,
            filter_firewall,
            forward,
            nat_services,
            nat_nodeports,
            mark,
            nonpod,
            post,
        ],
        services,
    }
}
