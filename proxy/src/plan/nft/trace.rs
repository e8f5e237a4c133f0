//! Packet tracer over an nftables ruleset (the plan's `Ruleset`, or a table read back from the
//! kernel and parsed by `inspect::nft`), in the spirit of kube-proxy's nftables
//! helpers_test.go tracer, but following the netfilter hooks a first packet really crosses
//! and executing marks, `return`, `goto` and NAT statements instead of pattern-matching rules.
//!
//! Hook order (priorities as built): a packet from a node address is locally generated:
//! filter-output (-110), nat-output (-100), filter-output-post-dnat (-90), then, when the
//! (possibly DNATed) destination is local, filter-input; then nat-postrouting. Any other
//! packet arrives: filter-prerouting (-110), nat-prerouting (-100), then filter-input if the
//! destination is local, else filter-forward and nat-postrouting. Affinity sets are empty
//! (first packet); `numgen random` is explored branch by branch.
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use super::build::Ruleset;
use super::ir::*;
use super::names::*;
use crate::model::Protocol;

#[derive(Clone, Debug)]
pub struct Packet {
    pub protocol: Protocol,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
}

/// What happened to the packet on one branch of the random endpoint choice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    Drop,
    Reject,
    /// Neither NATed nor filtered.
    Passthrough {
        masquerade: bool,
    },
    Dnat {
        to: SocketAddr,
        masquerade: bool,
    },
}

/// Why a ruleset cannot be traced: it holds something shunt never programs (a read-back table
/// changed by hand, or by another version), so no verdict can be trusted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("chain {0} is jumped to but does not exist")]
    UnknownChain(String),
    #[error("chain loop through {0}")]
    Loop(String),
    #[error("more than {0} endpoint-choice branches")]
    TooManyBranches(usize),
    #[error("map {map}: {what}")]
    Map { map: String, what: String },
}

/// All outcomes over every endpoint choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub fates: BTreeSet<Fate>,
    /// For each fate, the chains the first branch reaching it went through, in order.
    pub paths: std::collections::BTreeMap<Fate, Vec<String>>,
}

impl Trace {
    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.fates
            .iter()
            .filter_map(|f| match f {
                Fate::Dnat { to, .. } => Some(*to),
                _ => None,
            })
            .collect()
    }
}

enum Flow {
    /// `return` / end of a goto'd chain: back to the chain that jumped.
    Return,
    /// The base chain is done with the packet (accept, or a NAT statement).
    Accept,
    Drop,
    Reject,
}

struct Run<'a> {
    chains: HashMap<&'a str, &'a ChainDef>,
    elements: HashMap<&'a str, Vec<&'a Element>>,
    node_ips: &'a [IpAddr],
    /// Which branch to take at the next `numgen` (index into the list of branches taken).
    picks: Vec<usize>,
    next_pick: usize,
    /// Number of branches seen at each numgen, in order.
    widths: Vec<usize>,
    // packet state
    mark: u32,
    dnat: Option<SocketAddr>,
    masquerade: bool,
    depth: usize,
    /// Chains entered, in order (for explaining a verdict).
    path: Vec<String>,
}

fn in_nets(ip: &IpAddr, nets: &[ipnet::IpNet]) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

