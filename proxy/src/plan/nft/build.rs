//! Snapshot -> desired ruleset of one family (kube-proxy's setupNFTables + syncProxyRules).
use std::collections::BTreeMap;

use ipnet::IpNet;

use super::ir::*;
use super::names::*;
use crate::model::{
    Endpoint, IpFamily, LocalDetector, NodeNetwork, NodePortIps, ServicePortName, ServicePortState,
    Snapshot,
};

/// Node-wide objects: fixed chains with their rules, fixed sets/maps, node-wide elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFragment {
    pub chains: Vec<ChainDef>,
    pub sets: Vec<SetDef>,
    pub elements: Vec<Element>,
}

/// Everything one service port owns: its chains, affinity sets and map elements.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceFragment {
    pub chains: Vec<ChainDef>,
    pub sets: Vec<SetDef>,
    pub elements: Vec<Element>,
}

/// The desired content of table `shunt` of one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub family: IpFamily,
    pub network: NodeNetwork,
    pub node: NodeFragment,
    pub services: BTreeMap<ServicePortName, ServiceFragment>,
}

impl Ruleset {
    /// Every chain (node-wide first).
    pub fn chains(&self) -> impl Iterator<Item = &ChainDef> {
        self.node
            .chains
            .iter()
            .chain(self.services.values().flat_map(|f| f.chains.iter()))
    }
    /// Every set and map.
    pub fn sets(&self) -> impl Iterator<Item = &SetDef> {
        self.node
            .sets
            .iter()
            .chain(self.services.values().flat_map(|f| f.sets.iter()))
    }
    /// Every element of every fixed set/map.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.node
            .elements
            .iter()
            .chain(self.services.values().flat_map(|f| f.elements.iter()))
    }
    /// What the kernel holds once this ruleset is programmed (names of chains and sets).
    pub fn kernel_table(&self) -> super::tx::KernelTable {
        super::tx::KernelTable {
            chains: self.chains().map(|c| c.name.clone()).collect(),
            sets: self
                .sets()
                .map(|s| {
                    (
                        s.name.clone(),
                        super::tx::KernelSet {
                            verdict_map: s.verdict_map,
                            timeout_seconds: s.timeout_seconds,
                        },
                    )
                })
                .collect(),
        }
    }
    /// Rules plus set/map elements: what `SyncOutcome::rules_total` reports.
    pub fn rule_count(&self) -> u64 {
        let rules: usize = self.chains().map(|c| c.rules.len()).sum();
        let mut elements: Vec<&Element> = self.elements().collect();
        // A ClusterIP shared by several ports of one Service is one set element.
        elements.sort();
        elements.dedup();
        (rules + elements.len()) as u64
    }
}

const DNAT_PRIORITY: i32 = -100;
const SNAT_PRIORITY: i32 = 100;

fn base(name: &str, kind: ChainType, hook: Hook, priority: i32) -> ChainDef {
    ChainDef {
        name: name.to_string(),
        base: Some(BaseHook {
            kind,
            hook,
            priority,
        }),
        rules: Vec::new(),
    }
}

fn regular(name: &str, rules: Vec<Rule>) -> ChainDef {
    ChainDef {
        name: name.to_string(),
        base: None,
        rules,
    }
}

fn jump(chain: &str) -> Option<Verdict> {
    Some(Verdict::Jump(chain.to_string()))
}
fn goto(chain: &str) -> Option<Verdict> {
    Some(Verdict::Goto(chain.to_string()))
}
fn new_conn_jump(chain: &str) -> Rule {
    Rule::new(vec![Match::CtStateNew], vec![], jump(chain))
}

/// `ip saddr <pod CIDRs>` (kube-proxy's IfLocalNFT); None when the detector is a no-op.
fn if_local(detector: &LocalDetector, negate: bool) -> Option<Match> {
    match detector {
        LocalDetector::None => None,
        LocalDetector::ClusterCidr(cidrs) if cidrs.is_empty() => None,
        LocalDetector::ClusterCidr(cidrs) => Some(Match::Saddr {
            nets: cidrs.clone(),
            negate,
        }),
    }
}

