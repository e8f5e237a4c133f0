//! Scenario "restart": shunt is killed with SIGKILL and started again several times under load.
//!
//! A crash must not cost traffic: the kernel keeps the rules (or pinned BPF programs and maps)
//! shunt programmed, and established connections live on their conntrack NAT bindings, so
//! (1) long-lived connections through the ClusterIP and the NodePort that exchange a line every
//! ~50 ms must never break, and (2) short connections made while /healthz answers 200 must
//! never fail. Failures while shunt is down are counted and reported apart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::cluster::{CLIENT_POD, EXTERNAL, WEB, WEB_NP, WEB_PODS, addr};
use super::load::{exchange, open};
use super::{Ctx, Preset, Report};
use crate::lab::netns;

/// Long-lived connections: (source, VIP, how many).
const LONG: [(&str, &str, usize); 3] = [
    (CLIENT_POD, WEB, 4),
    (EXTERNAL, WEB_NP, 2),
    (CLIENT_POD, WEB_NP, 2),
];
const EXCHANGE_EVERY: Duration = Duration::from_millis(50);
const SHORT_EVERY: Duration = Duration::from_millis(100);
/// Load before the first kill, between restarts (after healthy again) and after the last.
const GAP: Duration = Duration::from_secs(4);

fn restarts(p: Preset) -> usize {
    match p {
        Preset::Short => 3,
        Preset::Full => 10,
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
    hits: std::collections::BTreeMap<String, u64>,
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

/// Short connections (connect, greeting, one echo, close) at a steady rate until `end`,
/// classified by whether shunt was healthy for the whole request.
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

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let n = restarts(ctx.preset);
    let mut w = ctx.work("restart")?;
    let args = ctx.args(&w.manifests);
    let mut proc = ctx.start(&args, &mut w)?;
    proc.wait_healthy(Duration::from_secs(30))?;
    let health = Arc::new(Health {
        up: AtomicBool::new(true),
        epoch: AtomicU64::new(0),
    });
    let tally = Arc::new(Mutex::new(Tally::default()));
    // The main thread ends the load with `stop` one gap after the last restart; `hard_end`
    // bounds it anyway (each restart is bounded by wait_healthy's 30 s).
    let restarts = u32::try_from(n)?;
    let hard_end = Instant::now() + GAP * (restarts + 2) + Duration::from_secs(31) * restarts;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let load_start = Instant::now();
    for (src, dst, count) in LONG {
        for _ in 0..count {
            let (ns, tally, stop) = (ctx.ns(src), tally.clone(), stop.clone());
            let dst = addr(dst);
            threads.push(std::thread::spawn(move || {
                long_conn(ns, dst, hard_end, stop, tally)
            }));
        }
    }
    for (src, dst) in [(CLIENT_POD, WEB), (EXTERNAL, WEB_NP)] {
        let (ns, health, tally, stop) = (ctx.ns(src), health.clone(), tally.clone(), stop.clone());
        let dst = addr(dst);
        threads.push(std::thread::spawn(move || {
            short_conns(ns, dst, hard_end, stop, health, tally)
        }));
    }

    let mut restart_err = None;
    for i in 1..=n {
        std::thread::sleep(GAP);
        if crate::lab::interrupted() {
            restart_err = Some(anyhow::anyhow!("interrupted"));
            break;
        }
        health.set(false);
        let st = proc.kill9()?;
        let t = Instant::now();
        proc = ctx.start(&args, &mut w)?;
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
    std::thread::sleep(GAP);
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
    let missing: Vec<&str> = WEB_PODS
        .iter()
        .map(|p| p.name)
        .filter(|p| !t.hits.contains_key(*p))
        .collect();
    rep.check(
        missing.is_empty(),
        "short connections spread over every endpoint",
        &format!("{:?}", t.hits),
    );
    drop(t);
    if let Some(e) = restart_err {
        return Err(e.context("restart scenario aborted"));
    }
    ctx.finish(proc, &args, &mut w, rep)
}
