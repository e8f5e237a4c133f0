//! `iptables-restore --noflush` input for a [`Ruleset`].
//!
//! With `--noflush`, declaring a chain (`:NAME - [0:0]`) creates it or flushes it, and the
//! chains a restore does not mention keep their rules; the whole input is committed per table
//! atomically. kube-proxy's partial sync relies on exactly this: it rewrites the dispatch
//! chains and the chains of changed Services only, and deletes stale chains (declare, then
//! `-X`) in the same transaction, so no rule ever jumps to a missing chain.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use super::{CHAIN_PREFIX, Chain, ChainId, Ruleset, Table};
use crate::model::ServiceKey;

/// Which part of the rule set a restore rewrites.
#[derive(Clone, Copy, Debug)]
pub enum RenderScope<'a> {
    /// Every chain; `existing` are shunt's chains currently in the kernel (from
    /// iptables-save): those no longer wanted are deleted.
    Full { existing: &'a BTreeSet<ChainId> },
    /// Shared chains plus the chains of `services`; `previous` is the chain ownership the
    /// last successful sync wrote, to delete chains those Services no longer have.
    Partial {
        services: &'a BTreeSet<ServiceKey>,
        previous: &'a BTreeMap<ServiceKey, BTreeSet<ChainId>>,
    },
}

/// A rendered restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    /// The `iptables-restore --noflush` input.
    pub text: String,
    /// Chains written (declared and filled).
    pub written: BTreeSet<ChainId>,
    /// Chains deleted.
    pub deleted: BTreeSet<ChainId>,
    /// Per table: where its block's commands start in `text` (just after `*table`), and the
    /// chain names the block mentions (see [`ChainMentions`]).
    pub blocks: BTreeMap<Table, (usize, ChainMentions)>,
}

/// The chain names one table block of a restore mentions, as iptables-nft (1.8.9) records
/// them while parsing it: with `--noflush`, every command that names a chain (`:CHAIN`, the
/// chain of `-A`, `-X`, and a `-j` target that is a chain rather than a target extension)
/// goes through `nft_cache_level_set()` -> `cache_chain_list_insert()` (iptables/nft-cache.c),
/// which inserts the name into a *sorted linked list* by walking it from its head with
/// `strcmp` (and stops at the first greater name). Each mention costs its rank among the
/// names already listed, so a block costs about `mentions * names / 2` string compares:
/// quadratic in the number of chains. With kube-proxy's layout a full restore of 10,000
/// Services × 10 endpoints names ~110,000 chains in nat (one SVC + ten SEP per Service)
/// with ~330,000 mentions, ~2·10^10 compares: `iptables-nft-restore` spent more than 7
/// minutes at 100% CPU in that loop (perf: `__strcmp_avx2` and the loop itself, 85% of the
/// samples, already at 1,000 Services). iptables-legacy-restore has no such list.
/// See [`super::nft_cache`] for the way around it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainMentions {
    /// Distinct chain names.
    pub names: usize,
    /// Commands naming a chain, counted once per name they carry.
    pub mentions: usize,
}

impl Restore {
    /// Makes iptables-nft build its cache of `table` from one dump of the whole table instead
    /// of the per-name list (see [`super::nft_cache`]): inserts a chainless `-S` as the block's
    /// first command. `-S` only prints the table (as it is before this transaction) on
    /// stdout, which the caller discards; it changes nothing.
    pub fn request_whole_table_cache(&mut self, table: Table) {
        let Some((at, _)) = self.blocks.get(&table).copied() else {
            return;
        };
        if self.text[at..].starts_with(super::nft_cache::WHOLE_TABLE_REQUEST) {
            return;
        }
        self.text
            .insert_str(at, super::nft_cache::WHOLE_TABLE_REQUEST);
        let n = super::nft_cache::WHOLE_TABLE_REQUEST.len();
        for (start, _) in self.blocks.values_mut() {
            if *start > at {
                *start += n;
            }
        }
    }
}

/// Counts [`ChainMentions`] while a block is rendered.
#[derive(Default)]
struct MentionCounter<'a> {
    names: HashSet<&'a str>,
    mentions: usize,
}

