//! Removing what kube-proxy leaves behind when shunt replaces it (`--cleanup-kube-proxy`),
//! and nothing else.
//!
//! kube-proxy's own `--cleanup` (pkg/proxy/iptables/proxier.go `CleanupLeftovers`,
//! pkg/proxy/nftables/proxier.go `CleanupLeftovers`) deletes its jump rules from the built-in
//! chains, then flushes and deletes its chains; in nftables mode it deletes its tables. This
//! does the same for every backend a node may have used, so that the operator does not need
//! the kube-proxy binary of the right version on the node:
//!
//! * iptables, in both iptables-legacy and iptables-nft, IPv4 and IPv6, tables nat, filter
//!   and mangle: the chains kube-proxy creates (see [`is_kube_proxy_chain`]) are flushed and
//!   deleted, and every rule elsewhere that jumps (`-j`/`-g`) into one of them is deleted.
//!   Each table is changed in one `iptables-restore --noflush` transaction, so a packet sees
//!   either the old or the new ruleset. Kubelet's chains (`KUBE-FIREWALL`,
//!   `KUBE-KUBELET-CANARY`, and `KUBE-MARK-DROP` on old kubelets; pkg/kubelet
//!   kubelet_network_linux.go) and everything else are left alone.
//! * nftables: the tables `ip kube-proxy` and `ip6 kube-proxy` (kube-proxy's nftables mode
//!   owns these tables entirely).
//! * IPVS (virtual servers, the `kube-ipvs0` dummy device, ipsets, `KUBE-IPVS-*` chains) is
//!   out of scope: shunt has no IPVS mode and this does not touch IPVS state.
//!
//! Run it after kube-proxy has stopped on the node: a running kube-proxy notices its canary
//! chain is gone and recreates everything. The result is checked by reading the state back; a
//! leftover is an error.
use std::collections::BTreeSet;
use std::path::Path;

use super::DataplaneError;

/// What `cleanup_kube_proxy` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// One entry per iptables backend and table that held kube-proxy state.
    pub iptables: Vec<IptablesCleanup>,
    /// nftables tables deleted, as `family name` (`ip kube-proxy`).
    pub nft_tables: Vec<String>,
    /// Tools not installed, hence backends not looked at.
    pub skipped: Vec<String>,
}

/// kube-proxy state removed from one table of one iptables backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesCleanup {
    /// The save tool of the backend: `iptables-legacy-save`, `ip6tables-nft-save`, ….
    pub backend: String,
    pub table: String,
    /// Chains flushed and deleted.
    pub chains: Vec<String>,
    /// Rules outside those chains deleted because they jumped into them, as saved.
    pub jump_rules: Vec<String>,
}

impl CleanupReport {
    /// True if nothing of kube-proxy's was found.
    pub fn is_empty(&self) -> bool {
        self.iptables.is_empty() && self.nft_tables.is_empty()
    }
}

/// The four iptables backends: (save, restore).
const IPTABLES_BACKENDS: [(&str, &str); 4] = [
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

/// Chains kube-proxy's iptables mode creates, by exact name (pkg/proxy/iptables/proxier.go
/// constants). `KUBE-MARK-MASQ` and `KUBE-POSTROUTING` were shared with kubelet before
/// Kubernetes 1.25 (KEP-3178 iptables ownership cleanup); since then only kube-proxy creates
/// them, and a kubelet that still does recreates them at its next sync.
const KUBE_PROXY_CHAINS: [&str; 8] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
];

/// Per-service chain prefixes (proxier.go `isServiceChainName`): cluster and local policy
/// chains, endpoint chains, external and firewall chains, and the pre-1.24 `KUBE-XLB-`
/// local-traffic chains an upgraded node may still carry.
const KUBE_PROXY_CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-XLB-",
];

/// True for a chain kube-proxy's iptables mode creates. Kubelet's `KUBE-FIREWALL`,
/// `KUBE-KUBELET-CANARY` and `KUBE-MARK-DROP`, and IPVS mode's chains, are not.
pub fn is_kube_proxy_chain(name: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&name)
        || KUBE_PROXY_CHAIN_PREFIXES
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
}

/// The nftables tables kube-proxy's nftables mode owns: (family, name).
const KUBE_PROXY_NFT_TABLES: [(&str, &str); 2] = [("ip", "kube-proxy"), ("ip6", "kube-proxy")];

