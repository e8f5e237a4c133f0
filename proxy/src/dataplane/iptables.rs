//! iptables backend (`--proxy-mode iptables`): applies `plan::iptables` with one
//! `iptables-restore -w --noflush` (and `ip6tables-restore`) per family per sync.
//!
//! * Full syncs (first sync, `Changed::All`, after any failure) rewrite every shunt chain and
//!   delete the shunt chains found by `iptables-save` that are no longer wanted; partial syncs
//!   rewrite the node-wide dispatch chains and the chains of the changed Services only, as
//!   kube-proxy's iptables proxier does. Nothing is flushed on start or stop: the first sync
//!   after a restart replaces our chains in one atomic restore, so established connections
//!   keep their conntrack NAT.
//! * Jump rules from the built-in chains are ensured on full syncs with `-C`, then `-I` if
//!   missing (never duplicated), like kube-proxy's `EnsureRule(Prepend, ...)`.
//! * Backend (legacy vs nft) auto-detection follows kubernetes-sigs/iptables-wrappers: the
//!   kubelet's `KUBE-IPTABLES-HINT`/`KUBE-KUBELET-CANARY` chains in nft's mangle table, then in
//!   legacy's tables, decide; otherwise whichever backend holds more rules, nft on a tie.
use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;

use super::conntrack::Conntrack;
use super::{Changed, Dataplane, DataplaneError, SyncOutcome, SyncRequest};
use crate::model::{IpFamily, ServiceKey, Snapshot};
use crate::plan::conntrack::{cleanup_needed, deleted_udp_ports};
use crate::plan::iptables::nft_cache::want_whole_table_cache;
use crate::plan::iptables::render::{parse_saved_chains, render_delete};
use crate::plan::iptables::{
    CHAIN_PREFIX, ChainId, JumpRule, RenderScope, Table, build, jump_rules, render,
};

/// Which iptables flavour to drive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Detect like iptables-wrappers (see the module comment).
    #[default]
    Auto,
    /// `iptables-legacy*` (the x_tables kernel API).
    Legacy,
    /// `iptables-nft*` (the nf_tables kernel API through the iptables syntax).
    Nft,
}

impl std::str::FromStr for BackendChoice {
    type Err = DataplaneError;
    /// The value of a `--iptables-backend` style flag: `auto`, `legacy` or `nft`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "legacy" => Ok(BackendChoice::Legacy),
            "nft" => Ok(BackendChoice::Nft),
            other => Err(DataplaneError::Other(format!(
                "iptables backend {other:?}: expected auto, legacy or nft"
            ))),
        }
    }
}

/// A concrete flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    fn suffix(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }
    /// `iptables-legacy`, `ip6tables-nft-restore`, ... (`tool` is "", "-save" or "-restore").
    pub fn binary(self, family: IpFamily, tool: &str) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        format!("{base}-{}{tool}", self.suffix())
    }
}

/// Options of [`IptablesDataplane`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesOptions {
    pub backend: BackendChoice,
    /// Prepended to every command (e.g. `["ip", "netns", "exec", "NS"]` in tests).
    pub command_prefix: Vec<String>,
}

/// What the last successful sync of one family wrote.
struct FamilyState {
    ownership: BTreeMap<ServiceKey, BTreeSet<ChainId>>,
    snapshot: Snapshot,
    /// Rules per table the kernel holds after that sync (ours), for the nft backend's cache
    /// decision of the next partial restore.
    rules: BTreeMap<Table, u64>,
}

pub struct IptablesDataplane {
    opts: IptablesOptions,
    backend: Backend,
    families: BTreeMap<IpFamily, FamilyState>,
    conntrack: Conntrack,
    /// Set after any failure: the next sync is full.
    need_full: bool,
}

/// Run `program args` (behind the command prefix), feeding `stdin` if given.
fn run(
    prefix: &[String],
    program: &str,
    args: &[String],
    stdin: Option<&str>,
) -> Result<Output, DataplaneError> {
    let mut argv = prefix.to_vec();
    argv.push(program.to_string());
    argv.extend(args.iter().cloned());
    super::command::output(&argv, stdin.map(str::as_bytes))
}

