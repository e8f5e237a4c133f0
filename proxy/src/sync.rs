//! The sync runner: feeds source events to the model and paces dataplane syncs the way
//! kube-proxy's `async.BoundedFrequencyRunner` does (pkg/util/async/bounded_frequency_runner.go):
//!
//! - a change asks for a sync; it runs at once when the runner's token bucket has a token,
//!   otherwise as soon as one refills — changes arriving meanwhile are folded into that one
//!   sync (bursts coalesce). The bucket is kube-proxy's: one token per `min_sync_period`, at
//!   most [`BURST_SYNCS`] (the proxiers' `burstSyncs := 2`), so two syncs may run back to
//!   back (a Service and then its EndpointSlice arriving through two watchers), and a steady
//!   stream of changes syncs once per `min_sync_period`;
//! - a sync runs at least every `sync_period` even without changes;
//! - nothing is synced before the sources report `Synced` (kube-proxy waits for
//!   `isInitialized`: services and endpoint slices synced, proxier.go `syncProxyRules`).
//!
//! Full and partial syncs follow the nftables proxier (proxier.go `syncProxyRules`): a sync is
//! full when forced (`needFullSync`: the first one, after a failure) or when the last full
//! sync is older than `FULL_SYNC_PERIOD` (pkg/proxy/util FullSyncPeriod, one hour); other
//! syncs, the periodic ones included, are partial.
//!
//! On failure, kube-proxy logs, counts it, forces the next sync to be full and calls
//! `RetryAfter(syncPeriod)`. shunt retries (fully) after `min_sync_period` instead: that is
//! still rate limited, and fails over faster (decision of the project brief).
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::dataplane::{Dataplane, SyncRequest};
use crate::model::{
    Changed, Kind, ModelError, Object, ObjectRef, PendingChanges, Snapshot, Tracker, Update,
};
use crate::serve::metrics::unix_seconds;
use crate::serve::service_health::Wanted;
use crate::serve::{Metrics, ProxyHealth, ServiceHealthServer};
use crate::source::SourceEvent;

/// pkg/proxy/util FullSyncPeriod.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Upper bound on events folded in before a due sync runs, so a flood cannot starve syncs.
const MAX_DRAIN: usize = 10_000;

/// What the runner needs from the model. `Tracker` is the implementation; tests use a fake.
pub trait Model: Send {
    fn apply(&mut self, object: Object) -> Result<(), ModelError>;
    fn delete(&mut self, object: &ObjectRef);
    fn set_local_addresses(&mut self, addrs: Vec<IpAddr>);
    fn pending_changes(&self) -> PendingChanges;
    fn take_update(&mut self) -> Update;
    fn snapshots(&self) -> &[Snapshot];
    fn mark_all_dirty(&mut self);
}

impl Model for Tracker {
    fn apply(&mut self, object: Object) -> Result<(), ModelError> {
        Tracker::apply(self, object)
    }
    fn delete(&mut self, object: &ObjectRef) {
        Tracker::delete(self, object)
    }
    fn set_local_addresses(&mut self, addrs: Vec<IpAddr>) {
        Tracker::set_local_addresses(self, addrs)
    }
    fn pending_changes(&self) -> PendingChanges {
        Tracker::pending_changes(self)
    }
    fn take_update(&mut self) -> Update {
        Tracker::take_update(self)
    }
    fn snapshots(&self) -> &[Snapshot] {
        Tracker::snapshots(self)
    }
    fn mark_all_dirty(&mut self) {
        Tracker::mark_all_dirty(self)
    }
}

/// kube-proxy's proxiers build their runner with `burstSyncs := 2` (iptables/nftables
/// proxier.go `NewProxier`); BoundedFrequencyRunner turns it into a token bucket of that size
/// refilled at one token per minSyncPeriod (`flowcontrol.NewTokenBucketRateLimiter`).
pub const BURST_SYNCS: f64 = 2.0;

/// The sync runner's token bucket (see [`BURST_SYNCS`]).
#[derive(Clone, Copy, Debug)]
struct Tokens {
    tokens: f64,
    at: Instant,
}

impl Tokens {
    fn full(now: Instant) -> Self {
        Tokens {
            tokens: BURST_SYNCS,
            at: now,
        }
    }

    /// Tokens available at `now` (at or after the last update).
    fn level(&self, now: Instant, per_token: Duration) -> f64 {
        if per_token.is_zero() {
            return BURST_SYNCS;
        }
        let refilled =
            now.saturating_duration_since(self.at).as_secs_f64() / per_token.as_secs_f64();
        (self.tokens + refilled).min(BURST_SYNCS)
    }

