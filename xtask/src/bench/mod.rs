//! `cargo xtask bench`: every mode side by side in the netns lab, at several scales; writes a
//! report (markdown, CSV, SVG) to a results directory. See README.md "Benchmark".
//!
//! One lab per (mode, scale), so no run inherits another's kernel state: shunt starts cold on a
//! generated manifest directory, then the control-plane figure (cold sync, repeated changes,
//! CPU, peak RSS), then the data-plane figure (request latency and rate through the probed VIP
//! and straight to its pod, TCP throughput with iperf3). Every wait has a limit; a mode that
//! does not converge within it is reported as such and not run at larger scales.

mod cluster;
mod measure;
mod report;
mod svg;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::agent::Mode;
use crate::lab::netns;
use crate::lab::plan::Plan;
use crate::lab::topology::Lab;
use crate::shunt::{self, Cgroup, ProxyMode, Shunt};
use measure::Seen;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 100, 1,000, 10,000 and 30,000 Services; fits in 30 minutes on 2 cores.
    Full,
    /// 100 and 1,000 Services, a few seconds per figure: a smoke test (CI), no timing checks.
    Quick,
}

/// A mode as benchmarked: iptables once per backend of the iptables tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BenchMode {
    Nftables,
    IptablesLegacy,
    IptablesNft,
    Ebpf,
}

impl BenchMode {
    pub const ALL: [BenchMode; 4] = [
        BenchMode::Nftables,
        BenchMode::IptablesLegacy,
        BenchMode::IptablesNft,
        BenchMode::Ebpf,
    ];
    pub fn label(self) -> &'static str {
        match self {
            BenchMode::Nftables => "nftables",
            BenchMode::IptablesLegacy => "iptables-legacy",
            BenchMode::IptablesNft => "iptables-nft",
            BenchMode::Ebpf => "ebpf",
        }
    }
    fn proxy_mode(self) -> ProxyMode {
        match self {
            BenchMode::Nftables => ProxyMode::Nftables,
            BenchMode::IptablesLegacy | BenchMode::IptablesNft => ProxyMode::Iptables,
            BenchMode::Ebpf => ProxyMode::Ebpf,
        }
    }
    fn extra_args(self) -> Vec<String> {
        match self {
            BenchMode::IptablesLegacy => vec!["--iptables-backend=legacy".into()],
            BenchMode::IptablesNft => vec!["--iptables-backend=nft".into()],
            _ => vec![],
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "full")]
    pub preset: Preset,
    /// Shorthand for `--preset quick`.
    #[arg(long)]
    pub quick: bool,
    /// Modes to run (default: all four), e.g. `--mode nftables --mode ebpf`.
    #[arg(long, value_enum)]
    pub mode: Vec<BenchMode>,
    /// Service counts instead of the preset's, e.g. `--scales 100,5000`.
    #[arg(long, value_delimiter = ',')]
    pub scales: Vec<usize>,
    /// Endpoints per scale Service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// Results directory (default: <repo>/results/bench/<preset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// shunt binary (default: `cargo build --release -p shunt`).
    #[arg(long)]
    pub shunt: Option<PathBuf>,
}

/// Repetitions and limits of one preset.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: &'static str,
    pub scales: Vec<usize>,
    pub endpoints: usize,
    /// Changes of each kind (endpoint added, endpoint removed, Service added) per scale.
    pub changes: usize,
    /// Time box of the whole change figure at one scale (no new change starts after it).
    pub change_budget: Duration,
    pub latency_samples: usize,
    pub rate_window: Duration,
    pub iperf_secs: u64,
}

impl Settings {
    fn new(p: Preset) -> Settings {
        match p {
            Preset::Full => Settings {
                name: "full",
                scales: vec![100, 1_000, 10_000, 30_000],
                endpoints: 10,
                changes: 6,
                change_budget: Duration::from_secs(75),
                latency_samples: 400,
                rate_window: Duration::from_secs(2),
                iperf_secs: 3,
            },
            Preset::Quick => Settings {
                name: "quick",
                scales: vec![100, 1_000],
                endpoints: 10,
                changes: 3,
                change_budget: Duration::from_secs(20),
                latency_samples: 100,
                rate_window: Duration::from_millis(500),
                iperf_secs: 1,
            },
        }
    }

