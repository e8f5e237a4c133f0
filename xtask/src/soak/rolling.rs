//! Scenario "rolling": every backend of web (and web-np, same pods) is replaced one by one
//! the way a Deployment's rolling update (maxSurge 1, maxUnavailable 0) does it, written as
//! EndpointSlice edits in the manifest directory:
//!
//! 1. the new pod is ready: added to the slices, ready;
//! 2. the old pod is being deleted: `ready: false, serving: true, terminating: true` (it
//!    still serves, but with ready endpoints left kube-proxy sends it no new connection:
//!    pkg/proxy/topology.go CategorizeEndpoints uses serving-terminating endpoints only when
//!    no ready endpoint exists);
//! 3. the grace period ends: the old pod stops (its port resets connections, [`kill_pod`])
//!    and its endpoint leaves the slices.
//!
//! Short requests from a pod to the ClusterIP and from outside to the NodePort run the whole
//! time: 0 may fail, and after the rollout only new pods may answer.

use std::time::Duration;

use anyhow::Result;

use super::cluster::{self, CLIENT_POD, Cond, EXTERNAL, NEXT_PODS, Pod, WEB, WEB_NP, WEB_PODS};
use super::load::Load;
use super::{Ctx, Preset, Report, kill_pod, revive_pod};

/// Time between two transitions: longer than a sync takes, shorter than a real grace period.
fn step(p: Preset) -> Duration {
    match p {
        Preset::Short => Duration::from_millis(1500),
        Preset::Full => Duration::from_secs(3),
    }
}

pub fn run(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let r = rollout(ctx, rep);
    for p in WEB_PODS {
        revive_pod(ctx.lab, p)?;
    }
    r
}

fn rollout(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let step = step(ctx.preset);
    let mut w = ctx.work("rolling")?;
    let args = ctx.args(&w.manifests);
    let mut proc = ctx.start(&args, &mut w)?;
    proc.wait_healthy(Duration::from_secs(30))?;
    // Bound: three steps per backend plus a lead and a tail.
    let limit = step * (3 * WEB_PODS.len() as u32 + 4) + Duration::from_secs(30);
    let load = Load::start(
        &[
            (ctx.ns(CLIENT_POD), cluster::addr(WEB)),
            (ctx.ns(EXTERNAL), cluster::addr(WEB_NP)),
        ],
        Duration::from_millis(50),
        limit,
    );
    std::thread::sleep(step);
    let mut pods: Vec<(Pod, Cond)> = WEB_PODS.iter().map(|p| (*p, Cond::Ready)).collect();
    let mut transitions = 0;
    for (old, new) in WEB_PODS.iter().zip(&NEXT_PODS) {
        crate::lab::check_interrupted()?;
        pods.push((*new, Cond::Ready));
        cluster::write(&w.manifests, &cluster::web_slices(&pods))?;
        std::thread::sleep(step);
        for p in pods.iter_mut().filter(|p| p.0 == *old) {
            p.1 = Cond::Terminating;
        }
        cluster::write(&w.manifests, &cluster::web_slices(&pods))?;
        std::thread::sleep(step);
        kill_pod(ctx.lab, *old)?;
        pods.retain(|p| p.0 != *old);
        cluster::write(&w.manifests, &cluster::web_slices(&pods))?;
        std::thread::sleep(step);
        transitions += 3;
    }
    let done = load.start.elapsed();
    std::thread::sleep(step);
    let t = load.finish()?;
    rep.check(
        t.failures.is_empty() && !t.hits.is_empty(),
        "no failed request during the rollout",
        &format!(
            "{} ({transitions} transitions, {} backends replaced)",
            t.summary(),
            WEB_PODS.len()
        ),
    );
    let after = t.by_endpoint(done, Duration::MAX);
    let new: Vec<&str> = NEXT_PODS.iter().map(|p| p.name).collect();
    rep.check(
        !after.is_empty() && after.keys().all(|k| new.contains(&k.as_str())),
        "only new pods answer after the rollout",
        &format!("{after:?}"),
    );
    rep.info(
        "who answered during the rollout",
        &format!("{:?}", t.by_endpoint(Duration::ZERO, done)),
    );
    ctx.finish(proc, &args, &mut w, rep)
}
