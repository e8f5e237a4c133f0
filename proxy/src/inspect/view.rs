//! The mode-neutral view of what is programmed: one entry per frontend (address, port,
//! protocol) with the Service it belongs to where the dataplane records it, the endpoints it
//! can be DNATed to, and its flags. Built from read-back state only.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Proto;
use super::nft::NftTable;
use crate::model::IpFamily;
use crate::plan::iptables::Table;
use crate::plan::nft::ir::{Key, Match, Stmt, Verdict};
use crate::plan::nft::names;

/// `shunt inspect services` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspected {
    pub mode: String,
    pub families: Vec<FamilyView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyView {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Addresses accepting NodePorts; None: every local address (`fib daddr type local`,
    /// `--dst-type LOCAL`), or the mode lists NodePort frontends per address (ebpf).
    pub node_port_addresses: Option<BTreeSet<IpAddr>>,
    pub frontends: Vec<FrontendView>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
    /// An externalIP or LoadBalancer IP where the dataplane does not tell them apart (ebpf).
    External,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoEndpoints {
    Drop,
    Reject,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendView {
    /// `namespace/name:port`, where the dataplane records it (nft chain names, iptables
    /// comments; the BPF maps carry no names).
    pub service: Option<String>,
    pub kind: FrontendKind,
    /// None for a NodePort on every NodePort address (see `node_port_addresses`).
    pub address: Option<IpAddr>,
    pub port: u16,
    pub protocol: Proto,
    /// Every endpoint a new connection to this frontend may be DNATed to, whatever its source.
    pub endpoints: BTreeSet<SocketAddr>,
    /// Endpoints used for sources outside the cluster when they differ (an external
    /// traffic policy Local: only local endpoints), else None.
    pub external_endpoints: Option<BTreeSet<SocketAddr>>,
    /// What a packet gets when there is no endpoint to send it to.
    pub no_endpoints: Option<NoEndpoints>,
    /// ClientIP session affinity timeout.
    pub affinity_seconds: Option<u32>,
    /// loadBalancerSourceRanges enforced on this frontend.
    pub source_ranges: BTreeSet<IpNet>,
    /// Some source gets masqueraded (SNAT to a node address) on the way to an endpoint.
    pub masquerade: bool,
}

impl FrontendView {
    fn new(
        service: Option<String>,
        kind: FrontendKind,
        address: Option<IpAddr>,
        port: u16,
        protocol: Proto,
    ) -> FrontendView {
        FrontendView {
            service,
            kind,
            address,
            port,
            protocol,
            endpoints: BTreeSet::new(),
            external_endpoints: None,
            no_endpoints: None,
            affinity_seconds: None,
            source_ranges: BTreeSet::new(),
            masquerade: false,
        }
    }
}

pub fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

/// `service-HASH-ns/name/proto/port` (nft names) -> `ns/name:port`.
fn service_of_chain(chain: &str) -> Option<String> {
    let rest = chain.split_once('-')?.1;
    let readable = rest.split_once('-')?.1;
    let readable = readable.split("__").next()?;
    let parts: Vec<&str> = readable.split('/').collect();
    match parts.as_slice() {
        [ns, name, _proto, ""] => Some(format!("{ns}/{name}")),
        [ns, name, _proto, port] => Some(format!("{ns}/{name}:{port}")),
        _ => Some(readable.to_string()),
    }
}

/// What a walk from a frontend's verdict reaches.
#[derive(Default)]
struct Reach {
    endpoints: BTreeSet<SocketAddr>,
    affinity: Option<u32>,
    ranges: BTreeSet<IpNet>,
    masquerade: bool,
    drop: bool,
    reject: bool,
}

fn nft_walk(t: &NftTable, chain: &str, r: &mut Reach, seen: &mut HashSet<String>, skip: &str) {
    if !seen.insert(chain.to_string()) || chain == skip {
        return;
    }
    if chain == names::MARK_MASQ {
        r.masquerade = true;
        return;
    }
    let Some(c) = t.chains.get(chain) else { return };
    let firewall = chain.starts_with("firewall-");
    for rule in &c.rules {
        for s in &rule.stmts {
            match s {
                Stmt::Dnat(to) => {
                    r.endpoints.insert(*to);
                }
                Stmt::UpdateSaddr(set) => {
                    if let Some(d) = t.sets.get(set) {
                        r.affinity = d.timeout_seconds.or(r.affinity);
                    }
                }
                _ => {}
            }
        }
        if firewall {
            // `ip saddr != { ranges } drop`: the ranges let through.
            for m in &rule.matches {
                if let Match::Saddr { nets, negate: true } = m
                    && rule.verdict == Some(Verdict::Drop)
                {
                    r.ranges.extend(nets.iter().copied());
                }
            }
        }
        match &rule.verdict {
            Some(Verdict::Jump(c) | Verdict::Goto(c)) => nft_walk(t, c, r, seen, skip),
            Some(Verdict::Pick { count, offset, map }) => {
                for slot in *offset..offset + count {
                    if let Some(Some(Verdict::Goto(c) | Verdict::Jump(c))) = t
                        .elements
                        .get(map)
                        .and_then(|m| m.get(&Key::Pick(slot)))
                        .map(|e| e.value.clone())
                    {
                        nft_walk(t, &c, r, seen, skip);
                    }
                }
            }
            Some(Verdict::Drop) => r.drop = true,
            Some(Verdict::Reject) => r.reject = true,
            _ => {}
        }
    }
}

fn nft_reach(t: &NftTable, chain: &str) -> Reach {
    let mut r = Reach::default();
    nft_walk(t, chain, &mut r, &mut HashSet::new(), "");
    r
}

/// The external chain's endpoints for outside sources: the walk without the short-circuit
/// to the Cluster chain (`ip saddr <pods> goto service-...`, `fib saddr type local goto`).
fn nft_external_only(t: &NftTable, chain: &str) -> Option<BTreeSet<SocketAddr>> {
    let c = t.chains.get(chain)?;
    let short = c
        .rules
        .iter()
        .find_map(|r| match (&r.verdict, r.matches.first()) {
            (
                Some(Verdict::Goto(g)),
                Some(Match::Saddr { negate: false, .. } | Match::FibSaddrLocal),
            ) => Some(g.clone()),
            _ => None,
        })?;
    let mut r = Reach::default();
    nft_walk(t, chain, &mut r, &mut HashSet::new(), &short);
    Some(r.endpoints)
}

/// An nft table read back (or the plan's) -> its frontends.
pub fn from_nft(family: IpFamily, t: &NftTable) -> FamilyView {
    let mut out: BTreeMap<(Option<IpAddr>, u16, Proto, FrontendKind), FrontendView> =
        BTreeMap::new();
    let cluster_ips: BTreeSet<IpAddr> = t
        .elements
        .get(names::CLUSTER_IPS)
        .into_iter()
        .flat_map(|m| m.keys())
        .filter_map(|k| match k {
            Key::Addr(a) => Some(*a),
            _ => None,
        })
        .collect();
    let firewalled: BTreeSet<(IpAddr, u16, Proto)> = t
        .elements
        .get(names::FIREWALL_IPS)
        .into_iter()
        .flat_map(|m| m.keys())
        .filter_map(|k| match k {
            Key::AddrProtoPort(a, p, n) => Some((*a, *n, Proto::from(*p))),
            _ => None,
        })
        .collect();
    let kind_of = |a: &IpAddr, port: u16, p: Proto, chain: &str| {
        if cluster_ips.contains(a) && !chain.starts_with("external-") {
            FrontendKind::ClusterIp
        } else if firewalled.contains(&(*a, port, p)) {
            FrontendKind::LoadBalancer
        } else {
            // nft does not record whether an external address is an externalIP or a
            // LoadBalancer IP without source ranges.
            FrontendKind::External
        }
    };
    for (map, nodeport) in [
        (names::SERVICE_IPS, false),
        (names::SERVICE_NODEPORTS, true),
    ] {
        for e in t.elements.get(map).into_iter().flat_map(|m| m.values()) {
            let Some(Verdict::Goto(chain) | Verdict::Jump(chain)) = &e.value else {
                continue;
            };
            let (addr, port, proto, kind) = match e.key {
                Key::AddrProtoPort(a, p, n) if !nodeport => (
                    Some(a),
                    n,
                    Proto::from(p),
                    kind_of(&a, n, Proto::from(p), chain),
                ),
                Key::ProtoPort(p, n) if nodeport => {
                    (None, n, Proto::from(p), FrontendKind::NodePort)
                }
                _ => continue,
            };
            let mut f = FrontendView::new(service_of_chain(chain), kind, addr, port, proto);
            // LoadBalancer frontends with source ranges go through firewall-check first.
            let mut reach = nft_reach(t, chain);
            if let Some(a) = addr
                && let Some(fw) = t
                    .elements
                    .get(names::FIREWALL_IPS)
                    .and_then(|m| m.get(&Key::AddrProtoPort(a, proto.into(), port)))
                && let Some(Verdict::Goto(fc) | Verdict::Jump(fc)) = &fw.value
            {
                reach.ranges = nft_reach(t, fc).ranges;
            }
            f.endpoints = reach.endpoints;
            f.external_endpoints = if chain.starts_with("external-") {
                nft_external_only(t, chain).filter(|e| *e != f.endpoints)
            } else {
                None
            };
            f.affinity_seconds = reach.affinity;
            f.source_ranges = reach.ranges;
            f.masquerade = reach.masquerade;
            out.insert((addr, port, proto, kind), f);
        }
    }
    for (map, nodeport) in [
        (names::NO_ENDPOINT_SERVICES, false),
        (names::NO_ENDPOINT_NODEPORTS, true),
    ] {
        for e in t.elements.get(map).into_iter().flat_map(|m| m.values()) {
            let verdict = match &e.value {
                Some(Verdict::Drop) => NoEndpoints::Drop,
                Some(Verdict::Goto(c) | Verdict::Jump(c)) if c == names::REJECT_CHAIN => {
                    NoEndpoints::Reject
                }
                _ => continue,
            };
            let (addr, port, proto, kind) = match e.key {
                Key::AddrProtoPort(a, p, n) if !nodeport => {
                    let kind = if cluster_ips.contains(&a) {
                        FrontendKind::ClusterIp
                    } else {
                        kind_of(&a, n, Proto::from(p), "external-")
                    };
                    (Some(a), n, Proto::from(p), kind)
                }
                Key::ProtoPort(p, n) if nodeport => {
                    (None, n, Proto::from(p), FrontendKind::NodePort)
                }
                _ => continue,
            };
            let f = out
                .entry((addr, port, proto, kind))
                .or_insert_with(|| FrontendView::new(e.comment.clone(), kind, addr, port, proto));
            f.no_endpoints = Some(verdict);
        }
    }
    // A no-endpoint element shadows the dispatch for part of the sources (Local policy):
    // kept on the same frontend above.
    // `fib daddr type local` in the dispatch chain: every local address accepts NodePorts.
    let all_local = t.chains.get(names::SERVICES).is_some_and(|c| {
        c.rules
            .iter()
            .any(|r| r.matches.contains(&Match::FibDaddrLocal))
    });
    let node_port_addresses = (!all_local)
        .then_some(())
        .and_then(|()| t.elements.get(names::NODEPORT_IPS))
        .map(|m| {
            m.keys()
                .filter_map(|k| match k {
                    Key::Addr(a) => Some(*a),
                    _ => None,
                })
                .collect()
        });
    FamilyView {
        family: family_name(family).into(),
        node_port_addresses,
        frontends: out.into_values().collect(),
    }
}

// ---- iptables ----

/// One parsed iptables rule: the options shunt's frontend rules use.
#[derive(Default)]
struct IptRule<'a> {
    d: Option<&'a str>,
    s: Vec<(&'a str, bool)>,
    proto: Option<&'a str>,
    dport: Option<u16>,
    comment: Option<&'a str>,
    target: Option<&'a str>,
    to: Option<&'a str>,
    seconds: Option<u32>,
    dst_local: bool,
}

fn ipt_rule(args: &[String]) -> IptRule<'_> {
    let mut r = IptRule::default();
    let mut negate = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let v = args.get(i + 1).map(String::as_str);
        match a {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-d" => r.d = v,
            "-s" => r.s.extend(v.map(|v| (v, negate))),
            "-p" => r.proto = v,
            "--dport" => r.dport = v.and_then(|v| v.parse().ok()),
            "--comment" => r.comment = v,
            "-j" => r.target = v,
            "--to-destination" => r.to = v,
            "--seconds" => r.seconds = v.and_then(|v| v.parse().ok()),
            "--dst-type" => r.dst_local = v == Some("LOCAL"),
            _ => {}
        }
        negate = false;
        i += 1;
    }
    r
}

fn host_addr(s: &str) -> Option<IpAddr> {
    s.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .filter(|_| s.ends_with("/32") || s.ends_with("/128") || !s.contains('/'))
}

type IptChains = BTreeMap<(Table, String), Vec<Vec<String>>>;

fn ipt_walk(c: &IptChains, chain: &str, r: &mut Reach, seen: &mut HashSet<String>) {
    if !seen.insert(chain.to_string()) {
        return;
    }
    if chain == crate::plan::iptables::MARK_MASQ || chain == crate::plan::iptables::MASQ_NONPOD {
        r.masquerade = true;
        return;
    }
    let fw = chain.starts_with("SHUNT-FW-");
    for args in c
        .get(&(Table::Nat, chain.to_string()))
        .into_iter()
        .flatten()
    {
        let rule = ipt_rule(args);
        if let Some(s) = rule.seconds {
            r.affinity = Some(s);
        }
        match rule.target {
            Some("DNAT") => {
                r.endpoints
                    .extend(rule.to.and_then(|t| t.parse::<SocketAddr>().ok()));
            }
            Some(t) if t.starts_with(crate::plan::iptables::CHAIN_PREFIX) => {
                // The FW chain's `-s RANGE -j SHUNT-EXT/SVC/SVL` rules: accepted ranges.
                if fw && let Some((s, false)) = rule.s.first() {
                    r.ranges.extend(s.parse::<IpNet>().ok());
                }
                ipt_walk(c, t, r, seen);
            }
            _ => {}
        }
    }
}

/// Rules of nat SHUNT-SVL-*/SHUNT-EXT-* reached by outside sources: the EXT chain without
/// its short-circuit jumps (pod and local sources go to the SVC chain).
fn ipt_external_only(c: &IptChains, ext: &str) -> Option<BTreeSet<SocketAddr>> {
    let rules = c.get(&(Table::Nat, ext.to_string()))?;
    let mut r = Reach::default();
    let mut seen = HashSet::new();
    let mut short_circuit = false;
    for args in rules {
        let rule = ipt_rule(args);
        let Some(t) = rule.target else { continue };
        if !t.starts_with(crate::plan::iptables::CHAIN_PREFIX) {
            continue;
        }
        let conditional = !rule.s.is_empty() || args.iter().any(|a| a == "--src-type");
        if conditional && (t.starts_with("SHUNT-SVC-")) {
            short_circuit = true;
            continue;
        }
        ipt_walk(c, t, &mut r, &mut seen);
    }
    short_circuit.then_some(r.endpoints)
}

/// The frontend kind and the Service from a frontend rule's comment (see
/// `plan::iptables::build`: "NAME cluster IP", "NAME external IP", ..., NodePorts "NAME").
fn ipt_comment(comment: &str, nodeport: bool) -> (String, FrontendKind, Option<NoEndpoints>) {
    let kinds: [(&str, FrontendKind, Option<NoEndpoints>); 8] = [
        (" cluster IP", FrontendKind::ClusterIp, None),
        (
            " has no local endpoints",
            FrontendKind::ClusterIp,
            Some(NoEndpoints::Drop),
        ),
        (
            " has no endpoints",
            FrontendKind::ClusterIp,
            Some(NoEndpoints::Reject),
        ),
        (
            " external IP has no usable endpoints",
            FrontendKind::ExternalIp,
            None,
        ),
        (
            " loadbalancer IP has no usable endpoints",
            FrontendKind::LoadBalancer,
            None,
        ),
        (
            " nodePort has no usable endpoints",
            FrontendKind::NodePort,
            None,
        ),
        (" external IP", FrontendKind::ExternalIp, None),
        (" loadbalancer IP", FrontendKind::LoadBalancer, None),
    ];
    for (suffix, kind, ne) in kinds {
        if let Some(name) = comment.strip_suffix(suffix) {
            return (name.to_string(), kind, ne);
        }
    }
    let kind = if nodeport {
        FrontendKind::NodePort
    } else {
        FrontendKind::External
    };
    (comment.to_string(), kind, None)
}

/// shunt's iptables chains of one family (from `Tracer::from_save`) -> its frontends.
pub fn from_iptables(family: IpFamily, chains: &IptChains) -> FamilyView {
    use crate::plan::iptables::{EXTERNAL_SERVICES, NODEPORTS, SERVICES};
    let mut out: BTreeMap<(Option<IpAddr>, u16, Proto, FrontendKind), FrontendView> =
        BTreeMap::new();
    let mut node_port_addresses: Option<BTreeSet<IpAddr>> = Some(BTreeSet::new());
    let mut push = |table: Table, chain: &str, nodeport: bool| {
        for args in chains
            .get(&(table, chain.to_string()))
            .into_iter()
            .flatten()
        {
            let r = ipt_rule(args);
            let (Some(target), Some(dport), Some(proto)) = (r.target, r.dport, r.proto) else {
                continue;
            };
            let Ok(proto) = proto.parse::<Proto>() else {
                continue;
            };
            let Some(comment) = r.comment else { continue };
            let (service, kind, ne) = ipt_comment(comment, nodeport);
            let addr = if kind == FrontendKind::NodePort {
                None
            } else {
                r.d.and_then(host_addr)
            };
            let f = out
                .entry((addr, dport, proto, kind))
                .or_insert_with(|| FrontendView::new(Some(service), kind, addr, dport, proto));
            match (table, target) {
                (Table::Nat, t) => {
                    let mut reach = Reach::default();
                    ipt_walk(chains, t, &mut reach, &mut HashSet::new());
                    f.endpoints = reach.endpoints;
                    f.affinity_seconds = reach.affinity;
                    f.source_ranges = reach.ranges;
                    f.masquerade = reach.masquerade;
                    if t.starts_with("SHUNT-EXT-") {
                        f.external_endpoints =
                            ipt_external_only(chains, t).filter(|e| *e != f.endpoints);
                    } else if t.starts_with("SHUNT-FW-") {
                        // FW -> EXT: the external-only endpoints of the EXT chain it uses.
                        let ext = chains
                            .get(&(Table::Nat, t.to_string()))
                            .into_iter()
                            .flatten()
                            .find_map(|a| {
                                ipt_rule(a)
                                    .target
                                    .filter(|t| t.starts_with("SHUNT-EXT-"))
                                    .map(str::to_string)
                            });
                        f.external_endpoints = ext
                            .and_then(|e| ipt_external_only(chains, &e))
                            .filter(|e| *e != f.endpoints);
                    }
                }
                (Table::Filter, "REJECT") => f.no_endpoints = Some(NoEndpoints::Reject),
                (Table::Filter, "DROP") => {
                    f.no_endpoints = Some(ne.unwrap_or(NoEndpoints::Drop));
                }
                _ => {}
            }
        }
    };
    push(Table::Nat, SERVICES, false);
    push(Table::Nat, NODEPORTS, true);
    push(Table::Filter, SERVICES, false);
    push(Table::Filter, EXTERNAL_SERVICES, false);
    // The NodePort addresses: SHUNT-SERVICES' last rules `-d IP -j SHUNT-NODEPORTS`, or
    // `--dst-type LOCAL` for every local address.
    for args in chains
        .get(&(Table::Nat, SERVICES.to_string()))
        .into_iter()
        .flatten()
    {
        let r = ipt_rule(args);
        if r.target != Some(NODEPORTS) {
            continue;
        }
        if r.dst_local {
            node_port_addresses = None;
        } else if let (Some(set), Some(a)) = (&mut node_port_addresses, r.d.and_then(host_addr)) {
            set.insert(a);
        }
    }
    // Filter rules of NodePorts without endpoints are per address; fold them into one
    // all-addresses frontend like the nat rule.
    let mut merged: BTreeMap<(Option<IpAddr>, u16, Proto, FrontendKind), FrontendView> =
        BTreeMap::new();
    for ((a, p, pr, k), f) in out {
        let key = if k == FrontendKind::NodePort {
            (None, p, pr, k)
        } else {
            (a, p, pr, k)
        };
        match merged.get_mut(&key) {
            Some(m) => {
                m.no_endpoints = m.no_endpoints.or(f.no_endpoints);
            }
            None => {
                merged.insert(
                    key,
                    FrontendView {
                        address: key.0,
                        ..f
                    },
                );
            }
        }
    }
    FamilyView {
        family: family_name(family).into(),
        node_port_addresses,
        frontends: merged.into_values().collect(),
    }
}
