//! Scenario "churn": 1,000 extra Services (one port, two remote endpoints each) whose
//! EndpointSlices change at 1,000 changes a minute, round robin (each Service once a minute),
//! while short requests keep going to web and web-np, whose endpoints never change: none of
//! those may fail. shunt's RSS is sampled every second: reported as the value after the cold
//! sync, the warm-up peak (first fifth of the churn), the last and the maximum; "flat" means
//! the last sample is within 25 % (at least 16 MiB) of the warm-up peak, so a leak growing
//! with the number of changes fails and allocator noise does not.
//!
//! Each change rewrites one slice file (the Services live in one file written once), so the
//! manifest source sees a stream of single-file changes like a watch stream of slice updates.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_yaml::Value;

use super::cluster::{self, CLIENT_POD, Cond, EXTERNAL, WEB, WEB_NP};
use super::load::Load;
use super::{Ctx, Preset, Report};

const SERVICES: usize = 1000;
const CHANGES_PER_MINUTE: u32 = 1000;

fn duration(p: Preset) -> Duration {
    match p {
        Preset::Short => Duration::from_secs(20),
        Preset::Full => Duration::from_secs(300),
    }
}

fn churn_ip(net: u8, i: usize) -> String {
    // i < 1000: 4 blocks of 250.
    format!("10.{net}.{}.{}", i / 250, i % 250 + 1)
}

fn churn_service(i: usize) -> Value {
    let ip = format!("10.96.{}.{}", 100 + i / 250, i % 250 + 1);
    cluster::service(&format!("churn-{i}"), &ip, "TCP", 80, 8080, None)
}

/// Service i's second endpoint in generation `g`: alternates between two addresses.
fn moving_ip(i: usize, g: u64) -> String {
    churn_ip(if g.is_multiple_of(2) { 251 } else { 252 }, i)
}

/// Generation `g` of Service i's slice: one endpoint stays, the other moves, so every write
/// is a real endpoint change.
fn churn_slice(i: usize, g: u64) -> Value {
    let stay = churn_ip(250, i);
    let moving = moving_ip(i, g);
    cluster::slice(
        &format!("churn-{i}-1"),
        &format!("churn-{i}"),
        "TCP",
        8080,
        &[
            (stay.as_str(), "node-2", None, Cond::Ready),
            (moving.as_str(), "node-2", None, Cond::Ready),
        ],
    )
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let total = duration(ctx.preset);
    let mut w = ctx.work("churn")?;
    let services: Vec<Value> = (0..SERVICES).map(churn_service).collect();
    let text = services
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<Vec<_>, _>>()?
        .join("---\n");
    std::fs::write(w.manifests.join("churn-services.yaml"), text)?;
    let slices: Vec<Value> = (0..SERVICES).map(|i| churn_slice(i, 0)).collect();
    cluster::write(&w.manifests, &slices)?;
    let args = ctx.args(&w.manifests);
    let mut proc = ctx.start(&args, &mut w)?;
    let t0 = Instant::now();
    proc.wait_healthy(Duration::from_secs(120))?;
    rep.info(
        "cold sync",
        &format!(
            "{} Services: /healthz 200 after {:.2} s",
            SERVICES + 3,
            t0.elapsed().as_secs_f64()
        ),
    );
    let pid = proc.pid().context("shunt pid")?;
    let first = rss_kib(pid)?;
    let load = Load::start(
        &[
            (ctx.ns(CLIENT_POD), cluster::addr(WEB)),
            (ctx.ns(EXTERNAL), cluster::addr(WEB_NP)),
        ],
        Duration::from_millis(100),
        total + Duration::from_secs(60),
    );
    let every = Duration::from_secs(60) / CHANGES_PER_MINUTE;
    let start = Instant::now();
    let mut generation = vec![0u64; SERVICES];
    let mut changes = 0usize;
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut next_sample = Duration::ZERO;
    // Paced by schedule, not by sleeps alone: a slow write does not lower the rate.
    while start.elapsed() < total {
        crate::lab::check_interrupted()?;
        let due = every * u32::try_from(changes)?;
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let i = changes % SERVICES;
        generation[i] += 1;
        cluster::write(&w.manifests, &[churn_slice(i, generation[i])])?;
        changes += 1;
        if start.elapsed() >= next_sample {
            samples.push((start.elapsed(), rss_kib(pid)?));
            next_sample += Duration::from_secs(1);
        }
    }
    let churned = start.elapsed();
    // Let the last changes land, then one more sample.
    std::thread::sleep(Duration::from_secs(3));
    samples.push((start.elapsed(), rss_kib(pid)?));
    let t = load.finish()?;
    rep.check(
        t.failures.is_empty() && !t.hits.is_empty(),
        "no failed request to Services whose endpoints stayed",
        &t.summary(),
    );
    let rate = changes as f64 / churned.as_secs_f64() * 60.0;
    rep.check(
        rate >= f64::from(CHANGES_PER_MINUTE) * 0.9,
        "churn rate",
        &format!(
            "{changes} endpoint changes across {SERVICES} Services in {:.1} s ({rate:.0}/min)",
            churned.as_secs_f64()
        ),
    );
    let warm: u64 = samples
        .iter()
        .filter(|(t, _)| *t <= churned / 5)
        .map(|s| s.1)
        .max()
        .unwrap_or(first)
        .max(first);
    let last = samples.last().map_or(first, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(first);
    let allowed = (warm + warm / 4).max(warm + 16 * 1024);
    rep.check(
        last <= allowed,
        "memory flat",
        &format!(
            "RSS after cold sync {}, warm-up peak {}, last {}, max {} ({} samples; last must be <= {})",
            mib(first),
            mib(warm),
            mib(last),
            mib(max),
            samples.len(),
            mib(allowed)
        ),
    );
    // The changes really reached the kernel: the current address of the last ten Services
    // changed is in the rules (ebpf mode: in the maps, as `shunt inspect` reads them back).
    let recent: Vec<String> = (1..=10)
        .map(|k| (changes - k) % SERVICES)
        .map(|i| moving_ip(i, generation[i]))
        .collect();
    if let Some(dump) = ctx.rules_dump()? {
        let missing: Vec<&String> = recent
            .iter()
            .filter(|ip| !dump.contains(ip.as_str()))
            .collect();
        rep.check(
            missing.is_empty(),
            "the last changes are in the kernel",
            &format!(
                "{} of the last 10 changed endpoints missing {missing:?}",
                missing.len()
            ),
        );
    }
    let metrics = crate::lab::netns::in_netns(&ctx.lab.node.path(), || {
        crate::shunt::http_get("127.0.0.1:10249".parse()?, "/metrics")
    })
    .map(|(_, body)| {
        body.lines()
            .filter(|l| l.starts_with("kubeproxy_sync_proxy_rules_endpoint_changes_total"))
            .collect::<Vec<_>>()
            .join(" ")
    });
    rep.info("endpoint changes seen by shunt", &format!("{metrics:?}"));
    ctx.finish(proc, &args, &mut w, rep)
}