    /// When a whole token is there (`now` if it already is).
    fn ready_at(&self, now: Instant, per_token: Duration) -> Instant {
        // The small slack keeps float rounding from turning "due now" into a busy loop of
        // ever shorter sleeps.
        let missing = 1.0 - self.level(now, per_token);
        if missing <= 1e-6 {
            now
        } else {
            now + per_token.mul_f64(missing)
        }
    }

    /// Spend one token at `now` (a sync that was due anyway, e.g. the periodic one, may run
    /// without a whole token: the level never goes below zero).
    fn take(&mut self, now: Instant, per_token: Duration) {
        self.tokens = (self.level(now, per_token) - 1.0).max(0.0);
        self.at = now;
    }
}

#[derive(Clone, Debug)]
pub struct RunnerConfig {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// This node's name: its Node object decides /healthz eligibility.
    pub node_name: String,
}

/// Counters of what the runner did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunnerStats {
    pub syncs: u64,
    pub failures: u64,
}

pub struct Runner<M: Model, D: Dataplane> {
    model: M,
    dataplane: D,
    config: RunnerConfig,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    service_health: Option<ServiceHealthServer>,
    // Pacing state.
    synced: bool,
    /// A change is waiting for a sync.
    pending: bool,
    /// Start of the last sync attempt.
    last_sync: Option<Instant>,
    /// Rate limit of change-driven syncs.
    tokens: Tokens,
    /// Set after a failure: sync again (fully) at this time even without changes.
    retry_at: Option<Instant>,
    need_full_sync: bool,
    last_full_sync: Option<Instant>,
    stats: RunnerStats,
}

impl<M: Model, D: Dataplane> Runner<M, D> {
    pub fn new(
        model: M,
        dataplane: D,
        config: RunnerConfig,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
        service_health: Option<ServiceHealthServer>,
    ) -> Self {
        Runner {
            model,
            dataplane,
            config,
            metrics,
            health,
            service_health,
            synced: false,
            pending: false,
            last_sync: None,
            tokens: Tokens::full(Instant::now()),
            retry_at: None,
            need_full_sync: true,
            last_full_sync: None,
            stats: RunnerStats::default(),
        }
    }

