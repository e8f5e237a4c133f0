//! `cargo xtask conformance`: every scenario in its own lab, shunt started with the contract
//! command line, every packet probed and checked.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::check::{self, attempts};
use crate::lab::plan::Plan;
use crate::lab::selftest;
use crate::lab::topology::Lab;
use crate::scenario::{self, Protocol, Scenario};
use crate::shunt::{self, Cgroup, ProxyMode, Shunt};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Proxy mode passed as --proxy-mode.
    #[arg(long, value_enum, default_value = "nftables")]
    pub mode: ProxyMode,
    /// shunt binary (default: `cargo build -p shunt` and use the debug build).
    #[arg(long)]
    pub shunt: Option<PathBuf>,
    /// Run every scenario even after one failed.
    #[arg(long)]
    pub keep_going: bool,
    /// Skip the lab self-test before each scenario.
    #[arg(long)]
    pub no_selftest: bool,
    /// After each scenario also check `--cleanup` (removes shunt's rules, keeps a canary table).
    #[arg(long)]
    pub check_cleanup: bool,
    /// Extra argument for shunt, after the contract command line (repeatable), e.g.
    /// `--shunt-arg=--iptables-backend=legacy`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub shunt_arg: Vec<String>,
    /// Per-probe timeout in milliseconds (a drop is a timeout).
    #[arg(long, default_value_t = 1500)]
    pub timeout_ms: u64,
    /// Scenario files or directories (default: <repo>/../shared/scenarios).
    pub paths: Vec<PathBuf>,
}

const CANARY: &str = "shunt_lab_canary";