    /// Start to converged, at `services`: generous on a loaded 2-core machine (nftables 10k
    /// cold ≈ 10 s, iptables legacy ≈ 20 s measured), and the bound that stops a mode that
    /// does not converge from eating the run.
    pub fn cold_limit(&self, services: usize) -> Duration {
        Duration::from_secs(30) + Duration::from_millis(4 * services as u64)
    }

    /// One change to the kernel state carrying it (one change at 10k ≈ 1.5 s nftables, 5 s
    /// iptables legacy).
    pub fn change_limit(&self, services: usize) -> Duration {
        Duration::from_secs(15) + Duration::from_millis(services as u64)
    }
}

/// Past kube-proxy's default `--min-sync-period` (1 s), which shunt keeps.
const MIN_SYNC_GAP: Duration = Duration::from_millis(1100);

/// Control-plane figures of one (mode, scale).
#[derive(Debug, Clone, Default)]
pub struct Control {
    pub cold: Option<Duration>,
    pub cold_healthz: Option<Duration>,
    /// (kind, latency) of each change that converged, in order.
    pub changes: Vec<(ChangeKind, Duration)>,
    /// A change that did not converge within its limit (the figure stops there).
    pub change_stuck: Option<String>,
    pub cpu_cold: Duration,
    pub cpu_total: Duration,
    pub children_cpu_total: Duration,
    pub peak_rss_kib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    EndpointAdded,
    EndpointRemoved,
    ServiceAdded,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 3] = [
        ChangeKind::EndpointAdded,
        ChangeKind::EndpointRemoved,
        ChangeKind::ServiceAdded,
    ];
    pub fn label(self) -> &'static str {
        match self {
            ChangeKind::EndpointAdded => "endpoint added",
            ChangeKind::EndpointRemoved => "endpoint removed",
            ChangeKind::ServiceAdded => "Service added",
        }
    }
}

/// Data-plane figures of one (mode, scale): request latencies via the VIP and direct.
#[derive(Debug, Clone, Default)]
pub struct Data {
    pub vip: Vec<Duration>,
    pub direct: Vec<Duration>,
    /// Failed requests (any that did not get the lab answer), VIP and direct.
    pub failed: (usize, usize),
    pub vip_rate: Option<f64>,
    pub direct_rate: Option<f64>,
    pub vip_bps: Option<f64>,
    pub direct_bps: Option<f64>,
    pub notes: Vec<String>,
}

/// One (mode, scale) result.
#[derive(Debug, Clone)]
pub struct Run {
    pub mode: BenchMode,
    pub services: usize,
    /// Why the figures are missing or partial ("did not converge in N s", an error, skipped).
    pub status: Option<String>,
    pub control: Control,
    pub data: Option<Data>,
    pub wall: Duration,
}

