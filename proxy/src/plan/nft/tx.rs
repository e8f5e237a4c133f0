//! Desired rulesets -> one nft transaction (full or partial), as a list of operations.
use std::collections::{BTreeMap, BTreeSet};

use super::build::{Ruleset, ServiceFragment};
use super::ir::*;
use crate::model::{IpFamily, ServiceKey, ServicePortName};

/// One command of a transaction. All commands of all families go to the kernel in one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddTable,
    DeleteTable,
    /// `add chain` (with hook/priority for base chains); a no-op if it exists identically.
    AddChain {
        name: String,
        base: Option<BaseHook>,
    },
    FlushChain(String),
    DeleteChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    /// `add set`/`add map`; a no-op if it exists identically (elements are kept).
    AddSet(SetDef),
    FlushSet(SetDef),
    DeleteSet {
        name: String,
        verdict_map: bool,
    },
    AddElement(Element),
    DeleteElement(Element),
}

/// The operations for one family's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyOps {
    pub family: IpFamily,
    pub ops: Vec<Op>,
}

/// One atomic nft transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub full: bool,
    pub families: Vec<FamilyOps>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.families.iter().all(|f| f.ops.is_empty())
    }
}

/// What a family's table holds in the kernel, as read back before a full sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    pub chains: BTreeSet<String>,
    /// Sets and maps by name, with their element timeout.
    pub sets: BTreeMap<String, KernelSet>,
}

/// A set or map as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSet {
    pub verdict_map: bool,
    pub timeout_seconds: Option<u32>,
}

fn set_changed(existing: Option<&KernelSet>, def: &SetDef) -> bool {
    match existing {
        None => false,
        Some(k) => k.verdict_map != def.verdict_map || k.timeout_seconds != def.timeout_seconds,
    }
}

/// Rewrites everything of every family in `desired` (kube-proxy's full sync): each chain is
/// created and flushed, every fixed set/map flushed and refilled, affinity sets kept (their
/// entries are live state), and whatever else is in our table (`existing`) removed. Families
/// whose table exists but that are no longer desired lose their table. `recreate_base`
/// deletes and re-adds the base chains first, so that a change of hook or priority by a
/// newer version cannot make the transaction fail (upstream does this once per process).
pub fn full(
    desired: &[Ruleset],
    existing: &BTreeMap<IpFamily, KernelTable>,
    recreate_base: bool,
) -> Transaction {
    let mut families = Vec::new();
    for rs in desired {
        let empty = KernelTable::default();
        let kernel = existing.get(&rs.family).unwrap_or(&empty);
        let mut ops = vec![Op::AddTable];
        if recreate_base {
            for c in rs.chains().filter(|c| c.base.is_some()) {
                if kernel.chains.contains(&c.name) {
                    ops.push(Op::DeleteChain(c.name.clone()));
                }
            }
        }
        let desired_chains: BTreeSet<&str> = rs.chains().map(|c| c.name.as_str()).collect();
        for c in rs.chains() {
            ops.push(Op::AddChain {
                name: c.name.clone(),
                base: c.base,
            });
            ops.push(Op::FlushChain(c.name.clone()));
        }
        let stale_chains: Vec<&String> = kernel
            .chains
            .iter()
            .filter(|c| !desired_chains.contains(c.as_str()))
            .collect();
        for c in &stale_chains {
            ops.push(Op::FlushChain((*c).clone()));
        }
        let desired_sets: BTreeSet<&str> = rs.sets().map(|s| s.name.as_str()).collect();
        for (name, k) in &kernel.sets {
            if !desired_sets.contains(name.as_str()) {
                ops.push(Op::DeleteSet {
                    name: name.clone(),
                    verdict_map: k.verdict_map,
                });
            }
        }
        for s in rs.sets() {
            if set_changed(kernel.sets.get(&s.name), s) {
                ops.push(Op::DeleteSet {
                    name: s.name.clone(),
                    verdict_map: kernel.sets[&s.name].verdict_map,
                });
            }
            if s.timeout_seconds.is_none() {
                ops.push(Op::AddSet(s.clone()));
                ops.push(Op::FlushSet(s.clone()));
            } else if set_changed(kernel.sets.get(&s.name), s) || !kernel.sets.contains_key(&s.name)
            {
                // Affinity sets are only added when missing: their entries are live client
                // state, and once a rule `update`s a set the kernel marks it dynamic, so
                // re-adding it without that flag fails with EEXIST (nft 1.0.6's JSON parser
                // does not accept the flag).
                ops.push(Op::AddSet(s.clone()));
            }
        }
        for c in rs.chains() {
            for r in &c.rules {
                ops.push(Op::AddRule {
                    chain: c.name.clone(),
                    rule: r.clone(),
                });
            }
        }
        let mut elements: Vec<&Element> = rs.elements().collect();
        elements.sort();
        elements.dedup();
        ops.extend(elements.into_iter().map(|e| Op::AddElement(e.clone())));
        // Stale chains go last: the map elements and rules that pointed at them were flushed
        // in this same transaction, which the kernel accounts for synchronously since 6.2
        // (older kernels need the deletion delayed, as upstream does).
        ops.extend(stale_chains.into_iter().map(|c| Op::DeleteChain(c.clone())));
        families.push(FamilyOps {
            family: rs.family,
            ops,
        });
    }
    for family in existing.keys() {
        if !desired.iter().any(|rs| rs.family == *family) {
            families.push(FamilyOps {
                family: *family,
                ops: vec![Op::DeleteTable],
            });
        }
    }
    Transaction {
        full: true,
        families,
    }
}