fn map(name: &str, key: KeyType, comment: &str) -> SetDef {
    SetDef {
        name: name.to_string(),
        key,
        verdict_map: true,
        timeout_seconds: None,
        comment: Some(comment.to_string()),
    }
}

/// Node-wide objects (kube-proxy's setupNFTables).
pub fn node_fragment(net: &NodeNetwork) -> NodeFragment {
    let family = net.family;
    // Filter chains see pre-DNAT destinations, so they run just before DNAT; the post-DNAT
    // output chain sees what DNAT left untouched (traffic to a ClusterIP on a port the
    // Service does not have).
    let mut filter_prerouting = base(
        FILTER_PREROUTING,
        ChainType::Filter,
        Hook::Prerouting,
        DNAT_PRIORITY - 10,
    );
    let mut filter_input = base(
        FILTER_INPUT,
        ChainType::Filter,
        Hook::Input,
        DNAT_PRIORITY - 10,
    );
    let mut filter_forward = base(
        FILTER_FORWARD,
        ChainType::Filter,
        Hook::Forward,
        DNAT_PRIORITY - 10,
    );
    let mut filter_output = base(
        FILTER_OUTPUT,
        ChainType::Filter,
        Hook::Output,
        DNAT_PRIORITY - 10,
    );
    let mut filter_output_post_dnat = base(
        FILTER_OUTPUT_POST_DNAT,
        ChainType::Filter,
        Hook::Output,
        DNAT_PRIORITY + 10,
    );
    let mut nat_prerouting = base(
        NAT_PREROUTING,
        ChainType::Nat,
        Hook::Prerouting,
        DNAT_PRIORITY,
    );
    let mut nat_output = base(NAT_OUTPUT, ChainType::Nat, Hook::Output, DNAT_PRIORITY);
    let mut nat_postrouting = base(
        NAT_POSTROUTING,
        ChainType::Nat,
        Hook::Postrouting,
        SNAT_PRIORITY,
    );

    // Reject only works in input/forward/output on kernels before 5.9, hence the endpoint
    // checks are not in prerouting (same layout as upstream).
    filter_input
        .rules
        .push(new_conn_jump(NODEPORT_ENDPOINTS_CHECK));
    filter_input
        .rules
        .push(new_conn_jump(SERVICE_ENDPOINTS_CHECK));
    filter_forward
        .rules
        .push(new_conn_jump(SERVICE_ENDPOINTS_CHECK));
    filter_output
        .rules
        .push(new_conn_jump(SERVICE_ENDPOINTS_CHECK));
    filter_prerouting.rules.push(new_conn_jump(FIREWALL_CHECK));
    filter_output.rules.push(new_conn_jump(FIREWALL_CHECK));
    nat_output
        .rules
        .push(Rule::new(vec![], vec![], jump(SERVICES)));
    nat_prerouting
        .rules
        .push(Rule::new(vec![], vec![], jump(SERVICES)));
    nat_postrouting
        .rules
        .push(Rule::new(vec![], vec![], jump(MASQUERADING)));
    filter_forward.rules.push(new_conn_jump(CLUSTER_IPS_CHECK));
    filter_output_post_dnat
        .rules
        .push(new_conn_jump(CLUSTER_IPS_CHECK));

    let mark_masq = regular(
        MARK_MASQ,
        vec![Rule::new(vec![], vec![Stmt::MarkOr(MASQ_MARK)], None)],
    );
    // Clear the bit before masquerading so that a packet that is routed back through this
    // node (hairpin) is not masqueraded twice.
    let masquerading = regular(
        MASQUERADING,
        vec![
            Rule::new(
                vec![Match::MarkClear(MASQ_MARK)],
                vec![],
                Some(Verdict::Return),
            ),
            Rule::new(vec![], vec![Stmt::MarkXor(MASQ_MARK)], None),
            Rule::new(vec![], vec![Stmt::Masquerade], None),
        ],
    );

    let mut cluster_ips_check = vec![
        Rule::new(
            vec![Match::DaddrInSet(CLUSTER_IPS.to_string())],
            vec![],
            Some(Verdict::Reject),
        )
        .with_comment("Reject traffic to invalid ports of ClusterIPs"),
    ];
    if !net.service_cidrs.is_empty() {
        cluster_ips_check.push(
            Rule::new(
                vec![Match::Daddr {
                    nets: net.service_cidrs.clone(),
                    negate: false,
                }],
                vec![],
                Some(Verdict::Drop),
            )
            .with_comment("Drop traffic to unallocated ClusterIPs"),
        );
    }

    let mut sets = vec![SetDef {
        name: CLUSTER_IPS.to_string(),
        key: KeyType::Addr,
        verdict_map: false,
        timeout_seconds: None,
        comment: Some("Active ClusterIPs".to_string()),
    }];
    let mut elements = Vec::new();
    // Which destinations are NodePort destinations: every local address but loopback, or the
    // node addresses inside --nodeport-addresses.
    let nodeport_dest: Vec<Match> = match &net.node_port_ips {
        NodePortIps::AllLocal => vec![
            Match::FibDaddrLocal,
            Match::Daddr {
                nets: vec![loopback(family)],
                negate: true,
            },
        ],
        NodePortIps::Addresses(ips) => {
            sets.push(SetDef {
                name: NODEPORT_IPS.to_string(),
                key: KeyType::Addr,
                verdict_map: false,
                timeout_seconds: None,
                comment: Some("IPs that accept NodePort traffic".to_string()),
            });
            for ip in ips {
                // Localhost NodePorts are not supported (route_localnet is never set).
                if IpFamily::of(ip) == family && !ip.is_loopback() {
                    elements.push(Element {
                        set: NODEPORT_IPS.to_string(),
                        key: Key::Addr(*ip),
                        value: None,
                        comment: None,
                    });
                }
            }
            vec![Match::DaddrInSet(NODEPORT_IPS.to_string())]
        }
    };
    // filter-input only sees local destinations, so the fib check is redundant there.
    let nodeport_dest_input: Vec<Match> = nodeport_dest
        .iter()
        .filter(|m| **m != Match::FibDaddrLocal)
        .cloned()
        .collect();

    sets.push(map(
        NO_ENDPOINT_SERVICES,
        KeyType::AddrProtoPort,
        "vmap to drop or reject packets to services with no endpoints",
    ));
    sets.push(map(
        NO_ENDPOINT_NODEPORTS,
        KeyType::ProtoPort,
        "vmap to drop or reject packets to service nodeports with no endpoints",
    ));
    sets.push(map(
        FIREWALL_IPS,
        KeyType::AddrProtoPort,
        "destinations that are subject to LoadBalancerSourceRanges",
    ));
    sets.push(map(
        SERVICE_IPS,
        KeyType::AddrProtoPort,
        "ClusterIP, ExternalIP and LoadBalancer IP traffic",
    ));
    sets.push(map(
        SERVICE_NODEPORTS,
        KeyType::ProtoPort,
        "NodePort traffic",
    ));

    let vmap = |key: KeyType, name: &str| {
        Some(Verdict::Vmap {
            key,
            map: name.to_string(),
        })
    };
    let reject_chain = regular(
        REJECT_CHAIN,
        vec![Rule::new(vec![], vec![], Some(Verdict::Reject))],
    );
    let service_endpoints_check = regular(
        SERVICE_ENDPOINTS_CHECK,
        vec![Rule::new(
            vec![],
            vec![],
            vmap(KeyType::AddrProtoPort, NO_ENDPOINT_SERVICES),
        )],
    );
    let nodeport_endpoints_check = regular(
        NODEPORT_ENDPOINTS_CHECK,
        vec![Rule::new(
            nodeport_dest_input,
            vec![],
            vmap(KeyType::ProtoPort, NO_ENDPOINT_NODEPORTS),
        )],
    );
    let firewall_check = regular(
        FIREWALL_CHECK,
        vec![Rule::new(
            vec![],
            vec![],
            vmap(KeyType::AddrProtoPort, FIREWALL_IPS),
        )],
    );
    let services = regular(
        SERVICES,
        vec![
            Rule::new(vec![], vec![], vmap(KeyType::AddrProtoPort, SERVICE_IPS)),
            Rule::new(
                nodeport_dest,
                vec![],
                vmap(KeyType::ProtoPort, SERVICE_NODEPORTS),
            ),
        ],
    );

    NodeFragment {
        chains: vec![
            filter_prerouting,
            filter_input,
            filter_forward,
            filter_output,
            filter_output_post_dnat,
            nat_prerouting,
            nat_output,
            nat_postrouting,
            services,
            service_endpoints_check,
            nodeport_endpoints_check,
            reject_chain,
            regular(CLUSTER_IPS_CHECK, cluster_ips_check),
            firewall_check,
            mark_masq,
            masquerading,
        ],
        sets,
        elements,
    }
}

