//! `dataplane::kube_proxy_cleanup` against real iptables (legacy and nft, IPv4 and IPv6) and
//! nftables state, in private network namespaces.
//!
//! Namespace A gets a node's full ruleset (kube-proxy's iptables chains in both backends and
//! families, kube-proxy's nftables tables, kubelet's chains, the operator's rules and nftables
//! tables); namespace B gets only what is not kube-proxy's (hand-written fixtures, not derived
//! from A by the code under test). After the cleanup in A, A must equal B: per backend, table
//! and chain, the same policy and the same rules in the same order; and the same nftables
//! tables with the same content.
//!
//! Needs root, `ip`, the iptables-legacy/-nft tools and `nft`; skips (and says why) otherwise.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use shunt::dataplane::kube_proxy_cleanup::{CleanupReport, cleanup_kube_proxy};

const TOOLS: [&str; 10] = [
    "ip",
    "nft",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
];

const SAVE_TOOLS: [&str; 4] = [
    "iptables-legacy-save",
    "iptables-nft-save",
    "ip6tables-legacy-save",
    "ip6tables-nft-save",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube-proxy-cleanup")
        .join(name)
}

fn have(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !have(t)).collect();
    (!missing.is_empty()).then(|| format!("missing tools: {}", missing.join(", ")))
}

/// A network namespace, deleted when dropped (also when the test panics).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("shunt-kpc-test-{}-{tag}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.0]
            .map(String::from)
            .into_iter()
            .collect()
    }

    /// Run a command in the namespace, optionally with a file as stdin; its stdout.
    fn run(&self, args: &[&str], stdin: Option<&Path>) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).args(args);
        if let Some(p) = stdin {
            cmd.stdin(Stdio::from(
                std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            ));
        }
        let out = cmd.output().expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    fn load(&self, v4: &str, v6: &str, nft: &[&str]) {
        for tool in ["iptables-legacy-restore", "iptables-nft-restore"] {
            self.run(&[tool], Some(&fixture(v4)));
        }
        for tool in ["ip6tables-legacy-restore", "ip6tables-nft-restore"] {
            self.run(&[tool], Some(&fixture(v6)));
        }
        for f in nft {
            self.run(&["nft", "-f", &fixture(f).to_string_lossy()], None);
        }
    }

    /// Every iptables backend's ruleset, normalized, and every nftables table not managed
    /// by iptables-nft, as listed.
    fn state(&self) -> State {
        let iptables = SAVE_TOOLS
            .iter()
            .map(|t| (t.to_string(), normalize(&self.run(&[t], None))))
            .collect();
        let mut nft = BTreeMap::new();
        for line in self.run(&["nft", "list", "tables"], None).lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            let [_, family, name] = w[..] else {
                panic!("unexpected nft list tables line {line:?}")
            };
            // iptables-nft's tables are compared through iptables-nft-save above (their
            // chain order in `nft list` follows creation order, which legitimately differs).
            if matches!(name, "nat" | "filter" | "mangle" | "raw" | "security")
                && matches!(family, "ip" | "ip6")
            {
                continue;
            }
            let listing = self.run(&["nft", "list", "table", family, name], None);
            nft.insert(format!("{family} {name}"), listing);
        }
        State { iptables, nft }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[derive(Debug, PartialEq, Eq)]
struct State {
    /// save tool -> table -> chain -> [policy, rules...]
    iptables: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<String>>>>,
    /// "family name" -> `nft list table` output
    nft: BTreeMap<String, String>,
}

/// iptables-save output as table -> chain -> [policy, rules in order]; comments and counters
/// dropped, so that rulesets loaded in a different chain order compare equal.
fn normalize(save: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
            out.entry(table.clone()).or_default();
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            let chain = w.next().expect("chain name").to_owned();
            let policy = w.next().expect("chain policy").to_owned();
            out.entry(table.clone())
                .or_default()
                .entry(chain)
                .or_default()
                .insert(0, format!("policy {policy}"));
        } else if line.starts_with("-A ") {
            let chain = line
                .split_whitespace()
                .nth(1)
                .expect("rule chain")
                .to_owned();
            out.entry(table.clone())
                .or_default()
                .entry(chain)
                .or_default()
                .push(line.to_owned());
        }
    }
    out
}

fn chains_named(state: &State, pred: impl Fn(&str) -> bool) -> usize {
    state
        .iptables
        .values()
        .flat_map(|tables| tables.values())
        .flat_map(|chains| chains.keys())
        .filter(|c| pred(c))
        .count()
}

#[test]
fn removes_kube_proxy_state_and_nothing_else() {
    if let Some(why) = skip_reason() {
        eprintln!("skipping removes_kube_proxy_state_and_nothing_else: {why}");
        return;
    }
    let node = Netns::new("a");
    let expected = Netns::new("b");
    node.load(
        "node.v4.iptables-save",
        "node.v6.iptables-save",
        &["kube-proxy.nft", "foreign.nft"],
    );
    expected.load(
        "foreign.v4.iptables-save",
        "foreign.v6.iptables-save",
        &["foreign.nft"],
    );
    let want = expected.state();
    let before = node.state();
    // The fixtures really hold kube-proxy state in every backend, and kubelet's chains.
    assert_ne!(before, want);
    assert!(before.nft.contains_key("ip kube-proxy") && before.nft.contains_key("ip6 kube-proxy"));
    for (tool, tables) in &before.iptables {
        assert!(
            tables["nat"].contains_key("KUBE-SERVICES"),
            "{tool}: fixture not loaded"
        );
    }
    assert_eq!(
        chains_named(&before, |c| c == "KUBE-FIREWALL"),
        chains_named(&want, |c| c == "KUBE-FIREWALL")
    );

    let report = cleanup_kube_proxy(&node.prefix()).expect("cleanup");
    let after = node.state();
    assert_eq!(
        after.nft, want.nft,
        "nftables tables differ after the cleanup"
    );
    for (tool, tables) in &want.iptables {
        assert_eq!(
            &after.iptables[tool], tables,
            "{tool}: ruleset differs from the expected one after the cleanup"
        );
    }
    assert_eq!(after, want);

    // The report says what was removed: every backend, every table with kube-proxy chains.
    assert_eq!(report.nft_tables, ["ip kube-proxy", "ip6 kube-proxy"]);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let per_backend: BTreeMap<(&str, &str), usize> = report
        .iptables
        .iter()
        .map(|c| ((c.backend.as_str(), c.table.as_str()), c.chains.len()))
        .collect();
    for tool in SAVE_TOOLS {
        for table in ["nat", "filter", "mangle"] {
            let n = per_backend.get(&(tool, table)).copied().unwrap_or(0);
            let had = before.iptables[tool][table].len() - want.iptables[tool][table].len();
            assert_eq!(n, had, "{tool} {table}: chains reported removed");
        }
    }
    let v4_nat = report
        .iptables
        .iter()
        .find(|c| c.backend == "iptables-legacy-save" && c.table == "nat")
        .expect("legacy v4 nat cleaned");
    // PREROUTING, OUTPUT and POSTROUTING each had one jump into kube-proxy's chains.
    assert_eq!(v4_nat.jump_rules.len(), 3, "{:?}", v4_nat.jump_rules);

    // Idempotent: a second run finds nothing and changes nothing.
    let again = cleanup_kube_proxy(&node.prefix()).expect("second cleanup");
    assert_eq!(again, CleanupReport::default());
    assert_eq!(node.state(), want);
}