/// Why a partial sync had to become a full one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NeedsFull {
    /// Nothing was programmed for this family yet (or the last sync failed).
    NoPreviousState(IpFamily),
    /// Node-wide settings (addresses, CIDRs, masquerade-all, ...) changed.
    NodeChanged(IpFamily),
    /// A service port outside the changed set differs from what is programmed.
    UnlistedChange(ServicePortName),
    /// The set of families changed.
    FamiliesChanged,
}

/// Rewrites only the chains, affinity sets and map elements of the service ports of
/// `changed` Services (kube-proxy's partial sync). Returns why a full sync is needed instead
/// when the programmed state `old` and `new` differ in anything else.
pub fn partial(
    old: &[Ruleset],
    new: &[Ruleset],
    changed: &BTreeSet<ServiceKey>,
) -> Result<Transaction, NeedsFull> {
    if old.len() != new.len() || old.iter().zip(new).any(|(o, n)| o.family != n.family) {
        return Err(NeedsFull::FamiliesChanged);
    }
    let mut families = Vec::new();
    for (o, n) in old.iter().zip(new) {
        if o.network != n.network || o.node != n.node {
            return Err(NeedsFull::NodeChanged(n.family));
        }
        let names: BTreeSet<&ServicePortName> =
            o.services.keys().chain(n.services.keys()).collect();
        for name in &names {
            if !changed.contains(&name.service) && o.services.get(*name) != n.services.get(*name) {
                return Err(NeedsFull::UnlistedChange((*name).clone()));
            }
        }
        let touched: Vec<&ServicePortName> = names
            .into_iter()
            .filter(|n| changed.contains(&n.service))
            .collect();
        families.push(FamilyOps {
            family: n.family,
            ops: partial_family(o, n, &touched),
        });
    }
    Ok(Transaction {
        full: false,
        families,
    })
}

fn partial_family(o: &Ruleset, n: &Ruleset, touched: &[&ServicePortName]) -> Vec<Op> {
    let empty = ServiceFragment::default();
    let olds: Vec<&ServiceFragment> = touched
        .iter()
        .map(|k| o.services.get(*k).unwrap_or(&empty))
        .collect();
    let news: Vec<&ServiceFragment> = touched
        .iter()
        .map(|k| n.services.get(*k).unwrap_or(&empty))
        .collect();

    let new_chains: BTreeSet<&str> = news
        .iter()
        .flat_map(|f| f.chains.iter().map(|c| c.name.as_str()))
        .collect();
    let old_chains: BTreeSet<&str> = olds
        .iter()
        .flat_map(|f| f.chains.iter().map(|c| c.name.as_str()))
        .collect();
    let new_sets: BTreeMap<&str, &SetDef> = news
        .iter()
        .flat_map(|f| f.sets.iter().map(|s| (s.name.as_str(), s)))
        .collect();
    let old_sets: BTreeMap<&str, &SetDef> = olds
        .iter()
        .flat_map(|f| f.sets.iter().map(|s| (s.name.as_str(), s)))
        .collect();

    // Element ownership is global in the kernel: an element stays if any service still has
    // it with the same value, whichever service that is.
    let owned = |rs: &'_ Ruleset| -> BTreeMap<(String, Key), Element> {
        rs.elements()
            .map(|e| ((e.set.clone(), e.key.clone()), e.clone()))
            .collect()
    };
    let value =
        |m: &BTreeMap<(String, Key), Element>, k: &(String, Key)| m.get(k).map(|e| e.value.clone());
    let old_all = owned(o);
    let new_all = owned(n);
    let mut touched_keys: BTreeSet<(String, Key)> = BTreeSet::new();
    for f in olds.iter().chain(news.iter()) {
        for e in &f.elements {
            touched_keys.insert((e.set.clone(), e.key.clone()));
        }
    }

    let mut ops = Vec::new();
    for c in news.iter().flat_map(|f| f.chains.iter()) {
        ops.push(Op::AddChain {
            name: c.name.clone(),
            base: None,
        });
    }
    for name in old_chains.union(&new_chains) {
        ops.push(Op::FlushChain((*name).to_string()));
    }
    for k in &touched_keys {
        if let Some(old_elem) = old_all.get(k)
            && value(&new_all, k) != Some(old_elem.value.clone())
        {
            ops.push(Op::DeleteElement(old_elem.clone()));
        }
    }
    for (name, def) in &old_sets {
        if new_sets.get(name) != Some(def) {
            ops.push(Op::DeleteSet {
                name: (*name).to_string(),
                verdict_map: def.verdict_map,
            });
        }
    }
    for (name, def) in &new_sets {
        // Unchanged affinity sets are left alone: their entries are live client state.
        if old_sets.get(name) != Some(def) {
            ops.push(Op::AddSet((*def).clone()));
        }
    }
    for c in news.iter().flat_map(|f| f.chains.iter()) {
        for r in &c.rules {
            ops.push(Op::AddRule {
                chain: c.name.clone(),
                rule: r.clone(),
            });
        }
    }
    for k in &touched_keys {
        if let Some(new_elem) = new_all.get(k)
            && value(&old_all, k) != Some(new_elem.value.clone())
        {
            ops.push(Op::AddElement(new_elem.clone()));
        }
    }
    for name in old_chains.difference(&new_chains) {
        ops.push(Op::DeleteChain((*name).to_string()));
    }
    ops
}