/// Remove kube-proxy's iptables chains and rules (legacy and nft, both families) and its
/// nftables tables. `cmd_prefix` is prepended to every command (e.g. `ip netns exec NS`, or
/// empty). Tools that are not installed are skipped and listed in the report.
pub fn cleanup_kube_proxy(cmd_prefix: &[String]) -> Result<CleanupReport, DataplaneError> {
    let mut report = CleanupReport::default();
    for (save, restore) in IPTABLES_BACKENDS {
        if !installed(save) || !installed(restore) {
            report.skipped.push(save.to_owned());
            continue;
        }
        let before = parse_save(&run(cmd_prefix, save, &[], None)?);
        let (input, removed) = removal(&before, save);
        if removed.is_empty() {
            continue;
        }
        run(cmd_prefix, restore, &["--noflush", "--wait"], Some(&input))?;
        let after = parse_save(&run(cmd_prefix, save, &[], None)?);
        let left: Vec<String> = after
            .iter()
            .flat_map(|t| {
                t.chains
                    .iter()
                    .filter(|c| is_kube_proxy_chain(c))
                    .map(move |c| format!("{} {c}", t.name))
            })
            .collect();
        if !left.is_empty() {
            return Err(DataplaneError::Other(format!(
                "{save}: kube-proxy chains still present after cleanup (is kube-proxy still \
                 running on this node?): {}",
                left.join(", ")
            )));
        }
        report.iptables.extend(removed);
    }

    if !installed("nft") {
        report.skipped.push("nft".to_owned());
        return Ok(report);
    }
    let tables = run(cmd_prefix, "nft", &["list", "tables"], None)?;
    let present: BTreeSet<(String, String)> = tables
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next(), w.next()) {
                (Some("table"), Some(family), Some(name), None) => {
                    Some((family.to_owned(), name.to_owned()))
                }
                _ => None,
            }
        })
        .collect();
    for (family, name) in KUBE_PROXY_NFT_TABLES {
        if present.contains(&(family.to_owned(), name.to_owned())) {
            run(cmd_prefix, "nft", &["delete", "table", family, name], None)?;
            report.nft_tables.push(format!("{family} {name}"));
        }
    }
    Ok(report)
}

/// One table of `iptables-save` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SavedTable {
    name: String,
    /// Every chain, built-in and user-defined, in save order.
    chains: Vec<String>,
    /// Rules as saved (`-A CHAIN …`), in order.
    rules: Vec<String>,
}

fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut tables = Vec::new();
    let mut current: Option<SavedTable> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            current = Some(SavedTable {
                name: name.to_owned(),
                ..Default::default()
            });
        } else if line == "COMMIT" {
            tables.extend(current.take());
        } else if let (Some(t), Some(decl)) = (current.as_mut(), line.strip_prefix(':')) {
            if let Some(chain) = decl.split_whitespace().next() {
                t.chains.push(chain.to_owned());
            }
        } else if let (Some(t), true) = (current.as_mut(), line.starts_with("-A ")) {
            t.rules.push(line.to_owned());
        }
    }
    tables
}