fn tool_error(what: String, out: &Output) -> DataplaneError {
    DataplaneError::Tool {
        tool: what,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// True if the kubelet's hint chains are in `save` output (iptables-wrappers' regex).
fn has_kubelet_chains(save: &str) -> bool {
    save.lines()
        .any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"))
}

fn rule_lines(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with('-')).count()
}

/// Pick the backend as iptables-wrappers does (see the module comment). Errors of the probes
/// are ignored on purpose, like the wrapper: a missing flavour simply has no rules.
pub fn detect_backend(prefix: &[String]) -> Backend {
    let save = |b: Backend, f: IpFamily, args: &[&str]| -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        run(prefix, &b.binary(f, "-save"), &args, None)
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let families = [IpFamily::V4, IpFamily::V6];
    if families
        .iter()
        .any(|f| has_kubelet_chains(&save(Backend::Nft, *f, &["-t", "mangle"])))
    {
        return Backend::Nft;
    }
    // Not `-t mangle` for legacy: that would make the kernel create the table.
    let legacy: Vec<String> = families
        .iter()
        .map(|f| save(Backend::Legacy, *f, &[]))
        .collect();
    if legacy.iter().any(|s| has_kubelet_chains(s)) {
        return Backend::Legacy;
    }
    let nft_rules: usize = families
        .iter()
        .map(|f| rule_lines(&save(Backend::Nft, *f, &[])))
        .sum();
    let legacy_rules: usize = legacy.iter().map(|s| rule_lines(s)).sum();
    if legacy_rules > nft_rules {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

impl IptablesDataplane {
    /// Chooses the backend and checks its tools run; touches no rule.
    pub fn new(opts: IptablesOptions) -> Result<Self, DataplaneError> {
        let backend = match opts.backend {
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Nft => Backend::Nft,
            BackendChoice::Auto => detect_backend(&opts.command_prefix),
        };
        for family in [IpFamily::V4, IpFamily::V6] {
            let bin = backend.binary(family, "-restore");
            let out = run(&opts.command_prefix, &bin, &["--version".into()], None)?;
            if !out.status.success() {
                return Err(tool_error(format!("{bin} --version"), &out));
            }
        }
        tracing::info!(backend = backend.suffix(), "iptables backend");
        let mut conntrack = opts.command_prefix.clone();
        conntrack.push("conntrack".to_string());
        Ok(IptablesDataplane {
            conntrack: Conntrack::new(conntrack),
            opts,
            backend,
            families: BTreeMap::new(),
            need_full: true,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<Output, DataplaneError> {
        run(&self.opts.command_prefix, program, args, stdin)
    }

    fn save(
        &self,
        backend: Backend,
        family: IpFamily,
        table: Option<Table>,
    ) -> Result<String, DataplaneError> {
        let bin = backend.binary(family, "-save");
        let args: Vec<String> = match table {
            Some(t) => vec!["-t".into(), t.as_str().into()],
            None => vec![],
        };
        let out = self.run(&bin, &args, None)?;
        if !out.status.success() {
            return Err(tool_error(format!("{bin} {}", args.join(" ")), &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables-restore -w --noflush`. Its stdout is dropped: it only carries the listing a
    /// whole-table cache request (`-S`, see plan::iptables::nft_cache) prints.
    fn restore(
        &self,
        backend: Backend,
        family: IpFamily,
        text: &str,
    ) -> Result<(), DataplaneError> {
        let bin = backend.binary(family, "-restore");
        let args = vec!["-w".to_string(), "--noflush".to_string()];
        let out = self.run(&bin, &args, Some(text))?;
        if !out.status.success() {
            return Err(tool_error(format!("{bin} -w --noflush"), &out));
        }
        Ok(())
    }

    fn jump_args(op: &str, j: &JumpRule) -> Vec<String> {
        let mut a = vec![
            "-w".to_string(),
            "-t".into(),
            j.table.as_str().into(),
            op.into(),
            j.chain.into(),
        ];
        a.extend(j.args.iter().cloned());
        a
    }

    /// `-C`, then `-I` if missing. Inserted in reverse so the final order in each built-in
    /// chain is `jump_rules()` order.
    fn ensure_jumps(&self, family: IpFamily) -> Result<(), DataplaneError> {
        let bin = self.backend.binary(family, "");
        for j in jump_rules().iter().rev() {
            let check = self.run(&bin, &Self::jump_args("-C", j), None)?;
            if check.status.success() {
                continue;
            }
            let args = Self::jump_args("-I", j);
            let out = self.run(&bin, &args, None)?;
            if !out.status.success() {
                return Err(tool_error(format!("{bin} {}", args.join(" ")), &out));
            }
        }
        Ok(())
    }

    fn sync_family(
        &mut self,
        snap: &Snapshot,
        full: bool,
        changed: &Changed,
    ) -> Result<BTreeMap<Table, u64>, DataplaneError> {
        let family = snap.network.family;
        let rs = build(snap);
        // Rules each table holds before this restore: what a whole-table cache request would
        // make iptables-nft list (see plan::iptables::nft_cache).
        let mut table_rules: BTreeMap<Table, u64> = BTreeMap::new();
        let mut restore = match (full, changed, self.families.get(&family)) {
            (false, Changed::Services(services), Some(prev)) => {
                table_rules = prev.rules.clone();
                render(
                    &rs,
                    RenderScope::Partial {
                        services,
                        previous: &prev.ownership,
                    },
                )
            }
            _ => {
                let mut existing = BTreeSet::new();
                for t in Table::ALL {
                    let save = self.save(self.backend, family, Some(t))?;
                    table_rules.insert(t, rule_lines(&save) as u64);
                    existing.extend(parse_saved_chains(&save));
                }
                if let Some(prev) = self.families.get(&family) {
                    existing.extend(prev.ownership.values().flatten().cloned());
                }
                render(
                    &rs,
                    RenderScope::Full {
                        existing: &existing,
                    },
                )
            }
        };
        if self.backend == Backend::Nft {
            // iptables-nft's per-name cache request is quadratic in the chains a block names
            // (cache_chain_list_insert in iptables/nft-cache.c): a full restore at 10,000
            // Services did not finish in 7 minutes. Ask for the whole table instead where
            // that is cheaper (plan::iptables::nft_cache has the source lines and figures).
            let wanted: Vec<Table> = restore
                .blocks
                .iter()
                .filter(|(t, (_, m))| {
                    want_whole_table_cache(*m, table_rules.get(t).copied().unwrap_or(0))
                })
                .map(|(t, _)| *t)
                .collect();
            for t in wanted {
                restore.request_whole_table_cache(t);
            }
        }
        self.restore(self.backend, family, &restore.text)?;
        if full {
            self.ensure_jumps(family)?;
        }
        tracing::debug!(
            ?family,
            full,
            written = restore.written.len(),
            deleted = restore.deleted.len(),
            "iptables-restore applied"
        );
        self.families.insert(
            family,
            FamilyState {
                ownership: rs.ownership(),
                snapshot: snap.clone(),
                rules: rs.rule_counts(),
            },
        );
        Ok(rs.rule_counts())
    }

    /// Remove shunt's chains and jump rules of one backend and family; skips a backend whose
    /// tools are missing or which holds nothing of ours.
    fn cleanup_one(&self, backend: Backend, family: IpFamily) -> Result<(), DataplaneError> {
        // Whole save (no -t): listing a legacy table by name would create it.
        let save = match self.save(backend, family, None) {
            Ok(s) => s,
            Err(DataplaneError::Io { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !save.contains(CHAIN_PREFIX) {
            return Ok(());
        }
        let bin = backend.binary(family, "");
        for j in jump_rules() {
            let target = j.args.last().expect("jump rule has a target");
            let present = |save: &str| {
                let mut table = "";
                save.lines().any(|l| {
                    if let Some(t) = l.strip_prefix('*') {
                        table = t;
                    }
                    table == j.table.as_str()
                        && l.starts_with(&format!("-A {} ", j.chain))
                        && l.ends_with(&format!("-j {target}"))
                })
            };
            if !present(&save) {
                continue;
            }
            // Bounded: a rule could have been added more than once by someone else.
            for _ in 0..16 {
                let check = self.run(&bin, &Self::jump_args("-C", &j), None)?;
                if !check.status.success() {
                    break;
                }
                let args = Self::jump_args("-D", &j);
                let out = self.run(&bin, &args, None)?;
                if !out.status.success() {
                    return Err(tool_error(format!("{bin} {}", args.join(" ")), &out));
                }
            }
        }
        let chains = parse_saved_chains(&save);
        if !chains.is_empty() {
            self.restore(backend, family, &render_delete(&chains))?;
        }
        Ok(())
    }
}

impl Dataplane for IptablesDataplane {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError> {
        let full = self.need_full
            || matches!(request.changed, Changed::All)
            // A node-wide change (detector, NodePort addresses, ...) touches rules of every
            // Service: never partial, whatever the caller says.
            || request.snapshots.iter().any(|s| {
                self.families
                    .get(&s.network.family)
                    .is_none_or(|prev| prev.snapshot.network != s.network)
            });
        // Pessimistic: cleared only when every family succeeded.
        self.need_full = true;
        // UDP service ports deleted since the last sync (unknown after a restart), for the
        // stale-conntrack decision below.
        let prev: Vec<Snapshot> = self.families.values().map(|f| f.snapshot.clone()).collect();
        let gone = deleted_udp_ports(&prev, request.snapshots);
        let mut totals: BTreeMap<Table, u64> = BTreeMap::new();
        for snap in request.snapshots {
            for (t, n) in self.sync_family(snap, full, request.changed)? {
                *totals.entry(t).or_default() += n;
            }
        }
        self.need_full = false;
        // Stale UDP flows, once the new rules are in place (as kube-proxy does), decided from
        // the kernel's entries and the new state (plan::conntrack, shared with nftables mode),
        // so a restarted backend keeps healthy flows. A failure is logged, not fatal: the
        // rules are right, only old flows linger, as upstream treats it.
        let mut conntrack_deleted = 0;
        if full || cleanup_needed(request.changed, request.snapshots, &gone) {
            match self.conntrack.clean_stale_udp(request.snapshots, &gone) {
                Ok(n) => conntrack_deleted = n,
                Err(e) => tracing::warn!(error = %e, "deleting stale UDP conntrack entries"),
            }
        }
        Ok(SyncOutcome {
            full,
            rules_total: totals
                .into_iter()
                .map(|(t, n)| (t.as_str().to_string(), n))
                .collect(),
            conntrack_deleted,
        })
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        for backend in [Backend::Legacy, Backend::Nft] {
            for family in [IpFamily::V4, IpFamily::V6] {
                self.cleanup_one(backend, family)?;
            }
        }
        self.families.clear();
        self.need_full = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