fn nft_tables(lab: &Lab) -> Result<Vec<String>> {
    let out = lab.node.sh("nft list tables")?;
    Ok(out
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The contract: SIGTERM leaves the rules in place; the same command line plus `--cleanup`
/// removes everything shunt created and nothing else (the canary table survives).
fn check_cleanup(
    bin: &std::path::Path,
    lab: &Lab,
    cmdline: &[String],
    mode: ProxyMode,
    dir: &std::path::Path,
) -> Result<String> {
    let canary = format!("table inet {CANARY}");
    let before = nft_tables(lab)?;
    let owned: Vec<&String> = before.iter().filter(|t| **t != canary).collect();
    if mode == ProxyMode::Nftables && owned.is_empty() {
        anyhow::bail!("no nftables table left in place after SIGTERM");
    }
    let mut args = cmdline.to_vec();
    args.push("--cleanup".into());
    let mut proc = Shunt::start(bin, &lab.node, &args, mode, dir)?;
    let st = proc.wait_exit(Duration::from_secs(30))?;
    if !st.success() {
        anyhow::bail!(
            "shunt --cleanup exited with {st}; stderr:\n{}",
            proc.stderr_tail(20)
        );
    }
    let after = nft_tables(lab)?;
    if !after.contains(&canary) {
        anyhow::bail!("--cleanup removed a table shunt does not own ({canary})");
    }
    if mode == ProxyMode::Nftables {
        let left: Vec<&String> = after.iter().filter(|t| **t != canary).collect();
        if !left.is_empty() {
            anyhow::bail!("tables left after --cleanup: {left:?}");
        }
    }
    let names: Vec<&str> = owned.iter().map(|t| t.as_str()).collect();
    Ok(format!("removed [{}], kept {canary}", names.join(", ")))
}

/// Explicit paths, else `<repo>/../shared/scenarios` (CI: a fresh clone with shared/ beside it);
/// for a git worktree nested deeper, the nearest ancestor holding `shared/scenarios`.
pub fn default_paths(paths: &[PathBuf]) -> Vec<PathBuf> {
    if !paths.is_empty() {
        return paths.to_vec();
    }
    let root = shunt::repo_root();
    let found = root
        .ancestors()
        .skip(1)
        .map(|a| a.join("shared/scenarios"))
        .find(|p| p.is_dir());
    vec![found.unwrap_or_else(|| root.join("../shared/scenarios"))]
}

#[derive(Default)]
struct Totals {
    passed: usize,
    failed: usize,
    skipped: usize,
}

pub fn run(args: &Args) -> Result<bool> {
    let scenarios = scenario::load(&default_paths(&args.paths))?;
    let bin = match &args.shunt {
        Some(p) => p.clone(),
        None => shunt::build()?,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut t = Totals::default();
    for (i, s) in scenarios.iter().enumerate() {
        if crate::lab::interrupted() {
            break;
        }
        let before = t.failed;
        eprintln!("== {} ({})", s.id, s.name);
        if let Err(e) = run_scenario(s, i, &bin, args, timeout, &mut t) {
            // The lab or shunt could not be set up: every packet not yet reported fails.
            eprintln!("ERROR {} :: {e:#}", s.id);
        }
        if t.failed > before && !args.keep_going && i + 1 < scenarios.len() {
            eprintln!(
                "stopping after the first failing scenario ({} more not run; --keep-going runs all)",
                scenarios.len() - i - 1
            );
            break;
        }
    }
    let mut line = format!("{} passed, {} failed", t.passed, t.failed);
    if t.skipped > 0 {
        line.push_str(&format!(", {} skipped", t.skipped));
    }
    if crate::lab::interrupted() {
        eprintln!("interrupted");
    }
    println!("{line}");
    Ok(t.failed == 0 && !crate::lab::interrupted())
}

fn run_scenario(
    s: &Scenario,
    idx: usize,
    bin: &std::path::Path,
    args: &Args,
    timeout: Duration,
    t: &mut Totals,
) -> Result<()> {
    let mut reported = 0;
    let result = (|| -> Result<()> {
        let mut lab =
            Lab::build(Plan::new(s)?).with_context(|| format!("{}: building the lab", s.id))?;
        if !args.no_selftest {
            let r =
                selftest::run(&lab, timeout).with_context(|| format!("{}: lab self-test", s.id))?;
            eprintln!("lab self-test {}: {} checks passed", s.id, r.checks);
        }
        let dir = tempfile::Builder::new().prefix("shunt-lab-").tempdir()?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        shunt::write_manifests(s, &manifests)?;
        let cgroup = if args.mode == ProxyMode::Ebpf {
            Some(Cgroup::create(&format!("cg{idx}"))?)
        } else {
            None
        };
        lab.probe_cgroup = cgroup.as_ref().map(|c| c.path.clone());
        let mut cmdline = shunt::args(
            s,
            args.mode,
            &manifests,
            cgroup.as_ref().map(|c| c.path.as_path()),
        );
        cmdline.extend(args.shunt_arg.iter().cloned());
        if args.check_cleanup {
            // A table shunt does not own: `--cleanup` must leave it alone.
            lab.node.sh(&format!("nft add table inet {CANARY}"))?;
        }
        let mut proc = Shunt::start(bin, &lab.node, &cmdline, args.mode, dir.path())?;
        proc.wait_healthy(Duration::from_secs(30))?;
        for p in &s.packets {
            let expect = p.expect.resolve()?;
            let head = format!("{} :: {}", s.id, p.name);
            if p.protocol == Protocol::SCTP {
                println!("SKIP {head} :: SCTP sockets cannot be created on this kernel");
                t.skipped += 1;
                reported += 1;
                continue;
            }
            let mut outcomes = Vec::new();
            for _ in 0..attempts(&expect) {
                let send = || lab.probe(p.protocol, p.source_ip, p.dest(), timeout);
                let o = if matches!(expect, scenario::Expectation::Reject) {
                    crate::lab::probe::retry_refusal(send)?
                } else {
                    send()?
                };
                let answered = matches!(o, crate::lab::probe::Outcome::Answered { .. });
                outcomes.push(o);
                if !answered {
                    break; // one non-answer decides; do not pay more timeouts
                }
            }
            let from_node = s.node.ips().contains(&p.source_ip);
            match check::check(&expect, p.dest(), &outcomes, from_node) {
                check::Result::Pass(d) => {
                    println!("PASS {head} :: {d}");
                    t.passed += 1;
                }
                check::Result::Fail(d) => {
                    println!("FAIL {head} :: {d}");
                    t.failed += 1;
                }
            }
            reported += 1;
        }
        let st = proc.stop()?;
        if !st.success() {
            eprintln!(
                "note: shunt exited with {st} after SIGTERM; stderr:\n{}",
                proc.stderr_tail(20)
            );
        }
        if args.check_cleanup {
            let head = format!("{} :: --cleanup", s.id);
            match check_cleanup(bin, &lab, &cmdline, args.mode, dir.path()) {
                Ok(d) => {
                    println!("PASS {head} :: {d}");
                    t.passed += 1;
                }
                Err(e) => {
                    println!("FAIL {head} :: {e:#}");
                    t.failed += 1;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in &s.packets[reported..] {
            if p.protocol == Protocol::SCTP {
                println!(
                    "SKIP {} :: {} :: SCTP sockets cannot be created on this kernel",
                    s.id, p.name
                );
                t.skipped += 1;
            } else {
                println!("FAIL {} :: {} :: not run: setup failed", s.id, p.name);
                t.failed += 1;
            }
        }
        return Err(e);
    }
    Ok(())
}
