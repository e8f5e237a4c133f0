//! `cargo xtask soak`: the demo's two-node netns cluster under steady client load while shunt is
//! killed with SIGKILL and started again several times ("restart" scenario).
//!
//! A crash must not cost traffic: the kernel keeps the rules shunt programmed, and established
//! connections live on their conntrack NAT bindings, so (1) long-lived connections through the
//! ClusterIP and the NodePort that exchange a line every ~50 ms must never break, and (2) short
//! connections made while /healthz answers 200 must never fail. Failures while shunt is down are
//! counted and reported too. At the end shunt gets SIGTERM (rules stay, traffic still flows) and
//! `--cleanup` must remove what it created.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::demo::{CLIENT_POD, CLUSTER_IP, EXTERNAL, NODE_PORT, PODS, demo_scenario};
use crate::lab::agent::{Answer, Mode};
use crate::lab::netns;
use crate::lab::plan::Plan;
use crate::lab::topology::Lab;
use crate::shunt::{self, ProxyMode, Shunt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 3 restarts in about 20 s.
    Short,
    /// 10 restarts in about 60 s.
    Full,
}

#[derive(Debug, clap::Args)]
pub struct Args {
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

/// Long-lived connections: (source, VIP, how many).
const LONG: [(&str, &str, usize); 3] = [
    (CLIENT_POD, CLUSTER_IP, 4),
    (EXTERNAL, NODE_PORT, 2),
    (CLIENT_POD, NODE_PORT, 2),
];
const EXCHANGE_EVERY: Duration = Duration::from_millis(50);
const SHORT_EVERY: Duration = Duration::from_millis(100);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

struct Plan2 {
    restarts: usize,
    /// Load before the first kill, between restarts (after healthy again) and after the last.
    gap: Duration,
}

fn preset(p: Preset) -> Plan2 {
    match p {
        Preset::Short => Plan2 {
            restarts: 3,
            gap: Duration::from_secs(4),
        },
        Preset::Full => Plan2 {
            restarts: 10,
            gap: Duration::from_secs(4),
        },
    }
}

/// Whether shunt is up (/healthz 200 seen, not yet killed); `epoch` changes on every flip so a
/// short connection can tell it overlapped a restart.
struct Health {
    up: AtomicBool,
    epoch: AtomicU64,
}

impl Health {
    fn set(&self, up: bool) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.up.store(up, Ordering::SeqCst);
    }
    fn snapshot(&self) -> (bool, u64) {
        (
            self.up.load(Ordering::SeqCst),
            self.epoch.load(Ordering::SeqCst),
        )
    }
}

#[derive(Default)]
struct Tally {
    long_exchanges: u64,
    long_dropped: Vec<String>,
    short_ok: u64,
    short_failed_healthy: Vec<String>,
    short_failed_down: u64,
    hits: BTreeMap<String, u64>,
}

fn read_line(r: &mut BufReader<TcpStream>) -> Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed by peer");
    }
    Ok(line)
}

fn open(dst: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, Answer)> {
    let c = TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut r = BufReader::new(c.try_clone()?);
    let hello = read_line(&mut r)?;
    let a = Answer::parse(&hello).with_context(|| format!("bad greeting {hello:?}"))?;
    Ok((c, r, a))
}

fn exchange(c: &mut TcpStream, r: &mut BufReader<TcpStream>, seq: u64) -> Result<()> {
    let msg = format!("seq {seq}\n");
    c.write_all(msg.as_bytes())?;
    let back = read_line(r)?;
    if back != msg {
        bail!("echo mismatch: sent {msg:?}, got {back:?}");
    }
    Ok(())
}

/// One long-lived connection for the whole run (bounded by `end`); any error is a drop.
fn long_conn(
    ns: String,
    dst: SocketAddr,
    end: Instant,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> Result<()> {
    netns::enter(&ns)?;
    let (mut c, mut r, a) =
        open(dst).with_context(|| format!("opening long connection to {dst}"))?;
    let mut seq = 0;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        if let Err(e) = exchange(&mut c, &mut r, seq) {
            let mut t = tally.lock().expect("tally");
            t.long_exchanges += seq;
            t.long_dropped.push(format!(
                "{dst} via {} (after {seq} exchanges): {e:#}",
                a.name
            ));
            return Ok(());
        }
        seq += 1;
        std::thread::sleep(EXCHANGE_EVERY);
    }
    tally.lock().expect("tally").long_exchanges += seq;
    Ok(())
}

