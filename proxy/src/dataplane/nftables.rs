//! nftables backend: applies `plan::nft` transactions with `nft -j -f -` and reads state back
//! with `nft -j list ...`.
//!
//! Every sync is one nft transaction covering both families' `shunt` tables, so the kernel
//! either takes all of it or none of it. The backend remembers what it last programmed;
//! partial syncs rewrite only the changed Services' chains and elements against that memory,
//! and any failure makes the next sync a full one (the memory may no longer match the
//! kernel). The table is never deleted on start or stop: a full sync flushes and refills each
//! chain and map in place, so the first sync after a restart replaces the old content
//! atomically while established connections keep their conntrack NAT state.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::conntrack::Conntrack;
use super::{Changed, Dataplane, DataplaneError, SyncOutcome, SyncRequest};
use crate::model::{IpFamily, Snapshot};
use crate::plan::conntrack::stale_udp;
use crate::plan::nft::{self, KernelSet, KernelTable, Ruleset, Transaction, names::TABLE};

/// What the last successful sync programmed.
struct Programmed {
    rulesets: Vec<Ruleset>,
    snapshots: Vec<Snapshot>,
}

pub struct NftablesDataplane {
    /// argv that runs nft (`["nft"]`, or with a prefix such as `ip netns exec NS`).
    nft: Vec<String>,
    conntrack: Conntrack,
    programmed: Option<Programmed>,
    /// Set after a failure: the kernel may not hold what `programmed` says.
    needs_full: bool,
    /// Base chains are deleted and re-added once per process (upstream's `flushed`), so a
    /// hook or priority change by an upgrade cannot fail the transaction.
    base_chains_recreated: bool,
}

/// One chain as read back: rule handles and their JSON expressions, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRule {
    pub handle: u64,
    pub expr: Value,
}

/// A family's `shunt` table as read back with `nft -j list table`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    pub chains: BTreeMap<String, Vec<ReadRule>>,
    pub sets: BTreeMap<String, KernelSet>,
    /// Elements of each set/map, as nft prints them.
    pub elements: BTreeMap<String, Vec<Value>>,
}

impl TableState {
    fn kernel_table(&self) -> KernelTable {
        KernelTable {
            chains: self.chains.keys().cloned().collect(),
            sets: self.sets.clone(),
        }
    }
}

fn families() -> [IpFamily; 2] {
    [IpFamily::V4, IpFamily::V6]
}

impl NftablesDataplane {
    /// Checks that nft is usable; touches nothing.
    pub fn new() -> Result<Self, DataplaneError> {
        Self::with_command(Vec::new())
    }

    /// Runs `nft` and `conntrack` behind `prefix` (e.g. `["ip", "netns", "exec", "NS"]`, so
    /// that tests program a network namespace of their own). Checks that nft runs.
    pub fn with_command(prefix: Vec<String>) -> Result<Self, DataplaneError> {
        let mut nft = prefix.clone();
        nft.push("nft".to_string());
        let mut version = nft.clone();
        version.push("--version".to_string());
        run(&version, None)?;
        let mut conntrack = prefix;
        conntrack.push("conntrack".to_string());
        Ok(NftablesDataplane {
            nft,
            conntrack: Conntrack::new(conntrack),
            programmed: None,
            needs_full: true,
            base_chains_recreated: false,
        })
    }