impl<'a> MentionCounter<'a> {
    fn mention(&mut self, name: &'a str) {
        self.names.insert(name);
        self.mentions += 1;
    }
    /// A rule's `-j` target, if it is one of our chains (targets like DNAT, ACCEPT or MARK are
    /// extensions: iptables-nft does not record those).
    fn rule(&mut self, chain: &'a str, rule: &'a str) {
        self.mention(chain);
        let mut words = rule.split_whitespace();
        while let Some(w) = words.next() {
            if w == "-j" {
                if let Some(t) = words.next().filter(|t| t.starts_with(CHAIN_PREFIX)) {
                    self.mention(t);
                }
                break;
            }
        }
    }
    fn done(self) -> ChainMentions {
        ChainMentions {
            names: self.names.len(),
            mentions: self.mentions,
        }
    }
}

/// Render the restore input for `rs` limited to `scope`.
pub fn render(rs: &Ruleset, scope: RenderScope<'_>) -> Restore {
    let desired: BTreeSet<ChainId> = rs.chains().map(Chain::id).collect();
    let (write, stale): (Vec<&Chain>, BTreeSet<ChainId>) = match scope {
        RenderScope::Full { existing } => (
            rs.chains().collect(),
            existing
                .iter()
                .filter(|c| c.1.starts_with(CHAIN_PREFIX) && !desired.contains(*c))
                .cloned()
                .collect(),
        ),
        RenderScope::Partial { services, previous } => {
            let mut w: Vec<&Chain> = rs.shared.iter().collect();
            let mut stale = BTreeSet::new();
            for key in services {
                if let Some(cs) = rs.services.get(key) {
                    w.extend(cs.iter());
                }
                for c in previous.get(key).into_iter().flatten() {
                    if !desired.contains(c) {
                        stale.insert(c.clone());
                    }
                }
            }
            (w, stale)
        }
    };
    let mut text = String::new();
    let mut blocks = BTreeMap::new();
    for table in Table::ALL {
        let mut m = MentionCounter::default();
        let _ = writeln!(text, "*{}", table.as_str());
        let start = text.len();
        for c in write.iter().filter(|c| c.table == table) {
            let _ = writeln!(text, ":{} - [0:0]", c.name);
            m.mention(&c.name);
        }
        for (_, name) in stale.iter().filter(|c| c.0 == table) {
            let _ = writeln!(text, ":{name} - [0:0]");
            m.mention(name);
        }
        for c in write.iter().filter(|c| c.table == table) {
            for r in &c.rules {
                let _ = writeln!(text, "-A {} {r}", c.name);
                m.rule(&c.name, r);
            }
        }
        for (_, name) in stale.iter().filter(|c| c.0 == table) {
            let _ = writeln!(text, "-X {name}");
            m.mention(name);
        }
        text.push_str("COMMIT\n");
        blocks.insert(table, (start, m.done()));
    }
    Restore {
        text,
        written: write.iter().map(|c| c.id()).collect(),
        deleted: stale,
        blocks,
    }
}

/// shunt's chains in `iptables-save` output (`:NAME POLICY [p:b]` lines under `*table`).
pub fn parse_saved_chains(save: &str) -> BTreeSet<ChainId> {
    let mut table = None;
    let mut out = BTreeSet::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t.trim() {
                "filter" => Some(Table::Filter),
                "nat" => Some(Table::Nat),
                _ => None,
            };
        } else if let (Some(t), Some(decl)) = (table, line.strip_prefix(':'))
            && let Some(name) = decl.split_whitespace().next()
            && name.starts_with(CHAIN_PREFIX)
        {
            out.insert((t, name.to_string()));
        }
    }
    out
}

/// Restore input that deletes `chains` (flush by declaring, then `-X`).
pub fn render_delete(chains: &BTreeSet<ChainId>) -> String {
    let mut text = String::new();
    for table in Table::ALL {
        if !chains.iter().any(|c| c.0 == table) {
            continue;
        }
        let _ = writeln!(text, "*{}", table.as_str());
        for (_, n) in chains.iter().filter(|c| c.0 == table) {
            let _ = writeln!(text, ":{n} - [0:0]");
        }
        for (_, n) in chains.iter().filter(|c| c.0 == table) {
            let _ = writeln!(text, "-X {n}");
        }
        text.push_str("COMMIT\n");
    }
    text
}