/// Short connections (connect, greeting, one echo, close) at a steady rate until `end`.
fn short_conns(
    ns: String,
    dst: SocketAddr,
    end: Instant,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
    tally: Arc<Mutex<Tally>>,
) -> Result<()> {
    netns::enter(&ns)?;
    let mut seq = 0;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        let (up0, e0) = health.snapshot();
        let r = open(dst).and_then(|(mut c, mut r, a)| exchange(&mut c, &mut r, seq).map(|()| a));
        let (up1, e1) = health.snapshot();
        let mut t = tally.lock().expect("tally");
        match r {
            Ok(a) => {
                t.short_ok += 1;
                *t.hits.entry(a.name).or_insert(0) += 1;
            }
            Err(e) if up0 && up1 && e0 == e1 => {
                t.short_failed_healthy.push(format!("{dst} #{seq}: {e:#}"))
            }
            Err(_) => t.short_failed_down += 1,
        }
        drop(t);
        seq += 1;
        std::thread::sleep(SHORT_EVERY);
    }
    Ok(())
}

/// Lines naming shunt's rules in the node namespace: nft tables called `shunt*`, or iptables
/// `SHUNT-` chains through either iptables backend (whichever tools exist).
fn shunt_rules(lab: &Lab, mode: ProxyMode) -> Result<usize> {
    let out = match mode {
        ProxyMode::Iptables => lab.node.sh(
            "for t in iptables-legacy-save iptables-nft-save ip6tables-legacy-save ip6tables-nft-save; do \
             command -v $t >/dev/null && $t 2>/dev/null; done; true",
        )?,
        _ => lab.node.sh("nft list tables")?,
    };
    Ok(out
        .lines()
        .filter(|l| match mode {
            ProxyMode::Iptables => l.starts_with(":SHUNT-"),
            _ => l.contains("shunt"),
        })
        .count())
}

struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn check(&mut self, ok: bool, what: &str, detail: &str) {
        if ok {
            self.passed += 1;
            println!("PASS soak/restart :: {what} :: {detail}");
        } else {
            self.failed += 1;
            println!("FAIL soak/restart :: {what} :: {detail}");
        }
    }
}