fn build_release() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building shunt (cargo build --release -p shunt) ...");
    let st = Command::new(&cargo)
        .args(["build", "--release", "-p", "shunt"])
        .current_dir(shunt::repo_root())
        .status()
        .context("running cargo build --release -p shunt")?;
    if !st.success() {
        bail!("cargo build --release -p shunt failed ({st})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| shunt::repo_root().join("target"));
    let bin = target.join("release/shunt");
    anyhow::ensure!(bin.exists(), "{} missing after the build", bin.display());
    Ok(bin)
}

pub fn run(a: &Args) -> Result<bool> {
    let mut set = Settings::new(if a.quick { Preset::Quick } else { a.preset });
    if !a.scales.is_empty() {
        set.scales = a.scales.clone();
    }
    set.endpoints = a.endpoints;
    let modes: Vec<BenchMode> = if a.mode.is_empty() {
        BenchMode::ALL.to_vec()
    } else {
        let mut m = a.mode.clone();
        m.sort();
        m.dedup();
        m
    };
    for tool in ["iperf3", "iptables-legacy-save", "iptables-nft-save"] {
        if !on_path(tool) {
            bail!("the bench needs `{tool}` (scripts/install-deps.sh installs it)");
        }
    }
    let bin = match &a.shunt {
        Some(p) => p.clone(),
        None => build_release()?,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| shunt::repo_root().join("results/bench").join(set.name));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let machine = report::Machine::collect(&bin);
    let started = Instant::now();
    let mut runs = Vec::new();
    for &mode in &modes {
        let mut stuck: Option<String> = None;
        for &services in &set.scales {
            crate::lab::check_interrupted()?;
            if let Some(why) = &stuck {
                runs.push(Run {
                    mode,
                    services,
                    status: Some(format!("not run: {why}")),
                    control: Control::default(),
                    data: None,
                    wall: Duration::ZERO,
                });
                continue;
            }
            eprintln!(
                "== {} × {services} Services × {} endpoints ({:.0} s into the run)",
                mode.label(),
                set.endpoints,
                started.elapsed().as_secs_f64()
            );
            let t = Instant::now();
            let mut r = match one(&bin, mode, services, &set) {
                Ok(r) => r,
                Err(e) if crate::lab::interrupted() => return Err(e),
                Err(e) => Run {
                    mode,
                    services,
                    status: Some(format!("error: {e:#}")),
                    control: Control::default(),
                    data: None,
                    wall: Duration::ZERO,
                },
            };
            r.wall = t.elapsed();
            eprintln!("   {}", report::one_line(&r));
            if r.control.cold.is_none() {
                stuck = Some(format!(
                    "{} did not converge at {services} Services",
                    mode.label()
                ));
            }
            runs.push(r);
            // Partial report after every run: an interrupted bench still leaves its figures.
            report::write(&out, &set, &machine, &runs, started.elapsed())?;
        }
    }
    report::write(&out, &set, &machine, &runs, started.elapsed())?;
    println!(
        "bench report: {} ({} runs in {:.0} s)",
        out.join("report.md").display(),
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    // The bench reports; only a run that could not measure at all (error) fails the command.
    Ok(runs
        .iter()
        .all(|r| !r.status.as_deref().is_some_and(|s| s.starts_with("error"))))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// One (mode, scale): lab, manifests, shunt, figures, teardown.
fn one(bin: &Path, mode: BenchMode, services: usize, set: &Settings) -> Result<Run> {
    let s = cluster::lab_scenario()?;
    // Endpoint servers answer with their pod's name; probes check who answered.
    let names = [cluster::POD_A, cluster::POD_B]
        .iter()
        .map(|(n, ip)| Ok((ip.parse()?, (*n).to_owned())))
        .collect::<Result<_>>()?;
    let mut lab = Lab::build_named(Plan::new(&s)?, &names, Mode::Http)?;
    let dir = tempfile::Builder::new().prefix("shunt-bench-").tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    cluster::write_all(&s, &manifests, services, set.endpoints)?;
    let cgroup = if mode == BenchMode::Ebpf {
        Some(Cgroup::create(&format!("bench{services}"))?)
    } else {
        None
    };
    lab.probe_cgroup = cgroup.as_ref().map(|c| c.path.clone());
    let mut args = shunt::args(
        &s,
        mode.proxy_mode(),
        &manifests,
        cgroup.as_ref().map(|c| c.path.as_path()),
    );
    args.extend(mode.extra_args());
    let client = lab.ns_of(cluster::CLIENT.parse()?).path();
    let pod_a = lab.ns_of(cluster::POD_A.1.parse()?).name.clone();
    let mut run = Run {
        mode,
        services,
        status: None,
        control: Control::default(),
        data: None,
        wall: Duration::ZERO,
    };

    let t0 = Instant::now();
    let proc = Shunt::start(bin, &lab.node, &args, mode.proxy_mode(), dir.path())?;
    let mut proc = Some(proc);
    let pid = {
        let mut found = None;
        for _ in 0..100 {
            if let Ok(p) = measure::find_pid(&manifests.display().to_string()) {
                found = Some(p);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        found.context("shunt's pid not found in /proc")?
    };
    let result = (|| -> Result<()> {
        control(&lab, &client, pid, &manifests, t0, services, set, &mut run)?;
        if run.control.cold.is_some() {
            let _iperf = measure::iperf_server(&pod_a, cluster::POD_A.1, cluster::IPERF_PORT)?;
            run.data = Some(data(&client, set)?);
        }
        Ok(())
    })();
    if let Err(e) = result {
        if crate::lab::interrupted() {
            return Err(e);
        }
        run.status = Some(format!("error: {e:#}"));
        if let Some(p) = &proc {
            eprintln!("shunt stderr (tail):\n{}", p.stderr_tail(15));
        }
    }
    // Read while shunt still runs: a reaped process has no /proc entry.
    let st = measure::proc_stat(pid);
    run.control.cpu_total = st.cpu;
    run.control.children_cpu_total = st.children_cpu;
    run.control.peak_rss_kib = st.peak_rss_kib;
    if let Some(mut p) = proc.take() {
        // SIGTERM is bounded (10 s, then SIGKILL) by Shunt::stop.
        if let Err(e) = p.stop() {
            eprintln!("warning: {e:#}");
        }
    }
    if mode == BenchMode::Ebpf {
        // The pinned maps and links live in the machine's bpffs, not in the lab namespace:
        // `--cleanup` removes them (netfilter state goes away with the namespace).
        let mut cargs = args.clone();
        cargs.push("--cleanup".into());
        let mut c = Shunt::start(bin, &lab.node, &cargs, mode.proxy_mode(), dir.path())?;
        let cst = c.wait_exit(Duration::from_secs(60))?;
        if !cst.success() {
            eprintln!("warning: shunt --cleanup exited {cst}");
        }
    }
    drop(cgroup);
    drop(lab);
    Ok(run)
}

/// Cold sync, then the repeated changes; fills `run.control`.
#[allow(clippy::too_many_arguments)]
fn control(
    lab: &Lab,
    client: &str,
    pid: u32,
    manifests: &Path,
    t0: Instant,
    services: usize,
    set: &Settings,
    run: &mut Run,
) -> Result<()> {
    let limit = set.cold_limit(services);
    let node = lab.node.path();
    // Converged = /healthz 200 and the probed Service (last in iptables' dispatch order)
    // answering through its VIP from the client pod: the kernel carries the objects.
    let mut healthz = None;
    let mut cold = None;
    let mut last = Seen::Other("no request yet".into());
    while t0.elapsed() < limit {
        crate::lab::check_interrupted()?;
        if measure::proc_stat(pid).exited {
            bail!("shunt exited during the cold sync");
        }
        if healthz.is_none() && measure::healthy(&node) {
            healthz = Some(t0.elapsed());
        }
        if healthz.is_some() {
            let seen = netns::in_netns(client, || {
                Ok(measure::request(
                    cluster::web_vip(),
                    Duration::from_millis(50),
                ))
            })?;
            if seen == Seen::Answer(cluster::POD_A.0.into()) {
                cold = Some(t0.elapsed());
                break;
            }
            last = seen;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run.control.cold_healthz = healthz;
    run.control.cold = cold;
    if cold.is_none() {
        run.status = Some(format!(
            "did not converge in {} s (cold sync{})",
            limit.as_secs(),
            if healthz.is_some() {
                format!(", /healthz 200 but the VIP did not answer: last request saw {last:?}")
            } else {
                ", no /healthz 200".into()
            }
        ));
        return Ok(());
    }
    run.control.cpu_cold = measure::proc_stat(pid).cpu;

    let climit = set.change_limit(services);
    let budget_end = Instant::now() + set.change_budget;
    let pod_b = cluster::POD_B.0;
    let mut added = 0;
    'outer: for _ in 0..set.changes {
        for kind in ChangeKind::ALL {
            if Instant::now() > budget_end {
                break 'outer;
            }
            // shunt (like kube-proxy) runs at most one sync per --min-sync-period (1 s by
            // default, BoundedFrequencyRunner semantics): a change written right after the
            // previous sync waits for that period. Pausing past it measures one isolated
            // change, the figure the issue asks for, not the rate limiter.
            std::thread::sleep(MIN_SYNC_GAP);
            let (file, obj, dst) = match kind {
                ChangeKind::EndpointAdded => (
                    "probe-change.json".to_owned(),
                    cluster::change_slice(true),
                    cluster::change_vip(),
                ),
                ChangeKind::EndpointRemoved => (
                    "probe-change.json".to_owned(),
                    cluster::change_slice(false),
                    cluster::change_vip(),
                ),
                ChangeKind::ServiceAdded => {
                    if added >= cluster::MAX_ADDED {
                        continue;
                    }
                    added += 1;
                    (
                        format!("probe-added-{added}.json"),
                        cluster::added_service(added - 1),
                        cluster::added_vip(added - 1),
                    )
                }
            };
            let t = Instant::now();
            cluster::write_json(manifests, &file, &obj)?;
            let got = match kind {
                // Removed: the Service has no endpoint, so the kernel rejects (RST).
                ChangeKind::EndpointRemoved => {
                    measure::until(client, dst, t, climit, |s| *s == Seen::Refused)?
                }
                _ => measure::until(client, dst, t, climit, |s| *s == Seen::Answer(pod_b.into()))?,
            };
            match got {
                Some(d) => run.control.changes.push((kind, d)),
                None => {
                    run.control.change_stuck = Some(format!(
                        "{} did not converge in {} s",
                        kind.label(),
                        climit.as_secs()
                    ));
                    break 'outer;
                }
            }
        }
    }
    Ok(())
}

/// Request latency (interleaved VIP / direct, so load noise hits both alike), request rate and
/// iperf3 throughput, all from the client pod.
fn data(client: &str, set: &Settings) -> Result<Data> {
    let (vip, direct) = (cluster::web_vip(), cluster::web_direct());
    let want = Seen::Answer(cluster::POD_A.0.into());
    let mut d = Data::default();
    let n = set.latency_samples;
    let window = set.rate_window;
    let (lat, rates, shared_ports) = netns::in_netns(client, || {
        let mut v = Vec::with_capacity(n);
        let mut dr = Vec::with_capacity(n);
        let mut failed = (0, 0);
        // VIP and direct probes from disjoint source-port halves, in every mode: otherwise
        // they collide in the backend's TIME_WAIT sockets (see measure::PortRanges).
        let ranges = measure::PortRanges::for_this_netns();
        let one = |dst: SocketAddr| {
            let t = Instant::now();
            let timeout = Duration::from_secs(1);
            let seen = match ranges {
                Some(r) => {
                    measure::request_from(dst, timeout, if dst == vip { r.vip } else { r.direct })
                }
                None => measure::request(dst, timeout),
            };
            (seen == want, t.elapsed())
        };
        // Warm-up: ARP/neighbour entries, the server thread, first conntrack entries.
        for _ in 0..5 {
            one(vip);
            one(direct);
        }
        for _ in 0..n {
            crate::lab::check_interrupted()?;
            match one(vip) {
                (true, t) => v.push(t),
                _ => failed.0 += 1,
            }
            match one(direct) {
                (true, t) => dr.push(t),
                _ => failed.1 += 1,
            }
        }
        // Alternating 50 ms slices, so a burst of load from the rest of the machine lands on
        // both targets alike; each gets `window` in total.
        let mut ok = [0u64; 2];
        let mut spent = [Duration::ZERO; 2];
        while spent[0] < window || spent[1] < window {
            crate::lab::check_interrupted()?;
            for (i, dst) in [vip, direct].into_iter().enumerate() {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(50) {
                    if one(dst).0 {
                        ok[i] += 1;
                    }
                }
                spent[i] += t.elapsed();
            }
        }
        let rates = (
            ok[0] as f64 / spent[0].as_secs_f64(),
            ok[1] as f64 / spent[1].as_secs_f64(),
        );
        Ok(((v, dr, failed), rates, ranges.is_none()))
    })?;
    if shared_ports {
        d.notes.push(
            "no per-socket port range (IP_LOCAL_PORT_RANGE, Linux 6.3): VIP and direct probes \
             share the client's ports and may collide in the backend's TIME_WAIT sockets"
                .into(),
        );
    }
    (d.vip, d.direct, d.failed) = lat;
    (d.vip_rate, d.direct_rate) = (Some(rates.0), Some(rates.1));
    let iperf_vip = SocketAddr::new(vip.ip(), cluster::IPERF_PORT);
    let iperf_direct = SocketAddr::new(direct.ip(), cluster::IPERF_PORT);
    let client_name = client.trim_start_matches("/run/netns/");
    for (dst, slot) in [
        (iperf_vip, &mut d.vip_bps),
        (iperf_direct, &mut d.direct_bps),
    ] {
        match measure::iperf(client_name, dst, set.iperf_secs) {
            Ok(bps) => *slot = Some(bps),
            Err(e) => d.notes.push(format!("{e:#}")),
        }
    }
    Ok(d)
}
