//! Scenario "outage": shunt follows the API double (real list/watch protocol, the same double
//! the proxy's tests use: `proxy/tests/support/apiserver.rs`, included here, not copied) with
//! `--master http://127.0.0.1:PORT` inside the node namespace. The double goes down (listener
//! closed, every connection closed: connection refused, as a stopped apiserver) for 60 s
//! (short preset: 10 s). Meanwhile the Service `late`, which had no endpoint, gets one (an
//! EndpointSlice change, what an outage usually misses: pods coming and going). Checked:
//!
//! * the dataplane is unchanged during the outage: requests to web and web-np keep working
//!   (0 failed over the whole run), `late` still refuses, and the programmed rules are
//!   identical at the end of the outage (nftables/iptables rules, counters aside; in ebpf
//!   mode the frontends and endpoints `shunt inspect services` reads back from the maps);
//! * converged within 1 s of the API's return: `late` answers (the kernel carries the
//!   endpoint added while the API was down) within 1 s of the double serving again. Measured
//!   by probing every ~20 ms with a 50 ms connect timeout (a refusal comes back at once).
//!
//! Changes that reach shunt through two watchers (a new Service and its slice) usually land in
//! two syncs, and the second waits for the min-sync-period after the first (1 s, kube-proxy's
//! default, as its BoundedFrequencyRunner does): those converge in 1 to 1.5 s, which is why the
//! change checked here is within one kind.

#[path = "../../../proxy/tests/support/apiserver.rs"]
mod apiserver;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use super::cluster::{self, CLIENT_POD, EXTERNAL, LATE, WEB, WEB_NP, WEB_PODS};
use super::load::Load;
use super::{Ctx, Preset, Report};
use crate::lab::netns;
use apiserver::ApiServer;

/// The bound on convergence after the API returns.
const WITHIN: Duration = Duration::from_secs(1);

fn outage(p: Preset) -> Duration {
    match p {
        Preset::Short => Duration::from_secs(10),
        Preset::Full => Duration::from_secs(60),
    }
}

enum Cmd {
    Upsert(Value),
    Stop,
    Restart,
}

/// The double on a thread of its own inside the node namespace (its listener must be where
/// shunt's 127.0.0.1 is), driven by a current-thread runtime; commands are answered in order.
struct Double {
    addr: SocketAddr,
    tx: tokio::sync::mpsc::UnboundedSender<(Cmd, std::sync::mpsc::Sender<()>)>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Double {
    fn start(ns: String) -> Result<Double> {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(Cmd, std::sync::mpsc::Sender<()>)>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            netns::enter(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let api = ApiServer::start().await;
                let _ = addr_tx.send(api.addr);
                // Ends when the sender is dropped; dropping the double stops the server.
                while let Some((cmd, done)) = rx.recv().await {
                    match cmd {
                        Cmd::Upsert(v) => {
                            api.upsert(v);
                        }
                        Cmd::Stop => api.stop().await,
                        Cmd::Restart => api.restart().await,
                    }
                    let _ = done.send(());
                }
            });
            Ok(())
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the API double did not start"))?;
        Ok(Double {
            addr,
            tx,
            thread: Some(thread),
        })
    }

    fn call(&self, cmd: Cmd) -> Result<()> {
        let (done, wait) = std::sync::mpsc::channel();
        self.tx
            .send((cmd, done))
            .map_err(|_| anyhow!("the API double's thread is gone"))?;
        wait.recv_timeout(Duration::from_secs(20))
            .map_err(|_| anyhow!("the API double did not answer within 20 s"))
    }