/// kube-proxy's UsesClusterEndpoints: Cluster endpoints serve internal traffic with iTP
/// Cluster, and any external traffic (also with eTP Local, for the short-circuits).
fn uses_cluster_endpoints(s: &ServicePortState) -> bool {
    !s.port.internal_policy_local || s.port.externally_accessible()
}
/// kube-proxy's UsesLocalEndpoints.
fn uses_local_endpoints(s: &ServicePortState) -> bool {
    s.port.internal_policy_local || (s.port.external_policy_local && s.port.externally_accessible())
}

/// The rules, sets and elements of one service port (kube-proxy's per-service loop).
pub fn service_fragment(
    net: &NodeNetwork,
    name: &ServicePortName,
    s: &ServicePortState,
    masquerade_all: bool,
) -> ServiceFragment {
    let port = &s.port;
    let proto = name.protocol;
    let affinity = port.affinity_timeout_seconds;
    let mut frag = ServiceFragment::default();

    let cluster_eps: &[Endpoint] = if uses_cluster_endpoints(s) {
        &s.cluster_endpoints
    } else {
        &[]
    };
    let local_eps: &[Endpoint] = if uses_local_endpoints(s) {
        &s.local_endpoints
    } else {
        &[]
    };
    // Every endpoint some policy chain can send to, each once.
    let mut reachable: Vec<&Endpoint> = Vec::new();
    for ep in cluster_eps.iter().chain(local_eps.iter()) {
        if !reachable.iter().any(|r| r.ip == ep.ip && r.port == ep.port) {
            reachable.push(ep);
        }
    }

    let cluster_chain_name = cluster_chain(name);
    let local_chain_name = local_chain(name);
    let external_chain_name = external_chain(name);
    let fw_chain_name = firewall_chain(name);
    let uses_cluster_chain = !cluster_eps.is_empty();
    let uses_local_chain = !local_eps.is_empty();

    let has_endpoints = s.has_any_endpoints;
    // Internal traffic goes to the chain of its policy; a policy chain without endpoints is
    // never created, so "no endpoints for this policy" is decided by the chain's existence.
    let (internal_chain, has_internal) = if port.internal_policy_local {
        (&local_chain_name, has_endpoints && uses_local_chain)
    } else {
        (&cluster_chain_name, has_endpoints && uses_cluster_chain)
    };
    let (external_policy_chain, has_external) = if port.external_policy_local {
        (&local_chain_name, has_endpoints && uses_local_chain)
    } else {
        (&cluster_chain_name, has_endpoints && uses_cluster_chain)
    };
    // The external chain exists whenever there are endpoints anywhere, for the
    // short-circuit rules, even if external traffic itself has no endpoint here.
    let uses_external_chain = has_endpoints && port.externally_accessible();

    // No endpoints at all: REJECT (via reject-chain, since a map cannot hold "reject").
    // Endpoints, but none for this policy on this node: DROP.
    let reject = Verdict::Goto(REJECT_CHAIN.to_string());
    let internal_filter = if has_endpoints {
        Verdict::Drop
    } else {
        reject.clone()
    };
    let external_filter = internal_filter.clone();

    let port_name = name.to_string();
    // Elements that drop or reject name their service port, as upstream's do.
    let elem = |set: &str, key: Key, value: Option<Verdict>| Element {
        comment: (set == NO_ENDPOINT_SERVICES || set == NO_ENDPOINT_NODEPORTS)
            .then(|| port_name.clone()),
        set: set.to_string(),
        key,
        value,
    };
    let svc_port = port.port;

    frag.elements
        .push(elem(CLUSTER_IPS, Key::Addr(port.cluster_ip), None));
    let cip_key = Key::AddrProtoPort(port.cluster_ip, proto, svc_port);
    if has_internal {
        frag.elements.push(elem(
            SERVICE_IPS,
            cip_key,
            Some(Verdict::Goto(internal_chain.clone())),
        ));
    } else {
        frag.elements
            .push(elem(NO_ENDPOINT_SERVICES, cip_key, Some(internal_filter)));
    }

    for ip in &port.external_ips {
        let key = Key::AddrProtoPort(*ip, proto, svc_port);
        if has_endpoints {
            frag.elements.push(elem(
                SERVICE_IPS,
                key.clone(),
                Some(Verdict::Goto(external_chain_name.clone())),
            ));
        }
        if !has_external {
            frag.elements.push(elem(
                NO_ENDPOINT_SERVICES,
                key,
                Some(external_filter.clone()),
            ));
        }
    }

    let uses_fw_chain =
        !port.load_balancer_ips.is_empty() && !port.load_balancer_source_ranges.is_empty();
    for ip in &port.load_balancer_ips {
        let key = Key::AddrProtoPort(*ip, proto, svc_port);
        if has_endpoints {
            frag.elements.push(elem(
                SERVICE_IPS,
                key.clone(),
                Some(Verdict::Goto(external_chain_name.clone())),
            ));
        }
        if uses_fw_chain {
            frag.elements.push(elem(
                FIREWALL_IPS,
                key.clone(),
                Some(Verdict::Goto(fw_chain_name.clone())),
            ));
        }
        if !has_external {
            frag.elements.push(elem(
                NO_ENDPOINT_SERVICES,
                key,
                Some(external_filter.clone()),
            ));
        }
    }

    if let Some(node_port) = port.node_port {
        let key = Key::ProtoPort(proto, node_port);
        if has_endpoints {
            // NodePorts are not subject to loadBalancerSourceRanges (as upstream).
            frag.elements.push(elem(
                SERVICE_NODEPORTS,
                key.clone(),
                Some(Verdict::Goto(external_chain_name.clone())),
            ));
        }
        if !has_external {
            frag.elements.push(elem(
                NO_ENDPOINT_NODEPORTS,
                key,
                Some(external_filter.clone()),
            ));
        }
    }

    // Internal chain: masquerade what does not come from a pod (off-cluster clients that
    // route the service CIDR to this node may be answered from another node).
    let ip_daddr_port = vec![
        Match::Daddr {
            nets: vec![host(port.cluster_ip)],
            negate: false,
        },
        Match::Dport(proto, svc_port),
    ];
    let mut chains: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    if has_internal {
        let mut rules = Vec::new();
        if masquerade_all {
            rules.push(Rule::new(ip_daddr_port.clone(), vec![], jump(MARK_MASQ)));
        } else if let Some(not_local) = if_local(&net.local_detector, true) {
            let mut m = ip_daddr_port.clone();
            m.push(not_local);
            rules.push(Rule::new(m, vec![], jump(MARK_MASQ)));
        }
        chains
            .entry(internal_chain.clone())
            .or_default()
            .extend(rules);
    }

    if uses_external_chain {
        let mut rules = Vec::new();
        if !port.external_policy_local {
            // Endpoints may be on other nodes: masquerade so that replies come back here.
            rules.push(Rule::new(vec![], vec![], jump(MARK_MASQ)));
        } else {
            if uses_cluster_chain {
                // Pod -> external IP traffic acts as if it went out to the load balancer and
                // came back: it is subject to neither traffic policy.
                if let Some(local) = if_local(&net.local_detector, false) {
                    rules.push(
                        Rule::new(vec![local], vec![], goto(&cluster_chain_name))
                            .with_comment("short-circuit pod traffic"),
                    );
                }
            }
            // The node's own traffic gets a node address as source, which endpoints on
            // other nodes could not answer: masquerade it, and send it anywhere.
            rules.push(
                Rule::new(vec![Match::FibSaddrLocal], vec![], jump(MARK_MASQ))
                    .with_comment("masquerade local traffic"),
            );
            if uses_cluster_chain {
                rules.push(
                    Rule::new(
                        vec![Match::FibSaddrLocal],
                        vec![],
                        goto(&cluster_chain_name),
                    )
                    .with_comment("short-circuit local traffic"),
                );
            }
        }
        if has_external {
            rules.push(Rule::new(vec![], vec![], goto(external_policy_chain)));
        }
        chains.insert(external_chain_name.clone(), rules);
    }

    if uses_fw_chain {
        let mut sources: Vec<IpNet> = Vec::new();
        let mut allow_from_node = false;
        for cidr in &port.load_balancer_source_ranges {
            sources.push(*cidr);
            if let Some(node_ip) = net.primary_ip
                && cidr.contains(&node_ip)
            {
                allow_from_node = true;
            }
        }
        // A VIP often is also a local address: a request from this node to it then comes
        // back with the VIP as source, which must be allowed when the node itself is.
        if allow_from_node {
            sources.extend(port.load_balancer_ips.iter().map(|ip| host(*ip)));
        }
        chains.insert(
            fw_chain_name.clone(),
            vec![Rule::new(
                vec![Match::Saddr {
                    nets: sources,
                    negate: true,
                }],
                vec![],
                Some(Verdict::Drop),
            )],
        );
    }

    if let Some(timeout) = affinity {
        for ep in &reachable {
            frag.sets.push(SetDef {
                name: affinity_set(name, ep),
                key: KeyType::Addr,
                verdict_map: false,
                timeout_seconds: Some(timeout),
                comment: None,
            });
        }
    }

    let to_endpoints = |eps: &[Endpoint]| -> Vec<Rule> {
        let mut rules = Vec::new();
        if affinity.is_some() {
            for ep in eps {
                rules.push(Rule::new(
                    vec![Match::SaddrInSet(affinity_set(name, ep))],
                    vec![],
                    goto(&endpoint_chain(name, ep)),
                ));
            }
        }
        rules.push(Rule::new(
            vec![],
            vec![],
            Some(Verdict::RandomGoto(
                eps.iter().map(|ep| endpoint_chain(name, ep)).collect(),
            )),
        ));
        rules
    };
    if uses_cluster_chain {
        chains
            .entry(cluster_chain_name.clone())
            .or_default()
            .extend(to_endpoints(cluster_eps));
    }
    if uses_local_chain {
        chains
            .entry(local_chain_name.clone())
            .or_default()
            .extend(to_endpoints(local_eps));
    }

    for ep in &reachable {
        let mut rules = vec![Rule::new(
            vec![Match::Saddr {
                nets: vec![host(ep.ip)],
                negate: false,
            }],
            vec![],
            jump(MARK_MASQ),
        )];
        if affinity.is_some() {
            rules.push(Rule::new(
                vec![],
                vec![Stmt::UpdateSaddr(affinity_set(name, ep))],
                None,
            ));
        }
        rules.push(Rule::new(
            vec![Match::L4Proto(proto)],
            vec![Stmt::Dnat(ep.addr())],
            None,
        ));
        chains.insert(endpoint_chain(name, ep), rules);
    }

    frag.chains = chains
        .into_iter()
        .map(|(name, rules)| ChainDef {
            name,
            base: None,
            rules,
        })
        .collect();
    frag
}

/// The whole desired ruleset of one family.
pub fn ruleset(snapshot: &Snapshot) -> Ruleset {
    let net = &snapshot.network;
    let services = snapshot
        .services
        .iter()
        // A port whose ClusterIP is of the other family belongs to the other table.
        .filter(|(_, s)| IpFamily::of(&s.port.cluster_ip) == net.family)
        .map(|(name, s)| {
            (
                name.clone(),
                service_fragment(net, name, s, net.masquerade_all),
            )
        })
        .collect();
    Ruleset {
        family: net.family,
        network: net.clone(),
        node: node_fragment(net),
        services,
    }
}
