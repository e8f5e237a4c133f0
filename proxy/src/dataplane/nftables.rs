//! nftables backend: applies `plan::nft` transactions with `nft -f -` (nft's own syntax, see
//! `plan::nft::text` for why not JSON) and reads state back with `nft -j list ...`.
//!
//! Every sync is one nft transaction covering both families' `shunt` tables, so the kernel
//! either takes all of it or none of it. The backend remembers what it last programmed;
//! partial syncs rewrite only the changed Services' chains and elements against that memory,
//! and any failure makes the next sync a full one (the memory may no longer match the
//! kernel). The table is never deleted on start or stop: a full sync flushes and refills each
//! chain and map in place, so the first sync after a restart replaces the old content
//! atomically while established connections keep their conntrack NAT state.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::Value;

use super::command::run;
use super::conntrack::Conntrack;
use super::{Changed, Dataplane, DataplaneError, SyncOutcome, SyncRequest};
use crate::model::{IpFamily, Snapshot};
use crate::plan::conntrack::{cleanup_needed, deleted_udp_ports};
use crate::plan::nft::{self, KernelSet, KernelTable, Ruleset, Transaction, names::TABLE};

/// What the last successful sync programmed.
struct Programmed {
    rulesets: Vec<Ruleset>,
    /// Only to tell which UDP service ports a sync deletes (their flows are then stale).
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
            if let Listed::Table(t) = item
                && t.name == TABLE
            {
                match t.family.as_str() {
                    "ip" => found.insert(IpFamily::V4),
                    "ip6" => found.insert(IpFamily::V6),
                    _ => false,
                };
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
            match item {
                Listed::Chain(c) => {
                    st.chains.entry(c.name).or_default();
                }
                Listed::Rule(r) => st.chains.entry(r.chain).or_default().push(ReadRule {
                    handle: r.handle,
                    expr: r.expr,
                }),
                Listed::Set(set, verdict_map) => {
                    st.sets.insert(
                        set.name.clone(),
                        KernelSet {
                            verdict_map,
                            timeout_seconds: set.timeout,
                        },
                    );
                    st.elements.insert(set.name, set.elem);
                }
                Listed::Table(_) | Listed::Other => {}
            }
        }
        Ok(Some(st))
    }

    /// Sends one transaction; nft's own error text is returned on failure.
    fn apply(&self, tx: &Transaction) -> Result<(), DataplaneError> {
        let started = Instant::now();
        let mut script = String::new();
        nft::text::write_text(tx, &mut script);
        let written = Instant::now();
        run(&self.nft_args(&["-f", "-"]), Some(script.as_bytes()))?;
        tracing::debug!(
            bytes = script.len(),
            write = ?written - started,
            nft = ?written.elapsed(),
            "applied nft transaction"
        );
        Ok(())
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
        // What is in our tables now: known from memory when the last sync succeeded (if
        // someone else changed our table meanwhile, this sync fails and the next one reads
        // back), read back from the kernel otherwise.
        let mut existing = BTreeMap::new();
        match (&self.programmed, self.needs_full) {
            (Some(prev), false) => {
                for rs in &prev.rulesets {
                    existing.insert(rs.family, rs.kernel_table());
                }
            }
            _ => {
                for family in families() {
                    if let Some(t) = self.read_table(family)? {
                        existing.insert(family, t.kernel_table());
                    }
                }
            }
        }
        Ok(nft::tx::full(
            rulesets,
            &existing,
            !self.base_chains_recreated,
        ))
    }

    fn sync_inner(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError> {
        let started = Instant::now();
        let rulesets: Vec<Ruleset> = request
            .snapshots
            .iter()
            .map(|snap| {
                let prev = self.programmed.as_ref().and_then(|p| {
                    let i = p
                        .snapshots
                        .iter()
                        .position(|s| s.network.family == snap.network.family)?;
                    Some((&p.snapshots[i], p.rulesets.get(i)?))
                });
                nft::ruleset_reusing(snap, prev)
            })
            .collect();
        let built = Instant::now();
        let tx = self.plan(&rulesets, request.changed)?;
        tracing::debug!(
            build = ?built - started,
            plan = ?built.elapsed(),
            full = tx.full,
            "planned nft transaction"
        );
        if !tx.is_empty() {
            self.apply(&tx)?;
        }
        if tx.full {
            self.base_chains_recreated = true;
        }

        let applied = Instant::now();
        // Stale UDP flows are deleted once the new rules are in place (as upstream), so that
        // the client's next packet is NATed by the new rules. The decision reads the kernel's
        // entries and the new state (plus the UDP ports deleted since the last sync, unknown
        // after a restart), so a restarted backend keeps healthy flows.
        let gone = self
            .programmed
            .as_ref()
            .map(|p| deleted_udp_ports(&p.snapshots, request.snapshots))
            .unwrap_or_default();
        let mut deleted = 0;
        if tx.full || cleanup_needed(request.changed, request.snapshots, &gone) {
            match self.conntrack.clean_stale_udp(request.snapshots, &gone) {
                Ok(n) => deleted = n,
                // A failed deletion leaves a stale flow that ages out; the rules are in
                // place, so the sync itself succeeded (upstream logs and carries on).
                Err(e) => tracing::warn!(error = %e, "deleting stale UDP conntrack entries"),
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
        tracing::debug!(conntrack_and_bookkeeping = ?applied.elapsed(), "nftables sync done");
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
        match self.sync_inner(request) {
            Ok(out) => {
                self.needs_full = false;
                Ok(out)
            }
            Err(e) => {
                // The kernel may hold anything now: the next sync rewrites everything.
                self.needs_full = true;
                Err(e)
            }
        }
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

/// `{"table": {...}}` in `nft -j list` output (the fields we use).
#[derive(serde::Deserialize)]
struct ListedTable {
    family: String,
    name: String,
}

#[derive(serde::Deserialize)]
struct ListedChain {
    name: String,
}

#[derive(serde::Deserialize)]
struct ListedRule {
    chain: String,
    handle: u64,
    expr: Value,
}

/// A set or a map; nft prints elements only when there are some, and `timeout` only for
/// sets that have one.
#[derive(serde::Deserialize)]
struct ListedSet {
    name: String,
    #[serde(default)]
    timeout: Option<u32>,
    #[serde(default)]
    elem: Vec<Value>,
}

/// One object of an `nft -j list` document. (The `nftables` crate's own ruleset types
/// cannot read verdict maps or single NAT flags back, hence these.)
enum Listed {
    Table(ListedTable),
    Chain(ListedChain),
    Rule(ListedRule),
    /// A set (`false`) or verdict map (`true`).
    Set(ListedSet, bool),
    /// metainfo, or kinds we never create.
    Other,
}

/// The objects of an nft JSON document.
fn parse_items(out: &str) -> Result<Vec<Listed>, DataplaneError> {
    #[derive(serde::Deserialize)]
    struct Doc {
        nftables: Vec<BTreeMap<String, Value>>,
    }
    let bad = |e: serde_json::Error| DataplaneError::Other(format!("parsing nft -j output: {e}"));
    let doc: Doc = serde_json::from_str(out).map_err(bad)?;
    let mut items = Vec::with_capacity(doc.nftables.len());
    for obj in doc.nftables {
        // Each object has exactly one key naming its kind.
        for (kind, v) in obj {
            items.push(match kind.as_str() {
                "table" => Listed::Table(serde_json::from_value(v).map_err(bad)?),
                "chain" => Listed::Chain(serde_json::from_value(v).map_err(bad)?),
                "rule" => Listed::Rule(serde_json::from_value(v).map_err(bad)?),
                "set" => Listed::Set(serde_json::from_value(v).map_err(bad)?, false),
                "map" => Listed::Set(serde_json::from_value(v).map_err(bad)?, true),
                _ => Listed::Other,
            });
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    //! Root test: programs a network namespace of its own through `ip netns exec`.
    use std::collections::BTreeSet;
    use std::process::Command;

    use super::*;
    use crate::model::{Protocol, ServiceKey};
    use crate::plan::nft::fixtures::*;
    use crate::plan::nft::names;

    struct Netns(String);

    /// The elements of all endpoint-pick maps.
    fn picks_of(t: &TableState) -> Vec<Value> {
        t.elements
            .iter()
            .filter(|(n, _)| n.starts_with(names::ENDPOINT_PICKS_PREFIX))
            .flat_map(|(_, e)| e.iter().cloned())
            .collect()
    }

    impl Netns {
        fn exec(&self, args: &[&str]) -> Result<String, DataplaneError> {
            let mut argv: Vec<String> = ["ip", "netns", "exec", &self.0]
                .iter()
                .map(|s| s.to_string())
                .collect();
            argv.extend(args.iter().map(|s| s.to_string()));
            run(&argv, None)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            // Always remove the namespace, also when the test failed.
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn tool_missing(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_err()
    }

    fn skip_reason() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("not root".to_string());
        }
        for tool in ["ip", "nft", "conntrack"] {
            if tool_missing(tool) {
                return Some(format!("{tool} not installed"));
            }
        }
        None
    }

    fn v4_snapshot(
        svc2_eps: Vec<crate::model::Endpoint>,
        svc3_eps: Vec<crate::model::Endpoint>,
    ) -> Snapshot {
        let mut p1 = port("ns1", "svc1", "p80", Protocol::Tcp, "172.30.0.41", 80);
        p1.node_port = Some(3001);
        p1.load_balancer_ips = vec![ip("198.51.100.4")];
        p1.load_balancer_source_ranges = vec![net("203.0.113.0/25")];
        p1.external_policy_local = true;
        let mut p2 = port("ns2", "svc2", "dns", Protocol::Udp, "172.30.0.42", 53);
        p2.affinity_timeout_seconds = Some(10800);
        let p3 = port("ns3", "svc3", "", Protocol::Tcp, "172.30.0.43", 80);
        snapshot(
            // Two pod and two service CIDRs: anonymous sets in the masquerade, short-circuit
            // and cluster-ips-check rules.
            network(
                IpFamily::V4,
                &["192.168.0.2"],
                &["10.0.0.0/8", "100.64.0.0/10"],
                &["172.30.0.0/16", "172.31.0.0/16"],
            ),
            vec![
                state(
                    p1,
                    vec![ep("10.180.0.1", 80, Some(NODE)), ep("10.180.2.1", 80, None)],
                ),
                state(p2, svc2_eps),
                state(p3, svc3_eps),
            ],
        )
    }

    fn v6_snapshot() -> Snapshot {
        let mut net6 = network(
            IpFamily::V6,
            &["2001:db8::1"],
            &["fd00:10::/64"],
            &["fd00:10:96::/112"],
        );
        net6.node_port_ips = crate::model::NodePortIps::AllLocal;
        let mut p = port("ns1", "svc1", "p80", Protocol::Tcp, "fd00:10:96::41", 80);
        p.node_port = Some(3001);
        snapshot(
            net6,
            vec![state(p, vec![ep("fd00:10:180::1", 80, Some(NODE))])],
        )
    }

    fn changed(names: &[(&str, &str)]) -> Changed {
        Changed::Services(
            names
                .iter()
                .map(|(ns, n)| ServiceKey {
                    namespace: ns.to_string(),
                    name: n.to_string(),
                })
                .collect(),
        )
    }

    fn table_names(ruleset: &str) -> BTreeSet<String> {
        ruleset
            .lines()
            .filter_map(|l| l.strip_prefix("table "))
            .map(|l| l.trim_end_matches(" {").to_string())
            .collect()
    }

    #[test]
    fn programs_a_namespace_atomically_partially_and_cleans_up() {
        if let Some(why) = skip_reason() {
            eprintln!("skipping root nftables test: {why}");
            return;
        }
        let ns = Netns(format!("shunt-nft-test-{}", std::process::id()));
        let st = Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {}", ns.0);
        ns.exec(&["nft", "add table inet foreign; add chain inet foreign keep { type filter hook input priority 0; }"])
            .unwrap();

        let prefix: Vec<String> = ["ip", "netns", "exec", &ns.0]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut dp = NftablesDataplane::with_command(prefix.clone()).unwrap();

        // 1. Full sync of both families.
        let eps_a = vec![ep("10.180.0.5", 53, Some(NODE)), ep("10.180.0.6", 53, None)];
        let snaps = vec![v4_snapshot(eps_a.clone(), vec![]), v6_snapshot()];
        let out = dp
            .sync(SyncRequest {
                snapshots: &snaps,
                changed: &Changed::Services(BTreeSet::new()),
            })
            .unwrap();
        assert!(out.full, "first sync must be full");
        assert_eq!(out.rules_total.len(), 2);
        let v4 = dp
            .read_table(IpFamily::V4)
            .unwrap()
            .expect("ip shunt exists");
        let v6 = dp
            .read_table(IpFamily::V6)
            .unwrap()
            .expect("ip6 shunt exists");
        let want4 = nft::ruleset(&snaps[0]);
        let want_chains: BTreeSet<String> = want4.chains().map(|c| c.name.clone()).collect();
        assert_eq!(
            v4.chains.keys().cloned().collect::<BTreeSet<_>>(),
            want_chains
        );
        for c in want4.chains() {
            assert_eq!(
                v4.chains[&c.name].len(),
                c.rules.len(),
                "rules of {}",
                c.name
            );
        }
        assert!(v4.sets[names::SERVICE_IPS].verdict_map);
        let svc2 = snaps[0]
            .services
            .keys()
            .find(|n| n.service.name == "svc2")
            .unwrap()
            .clone();
        let aff = names::affinity_set(&svc2, &eps_a[0]);
        assert_eq!(v4.sets[&aff].timeout_seconds, Some(10800));
        assert!(v6.chains.keys().any(|c| c.starts_with("service-")));
        // Elements: svc1 ClusterIP + LB IP + svc2 ClusterIP in service-ips; svc3 rejects.
        assert_eq!(
            v4.elements[names::SERVICE_IPS].len(),
            3,
            "{:?}",
            v4.elements[names::SERVICE_IPS]
        );
        assert_eq!(v4.elements[names::NO_ENDPOINT_SERVICES].len(), 1);
        assert_eq!(v4.elements[names::FIREWALL_IPS].len(), 1);

        // 2. Partial sync: svc2 loses 10.180.0.5 and gains 10.180.0.7. A UDP flow DNATed to
        // the lost endpoint must be deleted.
        ns.exec(&[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "10.0.0.2",
            "-d",
            "172.30.0.42",
            "--sport",
            "40000",
            "--dport",
            "53",
            "-r",
            "10.180.0.5",
            "-q",
            "10.0.0.2",
            "--reply-port-src",
            "53",
            "--reply-port-dst",
            "40000",
            "--timeout",
            "120",
        ])
        .unwrap();
        let eps_b = vec![ep("10.180.0.6", 53, None), ep("10.180.0.7", 53, None)];
        let snaps2 = vec![v4_snapshot(eps_b.clone(), vec![]), v6_snapshot()];
        let out = dp
            .sync(SyncRequest {
                snapshots: &snaps2,
                changed: &changed(&[("ns2", "svc2")]),
            })
            .unwrap();
        assert!(!out.full, "a listed change must be a partial sync");
        assert_eq!(out.conntrack_deleted, 1);
        let after = dp.read_table(IpFamily::V4).unwrap().unwrap();
        for (name, rules) in &v4.chains {
            let mine = name.contains("ns2/svc2");
            match after.chains.get(name) {
                Some(now) if !mine => {
                    assert_eq!(now, rules, "untouched chain {name} was rewritten")
                }
                Some(now) => assert_ne!(
                    now.iter().map(|r| r.handle).collect::<Vec<_>>(),
                    rules.iter().map(|r| r.handle).collect::<Vec<_>>(),
                    "svc2 chain {name} was not rewritten"
                ),
                None => assert!(mine, "chain {name} disappeared"),
            }
        }
        let gone = names::endpoint_chain(&svc2, &eps_a[0]);
        let new = names::endpoint_chain(&svc2, &eps_b[1]);
        assert!(!after.chains.contains_key(&gone) && after.chains.contains_key(&new));
        assert!(!after.sets.contains_key(&aff));
        let fixed = |t: &TableState| -> BTreeMap<String, Vec<Value>> {
            t.elements
                .iter()
                .filter(|(n, _)| {
                    !n.starts_with(names::AFFINITY_PREFIX)
                        && !n.starts_with(names::ENDPOINT_PICKS_PREFIX)
                })
                .map(|(n, e)| (n.clone(), e.clone()))
                .collect()
        };
        assert_eq!(fixed(&after), fixed(&v4), "no map element needed to change");
        // The endpoint-pick slots: svc2's now name exactly its new endpoint chains, the
        // others are untouched.
        let picks = |t: &TableState, svc2: bool| -> BTreeSet<String> {
            picks_of(t)
                .iter()
                .map(|e| e.to_string())
                .filter(|e| e.contains("ns2/svc2") == svc2)
                .collect()
        };
        assert_eq!(picks(&after, false), picks(&v4, false));
        let targets: BTreeSet<String> = picks_of(&after)
            .iter()
            .filter_map(|e| e[1]["goto"]["target"].as_str())
            .filter(|c| c.contains("ns2/svc2"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            targets,
            eps_b
                .iter()
                .map(|e| names::endpoint_chain(&svc2, e))
                .collect::<BTreeSet<_>>()
        );
        assert_eq!(
            dp.read_table(IpFamily::V6).unwrap().unwrap(),
            v6,
            "ip6 table untouched"
        );

        // 3. Only our tables and the foreign one exist.
        let listing = ns.exec(&["nft", "list", "ruleset"]).unwrap();
        assert_eq!(
            table_names(&listing),
            BTreeSet::from([
                "inet foreign".to_string(),
                "ip shunt".to_string(),
                "ip6 shunt".to_string()
            ])
        );

        // 3b. svc3 gets its first endpoint: its ClusterIP moves from no-endpoint-services to
        // service-ips, in a partial sync touching nothing else.
        let snaps_b3 = vec![
            v4_snapshot(eps_b.clone(), vec![ep("10.180.0.9", 80, None)]),
            v6_snapshot(),
        ];
        let out = dp
            .sync(SyncRequest {
                snapshots: &snaps_b3,
                changed: &changed(&[("ns3", "svc3")]),
            })
            .unwrap();
        assert!(!out.full);
        let b3 = dp.read_table(IpFamily::V4).unwrap().unwrap();
        assert!(b3.elements[names::NO_ENDPOINT_SERVICES].is_empty());
        assert_eq!(b3.elements[names::SERVICE_IPS].len(), 4);
        for (name, rules) in &after.chains {
            assert_eq!(b3.chains.get(name), Some(rules), "chain {name} changed");
        }

        // 4. Someone removes a chain behind our back: the partial sync that needs it fails
        // with nft's words, and the next one is full and repairs the table.
        let sabotaged = names::endpoint_chain(&svc2, &eps_b[0]);
        ns.exec(&[
            "nft",
            &format!("flush chain ip shunt {}", names::cluster_chain(&svc2)),
        ])
        .unwrap();
        // Its endpoint-pick slot refers to it too.
        let slot = picks_of(&b3)
            .iter()
            .find(|e| e[1]["goto"]["target"] == sabotaged.as_str())
            .map(|e| e[0].clone())
            .expect("the endpoint chain has a pick slot");
        ns.exec(&[
            "nft",
            &format!(
                "delete element ip shunt {} {{ {slot} }}",
                names::endpoint_pick_map(&names::cluster_chain(&svc2))
            ),
        ])
        .unwrap();
        ns.exec(&["nft", &format!("delete chain ip shunt {sabotaged}")])
            .unwrap();
        let eps_c = vec![ep("10.180.0.7", 53, None)];
        let snaps3 = vec![
            v4_snapshot(eps_c, vec![ep("10.180.0.9", 80, None)]),
            v6_snapshot(),
        ];
        let err = dp
            .sync(SyncRequest {
                snapshots: &snaps3,
                changed: &changed(&[("ns2", "svc2")]),
            })
            .unwrap_err();
        assert!(
            matches!(err, DataplaneError::Tool { ref stderr, .. } if !stderr.is_empty()),
            "{err}"
        );
        let out = dp
            .sync(SyncRequest {
                snapshots: &snaps3,
                changed: &changed(&[("ns2", "svc2")]),
            })
            .unwrap();
        assert!(out.full, "the sync after a failure must be full");
        let repaired = dp.read_table(IpFamily::V4).unwrap().unwrap();
        let want = nft::ruleset(&snaps3[0]);
        assert_eq!(
            repaired.chains.keys().cloned().collect::<BTreeSet<_>>(),
            want.chains()
                .map(|c| c.name.clone())
                .collect::<BTreeSet<_>>()
        );
        assert_eq!(repaired.chains[names::SERVICES].len(), 2);

        // 5. A restarted backend remembers nothing: its first sync is full and replaces the
        // content in place (no table deletion: the foreign table and ours stay).
        let mut dp2 = NftablesDataplane::with_command(prefix).unwrap();
        let out = dp2
            .sync(SyncRequest {
                snapshots: &snaps3,
                changed: &changed(&[("ns2", "svc2")]),
            })
            .unwrap();
        assert!(out.full);
        let again = dp2.read_table(IpFamily::V4).unwrap().unwrap();
        assert_eq!(
            again.chains.keys().collect::<Vec<_>>(),
            repaired.chains.keys().collect::<Vec<_>>()
        );
        assert_eq!(again.elements, repaired.elements);

        // 6. Cleanup removes exactly our tables, and is fine when they are gone.
        dp2.cleanup().unwrap();
        let listing = ns.exec(&["nft", "list", "ruleset"]).unwrap();
        assert_eq!(
            table_names(&listing),
            BTreeSet::from(["inet foreign".to_string()])
        );
        dp2.cleanup().unwrap();
        assert!(dp2.existing_tables().unwrap().is_empty());
    }

    /// Kills a process we started (the namespace's test server) when the test ends.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// What a TCP connect from inside the namespace sees.
    fn connect(ns: &Netns, addr: &str) -> String {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let script = format!(
            "import socket\n\
             s = socket.socket()\n\
             s.settimeout(1.5)\n\
             try:\n    s.connect(('{host}', {port})); print('data:' + s.recv(64).decode())\n\
             except ConnectionRefusedError: print('refused')\n\
             except socket.timeout: print('timeout')\n\
             except OSError as e: print('error:%d' % e.errno)\n"
        );
        ns.exec(&["python3", "-c", &script])
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn live_node_traffic_is_dnated_rejected_and_dropped() {
        if let Some(why) = skip_reason() {
            eprintln!("skipping live nftables test: {why}");
            return;
        }
        if tool_missing("python3") {
            eprintln!("skipping live nftables test: python3 not installed");
            return;
        }
        let ns = Netns(format!("shunt-nft-live-{}", std::process::id()));
        assert!(
            Command::new("ip")
                .args(["netns", "add", &ns.0])
                .status()
                .unwrap()
                .success()
        );
        // A node address on a veth uplink (its peer stays in the namespace too) with a route for the service CIDR, and the
        // "pod" endpoint as a local address.
        for cmd in [
            "ip link set lo up",
            "ip link add up0 type veth peer name up1",
            "ip link set up0 up",
            "ip link set up1 up",
            "ip addr add 192.168.0.2/24 dev up0",
            "ip route add 172.30.0.0/16 dev up0",
            "ip addr add 10.180.0.1/32 dev lo",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            ns.exec(&args).unwrap();
        }
        let server = "import socket, time\n\
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
            s.bind(('10.180.0.1', 8080)); s.listen(8); s.settimeout(1)\n\
            end = time.time() + 30\n\
            while time.time() < end:\n    try:\n        c, _ = s.accept(); c.send(b'pod'); c.close()\n    except socket.timeout: pass\n";
        let _server = Child(
            Command::new("ip")
                .args(["netns", "exec", &ns.0, "python3", "-c", server])
                .spawn()
                .unwrap(),
        );
        let prefix: Vec<String> = ["ip", "netns", "exec", &ns.0]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut dp = NftablesDataplane::with_command(prefix).unwrap();
        let web = port("ns1", "web", "http", Protocol::Tcp, "172.30.0.41", 80);
        let empty = port("ns1", "empty", "http", Protocol::Tcp, "172.30.0.43", 80);
        let snaps = vec![snapshot(
            v4_network(),
            vec![
                state(web, vec![ep("10.180.0.1", 8080, Some(NODE))]),
                state(empty, vec![]),
            ],
        )];
        dp.sync(SyncRequest {
            snapshots: &snaps,
            changed: &Changed::All,
        })
        .unwrap();
        // Wait (bounded) for the server to listen on the endpoint directly.
        let mut direct = String::new();
        for _ in 0..50 {
            direct = connect(&ns, "10.180.0.1:8080");
            if direct == "data:pod" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(direct, "data:pod", "test server did not come up");
        assert_eq!(connect(&ns, "172.30.0.41:80"), "data:pod", "ClusterIP DNAT");
        assert_eq!(
            connect(&ns, "172.30.0.43:80"),
            "refused",
            "no endpoints: REJECT"
        );
        assert_eq!(
            connect(&ns, "172.30.0.41:443"),
            "refused",
            "wrong port of a ClusterIP: REJECT"
        );
        assert_eq!(
            connect(&ns, "172.30.0.50:80"),
            "timeout",
            "unallocated ClusterIP: DROP"
        );
        dp.cleanup().unwrap();
        // Without our rules the service CIDR is just a route to nowhere: no reject.
        assert_ne!(connect(&ns, "172.30.0.43:80"), "refused");
    }

    /// Sends one UDP datagram from 192.168.0.2:`sport` and prints the answer.
    fn udp_ping(ns: &Netns, sport: u16, addr: &str) -> String {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('192.168.0.2', {sport})); s.settimeout(1)\n\
             s.sendto(b'ping', ('{host}', {port}))\n\
             try: print('data:' + s.recv(64).decode())\n\
             except socket.timeout: print('timeout')\n\
             except OSError as e: print('error:%d' % e.errno)\n"
        );
        ns.exec(&["python3", "-c", &script])
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn udp_flows_survive_a_restart_and_go_with_their_endpoint() {
        use crate::model::ServicePortState;
        use crate::plan::conntrack::ConntrackEntry;

        if let Some(why) = skip_reason() {
            eprintln!("skipping live conntrack test: {why}");
            return;
        }
        if tool_missing("python3") {
            eprintln!("skipping live conntrack test: python3 not installed");
            return;
        }
        let ns = Netns(format!("shunt-ct-live-{}", std::process::id()));
        assert!(
            Command::new("ip")
                .args(["netns", "add", &ns.0])
                .status()
                .unwrap()
                .success()
        );
        // The same node layout as the live TCP test: node address on a veth, a route for the
        // service CIDR, the "pod" endpoint as a local address.
        for cmd in [
            "ip link set lo up",
            "ip link add up0 type veth peer name up1",
            "ip link set up0 up",
            "ip link set up1 up",
            "ip addr add 192.168.0.2/24 dev up0",
            "ip route add 172.30.0.0/16 dev up0",
            "ip addr add 10.180.0.1/32 dev lo",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            ns.exec(&args).unwrap();
        }
        let server = "import socket, time\n\
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
            s.bind(('10.180.0.1', 5353)); s.settimeout(0.5)\n\
            end = time.time() + 30\n\
            while time.time() < end:\n    try:\n        d, a = s.recvfrom(64); s.sendto(b'pong', a)\n    except socket.timeout: pass\n";
        let _server = Child(
            Command::new("ip")
                .args(["netns", "exec", &ns.0, "python3", "-c", server])
                .spawn()
                .unwrap(),
        );
        let prefix: Vec<String> = ["ip", "netns", "exec", &ns.0]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut conntrack_argv = prefix.clone();
        conntrack_argv.push("conntrack".to_string());
        let ct = Conntrack::new(conntrack_argv);
        let dns = |eps: Vec<crate::model::Endpoint>| -> Vec<Snapshot> {
            let p = port("ns1", "dns", "dns", Protocol::Udp, "172.30.0.53", 53);
            let s: ServicePortState = state(p, eps);
            vec![snapshot(v4_network(), vec![s])]
        };
        let healthy = dns(vec![ep("10.180.0.1", 5353, Some(NODE))]);

        let mut dp = NftablesDataplane::with_command(prefix.clone()).unwrap();
        dp.sync(SyncRequest {
            snapshots: &healthy,
            changed: &Changed::All,
        })
        .unwrap();
        // Wait (bounded) for the server, talking to the endpoint directly: a flow that is
        // not Service traffic and must never be touched.
        let mut direct = String::new();
        for _ in 0..50 {
            direct = udp_ping(&ns, 40001, "10.180.0.1:5353");
            if direct == "data:pong" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(direct, "data:pong", "test server did not come up");
        assert_eq!(
            udp_ping(&ns, 40000, "172.30.0.53:53"),
            "data:pong",
            "ClusterIP DNAT"
        );
        let find = |sport: u16| -> Option<ConntrackEntry> {
            ct.list_udp(IpFamily::V4)
                .unwrap()
                .into_iter()
                .find(|e| e.orig_sport == sport && e.orig_src == ip("192.168.0.2"))
        };
        let flow = find(40000).expect("the Service flow is in the conntrack table");
        assert_eq!(
            (
                flow.orig_dst,
                flow.orig_dport,
                flow.reply_src,
                flow.reply_sport
            ),
            (ip("172.30.0.53"), 53, ip("10.180.0.1"), 5353)
        );
        let direct_flow = find(40001).expect("the direct flow is in the conntrack table");
        // A flow made to the ClusterIP before it had endpoints: never DNATed.
        ns.exec(&[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "192.168.0.2",
            "-d",
            "172.30.0.53",
            "--sport",
            "40500",
            "--dport",
            "53",
            "-r",
            "172.30.0.53",
            "-q",
            "192.168.0.2",
            "--reply-port-src",
            "53",
            "--reply-port-dst",
            "40500",
            "--timeout",
            "120",
        ])
        .unwrap();
        assert!(find(40500).is_some());

        // Restart: a new backend with no memory fully syncs the same state. The live flow and
        // the direct one survive; only the un-DNATed one goes.
        let mut dp2 = NftablesDataplane::with_command(prefix).unwrap();
        let out = dp2
            .sync(SyncRequest {
                snapshots: &healthy,
                changed: &Changed::All,
            })
            .unwrap();
        assert!(out.full);
        assert_eq!(out.conntrack_deleted, 1);
        assert_eq!(find(40000).as_ref(), Some(&flow), "live flow survived");
        assert_eq!(find(40001).as_ref(), Some(&direct_flow));
        assert_eq!(find(40500), None, "un-DNATed flow deleted");
        assert_eq!(udp_ping(&ns, 40000, "172.30.0.53:53"), "data:pong");

        // The endpoint goes away (replaced by another one): its flow is deleted, the
        // direct flow stays.
        let moved = dns(vec![ep("10.180.0.2", 5353, None)]);
        let out = dp2
            .sync(SyncRequest {
                snapshots: &moved,
                changed: &changed(&[("ns1", "dns")]),
            })
            .unwrap();
        assert!(!out.full);
        assert_eq!(out.conntrack_deleted, 1);
        assert_eq!(find(40000), None, "flow to the removed endpoint deleted");
        assert_eq!(find(40001).as_ref(), Some(&direct_flow));

        // The endpoint comes back and the client talks again; then the Service is deleted:
        // its flow goes too (kubernetes#141371), the direct one stays.
        dp2.sync(SyncRequest {
            snapshots: &healthy,
            changed: &changed(&[("ns1", "dns")]),
        })
        .unwrap();
        assert_eq!(udp_ping(&ns, 40000, "172.30.0.53:53"), "data:pong");
        assert!(find(40000).is_some());
        let none = vec![snapshot(v4_network(), vec![])];
        let out = dp2
            .sync(SyncRequest {
                snapshots: &none,
                changed: &changed(&[("ns1", "dns")]),
            })
            .unwrap();
        assert_eq!(out.conntrack_deleted, 1);
        assert_eq!(find(40000), None, "flow of the deleted Service deleted");
        assert_eq!(find(40001).as_ref(), Some(&direct_flow));
        dp2.cleanup().unwrap();
    }
}