/// Split a saved rule into words as iptables-restore does: whitespace-separated, with
/// double-quoted strings (which may contain escaped quotes) as one word.
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The chain a rule is in and the chain it jumps or goes to, if any.
fn rule_chain_and_target(rule: &str) -> (String, Option<String>) {
    let w = words(rule);
    let chain = w.get(1).cloned().unwrap_or_default();
    let target = w
        .windows(2)
        .find(|p| matches!(p[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
        .map(|p| p[1].clone());
    (chain, target)
}

/// The iptables-restore input that removes kube-proxy's state from `tables`, and what it
/// removes. Per table: declaring a chain (`:CHAIN - [0:0]`) with `--noflush` flushes it, so
/// all of kube-proxy's chains are emptied first; then the rules in other chains that jump into
/// them are deleted by their exact saved spec (`-D` instead of `-A`); then, with no references
/// left, the chains are deleted (`-X`). The kernel refuses `-X` on a referenced chain, so a
/// mistake here fails the whole transaction instead of leaving half a ruleset.
fn removal(tables: &[SavedTable], backend: &str) -> (String, Vec<IptablesCleanup>) {
    let mut input = String::new();
    let mut removed = Vec::new();
    for t in tables {
        let chains: Vec<String> = t
            .chains
            .iter()
            .filter(|c| is_kube_proxy_chain(c))
            .cloned()
            .collect();
        if chains.is_empty() {
            continue;
        }
        let ours: BTreeSet<&str> = chains.iter().map(String::as_str).collect();
        let jump_rules: Vec<String> = t
            .rules
            .iter()
            .filter(|r| {
                let (chain, target) = rule_chain_and_target(r);
                !ours.contains(chain.as_str()) && target.is_some_and(|t| ours.contains(t.as_str()))
            })
            .cloned()
            .collect();
        input.push_str(&format!("*{}\n", t.name));
        for c in &chains {
            input.push_str(&format!(":{c} - [0:0]\n"));
        }
        for r in &jump_rules {
            // Saved rules start with "-A "; deleting by the same spec removes exactly that
            // rule (one occurrence per line, so duplicates are all removed).
            input.push_str(&format!("-D {}\n", &r[3..]));
        }
        for c in &chains {
            input.push_str(&format!("-X {c}\n"));
        }
        input.push_str("COMMIT\n");
        removed.push(IptablesCleanup {
            backend: backend.to_owned(),
            table: t.name.clone(),
            chains,
            jump_rules,
        });
    }
    (input, removed)
}

/// True if `tool` is an executable in PATH or the sbin directories (where Debian installs
/// the iptables and nft tools; a non-login PATH may lack them).
fn installed(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| is_executable(&dir.join(tool)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Run `prefix... program args...`, feeding `stdin`; its stdout, or its stderr as the error
/// (followed by the input, so a refused restore shows what was refused).
fn run(
    prefix: &[String],
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, DataplaneError> {
    let mut argv = prefix.to_vec();
    argv.push(program.to_string());
    argv.extend(args.iter().map(|a| a.to_string()));
    super::command::run(&argv, stdin.map(str::as_bytes)).map_err(|e| match (e, stdin) {
        (DataplaneError::Tool { tool, mut stderr }, Some(input)) => {
            stderr.push_str(&format!("\ninput was:\n{input}"));
            DataplaneError::Tool { tool, stderr }
        }
        (e, _) => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ownership_follows_upstream() {
        for c in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-SVC-ERIFXISQEP7F7OF4",
            "KUBE-SEP-IT2ZTR26TO4XFPTO",
            "KUBE-EXT-QKNQQNIN727HO3XU",
            "KUBE-FW-QKNQQNIN727HO3XU",
            "KUBE-SVL-QKNQQNIN727HO3XU",
            "KUBE-XLB-QKNQQNIN727HO3XU",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-PROXY-CANARY",
        ] {
            assert!(is_kube_proxy_chain(c), "{c}");
        }
        for c in [
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBE-MARK-DROP",
            "KUBE-IPVS-FILTER",
            "KUBE-LOAD-BALANCER",
            "KUBE-SVC-",
            "INPUT",
            "DOCKER",
            "CILIUM_INPUT",
        ] {
            assert!(!is_kube_proxy_chain(c), "{c}");
        }
    }

    #[test]
    fn words_follow_restore_quoting() {
        assert_eq!(
            words(r#"-A INPUT -m comment --comment "a \"b\" c" -j KUBE-X"#),
            [
                "-A",
                "INPUT",
                "-m",
                "comment",
                "--comment",
                r#"a "b" c"#,
                "-j",
                "KUBE-X"
            ]
        );
        assert_eq!(
            rule_chain_and_target(r#"-A FOO -m comment --comment "-j KUBE-SERVICES" -j ACCEPT"#),
            ("FOO".to_owned(), Some("ACCEPT".to_owned()))
        );
        assert_eq!(
            rule_chain_and_target("-A FOO -g KUBE-SVC-X"),
            ("FOO".to_owned(), Some("KUBE-SVC-X".to_owned()))
        );
    }

    #[test]
    fn removal_flushes_unhooks_and_deletes_only_kube_proxy_chains() {
        let saved = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n\
            :OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n\
            :KUBE-KUBELET-CANARY - [0:0]\n:MINE - [0:0]\n\
            -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A PREROUTING -j MINE\n-A MINE -j KUBE-SERVICES\n\
            -A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-A\nCOMMIT\n\
            *mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        let (input, removed) = removal(&parse_save(saved), "iptables-legacy-save");
        assert_eq!(
            input,
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D MINE -j KUBE-SERVICES\n-X KUBE-SERVICES\n-X KUBE-SVC-A\nCOMMIT\n"
        );
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].chains, ["KUBE-SERVICES", "KUBE-SVC-A"]);
        assert_eq!(removed[0].jump_rules.len(), 2);
        // Nothing of kube-proxy's: nothing to do.
        let (input, removed) = removal(&parse_save(&saved.replace("KUBE-S", "OTHER-S")), "x");
        assert!(input.is_empty() && removed.is_empty());
    }
}
