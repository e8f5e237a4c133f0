//! `cargo xtask`: the netns lab, conformance runs, the demo and the all-tests command.
//!
//! Lab servers and probes are threads of this process that `setns` into a namespace (a socket
//! keeps the namespace it was created in), so nothing can outlive a run. The only helper process
//! is `lab-agent probe`, for ebpf mode, where a probe must belong to the lab cgroup.

mod bench;
mod check;
mod conformance;
mod demo;
mod lab;
mod scenario;
mod shunt;
mod soak;
mod testcmd;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "shunt development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the packet-level conformance scenarios against shunt in network namespaces.
    Conformance(conformance::Args),
    /// Lab maintenance.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// A small two-node netns cluster showing shunt balancing and following an EndpointSlice edit.
    Demo(demo::Args),
    /// Reliability soaks under counted client load: restart (SIGKILL + restart), rolling update,
    /// UDP backend replacement, endpoint churn, API outage (`--scenario`, default all).
    Soak(soak::Args),
    /// Benchmark every mode side by side at several scales (control plane, data plane, summary);
    /// writes a report (markdown, CSV, SVG) to results/bench/<preset>.
    Bench(bench::Args),
    /// Internal: the lab's helper process (probes that must run inside a cgroup).
    #[command(hide = true)]
    LabAgent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// Everything: install-deps, manifest validation, fmt, clippy, cargo test, conformance
    /// (nftables, iptables on both backends, ebpf), short soaks (every scenario, every mode),
    /// bench quick preset.
    Test,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Join CGROUP (cgroup.procs), then NETNS, send one probe, print the encoded outcome.
    Probe {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        proto: String,
        #[arg(long)]
        src: std::net::IpAddr,
        #[arg(long)]
        dst: std::net::SocketAddr,
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
    },
}

fn agent_probe(
    netns: &str,
    cgroup: Option<&std::path::Path>,
    proto: &str,
    src: std::net::IpAddr,
    dst: std::net::SocketAddr,
    timeout_ms: u64,
) -> Result<bool> {
    if let Some(cg) = cgroup {
        // Writing "0" moves the writing process (cgroup v2 cgroup.procs); done before any
        // socket exists, since cgroup socket hooks act on the cgroup of the socket's creator.
        std::fs::write(cg.join("cgroup.procs"), "0")
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    let proto = scenario::Protocol::parse(proto).with_context(|| format!("--proto {proto}"))?;
    lab::netns::enter(netns)?;
    let o = lab::probe::probe(proto, src, dst, Duration::from_millis(timeout_ms))?;
    println!("{}", o.encode());
    Ok(true)
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build each scenario's lab without a proxy and prove it tells every outcome apart.
    Selftest {
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
        /// On failure keep the lab for this many seconds for inspection.
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// Scenario files or directories (default: <repo>/../shared/scenarios).
        paths: Vec<PathBuf>,
    },
    /// Delete namespaces left behind by a lab run that was SIGKILLed.
    Gc,
}

/// The first tool the lab shells out to that is not on PATH.
pub fn missing_tool() -> Option<&'static str> {
    ["ip", "nft", "ethtool", "nsenter", "sysctl"]
        .into_iter()
        .find(|tool| {
            !std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        })
}

/// Root and the tools the lab shells out to; a clear message instead of a half-built lab.
pub fn require_lab() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the netns lab needs root (network namespaces, veths, nft)");
    }
    if let Some(tool) = missing_tool() {
        bail!("the netns lab needs `{tool}` on PATH");
    }
    let n = lab::netns::gc()? + shunt::Cgroup::gc();
    if n > 0 {
        eprintln!("removed {n} namespace(s)/cgroup(s) left by earlier lab runs");
    }
    lab::install_signal_handlers();
    Ok(())
}

/// Keeps a failed lab up for inspection (`ip netns list`), bounded and interruptible.
fn hold(lab: &lab::topology::Lab, secs: u64) {
    if secs > 0 {
        eprintln!(
            "holding the lab for {secs} s (node namespace {}); Ctrl-C ends it",
            lab.node.name
        );
        for _ in 0..secs * 10 {
            if lab::interrupted() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn selftest(paths: &[PathBuf], timeout: Duration, hold_secs: u64) -> Result<bool> {
    require_lab()?;
    let scenarios = scenario::load(&conformance::default_paths(paths))?;
    for s in &scenarios {
        lab::check_interrupted()?;
        let lab = lab::topology::Lab::build(lab::plan::Plan::new(s)?)?;
        let r = match lab::selftest::run(&lab, timeout) {
            Ok(r) => r,
            Err(e) => {
                hold(&lab, hold_secs);
                return Err(e.context(s.id.clone()));
            }
        };
        println!("PASS lab self-test {} :: {} checks", s.id, r.checks);
    }
    println!("lab self-test passed on {} scenario labs", scenarios.len());
    Ok(true)
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Conformance(a) => require_lab().and_then(|()| conformance::run(&a)),
        Cmd::Lab {
            cmd:
                LabCmd::Selftest {
                    timeout_ms,
                    hold,
                    paths,
                },
        } => selftest(&paths, Duration::from_millis(timeout_ms), hold),
        Cmd::Lab { cmd: LabCmd::Gc } => require_lab().map(|()| true),
        Cmd::Demo(a) => require_lab().and_then(|()| demo::run(&a)),
        Cmd::Soak(a) => require_lab().and_then(|()| soak::run(&a)),
        Cmd::Bench(a) => require_lab().and_then(|()| bench::run(&a)),
        Cmd::Test => testcmd::run(),
        Cmd::LabAgent {
            cmd:
                AgentCmd::Probe {
                    netns,
                    cgroup,
                    proto,
                    src,
                    dst,
                    timeout_ms,
                },
        } => agent_probe(&netns, cgroup.as_deref(), &proto, src, dst, timeout_ms),
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
