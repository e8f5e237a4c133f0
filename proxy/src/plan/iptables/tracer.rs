//! A packet tracer over iptables rules: the rendered `iptables-restore` text, or shunt's
//! chains read back with `iptables-save` ([`Tracer::from_save`]), in the spirit of
//! kube-proxy's iptables tracer (pkg/proxy/iptables/proxier_test.go): it parses the rules,
//! follows `-j` into user chains and back on RETURN/end of chain, explores both branches of
//! every `-m statistic` match (so all reachable endpoints are enumerated), and understands
//! exactly the matches and targets shunt emits, in both spellings (what we render, and how
//! iptables-save prints it back: `--set-xmark` for `--or-mark`/`--xor-mark`, `-m recent
//! --rsource`, `--reject-with`, `--random-fully`); anything else is a [`TraceError`], so a
//! rule form nobody taught it cannot silently be ignored.
//!
//! Packet path (one new connection, first packet, netfilter hook order): nat PREROUTING (or
//! nat OUTPUT for node-originated packets) -> routing on the possibly DNATed destination ->
//! filter INPUT / FORWARD / OUTPUT -> nat POSTROUTING (unless delivered locally).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{JumpRule, Table};
use crate::model::Protocol;

/// A rule the tracer does not understand, or a structure it cannot follow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("line {line:?}: {what}")]
    Line { line: String, what: String },
    #[error("rule {rule:?}: {what}")]
    Rule { rule: String, what: String },
    #[error("chain {0} is jumped to but does not exist")]
    UnknownChain(String),
    #[error("chain loop through {0}")]
    Loop(String),
}

fn rule_err(rule: &[String], what: impl Into<String>) -> TraceError {
    TraceError::Rule {
        rule: rule.join(" "),
        what: what.into(),
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub protocol: Protocol,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
}

/// What happened to a packet on one branch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Dnat { to: SocketAddr, masq: bool },
    Pass { masq: bool },
    Drop,
    Reject,
}

#[derive(Clone, Debug, Default)]
struct State {
    mark: u32,
    dnat: Option<SocketAddr>,
    recent: BTreeMap<String, BTreeSet<IpAddr>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Return,
    Accept,
    Drop,
    Reject,
    Masquerade,
}

pub struct Tracer {
    chains: BTreeMap<(Table, String), Vec<Vec<String>>>,
    local: Vec<IpAddr>,
    /// `-m recent` lists before the packet (affinity state).
    pub recent: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// Split a rule like a shell would for iptables-restore: whitespace, double quotes.
fn tokens(line: &str) -> Result<Vec<String>, TraceError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err(TraceError::Line {
            line: line.to_string(),
            what: "unbalanced quote".into(),
        });
    }
    if any {
        out.push(cur);
    }
    Ok(out)
}

impl Tracer {
    /// Load a restore input (all tables) and the jump rules; `local` are the node's addresses.
    /// Panics where [`Tracer::try_new`] fails (the plan's own output always loads).
    pub fn new(restore: &str, jumps: &[JumpRule], local: &[IpAddr]) -> Tracer {
        Tracer::try_new(restore, jumps, local).expect("the rendered restore loads")
    }

    /// Load a restore input (all tables) and the jump rules; `local` are the node's addresses.
    pub fn try_new(
        restore: &str,
        jumps: &[JumpRule],
        local: &[IpAddr],
    ) -> Result<Tracer, TraceError> {
        let mut chains = load(restore, false)?;
        for j in jumps {
            chains
                .entry((j.table, j.chain.to_string()))
                .or_default()
                .push(j.args.clone());
        }
        Ok(Tracer {
            chains,
            local: local.to_vec(),
            recent: BTreeMap::new(),
        })
    }

    /// Load `iptables-save` output (one family, every table): shunt's `SHUNT-` chains, and
    /// from the built-in chains only the rules that jump into them (another program's rules
    /// there, and every other table, are not shunt's and are left out of the verdict).
    pub fn from_save(save: &str, local: &[IpAddr]) -> Result<Tracer, TraceError> {
        Ok(Tracer {
            chains: load(save, true)?,
            local: local.to_vec(),
            recent: BTreeMap::new(),
        })
    }

    /// Every chain's rules (for assertions on structure).
    pub fn chain(&self, table: Table, name: &str) -> Option<&Vec<Vec<String>>> {
        self.chains.get(&(table, name.to_string()))
    }

