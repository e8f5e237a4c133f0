//! `cargo xtask soak`: reliability scenarios on a two-node netns cluster under steady client
//! load that counts every failed request (issue #8).
//!
//! * `restart`: SIGKILL and restart shunt several times ([`restart`]);
//! * `rolling`: replace every backend of a Service one by one, kube-like ([`rolling`]);
//! * `udp`: a UDP client keeps getting answers after its backend is replaced ([`udp`]);
//! * `churn`: ~1,000 endpoint changes a minute across 1,000 Services, RSS sampled ([`churn`]);
//! * `outage`: shunt follows the API double, which goes down and comes back ([`outage`]).
//!
//! One lab is built per run and shared by the scenarios; each scenario starts shunt on a fresh
//! manifest directory (or the API double), and ends with SIGTERM (the rules must keep serving)
//! and `--cleanup` (nothing of shunt may remain), so the next one starts from a clean node.
//! Output: one line per check, `PASS|FAIL soak/<scenario> :: <check> :: <detail>`, then
//! `N passed, N failed`; the exit status is non-zero on any failure.

mod churn;
mod cluster;
mod load;
mod outage;
mod restart;
mod rolling;
mod udp;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::lab::agent::Mode;
use crate::lab::netns;
use crate::lab::plan::Plan;
use crate::lab::topology::Lab;
use crate::scenario::Scenario;
use crate::shunt::{self, Cgroup, ProxyMode, Shunt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Seconds per scenario (CI).
    Short,
    /// The figures: 10 restarts, 60 s outage, 5 minutes of churn.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Restart,
    Rolling,
    Udp,
    Churn,
    Outage,
    All,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "all")]
    pub scenario: Which,
    #[arg(long, value_enum, default_value = "nftables")]
    pub mode: ProxyMode,
    #[arg(long, value_enum, default_value = "short")]
    pub preset: Preset,
    /// shunt binary (default: `cargo build -p shunt`).
    #[arg(long)]
    pub shunt: Option<PathBuf>,
    /// Extra argument for shunt after the contract command line (repeatable), e.g.
    /// `--shunt-arg=--iptables-backend=legacy`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub shunt_arg: Vec<String>,
}

/// Check results of one scenario.
pub struct Report {
    scenario: &'static str,
    pub passed: usize,
    pub failed: usize,
}

impl Report {
    fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            passed: 0,
            failed: 0,
        }
    }

    pub fn check(&mut self, ok: bool, what: &str, detail: &str) {
        let word = if ok { "PASS" } else { "FAIL" };
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        println!("{word} soak/{} :: {what} :: {detail}", self.scenario);
    }

    /// A figure that is reported, not checked.
    pub fn info(&self, what: &str, detail: &str) {
        println!("INFO soak/{} :: {what} :: {detail}", self.scenario);
    }
}

/// What every scenario needs: the lab, the binary and how to start it.
pub struct Ctx<'a> {
    pub lab: &'a Lab,
    pub scenario: &'a Scenario,
    pub mode: ProxyMode,
    pub preset: Preset,
    pub bin: &'a Path,
    pub cgroup: Option<&'a Path>,
    pub extra: &'a [String],
}

/// A scenario's scratch directory: `manifests/` and one log directory per shunt run.
pub struct Work {
    pub dir: tempfile::TempDir,
    pub manifests: PathBuf,
    runs: usize,
    /// shunt state present before the scenario (see [`Ctx::leftovers`]).
    before: Vec<String>,
}