pub fn run(a: &Args) -> Result<bool> {
    if a.mode == ProxyMode::Ebpf {
        bail!("soak runs in nftables or iptables mode");
    }
    let bin = match &a.shunt {
        Some(p) => p.clone(),
        None => shunt::build()?,
    };
    let plan = preset(a.preset);
    let all: Vec<&str> = PODS.iter().map(|p| p.0).collect();
    let s = demo_scenario(&all)?;
    let names: BTreeMap<IpAddr, String> = PODS
        .iter()
        .map(|(n, ip, _)| (ip.parse().expect("constant"), (*n).to_owned()))
        .collect();
    eprintln!(
        "soak restart ({} mode, {} restarts): building the cluster ...",
        a.mode.flag(),
        plan.restarts
    );
    let lab = Lab::build_named(Plan::new(&s)?, &names, Mode::Echo)?;
    let dir = tempfile::Builder::new().prefix("shunt-soak-").tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    shunt::write_manifests(&s, &manifests)?;
    let mut args = shunt::args(&s, a.mode, &manifests, None);
    args.extend(a.shunt_arg.iter().cloned());
    let log = |i: usize| -> Result<PathBuf> {
        let d = dir.path().join(format!("run{i}"));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let mut rep = Report {
        passed: 0,
        failed: 0,
    };

    let mut proc = Shunt::start(&bin, &lab.node, &args, a.mode, &log(0)?)?;
    proc.wait_healthy(Duration::from_secs(30))?;
    let health = Arc::new(Health {
        up: AtomicBool::new(true),
        epoch: AtomicU64::new(0),
    });
    let tally = Arc::new(Mutex::new(Tally::default()));
    // The main thread ends the load with `stop` one gap after the last restart; `hard_end`
    // bounds it anyway (each restart is bounded by wait_healthy's 30 s).
    let restarts = u32::try_from(plan.restarts)?;
    let worst = plan.gap * (restarts + 2) + Duration::from_secs(31) * restarts;
    let hard_end = Instant::now() + worst;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let load_start = Instant::now();
    for (src, dst, n) in LONG {
        let src: IpAddr = src.parse()?;
        let dst: SocketAddr = dst.parse()?;
        for _ in 0..n {
            let (ns, tally, stop) = (lab.ns_of(src).path(), tally.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                long_conn(ns, dst, hard_end, stop, tally)
            }));
        }
    }
    for (src, dst) in [(CLIENT_POD, CLUSTER_IP), (EXTERNAL, NODE_PORT)] {
        let src: IpAddr = src.parse()?;
        let dst: SocketAddr = dst.parse()?;
        let (ns, health, tally, stop) = (
            lab.ns_of(src).path(),
            health.clone(),
            tally.clone(),
            stop.clone(),
        );
        threads.push(std::thread::spawn(move || {
            short_conns(ns, dst, hard_end, stop, health, tally)
        }));
    }

    let mut restart_err = None;
    for i in 1..=plan.restarts {
        std::thread::sleep(plan.gap);
        if crate::lab::interrupted() {
            restart_err = Some(anyhow::anyhow!("interrupted"));
            break;
        }
        health.set(false);
        let st = proc.kill9()?;
        let t = Instant::now();
        proc = Shunt::start(&bin, &lab.node, &args, a.mode, &log(i)?)?;
        match proc.wait_healthy(Duration::from_secs(30)) {
            Ok(()) => {
                health.set(true);
                rep.check(
                    true,
                    &format!("restart {i}"),
                    &format!(
                        "killed ({st}), /healthz 200 again after {:.2} s",
                        t.elapsed().as_secs_f64()
                    ),
                );
            }
            Err(e) => {
                rep.check(false, &format!("restart {i}"), &format!("{e:#}"));
                restart_err = Some(e);
                break;
            }
        }
    }
    std::thread::sleep(plan.gap);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => rep.check(false, "client load", &format!("{e:#}")),
            Err(_) => rep.check(false, "client load", "a client thread panicked"),
        }
    }
    let secs = load_start.elapsed().as_secs_f64();
    let t = tally.lock().expect("tally");
    let long_total: usize = LONG.iter().map(|l| l.2).sum();
    rep.check(
        t.long_dropped.is_empty(),
        "established connections dropped",
        &format!(
            "{} of {long_total} long-lived connections dropped, {} exchanges over {secs:.1} s{}",
            t.long_dropped.len(),
            t.long_exchanges,
            t.long_dropped
                .iter()
                .map(|d| format!("; {d}"))
                .collect::<String>()
        ),
    );
    rep.check(
        t.short_failed_healthy.is_empty() && t.short_ok > 0,
        "new connections while /healthz 200",
        &format!(
            "{} failed, {} succeeded ({} failed while shunt was down or restarting){}",
            t.short_failed_healthy.len(),
            t.short_ok,
            t.short_failed_down,
            t.short_failed_healthy
                .iter()
                .take(5)
                .map(|d| format!("; {d}"))
                .collect::<String>()
        ),
    );
    let missing: Vec<&str> = PODS
        .iter()
        .map(|p| p.0)
        .filter(|p| !t.hits.contains_key(*p))
        .collect();
    rep.check(
        missing.is_empty(),
        "short connections spread over every endpoint",
        &format!("{:?}", t.hits),
    );
    drop(t);
    if let Some(e) = restart_err {
        println!("{} passed, {} failed", rep.passed, rep.failed + 1);
        return Err(e.context("restart scenario aborted"));
    }

    // SIGTERM: rules stay and keep serving; --cleanup removes them.
    let st = proc.stop()?;
    let left = shunt_rules(&lab, a.mode)?;
    let still = netns::in_netns(&lab.ns_of(EXTERNAL.parse()?).path(), || {
        open(NODE_PORT.parse()?).map(|x| x.2.name)
    });
    rep.check(
        st.success() && left > 0 && still.is_ok(),
        "SIGTERM leaves the rules serving",
        &format!("{st}, {left} shunt table/chain line(s) left, NodePort answered by {still:?}"),
    );
    let mut cargs = args.clone();
    cargs.push("--cleanup".into());
    let mut c = Shunt::start(&bin, &lab.node, &cargs, a.mode, &log(plan.restarts + 1)?)?;
    let cst = c.wait_exit(Duration::from_secs(30))?;
    let left = shunt_rules(&lab, a.mode)?;
    rep.check(
        cst.success() && left == 0,
        "--cleanup removes everything",
        &format!("{cst}, {left} shunt table/chain line(s) left"),
    );
    drop(c);
    drop(lab);
    println!("{} passed, {} failed", rep.passed, rep.failed);
    Ok(rep.failed == 0)
}
