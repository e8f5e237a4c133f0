//! `iptables-restore --noflush` input for a [`Ruleset`].
//!
//! With `--noflush`, declaring a chain (`:NAME - [0:0]`) creates it or flushes it, and the
//! chains a restore does not mention keep their rules; the whole input is committed per table
//! atomically. kube-proxy's partial sync relies on exactly this: it rewrites the dispatch
//! chains and the chains of changed Services only, and deletes stale chains (declare, then
//! `-X`) in the same transaction, so no rule ever jumps to a missing chain.
use std::collections::{BTreeMap, BTreeSet};
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
    for table in Table::ALL {
        let _ = writeln!(text, "*{}", table.as_str());
        for c in write.iter().filter(|c| c.table == table) {
            let _ = writeln!(text, ":{} - [0:0]", c.name);
        }
        for (_, name) in stale.iter().filter(|c| c.0 == table) {
            let _ = writeln!(text, ":{name} - [0:0]");
        }
        for c in write.iter().filter(|c| c.table == table) {
            for r in &c.rules {
                let _ = writeln!(text, "-A {} {r}", c.name);
            }
        }
        for (_, name) in stale.iter().filter(|c| c.0 == table) {
            let _ = writeln!(text, "-X {name}");
        }
        text.push_str("COMMIT\n");
    }
    Restore {
        text,
        written: write.iter().map(|c| c.id()).collect(),
        deleted: stale,
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