    /// Every chain, by table and name.
    pub fn chains(&self) -> &BTreeMap<(Table, String), Vec<Vec<String>>> {
        &self.chains
    }

    /// All outcomes of one packet; panics where [`Tracer::try_trace`] fails.
    pub fn trace(&self, p: &Packet) -> BTreeSet<Outcome> {
        self.try_trace(p).expect("the rendered rules trace")
    }

    /// All outcomes of one packet (several when a random choice is involved), deduplicated.
    pub fn try_trace(&self, p: &Packet) -> Result<BTreeSet<Outcome>, TraceError> {
        let node_src = self.local.contains(&p.src);
        let start = State {
            recent: self.recent.clone(),
            ..State::default()
        };
        let mut out = BTreeSet::new();
        let nat_hook = if node_src { "OUTPUT" } else { "PREROUTING" };
        for (st, term) in self.walk(Table::Nat, nat_hook, p, start, 0)? {
            if !matches!(term, Term::Return | Term::Accept) {
                return Err(TraceError::Rule {
                    rule: format!("nat {nat_hook}"),
                    what: format!("ended in {term:?}"),
                });
            }
            let dst = st.dnat.map(|a| a.ip()).unwrap_or(p.dst);
            let filter_hook = if node_src {
                "OUTPUT"
            } else if self.local.contains(&dst) {
                "INPUT"
            } else {
                "FORWARD"
            };
            for (st, term) in self.walk(Table::Filter, filter_hook, p, st, 0)? {
                match term {
                    Term::Drop => {
                        out.insert(Outcome::Drop);
                    }
                    Term::Reject => {
                        out.insert(Outcome::Reject);
                    }
                    Term::Accept | Term::Return => {
                        // Locally delivered packets never see POSTROUTING.
                        let masq = filter_hook != "INPUT"
                            && self
                                .walk(Table::Nat, "POSTROUTING", p, st.clone(), 0)?
                                .iter()
                                .any(|(_, t)| *t == Term::Masquerade);
                        out.insert(match st.dnat {
                            Some(to) => Outcome::Dnat { to, masq },
                            None => Outcome::Pass { masq },
                        });
                    }
                    Term::Masquerade => {
                        return Err(TraceError::Rule {
                            rule: format!("filter {filter_hook}"),
                            what: "MASQUERADE in filter".into(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    fn walk(
        &self,
        table: Table,
        chain: &str,
        p: &Packet,
        st: State,
        depth: usize,
    ) -> Result<Vec<(State, Term)>, TraceError> {
        if depth > 64 {
            return Err(TraceError::Loop(chain.to_string()));
        }
        let Some(rules) = self.chains.get(&(table, chain.to_string())) else {
            // A built-in chain with no rules of ours: policy ACCEPT.
            if !chain.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(TraceError::UnknownChain(chain.to_string()));
            }
            return Ok(vec![(st, Term::Return)]);
        };
        let mut results = Vec::new();
        let mut pending = vec![(0, st)];
        // Bounded: each step consumes a rule index.
        while let Some((idx, mut st)) = pending.pop() {
            let Some(rule) = rules.get(idx) else {
                results.push((st, Term::Return));
                continue;
            };
            let before = st.clone();
            let (matched, random) = self.matches(rule, p, &mut st)?;
            if !matched {
                pending.push((idx + 1, before));
                continue;
            }
            if random {
                // Both branches of the random choice: this one not taken...
                pending.push((idx + 1, before));
            }
            // ...and taken.
            match self.apply_target(table, rule, &mut st)? {
                Some(Target::Continue) => pending.push((idx + 1, st)),
                Some(Target::Term(t)) => results.push((st, t)),
                Some(Target::Jump(name)) => {
                    for (st2, t) in self.walk(table, &name, p, st, depth + 1)? {
                        if t == Term::Return {
                            pending.push((idx + 1, st2));
                        } else {
                            results.push((st2, t));
                        }
                    }
                }
                None => pending.push((idx + 1, st)),
            }
        }
        Ok(results)
    }

    /// (matched, random-branch). Evaluates every match of the rule; `-m recent --set` records.
    fn matches(
        &self,
        rule: &[String],
        p: &Packet,
        st: &mut State,
    ) -> Result<(bool, bool), TraceError> {
        let dst = st.dnat.map(|a| a.ip()).unwrap_or(p.dst);
        let dport = st.dnat.map(|a| a.port()).unwrap_or(p.dport);
        let mut ok = true;
        let mut random = false;
        let mut negate = false;
        let mut i = 0;
        let mut recent_name: Option<String> = None;
        let mut recent_set = false;
        let arg = |i: usize| rule.get(i + 1).map(String::as_str).unwrap_or("");
        while i < rule.len() && ok {
            let opt = rule[i].as_str();
            let mut step = 2;
            let m: Option<bool> = match opt {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                "-m" => {
                    if ![
                        "comment",
                        "tcp",
                        "udp",
                        "sctp",
                        "addrtype",
                        "statistic",
                        "recent",
                        "mark",
                        "conntrack",
                    ]
                    .contains(&arg(i))
                    {
                        return Err(rule_err(rule, format!("unknown match module {}", arg(i))));
                    }
                    None
                }
                "--comment" => None,
                "-p" => Some(arg(i) == p.protocol.as_str()),
                "--dport" => Some(
                    arg(i)
                        .parse::<u16>()
                        .map_err(|_| rule_err(rule, "bad --dport"))?
                        == dport,
                ),
                "-s" => Some(net(rule, arg(i))?.contains(&p.src)),
                "-d" => Some(net(rule, arg(i))?.contains(&dst)),
                "--dst-type" if arg(i) == "LOCAL" => Some(self.local.contains(&dst)),
                "--src-type" if arg(i) == "LOCAL" => Some(self.local.contains(&p.src)),
                // A first packet is NEW (never INVALID, RELATED or ESTABLISHED).
                "--ctstate" => Some(arg(i).split(',').any(|s| s == "NEW")),
                "--mark" => {
                    let (v, m) = value_mask(rule, arg(i))?;
                    Some(st.mark & m == v)
                }
                "--mode" if arg(i) == "random" => None,
                "--probability" => {
                    let prob: f64 = arg(i)
                        .parse()
                        .map_err(|_| rule_err(rule, "bad --probability"))?;
                    if !(prob > 0.0 && prob < 1.0) {
                        return Err(rule_err(rule, format!("probability {prob}")));
                    }
                    random = true;
                    None
                }
                // iptables-save spells out recent's defaults (source address, host mask).
                "--rsource" => {
                    step = 1;
                    None
                }
                "--name" => {
                    recent_name = Some(arg(i).to_string());
                    None
                }
                "--mask" | "--seconds" => None,
                "--reap" => {
                    step = 1;
                    None
                }
                "--rcheck" => {
                    step = 1;
                    // iptables-save prints --name after --rcheck: look it up in the rule.
                    let name = match &recent_name {
                        Some(n) => n.clone(),
                        None => rule
                            .iter()
                            .position(|t| t == "--name")
                            .and_then(|k| rule.get(k + 1))
                            .cloned()
                            .ok_or_else(|| rule_err(rule, "--rcheck without --name"))?,
                    };
                    Some(st.recent.get(&name).is_some_and(|s| s.contains(&p.src)))
                }
                "--set" => {
                    step = 1;
                    recent_set = true;
                    None
                }
                "-j" | "-g" => break,
                other => return Err(rule_err(rule, format!("unknown option {other}"))),
            };
            if let Some(m) = m {
                ok = m != negate;
            }
            negate = false;
            i += step;
        }
        if ok && recent_set {
            let name = recent_name.ok_or_else(|| rule_err(rule, "--set without --name"))?;
            st.recent.entry(name).or_default().insert(p.src);
        }
        Ok((ok, ok && random))
    }

    fn apply_target(
        &self,
        table: Table,
        rule: &[String],
        st: &mut State,
    ) -> Result<Option<Target>, TraceError> {
        let Some(j) = rule.iter().position(|t| t == "-j" || t == "-g") else {
            return Ok(None);
        };
        if rule[j] != "-j" {
            return Err(rule_err(rule, "goto is not used by shunt"));
        }
        let target = rule.get(j + 1).map(String::as_str).unwrap_or("");
        let opts = &rule[(j + 2).min(rule.len())..];
        let opt = |name: &str| {
            opts.iter()
                .position(|o| o == name)
                .and_then(|k| opts.get(k + 1))
                .map(String::as_str)
        };
        Ok(Some(match target {
            "ACCEPT" => Target::Term(Term::Accept),
            "DROP" => Target::Term(Term::Drop),
            "REJECT" if table == Table::Filter => Target::Term(Term::Reject),
            "RETURN" => Target::Term(Term::Return),
            "MARK" => {
                if let Some(v) = opt("--or-mark") {
                    st.mark |= hex(rule, v)?;
                } else if let Some(v) = opt("--xor-mark") {
                    st.mark ^= hex(rule, v)?;
                } else if let Some(v) = opt("--set-xmark") {
                    // xt_MARK: mark = (mark & ~mask) ^ value; iptables-save prints
                    // --or-mark M as M/M and --xor-mark M as M/0x0.
                    let (v, m) = value_mask(rule, v)?;
                    st.mark = (st.mark & !m) ^ v;
                } else {
                    return Err(rule_err(rule, "MARK without a mark operation"));
                }
                Target::Continue
            }
            "DNAT" if table == Table::Nat => {
                let to: SocketAddr = opt("--to-destination")
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| rule_err(rule, "DNAT without an IP:port"))?;
                st.dnat = Some(to);
                Target::Term(Term::Accept)
            }
            "MASQUERADE" if table == Table::Nat => Target::Term(Term::Masquerade),
            chain if chain.starts_with(super::CHAIN_PREFIX) => Target::Jump(chain.to_string()),
            other => return Err(rule_err(rule, format!("target {other}"))),
        }))
    }
}

enum Target {
    Continue,
    Term(Term),
    Jump(String),
}

fn hex(rule: &[String], v: &str) -> Result<u32, TraceError> {
    u32::from_str_radix(v.trim_start_matches("0x"), 16)
        .map_err(|_| rule_err(rule, format!("bad mark {v}")))
}

/// `VALUE/MASK` in hex.
fn value_mask(rule: &[String], s: &str) -> Result<(u32, u32), TraceError> {
    let (v, m) = s
        .split_once('/')
        .ok_or_else(|| rule_err(rule, format!("bad mark {s}")))?;
    Ok((hex(rule, v)?, hex(rule, m)?))
}

fn net(rule: &[String], s: &str) -> Result<IpNet, TraceError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| rule_err(rule, format!("bad address {s}")))
}

type Chains = BTreeMap<(Table, String), Vec<Vec<String>>>;

/// Parse restore input, or (`saved`) iptables-save output keeping only shunt's part.
fn load(text: &str, saved: bool) -> Result<Chains, TraceError> {
    let bad = |line: &str, what: &str| TraceError::Line {
        line: line.to_string(),
        what: what.to_string(),
    };
    let ours = |name: &str| name.starts_with(super::CHAIN_PREFIX);
    let mut chains: Chains = BTreeMap::new();
    // None: a table shunt does not write (mangle, raw, security), skipped.
    let mut table = Some(Table::Filter);
    // Chains declared by the current restore section: declaring twice is a bug.
    let mut declared = BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t.trim() {
                "filter" => Some(Table::Filter),
                "nat" => Some(Table::Nat),
                _ if saved => None,
                other => return Err(bad(line, &format!("unexpected table {other}"))),
            };
            declared.clear();
            continue;
        }
        if line.starts_with('#') && saved {
            continue;
        }
        let Some(table) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("").to_string();
            if saved && !ours(&name) {
                continue;
            }
            if !declared.insert(name.clone()) {
                return Err(bad(line, "chain declared twice"));
            }
            // --noflush semantics: declaring creates or flushes.
            chains.insert((table, name), Vec::new());
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let t = tokens(rest)?;
            let Some((chain, args)) = t.split_first() else {
                return Err(bad(line, "empty rule"));
            };
            if saved && !ours(chain) {
                // A built-in chain: only the jumps into shunt's chains are shunt's.
                let jumps_to_ours = args
                    .iter()
                    .position(|a| a == "-j")
                    .and_then(|k| args.get(k + 1))
                    .is_some_and(|target| ours(target));
                if !jumps_to_ours || !chain.chars().all(|c| c.is_ascii_uppercase()) {
                    continue;
                }
                chains
                    .entry((table, chain.clone()))
                    .or_default()
                    .push(args.to_vec());
                continue;
            }
            let rules = chains
                .get_mut(&(table, chain.clone()))
                .ok_or_else(|| bad(line, "rule for an undeclared chain"))?;
            rules.push(args.to_vec());
        } else if let Some(name) = line.strip_prefix("-X ") {
            chains.remove(&(table, name.to_string()));
        } else if !(line == "COMMIT" || line.is_empty() || (!saved && line == "-S")) {
            // `-S` in a restore input is nft_cache's whole-table cache request: it only lists.
            return Err(bad(line, "unexpected line"));
        }
    }
    Ok(chains)
}