    fn upsert(&self, v: &serde_yaml::Value) -> Result<()> {
        self.call(Cmd::Upsert(serde_json::to_value(v)?))
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The rules with what legitimately moves under traffic removed: nft counters, iptables
/// packet/byte counters and iptables-save's timestamp comments.
fn normalized(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut out = Vec::new();
            let mut words = l.split(' ').peekable();
            while let Some(w) = words.next() {
                if w == "counter" && words.peek() == Some(&"packets") {
                    words.nth(3); // packets N bytes M
                    continue;
                }
                if w.starts_with('[') && w.ends_with(']') && w.contains(':') {
                    continue;
                }
                out.push(w);
            }
            out.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let down_for = outage(ctx.preset);
    let mut w = ctx.work("outage")?;
    let api = Double::start(ctx.lab.node.path())?;
    let late = cluster::addr(LATE);
    let (pod, node) = (WEB_PODS[0].name, WEB_PODS[0].node);
    let svc = |name: &str, vip: SocketAddr| {
        cluster::service(
            name,
            &vip.ip().to_string(),
            "TCP",
            vip.port(),
            cluster::WEB_PORT,
            None,
        )
    };
    let slice = |name: &str, svc: &str, eps: &[(&str, &str, Option<&str>, cluster::Cond)]| {
        cluster::slice(name, svc, "TCP", cluster::WEB_PORT, eps)
    };
    let ep = [(WEB_PODS[0].ip, node, Some(pod), cluster::Cond::Ready)];
    for o in cluster::initial_objects(ctx.scenario) {
        api.upsert(&o)?;
    }
    api.upsert(&svc("late", late))?;
    api.upsert(&slice("late-1", "late", &[]))?;
    // The contract command line, with the API instead of the manifest directory.
    let mut args = ctx.args(&w.manifests);
    let i = args
        .iter()
        .position(|a| a == "--manifests")
        .context("--manifests in the command line")?;
    args.drain(i..i + 2);
    args.extend(["--master".into(), format!("http://{}", api.addr)]);
    let mut proc = ctx.start(&args, &mut w)?;
    proc.wait_healthy(Duration::from_secs(30))?;
    let load = Load::start(
        &[
            (ctx.ns(CLIENT_POD), cluster::addr(WEB)),
            (ctx.ns(EXTERNAL), cluster::addr(WEB_NP)),
        ],
        Duration::from_millis(100),
        down_for + Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = ctx.rules_dump()?.map(|d| normalized(&d));
    api.call(Cmd::Stop)?;
    let down = Instant::now();
    // Well into the outage, when every watcher has failed and is backing off.
    std::thread::sleep(down_for / 4);
    api.upsert(&slice("late-1", "late", &ep))?;
    if let Some(left) = down_for.checked_sub(down.elapsed()) {
        std::thread::sleep(left);
    }
    let during = ctx.rules_dump()?.map(|d| normalized(&d));
    let late_during = netns::in_netns(&ctx.ns(CLIENT_POD), || {
        Ok(TcpStream::connect_timeout(&late, Duration::from_millis(200)).is_ok())
    })?;
    api.call(Cmd::Restart)?;
    let up = Instant::now();
    // Probe until it answers (bounded).
    let seen = netns::in_netns(&ctx.ns(CLIENT_POD), || {
        let limit = Duration::from_secs(30);
        while up.elapsed() < limit {
            if TcpStream::connect_timeout(&late, Duration::from_millis(50)).is_ok() {
                return Ok(Some(up.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    })?;
    let t = load.finish()?;
    rep.check(
        t.failures.is_empty() && !t.hits.is_empty(),
        "traffic kept working through the outage",
        &format!("{} (API down {:.1} s)", t.summary(), down_for.as_secs_f64()),
    );
    match (&before, &during) {
        (Some(b), Some(d)) => rep.check(
            b == d && !late_during,
            "dataplane unchanged during the outage",
            &format!(
                "rules {} ({} lines), {LATE} reachable during the outage: {late_during}",
                if b == d { "identical" } else { "CHANGED" },
                b.lines().count()
            ),
        ),
        _ => rep.check(
            !late_during,
            "dataplane unchanged during the outage",
            &format!("state not readable, traffic only; {LATE} reachable during the outage: {late_during}"),
        ),
    }
    let ms = |d: Option<Duration>| {
        d.map_or("never (30 s)".to_owned(), |d| {
            format!("{} ms", d.as_millis())
        })
    };
    rep.check(
        seen.is_some_and(|d| d <= WITHIN),
        &format!(
            "converged within {} ms of the API's return",
            WITHIN.as_millis()
        ),
        &format!(
            "the endpoint added to {LATE} during the outage answered {} after the API came back",
            ms(seen)
        ),
    );
    ctx.finish(proc, &args, &mut w, rep)?;
    drop(api);
    Ok(())
}