    /// Run until `shutdown` completes; returns what it did. Dropping out never cleans up:
    /// the rules stay in place (kube-proxy leaves them on exit too).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> RunnerStats {
        tokio::pin!(shutdown);
        let mut events_open = true;
        loop {
            let due = self.next_sync_at();
            // Timer before events: a sustained flood of events cannot starve due syncs.
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = sleep_until_opt(due) => {
                    // Fold in whatever already arrived, so a burst becomes one sync.
                    for _ in 0..MAX_DRAIN {
                        match events.try_recv() {
                            Ok(ev) => self.handle(ev),
                            Err(_) => break,
                        }
                    }
                    if self.next_sync_at().is_some_and(|t| t <= Instant::now()) {
                        self.sync_once();
                    }
                }
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => self.handle(ev),
                    None => {
                        // Sources ended (their task logs why); keep the periodic syncs going.
                        warn!("all sources stopped; no more changes will be received");
                        events_open = false;
                    }
                },
            }
        }
        info!(
            syncs = self.stats.syncs,
            failures = self.stats.failures,
            "sync runner stopped; rules left in place"
        );
        self.stats
    }

    /// When the next sync is due, or None if none may run.
    fn next_sync_at(&self) -> Option<Instant> {
        if !self.synced {
            return None;
        }
        let Some(last) = self.last_sync else {
            return Some(Instant::now());
        };
        let mut due = last + self.config.sync_period;
        if self.pending {
            due = due.min(
                self.tokens
                    .ready_at(Instant::now(), self.config.min_sync_period),
            );
        }
        if let Some(retry) = self.retry_at {
            due = due.min(retry);
        }
        Some(due)
    }

    fn request_sync(&mut self) {
        self.pending = true;
        // QueuedUpdate + SyncProxyRulesLastQueuedTimestamp, as the proxiers' Sync() does.
        self.health.queued_update();
        self.metrics
            .sync_proxy_rules_last_queued_timestamp
            .set(unix_seconds(SystemTime::now()));
    }

    fn count_change(&self, kind: Kind) {
        match kind {
            Kind::Service => {
                self.metrics.service_changes_total.inc();
            }
            Kind::EndpointSlice => {
                self.metrics.endpoint_changes_total.inc();
            }
            Kind::ServiceCidr | Kind::Node => {}
        }
    }

    fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Apply { origin, object } => {
                let kind = object_kind(&object);
                if let Object::Node(node) = &object
                    && node.metadata.name.as_deref() == Some(self.config.node_name.as_str())
                {
                    self.health.sync_node(node);
                }
                self.count_change(kind);
                if let Err(e) = self.model.apply(object) {
                    // The error names the object and field; the origin names the file.
                    warn!(origin = %origin, "skipping invalid object: {e}");
                    self.metrics.invalid_objects_total.inc();
                }
                // Either way something changed: an invalid object replaces (removes) its
                // earlier valid version.
                self.request_sync();
            }
            SourceEvent::Delete { origin, object } => {
                debug!(origin = %origin, object = %object, "delete");
                if object.kind == Kind::Node && object.name == self.config.node_name {
                    self.health.node_deleted();
                }
                self.count_change(object.kind);
                self.model.delete(&object);
                self.request_sync();
            }
            SourceEvent::Invalid { origin, reason } => {
                warn!(origin = %origin, "skipping invalid input: {reason}");
                self.metrics.invalid_objects_total.inc();
            }
            SourceEvent::LocalAddresses(addrs) => {
                debug!(?addrs, "local addresses");
                self.model.set_local_addresses(addrs);
                self.request_sync();
            }
            SourceEvent::Synced => {
                if !self.synced {
                    info!("sources synced; first sync may run");
                }
                self.synced = true;
                self.request_sync();
            }
        }
        self.metrics.set_pending(self.model.pending_changes());
    }

    /// One sync attempt now.
    fn sync_once(&mut self) {
        let start = Instant::now();
        self.last_sync = Some(start);
        self.tokens.take(start, self.config.min_sync_period);
        self.pending = false;
        self.retry_at = None;
        let periodic_full = self
            .last_full_sync
            .is_none_or(|t| start.duration_since(t) >= FULL_SYNC_PERIOD);
        if self.need_full_sync || periodic_full {
            self.model.mark_all_dirty();
        }
        let update = self.model.take_update();
        let requested_full = matches!(update.changed, Changed::All);
        let model = &self.model;
        let dataplane = &mut self.dataplane;
        let request = SyncRequest {
            snapshots: model.snapshots(),
            changed: &update.changed,
        };
        // The dataplane blocks (it runs nft and friends); keep the runtime's other tasks
        // (health checks, sources) running meanwhile.
        let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| dataplane.sync(request))
            }
            _ => dataplane.sync(request),
        };
        let elapsed = start.elapsed();
        self.stats.syncs += 1;
        match result {
            Ok(outcome) => {
                let now = SystemTime::now();
                let secs = elapsed.as_secs_f64();
                self.metrics.sync_proxy_rules_duration.observe(secs);
                if outcome.full {
                    self.metrics.sync_full_proxy_rules_duration.observe(secs);
                    self.last_full_sync = Some(start);
                } else {
                    self.metrics.sync_partial_proxy_rules_duration.observe(secs);
                }
                self.metrics
                    .sync_proxy_rules_last_timestamp
                    .set(unix_seconds(now));
                // NetworkProgrammingLatency: from each change's trigger time to now.
                for t in &update.trigger_times {
                    if let Ok(d) = now.duration_since(*t) {
                        self.metrics
                            .network_programming_duration
                            .observe(d.as_secs_f64());
                    }
                }
                self.metrics
                    .set_rules_total(self.dataplane.mode(), &outcome.rules_total);
                self.metrics
                    .conntrack_entries_deleted_total
                    .inc_by(outcome.conntrack_deleted);
                self.metrics.set_no_local_endpoints(self.model.snapshots());
                self.need_full_sync = false;
                self.health.updated();
                if let Some(hc) = &mut self.service_health {
                    hc.sync(&Wanted::from_snapshots(self.model.snapshots()));
                }
                info!(
                    full = outcome.full,
                    elapsed = ?elapsed,
                    "synced {} rules",
                    self.dataplane.mode()
                );
            }
            Err(e) => {
                self.stats.failures += 1;
                error!(
                    mode = self.dataplane.mode(),
                    retry_in = ?self.config.min_sync_period,
                    "sync failed: {e}"
                );
                self.metrics
                    .count_sync_failure(self.dataplane.mode(), !requested_full);
                // The changes were consumed by take_update: only a full sync can recover.
                self.model.mark_all_dirty();
                self.need_full_sync = true;
                self.retry_at = Some(start + self.config.min_sync_period);
            }
        }
        self.metrics.set_pending(self.model.pending_changes());
    }
}

fn object_kind(o: &Object) -> Kind {
    match o {
        Object::Service(_) => Kind::Service,
        Object::EndpointSlice(_) => Kind::EndpointSlice,
        Object::ServiceCidr(_) => Kind::ServiceCidr,
        Object::Node(_) => Kind::Node,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