impl<'a> Run<'a> {
    fn has(&self, set: &str, key: &Key) -> Option<&'a Element> {
        self.elements
            .get(set)
            .and_then(|v| v.iter().find(|e| &e.key == key).copied())
    }

    fn matches(&self, m: &Match, p: &Packet) -> bool {
        let dst = self.dnat.map_or(p.dst, |d| d.ip());
        let dport = self.dnat.map_or(p.dport, |d| d.port());
        match m {
            Match::CtStateNew => true,
            Match::Daddr { nets, negate } => in_nets(&dst, nets) != *negate,
            Match::Saddr { nets, negate } => in_nets(&p.src, nets) != *negate,
            Match::DaddrInSet(s) => self.has(s, &Key::Addr(dst)).is_some(),
            // Affinity sets start empty: a first packet has no affinity yet.
            Match::SaddrInSet(s) => self.has(s, &Key::Addr(p.src)).is_some(),
            Match::Dport(proto, port) => *proto == p.protocol && *port == dport,
            Match::L4Proto(proto) => *proto == p.protocol,
            Match::FibDaddrLocal => self.node_ips.contains(&dst),
            Match::FibSaddrLocal => self.node_ips.contains(&p.src),
            Match::MarkClear(m) => self.mark & m == 0,
        }
    }

    fn run_chain(&mut self, name: &str, p: &Packet) -> Result<Flow, TraceError> {
        self.depth += 1;
        self.path.push(name.to_string());
        if self.depth >= 64 {
            return Err(TraceError::Loop(name.to_string()));
        }
        let chain = *self
            .chains
            .get(name)
            .ok_or_else(|| TraceError::UnknownChain(name.to_string()))?;
        let mut flow = Flow::Return;
        'rules: for rule in &chain.rules {
            if !rule.matches.iter().all(|m| self.matches(m, p)) {
                continue;
            }
            for st in &rule.stmts {
                match st {
                    Stmt::MarkOr(m) => self.mark |= m,
                    Stmt::MarkXor(m) => self.mark ^= m,
                    Stmt::UpdateSaddr(_) => {}
                    Stmt::Masquerade => {
                        self.masquerade = true;
                        flow = Flow::Accept;
                        break 'rules;
                    }
                    Stmt::Dnat(to) => {
                        self.dnat = Some(*to);
                        flow = Flow::Accept;
                        break 'rules;
                    }
                }
            }
            let Some(v) = &rule.verdict else { continue };
            let next = match v {
                Verdict::Drop => Some(Flow::Drop),
                Verdict::Reject => Some(Flow::Reject),
                Verdict::Return => Some(Flow::Return),
                Verdict::Jump(c) => self.call(c, p, false)?,
                Verdict::Goto(c) => self.call(c, p, true)?,
                Verdict::Vmap { key, map } => {
                    let dst = self.dnat.map_or(p.dst, |d| d.ip());
                    let dport = self.dnat.map_or(p.dport, |d| d.port());
                    let k = match key {
                        KeyType::Addr => Key::Addr(dst),
                        KeyType::AddrProtoPort => Key::AddrProtoPort(dst, p.protocol, dport),
                        KeyType::ProtoPort => Key::ProtoPort(p.protocol, dport),
                        KeyType::Pick => {
                            return Err(TraceError::Map {
                                map: map.clone(),
                                what: "a pick map used as a vmap".into(),
                            });
                        }
                    };
                    match self.has(map, &k).and_then(|e| e.value.clone()) {
                        None => None,
                        Some(Verdict::Drop) => Some(Flow::Drop),
                        Some(Verdict::Goto(c)) => self.call(&c, p, true)?,
                        Some(Verdict::Jump(c)) => self.call(&c, p, false)?,
                        Some(other) => {
                            return Err(TraceError::Map {
                                map: map.clone(),
                                what: format!("unexpected map verdict {other:?}"),
                            });
                        }
                    }
                }
                Verdict::Pick { count, offset, map } => {
                    let i = self.next_pick;
                    self.next_pick += 1;
                    self.widths.push(*count as usize);
                    let pick = self.picks.get(i).copied().unwrap_or(0) as u32;
                    // Every slot of the range must be in the map, else nft would fall
                    // through with no verdict for that draw.
                    match self.has(map, &Key::Pick(offset + pick)).map(|e| &e.value) {
                        Some(Some(Verdict::Goto(c))) => self.call(c, p, true)?,
                        other => {
                            return Err(TraceError::Map {
                                map: map.clone(),
                                what: format!("slot {} holds {other:?}", offset + pick),
                            });
                        }
                    }
                }
            };
            if let Some(f) = next {
                flow = f;
                break;
            }
        }
        self.depth -= 1;
        Ok(flow)
    }

    /// Runs a jump/goto target. Returns the flow that ends the calling chain, if any.
    fn call(
        &mut self,
        target: &str,
        p: &Packet,
        is_goto: bool,
    ) -> Result<Option<Flow>, TraceError> {
        Ok(match self.run_chain(target, p)? {
            Flow::Return if is_goto => Some(Flow::Return),
            Flow::Return => None,
            f => Some(f),
        })
    }

    /// A base chain; a table without it (read back half-written) has no say at that hook.
    fn base(&mut self, name: &str, p: &Packet) -> Result<Option<Fate>, TraceError> {
        if !self.chains.contains_key(name) {
            return Ok(None);
        }
        Ok(match self.run_chain(name, p)? {
            Flow::Drop => Some(Fate::Drop),
            Flow::Reject => Some(Fate::Reject),
            _ => None,
        })
    }

    fn path(&mut self, p: &Packet) -> Result<Fate, TraceError> {
        let local_src = self.node_ips.contains(&p.src);
        let (pre_filter, pre_nat) = if local_src {
            (FILTER_OUTPUT, NAT_OUTPUT)
        } else {
            (FILTER_PREROUTING, NAT_PREROUTING)
        };
        if let Some(f) = self.base(pre_filter, p)? {
            return Ok(f);
        }
        if let Some(f) = self.base(pre_nat, p)? {
            return Ok(f);
        }
        if local_src && let Some(f) = self.base(FILTER_OUTPUT_POST_DNAT, p)? {
            return Ok(f);
        }
        let dst = self.dnat.map_or(p.dst, |d| d.ip());
        let to_local = self.node_ips.contains(&dst);
        if !local_src
            && !to_local
            && let Some(f) = self.base(FILTER_FORWARD, p)?
        {
            return Ok(f);
        }
        if let Some(f) = self.base(NAT_POSTROUTING, p)? {
            return Ok(f);
        }
        if to_local && let Some(f) = self.base(FILTER_INPUT, p)? {
            return Ok(f);
        }
        Ok(match self.dnat {
            Some(to) => Fate::Dnat {
                to,
                masquerade: self.masquerade,
            },
            None => Fate::Passthrough {
                masquerade: self.masquerade,
            },
        })
    }
}

