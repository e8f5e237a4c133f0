//! Scenario "udp": a client keeps sending to the UDP Service dns from one socket (one source
//! port, so one conntrack entry that every datagram refreshes) while dns's only backend is
//! replaced: the old pod stops (its datagrams are dropped, [`kill_pod`]) and the slice names
//! the new pod on the other node instead.
//!
//! Without removing the stale conntrack entry the flow stays DNATed to the gone pod for as
//! long as the client keeps sending (UDP conntrack timeouts are refreshed by every packet),
//! the kube-proxy bug behind kubernetes#59368 / #112604; kube-proxy deletes UDP entries whose
//! endpoint went away (pkg/proxy/conntrack/cleanup.go). In ebpf mode the program's own
//! conntrack map must not pin the old backend either. Checked: answers come from the new pod
//! within 1 s of the EndpointSlice write, and every datagram after that is answered.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::cluster::{self, CLIENT_POD, DNS, UDP_NEW, UDP_OLD};
use super::{Ctx, Preset, Report, kill_pod, revive_pod};
use crate::lab::agent::Answer;
use crate::lab::netns;

const SEND_EVERY: Duration = Duration::from_millis(50);
/// A datagram without an answer within this counts as lost (a late answer is then taken by
/// the next receive: answers are not numbered). Generous for a loaded 2-core machine.
const RECV_TIMEOUT: Duration = Duration::from_millis(300);
/// The bound: answers again within 1 s of the backend being replaced.
const WITHIN: Duration = Duration::from_secs(1);

fn rounds(p: Preset) -> usize {
    match p {
        Preset::Short => 1,
        Preset::Full => 4,
    }
}

/// (time since start, who answered or why not) per datagram sent.
type Log = Arc<Mutex<Vec<(Duration, Result<String, String>)>>>;

fn client(
    ns: String,
    dst: SocketAddr,
    start: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
    log: Log,
) -> Result<()> {
    netns::enter(&ns)?;
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(dst)?;
    s.set_read_timeout(Some(RECV_TIMEOUT))?;
    let mut buf = [0u8; 1024];
    let mut seq = 0u64;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        let sent = start.elapsed();
        let r = s
            .send(format!("ping {seq}\n").as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|_| s.recv(&mut buf).map_err(|e| e.to_string()))
            .and_then(|n| {
                Answer::parse(&String::from_utf8_lossy(&buf[..n]))
                    .map(|a| a.name)
                    .ok_or_else(|| "garbage answer".to_owned())
            });
        log.lock().expect("log").push((sent, r));
        seq += 1;
        std::thread::sleep(SEND_EVERY);
    }
    Ok(())
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let r = replace(ctx, rep);
    revive_pod(ctx.lab, UDP_OLD)?;
    revive_pod(ctx.lab, UDP_NEW)?;
    r
}

fn replace(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let n = rounds(ctx.preset);
    let mut w = ctx.work("udp")?;
    let args = ctx.args(&w.manifests);
    let mut proc = ctx.start(&args, &mut w)?;
    proc.wait_healthy(Duration::from_secs(30))?;
    let lead = Duration::from_secs(2);
    let settle = Duration::from_secs(3);
    let start = Instant::now();
    let end = start + (lead + settle) * (n as u32 + 1) + Duration::from_secs(30);
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let th = {
        let (ns, stop, log) = (ctx.ns(CLIENT_POD), stop.clone(), log.clone());
        std::thread::spawn(move || client(ns, cluster::addr(DNS), start, end, stop, log))
    };
    std::thread::sleep(lead);
    // Each round: (backend before, backend after, time of the slice write).
    let mut switches = Vec::new();
    let (mut from, mut to) = (UDP_OLD, UDP_NEW);
    for _ in 0..n {
        crate::lab::check_interrupted()?;
        revive_pod(ctx.lab, to)?;
        kill_pod(ctx.lab, from)?;
        cluster::write(&w.manifests, &[cluster::dns_slice(to)])?;
        switches.push((from, to, start.elapsed()));
        std::thread::sleep(settle);
        std::mem::swap(&mut from, &mut to);
    }
    stop.store(true, Ordering::SeqCst);
    th.join()
        .map_err(|_| anyhow::anyhow!("udp client panicked"))??;
    let log = log.lock().expect("log").clone();

    let before: Vec<_> = log.iter().filter(|(t, _)| *t < switches[0].2).collect();
    let ok_before = before
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok(UDP_OLD.name))
        .count();
    // A miss here has nothing to do with a backend change: name when it happened and what
    // the client saw (a receive timeout, an error), so a load stall tells itself apart from
    // a dataplane fault.
    let misses_before: String = before
        .iter()
        .filter(|(_, r)| r.as_deref() != Ok(UDP_OLD.name))
        .take(3)
        .map(|(t, r)| format!("; miss {} ms after the start: {r:?}", t.as_millis()))
        .collect();
    rep.check(
        ok_before > 0 && ok_before == before.len(),
        "answered by the first backend before the replacement",
        &format!(
            "{ok_before} of {} datagrams answered by {}{misses_before}",
            before.len(),
            UDP_OLD.name
        ),
    );
    for (i, (from, to, at)) in switches.iter().enumerate() {
        let until = switches.get(i + 1).map_or(Duration::MAX, |s| s.2);
        let round: Vec<_> = log.iter().filter(|(t, _)| t >= at && *t < until).collect();
        let first = round.iter().position(|(_, r)| r.as_deref() == Ok(to.name));
        let detail;
        let ok = match first {
            None => {
                detail = format!(
                    "no answer from {} in {} datagrams after the slice write (last: {:?})",
                    to.name,
                    round.len(),
                    round.last().map(|x| &x.1)
                );
                false
            }
            Some(k) => {
                let gap = round[k].0 - *at;
                let after = &round[k..];
                let missed: Vec<_> = after
                    .iter()
                    .filter(|(_, r)| r.as_deref() != Ok(to.name))
                    .collect();
                detail = format!(
                    "{} -> {}: first answer from {} {} ms after the EndpointSlice write \
                     ({k} datagrams unanswered meanwhile), then {} of {} answered by it{}",
                    from.name,
                    to.name,
                    to.name,
                    gap.as_millis(),
                    after.len() - missed.len(),
                    after.len(),
                    missed
                        .iter()
                        .take(3)
                        .map(|m| format!(
                            "; miss {} ms after the write: {:?}",
                            (m.0 - *at).as_millis(),
                            m.1
                        ))
                        .collect::<String>()
                );
                gap <= WITHIN && missed.is_empty()
            }
        };
        rep.check(
            ok,
            &format!(
                "round {}: answers within {} ms of the backend replacement",
                i + 1,
                WITHIN.as_millis()
            ),
            &detail,
        );
    }
    ctx.finish(proc, &args, &mut w, rep)
}