impl Work {
    pub fn log_dir(&mut self) -> Result<PathBuf> {
        self.runs += 1;
        let d = self.dir.path().join(format!("run{}", self.runs));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
}

impl Ctx<'_> {
    /// A fresh manifest directory holding [`cluster::initial_objects`].
    pub fn work(&self, name: &str) -> Result<Work> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("shunt-soak-{name}-"))
            .tempdir()?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        cluster::write(&manifests, &cluster::initial_objects(self.scenario))?;
        let before = self.state_entries()?;
        if !before.is_empty() {
            eprintln!(
                "note: {} entries of shunt state exist before soak/{name} starts (another run's); \
                 the cleanup check ignores them",
                before.len()
            );
        }
        Ok(Work {
            dir,
            manifests,
            runs: 0,
            before,
        })
    }

    /// The contract command line on `manifests`, plus `--shunt-arg`s.
    pub fn args(&self, manifests: &Path) -> Vec<String> {
        let mut a = shunt::args(self.scenario, self.mode, manifests, self.cgroup);
        a.extend(self.extra.iter().cloned());
        a
    }

    pub fn start(&self, args: &[String], w: &mut Work) -> Result<Shunt> {
        Shunt::start(self.bin, &self.lab.node, args, self.mode, &w.log_dir()?)
    }

    /// The namespace path a source address lives in.
    pub fn ns(&self, src: &str) -> String {
        self.lab.ns_of(cluster::ip(src)).path()
    }

    /// shunt's state in the node: nft tables called `shunt*`, iptables `SHUNT-` chains through
    /// either iptables backend, or (ebpf) pins in the lab's own pin directory
    /// ([`shunt::pin_dir_for`]), minus what was there before the scenario started (`w.before`),
    /// so only what this scenario's shunt created is counted.
    fn leftovers(&self, w: &Work) -> Result<usize> {
        Ok(self
            .state_entries()?
            .iter()
            .filter(|e| !w.before.contains(*e))
            .count())
    }

    fn state_entries(&self) -> Result<Vec<String>> {
        let lines = |text: String, keep: fn(&str) -> bool| {
            text.lines()
                .filter(|l| keep(l))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        Ok(match self.mode {
            ProxyMode::Iptables => lines(
                self.lab.node.sh(
                    "for t in iptables-legacy-save iptables-nft-save ip6tables-legacy-save ip6tables-nft-save; do \
                     command -v $t >/dev/null && $t 2>/dev/null; done; true",
                )?,
                |l| l.starts_with(":SHUNT-"),
            ),
            ProxyMode::Nftables => lines(self.lab.node.sh("nft list tables")?, |l| {
                l.contains("shunt")
            }),
            ProxyMode::Ebpf => std::fs::read_dir(
                self.cgroup
                    .map(shunt::pin_dir_for)
                    .context("ebpf mode runs with a lab cgroup")?,
            )
            .map_or(Vec::new(), |d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            }),
        })
    }

    /// The programmed state as text: nft ruleset, iptables-save of both backends, or in ebpf
    /// mode the frontends and endpoints read back from the lab's pinned maps by shunt's own
    /// `shunt inspect services -o json` (conntrack and counters, which move with traffic, are
    /// not part of it). None only when that cannot be read.
    pub fn rules_dump(&self) -> Result<Option<String>> {
        Ok(match self.mode {
            ProxyMode::Nftables => Some(self.lab.node.sh("nft list ruleset")?),
            ProxyMode::Iptables => Some(
                self.lab
                    .node
                    .sh("for t in iptables-legacy-save iptables-nft-save; do \
                 command -v $t >/dev/null && $t 2>/dev/null; done; true")?,
            ),
            ProxyMode::Ebpf => {
                let Some(pins) = self.cgroup.map(shunt::pin_dir_for) else {
                    return Ok(None);
                };
                // nsenter, not `ip netns exec`: that remounts /sys and hides the pins.
                Some(netns::run(
                    std::process::Command::new("nsenter")
                        .arg(format!("--net={}", self.lab.node.path()))
                        .arg("--")
                        .arg(self.bin)
                        .args(["inspect", "services", "--proxy-mode", "ebpf", "--pin-dir"])
                        .arg(&pins)
                        .args(["-o", "json"]),
                )?)
            }
        })
    }

    /// End of a scenario: SIGTERM leaves rules that still serve the NodePort; `--cleanup`
    /// exits 0 and leaves nothing of shunt behind.
    pub fn finish(
        &self,
        mut proc: Shunt,
        args: &[String],
        w: &mut Work,
        rep: &mut Report,
    ) -> Result<()> {
        let st = proc.stop()?;
        let left = self.leftovers(w)?;
        let still = netns::in_netns(&self.ns(cluster::EXTERNAL), || {
            load::request(cluster::addr(cluster::WEB_NP), 0)
        })
        .map_err(|e| format!("{e:#}"));
        rep.check(
            st.success() && left > 0 && still.is_ok(),
            "SIGTERM leaves the rules serving",
            &format!("{st}, {left} table/chain/pin entries left, NodePort answered by {still:?}"),
        );
        let mut cargs = args.to_vec();
        cargs.push("--cleanup".into());
        let mut c = self.start(&cargs, w)?;
        let cst = c.wait_exit(Duration::from_secs(30))?;
        let left = self.leftovers(w)?;
        rep.check(
            cst.success() && left == 0,
            "--cleanup removes everything",
            &format!("{cst}, {left} table/chain/pin entries left"),
        );
        Ok(())
    }
}