/// Traces `p` through `rs` on a node owning `node_ips`, over every endpoint choice. Panics
/// where [`try_trace`] fails: the plan's own rulesets are always traceable.
pub fn trace(rs: &Ruleset, node_ips: &[IpAddr], p: &Packet) -> Trace {
    try_trace(rs.chains(), rs.elements(), node_ips, p).expect("the plan's ruleset traces")
}

/// Traces `p` through the chains and set/map elements of one family's table (the plan's, or
/// one read back from the kernel) on a node owning `node_ips`, over every endpoint choice.
pub fn try_trace<'a>(
    chains: impl Iterator<Item = &'a ChainDef>,
    elements: impl Iterator<Item = &'a Element>,
    node_ips: &[IpAddr],
    p: &Packet,
) -> Result<Trace, TraceError> {
    let chains: HashMap<&str, &ChainDef> = chains.map(|c| (c.name.as_str(), c)).collect();
    let mut element_map: HashMap<&str, Vec<&Element>> = HashMap::new();
    for e in elements {
        element_map.entry(e.set.as_str()).or_default().push(e);
    }
    let elements = element_map;
    let mut fates = BTreeSet::new();
    let mut paths = std::collections::BTreeMap::new();
    // Depth-first over the choices: `pending` holds pick prefixes still to explore.
    let mut pending: Vec<Vec<usize>> = vec![Vec::new()];
    let mut runs = 0;
    while let Some(picks) = pending.pop() {
        runs += 1;
        if runs >= MAX_BRANCHES {
            return Err(TraceError::TooManyBranches(MAX_BRANCHES));
        }
        let mut run = Run {
            chains: chains.clone(),
            elements: elements.clone(),
            node_ips,
            picks: picks.clone(),
            next_pick: 0,
            widths: Vec::new(),
            mark: 0,
            dnat: None,
            masquerade: false,
            depth: 0,
            path: Vec::new(),
        };
        let fate = run.path(p)?;
        paths
            .entry(fate.clone())
            .or_insert_with(|| run.path.clone());
        fates.insert(fate);
        // Branch on every numgen reached beyond the forced prefix.
        for (i, width) in run.widths.iter().enumerate().skip(picks.len()) {
            let mut prefix: Vec<usize> = picks.clone();
            prefix.resize(i, 0);
            for alt in 1..*width {
                let mut next = prefix.clone();
                next.push(alt);
                pending.push(next);
            }
        }
    }
    Ok(Trace { fates, paths })
}

/// Bound on the endpoint choices explored for one packet (each `numgen` multiplies them).
const MAX_BRANCHES: usize = 10_000;