    fn nft_args(&self, args: &[&str]) -> Vec<String> {
        let mut v = self.nft.clone();
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    /// Families whose `shunt` table exists (`nft list tables` shows names only, so nothing of
    /// anyone else's tables is read).
    pub fn existing_tables(&self) -> Result<BTreeSet<IpFamily>, DataplaneError> {
        let out = run(&self.nft_args(&["-j", "list", "tables"]), None)?;
        let mut found = BTreeSet::new();
        for item in parse_items(&out)? {
            if let Some(t) = item.get("table") {
                if t.get("name").and_then(Value::as_str) == Some(TABLE) {
                    match t.get("family").and_then(Value::as_str) {
                        Some("ip") => {
                            found.insert(IpFamily::V4);
                        }
                        Some("ip6") => {
                            found.insert(IpFamily::V6);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(found)
    }

    /// Reads one family's table back; None if it does not exist.
    pub fn read_table(&self, family: IpFamily) -> Result<Option<TableState>, DataplaneError> {
        if !self.existing_tables()?.contains(&family) {
            return Ok(None);
        }
        let out = run(
            &self.nft_args(&["-j", "list", "table", family.nft(), TABLE]),
            None,
        )?;
        let mut st = TableState::default();
        for item in parse_items(&out)? {
            if let Some(c) = item.get("chain") {
                st.chains.entry(field_str(c, "name")?).or_default();
            } else if let Some(r) = item.get("rule") {
                let chain = field_str(r, "chain")?;
                let handle = r.get("handle").and_then(Value::as_u64).ok_or_else(|| {
                    DataplaneError::Other(format!(
                        "nft listed a rule of chain {chain} without a handle"
                    ))
                })?;
                st.chains.entry(chain).or_default().push(ReadRule {
                    handle,
                    expr: r.get("expr").cloned().unwrap_or(Value::Null),
                });
            } else {
                for (kind, verdict_map) in [("set", false), ("map", true)] {
                    if let Some(s) = item.get(kind) {
                        let name = field_str(s, "name")?;
                        let timeout = s.get("timeout").and_then(Value::as_u64).map(|t| t as u32);
                        st.sets.insert(
                            name.clone(),
                            KernelSet {
                                verdict_map,
                                timeout_seconds: timeout,
                            },
                        );
                        let elems = match s.get("elem") {
                            Some(Value::Array(a)) => a.clone(),
                            _ => Vec::new(),
                        };
                        st.elements.insert(name, elems);
                    }
                }
            }
        }
        Ok(Some(st))
    }

    /// Sends one transaction; nft's own error text is returned on failure.
    fn apply(&self, tx: &Transaction) -> Result<(), DataplaneError> {
        let doc = nft::json::to_json(tx);
        let body = serde_json::to_vec(&doc)
            .map_err(|e| DataplaneError::Other(format!("serializing the nft transaction: {e}")))?;
        run(&self.nft_args(&["-j", "-f", "-"]), Some(&body)).map(|_| ())
    }

    fn plan(&self, rulesets: &[Ruleset], changed: &Changed) -> Result<Transaction, DataplaneError> {
        if let (false, Some(prev), Changed::Services(keys)) =
            (self.needs_full, &self.programmed, changed)
        {
            match nft::tx::partial(&prev.rulesets, rulesets, keys) {
                Ok(tx) => return Ok(tx),
                Err(why) => tracing::debug!(?why, "partial nftables sync escalated to a full one"),
            }
        }
        let mut existing = BTreeMap::new();
        for family in families() {
            if let Some(t) = self.read_table(family)? {
                existing.insert(family, t.kernel_table());
            }
        }
        Ok(nft::tx::full(
            rulesets,
            &existing,
            !self.base_chains_recreated,
        ))
    }

    fn sync_inner(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError> {
        let rulesets: Vec<Ruleset> = request.snapshots.iter().map(nft::ruleset).collect();
        let tx = self.plan(&rulesets, request.changed)?;
        if !tx.is_empty() {
            self.apply(&tx)?;
        }
        if tx.full {
            self.base_chains_recreated = true;
        }

        // Stale UDP flows are deleted once the new rules are in place (as upstream), so that
        // the client's next packet is NATed by the new rules.
        let mut deleted = 0;
        for snap in request.snapshots {
            let prev = self.programmed.as_ref().and_then(|p| {
                p.snapshots
                    .iter()
                    .find(|s| s.network.family == snap.network.family)
            });
            for filter in stale_udp(prev, snap) {
                match self.conntrack.delete(&filter) {
                    Ok(n) => deleted += n,
                    // A failed deletion leaves a stale flow that ages out; the rules are in
                    // place, so the sync itself succeeded (upstream logs and carries on).
                    Err(e) => {
                        tracing::warn!(?filter, error = %e, "deleting stale UDP conntrack entries")
                    }
                }
            }
        }

        let rules_total = rulesets
            .iter()
            .map(|rs| (format!("{} {}", rs.family.nft(), TABLE), rs.rule_count()))
            .collect();
        self.programmed = Some(Programmed {
            rulesets,
            snapshots: request.snapshots.to_vec(),
        });
        Ok(SyncOutcome {
            full: tx.full,
            rules_total,
            conntrack_deleted: deleted,
        })
    }
}

impl Dataplane for NftablesDataplane {
    fn mode(&self) -> &'static str {
        "nftables"
    }
    fn sync(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError> {
        // Assume the worst until the transaction went through: the next sync is full.
        self.needs_full = true;
        let out = self.sync_inner(request)?;
        self.needs_full = false;
        Ok(out)
    }
    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        let ours = self.existing_tables()?;
        if !ours.is_empty() {
            let tx = Transaction {
                full: true,
                families: ours
                    .into_iter()
                    .map(|family| nft::FamilyOps {
                        family,
                        ops: vec![nft::Op::DeleteTable],
                    })
                    .collect(),
            };
            self.apply(&tx)?;
        }
        self.programmed = None;
        self.needs_full = true;
        Ok(())
    }
}

fn field_str(v: &Value, field: &str) -> Result<String, DataplaneError> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            DataplaneError::Other(format!("nft -j output: object without {field:?}: {v}"))
        })
}

/// The `nftables` array of an nft JSON document.
fn parse_items(out: &str) -> Result<Vec<Value>, DataplaneError> {
    let doc: Value = serde_json::from_str(out)
        .map_err(|e| DataplaneError::Other(format!("parsing nft -j output: {e}")))?;
    match doc.get("nftables") {
        Some(Value::Array(items)) => Ok(items.clone()),
        _ => Err(DataplaneError::Other(
            "nft -j output has no \"nftables\" array".to_string(),
        )),
    }
}

/// Runs argv, feeding `stdin`; returns stdout, or the tool's stderr on failure.
pub(crate) fn run(argv: &[String], stdin: Option<&[u8]>) -> Result<String, DataplaneError> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| DataplaneError::Other("empty command".to_string()))?;
    let what = argv.join(" ");
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DataplaneError::Io {
            what: format!("running {what}"),
            source,
        })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data).map_err(|source| DataplaneError::Io {
            what: format!("writing to {what}"),
            source,
        })?;
        // Dropping the pipe closes it, so the tool sees end of input.
    }
    let out = child
        .wait_with_output()
        .map_err(|source| DataplaneError::Io {
            what: format!("waiting for {what}"),
            source,
        })?;
    if !out.status.success() {
        return Err(DataplaneError::Tool {
            tool: what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
