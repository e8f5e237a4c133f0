//! A packet tracer over the rendered `iptables-restore` text (tests only), in the spirit of
//! kube-proxy's iptables tracer (pkg/proxy/iptables/proxier_test.go): it parses the rules we
//! render, follows `-j` into user chains and back on RETURN/end of chain, explores both
//! branches of every `-m statistic` match (so all reachable endpoints are enumerated), and
//! understands exactly the matches and targets shunt emits; anything else panics, so a new
//! rule form cannot silently be ignored.
//!
//! Packet path (one new connection, first packet, netfilter hook order): nat PREROUTING (or
//! nat OUTPUT for node-originated packets) -> routing on the possibly DNATed destination ->
//! filter INPUT / FORWARD / OUTPUT -> nat POSTROUTING (unless delivered locally).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{JumpRule, Table};
use crate::model::Protocol;

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
fn tokens(line: &str) -> Vec<String> {
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
    assert!(!quoted, "unbalanced quote in {line}");
    if any {
        out.push(cur);
    }
    out
}

impl Tracer {
    /// Load a restore input (all tables) and the jump rules; `local` are the node's addresses.
    pub fn new(restore: &str, jumps: &[JumpRule], local: &[IpAddr]) -> Tracer {
        let mut chains: BTreeMap<(Table, String), Vec<Vec<String>>> = BTreeMap::new();
        let mut table = Table::Filter;
        // Chains declared by the current restore section: declaring twice is a bug.
        let mut declared = BTreeSet::new();
        for line in restore.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = match t {
                    "filter" => Table::Filter,
                    "nat" => Table::Nat,
                    other => panic!("unexpected table {other}"),
                };
                declared.clear();
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap().to_string();
                assert!(declared.insert(name.clone()), "chain {name} declared twice");
                // --noflush semantics: declaring creates or flushes.
                chains.insert((table, name), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let t = tokens(rest);
                let rules = chains
                    .get_mut(&(table, t[0].clone()))
                    .unwrap_or_else(|| panic!("rule for undeclared chain: {line}"));
                rules.push(t[1..].to_vec());
            } else if let Some(name) = line.strip_prefix("-X ") {
                chains.remove(&(table, name.to_string()));
            } else {
                // `-S` (nft_cache's whole-table cache request) only lists the table.
                assert!(
                    line == "COMMIT" || line.is_empty() || line == "-S",
                    "unexpected line {line}"
                );
            }
        }
        for j in jumps {
            chains
                .entry((j.table, j.chain.to_string()))
                .or_default()
                .push(j.args.clone());
        }
        Tracer {
            chains,
            local: local.to_vec(),
            recent: BTreeMap::new(),
        }
    }

    /// Every chain's rules (for assertions on structure).
    pub fn chain(&self, table: Table, name: &str) -> Option<&Vec<Vec<String>>> {
        self.chains.get(&(table, name.to_string()))
    }

    /// All outcomes of one packet (several when a random choice is involved), deduplicated.
    pub fn trace(&self, p: &Packet) -> BTreeSet<Outcome> {
        let node_src = self.local.contains(&p.src);
        let start = State {
            recent: self.recent.clone(),
            ..State::default()
        };
        let mut out = BTreeSet::new();
        let nat_hook = if node_src { "OUTPUT" } else { "PREROUTING" };
        for (st, term) in self.walk(Table::Nat, nat_hook, 0, p, start) {
            assert!(
                matches!(term, Term::Return | Term::Accept),
                "nat {nat_hook} ended in {term:?}"
            );
            let dst = st.dnat.map(|a| a.ip()).unwrap_or(p.dst);
            let filter_hook = if node_src {
                "OUTPUT"
            } else if self.local.contains(&dst) {
                "INPUT"
            } else {
                "FORWARD"
            };
            for (st, term) in self.walk(Table::Filter, filter_hook, 0, p, st) {
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
                                .walk(Table::Nat, "POSTROUTING", 0, p, st.clone())
                                .iter()
                                .any(|(_, t)| *t == Term::Masquerade);
                        out.insert(match st.dnat {
                            Some(to) => Outcome::Dnat { to, masq },
                            None => Outcome::Pass { masq },
                        });
                    }
                    Term::Masquerade => panic!("MASQUERADE in filter"),
                }
            }
        }
        out
    }

    fn walk(
        &self,
        table: Table,
        chain: &str,
        from: usize,
        p: &Packet,
        st: State,
    ) -> Vec<(State, Term)> {
        let Some(rules) = self.chains.get(&(table, chain.to_string())) else {
            // A built-in chain with no rules of ours: policy ACCEPT.
            assert!(
                chain.chars().all(|c| c.is_ascii_uppercase()),
                "jump to missing chain {chain}"
            );
            return vec![(st, Term::Return)];
        };
        let mut results = Vec::new();
        let mut pending = vec![(from, st)];
        // Bounded: each step consumes a rule index.
        while let Some((idx, mut st)) = pending.pop() {
            let Some(rule) = rules.get(idx) else {
                results.push((st, Term::Return));
                continue;
            };
            let before = st.clone();
            let (matched, random) = self.matches(rule, p, &mut st);
            if !matched {
                pending.push((idx + 1, before));
                continue;
            }
            if random {
                // Both branches of the random choice: this one not taken...
                pending.push((idx + 1, before));
            }
            // ...and taken.
            match self.apply_target(table, rule, p, &mut st) {
                Some(Target::Continue) => pending.push((idx + 1, st)),
                Some(Target::Term(t)) => results.push((st, t)),
                Some(Target::Jump(name)) => {
                    for (st2, t) in self.walk(table, &name, 0, p, st) {
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
        results
    }

    /// (matched, random-branch). Evaluates every match of the rule; `-m recent --set` records.
    fn matches(&self, rule: &[String], p: &Packet, st: &mut State) -> (bool, bool) {
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
                    assert!(
                        [
                            "comment",
                            "tcp",
                            "udp",
                            "sctp",
                            "addrtype",
                            "statistic",
                            "recent",
                            "mark",
                            "conntrack"
                        ]
                        .contains(&arg(i)),
                        "unknown match module {}",
                        arg(i)
                    );
                    None
                }
                "--comment" => None,
                "-p" => Some(arg(i) == p.protocol.as_str()),
                "--dport" => Some(arg(i).parse::<u16>().unwrap() == dport),
                "-s" => Some(net(arg(i)).contains(&p.src)),
                "-d" => Some(net(arg(i)).contains(&dst)),
                "--dst-type" => {
                    assert_eq!(arg(i), "LOCAL");
                    Some(self.local.contains(&dst))
                }
                "--src-type" => {
                    assert_eq!(arg(i), "LOCAL");
                    Some(self.local.contains(&p.src))
                }
                "--ctstate" => Some(arg(i).split(',').any(|s| s == "NEW")),
                "--mark" => {
                    let (v, m) = arg(i).split_once('/').unwrap();
                    let v = u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
                    let m = u32::from_str_radix(m.trim_start_matches("0x"), 16).unwrap();
                    Some(st.mark & m == v)
                }
                "--mode" => {
                    assert_eq!(arg(i), "random");
                    None
                }
                "--probability" => {
                    let prob: f64 = arg(i).parse().unwrap();
                    assert!(prob > 0.0 && prob < 1.0, "probability {prob}");
                    random = true;
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
                    let name = recent_name.as_ref().expect("--rcheck before --name");
                    Some(st.recent.get(name).is_some_and(|s| s.contains(&p.src)))
                }
                "--set" => {
                    step = 1;
                    recent_set = true;
                    None
                }
                "-j" | "-g" => break,
                other => panic!("unknown option {other} in {rule:?}"),
            };
            if let Some(m) = m {
                ok = m != negate;
            }
            negate = false;
            i += step;
        }
        if ok && recent_set {
            let name = recent_name.expect("--set without --name");
            st.recent.entry(name).or_default().insert(p.src);
        }
        (ok, ok && random)
    }

    fn apply_target(
        &self,
        table: Table,
        rule: &[String],
        _p: &Packet,
        st: &mut State,
    ) -> Option<Target> {
        let j = rule.iter().position(|t| t == "-j" || t == "-g")?;
        assert_eq!(rule[j], "-j", "goto is not used by shunt");
        let target = rule[j + 1].as_str();
        let opts = &rule[j + 2..];
        let opt = |name: &str| {
            opts.iter()
                .position(|o| o == name)
                .map(|k| opts[k + 1].as_str())
        };
        Some(match target {
            "ACCEPT" => Target::Term(Term::Accept),
            "DROP" => Target::Term(Term::Drop),
            "REJECT" => {
                assert_eq!(table, Table::Filter, "REJECT outside filter");
                Target::Term(Term::Reject)
            }
            "RETURN" => Target::Term(Term::Return),
            "MARK" => {
                if let Some(v) = opt("--or-mark") {
                    st.mark |= hex(v);
                } else if let Some(v) = opt("--xor-mark") {
                    st.mark ^= hex(v);
                } else {
                    panic!("MARK without --or-mark/--xor-mark: {rule:?}");
                }
                Target::Continue
            }
            "DNAT" => {
                assert_eq!(table, Table::Nat);
                let to: SocketAddr = opt("--to-destination").unwrap().parse().unwrap();
                st.dnat = Some(to);
                Target::Term(Term::Accept)
            }
            "MASQUERADE" => Target::Term(Term::Masquerade),
            chain => {
                assert!(chain.starts_with(super::CHAIN_PREFIX), "jump to {chain}");
                Target::Jump(chain.to_string())
            }
        })
    }
}

enum Target {
    Continue,
    Term(Term),
    Jump(String),
}

fn hex(v: &str) -> u32 {
    u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .unwrap_or_else(|_| panic!("bad address {s}"))
}