/// The nft table (in the pod's own namespace) that makes `pod` look terminated.
fn gone_table(pod: cluster::Pod) -> String {
    format!("inet soak_gone_{}", pod.name.replace('-', "_"))
}

/// Makes a pod's server unreachable the way a terminated pod is, in the pod's own namespace
/// (never the node's; remote pods share node2's, hence the address match): TCP gets a reset
/// (nothing listens any more), UDP is dropped.
pub fn kill_pod(lab: &Lab, pod: cluster::Pod) -> Result<()> {
    let t = gone_table(pod);
    lab.ns_of(cluster::ip(pod.ip))
        .sh(&format!(
            "nft add table {t} && \
             nft add chain {t} input '{{ type filter hook input priority 0; policy accept; }}' && \
             nft add rule {t} input ip daddr {ip} tcp dport {} reject with tcp reset && \
             nft add rule {t} input ip daddr {ip} udp dport {} drop",
            cluster::WEB_PORT,
            cluster::DNS_PORT,
            ip = pod.ip,
        ))
        .with_context(|| format!("stopping {}", pod.name))?;
    Ok(())
}

/// Undoes [`kill_pod`] (the pod serves again for the next scenario).
pub fn revive_pod(lab: &Lab, pod: cluster::Pod) -> Result<()> {
    lab.ns_of(cluster::ip(pod.ip)).sh(&format!(
        "nft delete table {} 2>/dev/null || true",
        gone_table(pod)
    ))?;
    Ok(())
}

pub fn run(a: &Args) -> Result<bool> {
    let bin = match &a.shunt {
        Some(p) => p.clone(),
        None => shunt::build()?,
    };
    let which: Vec<Which> = match a.scenario {
        Which::All => vec![
            Which::Restart,
            Which::Rolling,
            Which::Udp,
            Which::Churn,
            Which::Outage,
        ],
        w => vec![w],
    };
    let s = cluster::lab_scenario()?;
    let names: BTreeMap<IpAddr, String> = cluster::all_pods()
        .iter()
        .map(|p| (cluster::ip(p.ip), p.name.to_owned()))
        .collect();
    eprintln!(
        "soak {:?} ({} mode, {:?} preset): building the cluster ...",
        which,
        a.mode.flag(),
        a.preset
    );
    let mut lab = Lab::build_named(Plan::new(&s)?, &names, Mode::Echo)?;
    // ebpf mode: the socket programs attach to a cgroup of the lab's own (the load's client
    // threads are in pod and external namespaces, which tc handles, so they need not join it).
    let cgroup = if a.mode == ProxyMode::Ebpf {
        Some(Cgroup::create("soak")?)
    } else {
        None
    };
    lab.probe_cgroup = cgroup.as_ref().map(|c| c.path.clone());
    let ctx = Ctx {
        lab: &lab,
        scenario: &s,
        mode: a.mode,
        preset: a.preset,
        bin: &bin,
        cgroup: cgroup.as_ref().map(|c| c.path.as_path()),
        extra: &a.shunt_arg,
    };
    let (mut passed, mut failed) = (0, 0);
    let mut errors = Vec::new();
    for w in which {
        if crate::lab::interrupted() {
            errors.push("interrupted".to_owned());
            break;
        }
        let name = match w {
            Which::Restart => "restart",
            Which::Rolling => "rolling",
            Which::Udp => "udp",
            Which::Churn => "churn",
            Which::Outage => "outage",
            Which::All => unreachable!("expanded above"),
        };
        let mut rep = Report::new(name);
        let r = match w {
            Which::Restart => restart::run(&ctx, &mut rep),
            Which::Rolling => rolling::run(&ctx, &mut rep),
            Which::Udp => udp::run(&ctx, &mut rep),
            Which::Churn => churn::run(&ctx, &mut rep),
            Which::Outage => outage::run(&ctx, &mut rep),
            Which::All => unreachable!("expanded above"),
        };
        if let Err(e) = r {
            rep.check(false, "scenario ran to the end", &format!("{e:#}"));
            errors.push(format!("{name}: {e:#}"));
        }
        passed += rep.passed;
        failed += rep.failed;
    }
    // shunt has been stopped by every scenario: the cgroup can go, then the lab.
    drop(cgroup);
    drop(lab);
    println!("{passed} passed, {failed} failed");
    if !errors.is_empty() {
        eprintln!("errors: {}", errors.join("; "));
    }
    Ok(failed == 0)
}
