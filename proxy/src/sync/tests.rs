//! Pacing tests with a fake model and a fake dataplane, in paused virtual time (no timed
//! assertions on real clocks). The last test drives the real `Tracker` and needs the model
//! branch (its bodies are `todo!()` on this branch).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::oneshot;

use super::*;
use crate::dataplane::{DataplaneError, SyncOutcome};
use crate::model::ServiceKey;
use crate::source::Origin;

#[derive(Default)]
struct FakeModel {
    dirty_all: bool,
    changed: BTreeSet<ServiceKey>,
    snapshots: Vec<Snapshot>,
    mark_all_calls: Arc<AtomicUsize>,
}

impl Model for FakeModel {
    fn apply(&mut self, object: Object) -> Result<(), ModelError> {
        let Object::Service(svc) = object else {
            return Ok(());
        };
        let key = ServiceKey {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        };
        self.changed.insert(key.clone());
        if key.name.starts_with("bad") {
            return Err(ModelError::Invalid {
                object: ObjectRef {
                    kind: Kind::Service,
                    namespace: key.namespace,
                    name: key.name,
                },
                field: "spec.ports[0].port".into(),
                reason: "must be between 1 and 65535".into(),
            });
        }
        Ok(())
    }
    fn delete(&mut self, object: &ObjectRef) {
        self.changed.insert(ServiceKey {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
        });
    }
    fn set_local_addresses(&mut self, _addrs: Vec<IpAddr>) {
        self.dirty_all = true;
    }
    fn pending_changes(&self) -> PendingChanges {
        PendingChanges {
            services: self.changed.len(),
            endpoint_slices: 0,
        }
    }
    fn take_update(&mut self) -> Update {
        let changed = if std::mem::take(&mut self.dirty_all) {
            self.changed.clear();
            Changed::All
        } else {
            Changed::Services(std::mem::take(&mut self.changed))
        };
        Update {
            changed,
            trigger_times: vec![SystemTime::now() - Duration::from_millis(1500)],
        }
    }
    fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }
    fn mark_all_dirty(&mut self) {
        self.mark_all_calls.fetch_add(1, Ordering::SeqCst);
        self.dirty_all = true;
    }
}

#[derive(Clone, Default)]
struct FakeDataplane {
    syncs: Arc<Mutex<Vec<(Instant, Changed)>>>,
    /// Fail the syncs with these (0-based) indexes.
    fail: Arc<Mutex<BTreeSet<usize>>>,
}

impl FakeDataplane {
    fn syncs(&self) -> Vec<(Instant, Changed)> {
        self.syncs.lock().unwrap().clone()
    }
}

impl Dataplane for FakeDataplane {
    fn mode(&self) -> &'static str {
        "nftables"
    }
    fn sync(
        &mut self,
        request: SyncRequest<'_>,
    ) -> Result<SyncOutcome, crate::dataplane::DataplaneError> {
        let mut syncs = self.syncs.lock().unwrap();
        let index = syncs.len();
        syncs.push((Instant::now(), request.changed.clone()));
        if self.fail.lock().unwrap().contains(&index) {
            return Err(DataplaneError::Tool {
                tool: "nft".into(),
                stderr: "Error: Could not process rule: No such file or directory".into(),
            });
        }
        Ok(SyncOutcome {
            full: matches!(request.changed, Changed::All),
            ..Default::default()
        })
    }
    fn cleanup(&mut self) -> Result<(), crate::dataplane::DataplaneError> {
        Ok(())
    }
}

struct Harness {
    tx: mpsc::Sender<SourceEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<RunnerStats>,
    dp: FakeDataplane,
    metrics: Arc<Metrics>,
    health: Arc<ProxyHealth>,
    mark_all_calls: Arc<AtomicUsize>,
    t0: Instant,
}

fn start<M: Model + 'static>(
    model: M,
    mark_all_calls: Arc<AtomicUsize>,
    dp: FakeDataplane,
) -> Harness {
    let (tx, rx) = mpsc::channel(1024);
    let (stop, stop_rx) = oneshot::channel();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(ProxyHealth::new(Duration::from_secs(60)));
    let runner = Runner::new(
        model,
        dp.clone(),
        RunnerConfig {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            node_name: "node-a".into(),
        },
        metrics.clone(),
        health.clone(),
        None,
    );
    let task = tokio::spawn(runner.run(rx, async move {
        let _ = stop_rx.await;
    }));
    Harness {
        tx,
        stop: Some(stop),
        task,
        dp,
        metrics,
        health,
        mark_all_calls,
        t0: Instant::now(),
    }
}

fn fake() -> (FakeModel, Arc<AtomicUsize>) {
    let m = FakeModel::default();
    let calls = m.mark_all_calls.clone();
    (m, calls)
}

impl Harness {
    async fn send(&self, ev: SourceEvent) {
        self.tx.send(ev).await.unwrap();
    }
    async fn stop(mut self) -> RunnerStats {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap()
    }
}

fn svc(name: &str) -> SourceEvent {
    SourceEvent::Apply {
        origin: Origin::File(PathBuf::from(format!("/manifests/{name}.yaml"))),
        object: Object::Service(Box::new(Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        })),
    }
}

fn keys(names: &[&str]) -> Changed {
    Changed::Services(
        names
            .iter()
            .map(|n| ServiceKey {
                namespace: "ns".into(),
                name: n.to_string(),
            })
            .collect(),
    )
}

async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn no_sync_before_synced() {
    let (m, calls) = fake();
    let h = start(m, calls, FakeDataplane::default());
    h.send(svc("a")).await;
    h.send(SourceEvent::LocalAddresses(vec![
        "10.0.0.1".parse().unwrap(),
    ]))
    .await;
    advance(Duration::from_secs(120)).await;
    assert!(h.dp.syncs().is_empty(), "synced before Synced");
    assert!(!h.health.status().healthy, "healthy before the first sync");

    h.send(SourceEvent::Synced).await;
    advance(Duration::from_millis(10)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 1);
    assert_eq!(syncs[0].1, Changed::All, "the first sync is full");
    assert!(h.health.status().healthy);
    assert!(
        h.metrics
            .encode()
            .contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count 1")
    );
    // The change's trigger time (1.5 s before the sync) lands in the 2.0 bucket.
    assert!(
        h.metrics
            .encode()
            .contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 0")
    );
    assert!(
        h.metrics
            .encode()
            .contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"} 1")
    );
    let stats = h.stop().await;
    assert_eq!(
        stats,
        RunnerStats {
            syncs: 1,
            failures: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn bursts_coalesce_within_min_sync_period() {
    let (m, calls) = fake();
    let h = start(m, calls, FakeDataplane::default());
    h.send(SourceEvent::Synced).await;
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.dp.syncs().len(), 1);

    // A burst right after a sync. kube-proxy's runner has a bucket of two tokens
    // (burstSyncs := 2) refilled at one per min-sync-period: the first change still finds a
    // token and syncs at once, every later one waits for the refill and they all fold into
    // one sync, one min-sync-period after the first sync.
    let names: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    for n in &names {
        h.send(svc(n)).await;
        advance(Duration::from_millis(5)).await;
    }
    advance(Duration::from_secs(2)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 3, "{syncs:?}");
    assert_eq!(syncs[1].1, keys(&["s0"]));
    assert!(
        syncs[1].0 - syncs[0].0 < Duration::from_millis(20),
        "the second token is spent at once"
    );
    let gap = syncs[2].0 - syncs[0].0;
    assert!(
        gap >= Duration::from_millis(999),
        "min-sync-period not respected: {gap:?}"
    );
    let refs: Vec<&str> = names[1..].iter().map(String::as_str).collect();
    assert_eq!(syncs[2].1, keys(&refs));

    // After a quiet period, the bucket is full again: two changes in a row sync at once,
    // the third waits for a token.
    advance(Duration::from_secs(5)).await;
    for n in ["late1", "late2", "late3"] {
        h.send(svc(n)).await;
        advance(Duration::from_millis(10)).await;
    }
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 5, "{syncs:?}");
    assert_eq!(syncs[3].1, keys(&["late1"]));
    assert_eq!(syncs[4].1, keys(&["late2"]));
    advance(Duration::from_secs(1)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 6, "{syncs:?}");
    assert_eq!(syncs[5].1, keys(&["late3"]));
    assert!(syncs[5].0 - syncs[3].0 >= Duration::from_millis(999));
    assert!(
        h.metrics
            .encode()
            .contains("kubeproxy_sync_proxy_rules_service_changes_total 53")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failure_means_full_retry_after_min_sync_period() {
    let (m, calls) = fake();
    let dp = FakeDataplane::default();
    // Fail the first (full) sync and the third (partial) one.
    dp.fail.lock().unwrap().extend([0, 2]);
    let h = start(m, calls, dp);
    h.send(SourceEvent::Synced).await;
    advance(Duration::from_millis(10)).await;
    assert_eq!(h.dp.syncs().len(), 1);
    assert!(
        !h.health.status().healthy,
        "a failed first sync is not healthy"
    );

    // Retried, fully, after min-sync-period without any new event.
    advance(Duration::from_millis(1100)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 2);
    assert_eq!(syncs[1].1, Changed::All);
    assert!(syncs[1].0 - syncs[0].0 >= Duration::from_secs(1));
    assert!(h.health.status().healthy);

    // A partial sync fails (it runs at once: the bucket has a token): the retry is full,
    // one min-sync-period later.
    h.send(svc("a")).await;
    advance(Duration::from_millis(10)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 3);
    assert_eq!(syncs[2].1, keys(&["a"]));
    advance(Duration::from_millis(1100)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 4);
    assert_eq!(syncs[3].1, Changed::All);
    assert!(h.mark_all_calls.load(Ordering::SeqCst) >= 2);
    assert!(
        h.metrics
            .encode()
            .contains("kubeproxy_sync_proxy_rules_nftables_sync_failures_total 2")
    );

    // Back to partial syncs afterwards.
    h.send(svc("b")).await;
    advance(Duration::from_millis(1100)).await;
    assert_eq!(h.dp.syncs()[4].1, keys(&["b"]));
    let stats = h.stop().await;
    assert_eq!(
        stats,
        RunnerStats {
            syncs: 5,
            failures: 2
        }
    );
}

#[tokio::test(start_paused = true)]
async fn periodic_sync_and_hourly_full_sync() {
    let (m, calls) = fake();
    let h = start(m, calls, FakeDataplane::default());
    h.send(SourceEvent::Synced).await;
    advance(Duration::from_millis(10)).await;
    // No events: one sync per sync-period, partial with nothing changed.
    advance(Duration::from_secs(61)).await;
    let syncs = h.dp.syncs();
    assert_eq!(syncs.len(), 3, "{syncs:?}");
    assert_eq!(syncs[1].1, keys(&[]));
    assert_eq!(syncs[2].1, keys(&[]));
    assert!(syncs[1].0 - syncs[0].0 >= Duration::from_secs(30));
    // After FULL_SYNC_PERIOD, a periodic sync is full again.
    advance(FULL_SYNC_PERIOD).await;
    let syncs = h.dp.syncs();
    let fulls: Vec<_> = syncs.iter().filter(|(_, c)| *c == Changed::All).collect();
    assert_eq!(fulls.len(), 2, "one initial and one hourly full sync");
    assert!(fulls[1].0 - h.t0 >= FULL_SYNC_PERIOD);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_objects_warn_count_and_still_sync() {
    let (m, calls) = fake();
    let h = start(m, calls, FakeDataplane::default());
    h.send(SourceEvent::Synced).await;
    advance(Duration::from_secs(2)).await;
    h.send(svc("bad-port")).await;
    h.send(SourceEvent::Invalid {
        origin: Origin::File("/manifests/garbage.yaml".into()),
        reason: "unknown kind Foo".into(),
    })
    .await;
    advance(Duration::from_millis(10)).await;
    assert!(h.metrics.encode().contains("shunt_invalid_objects_total 2"));
    // The invalid object's earlier version must go away: a sync covering it ran.
    assert_eq!(h.dp.syncs().last().unwrap().1, keys(&["bad-port"]));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn node_object_drives_eligibility() {
    let (m, calls) = fake();
    let h = start(m, calls, FakeDataplane::default());
    h.send(SourceEvent::Synced).await;
    advance(Duration::from_millis(10)).await;
    assert!(h.health.status().healthz_ok());
    let mut node = Node::default();
    node.metadata.name = Some("node-a".into());
    node.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Default::default(),
    ));
    h.send(SourceEvent::Apply {
        origin: Origin::Api,
        object: Object::Node(Box::new(node.clone())),
    })
    .await;
    advance(Duration::from_millis(10)).await;
    assert!(!h.health.status().healthz_ok());
    // Another node's object does not matter.
    node.metadata.name = Some("node-b".into());
    node.metadata.deletion_timestamp = None;
    h.send(SourceEvent::Apply {
        origin: Origin::Api,
        object: Object::Node(Box::new(node)),
    })
    .await;
    advance(Duration::from_millis(10)).await;
    assert!(!h.health.status().healthz_ok());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn closed_source_channel_keeps_periodic_syncs() {
    let (m, calls) = fake();
    let mut h = start(m, calls, FakeDataplane::default());
    h.send(SourceEvent::Synced).await;
    let (dead_tx, _) = mpsc::channel(1);
    drop(std::mem::replace(&mut h.tx, dead_tx));
    advance(Duration::from_secs(31)).await;
    assert_eq!(h.dp.syncs().len(), 2);
    h.stop().await;
}

/// Drives the real Tracker: needs the model branch (Tracker bodies are todo!() here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tracker_end_to_end() {
    use crate::model::{DetectLocal, IpFamily, NodeConfig};
    let tracker = Tracker::new(NodeConfig {
        node_name: "node-a".into(),
        families: vec![IpFamily::V4],
        detect_local: DetectLocal::None,
        masquerade_all: false,
        node_port_addresses: vec![],
    });
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                 "type": "ClusterIP", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap();
    let bad: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ns", "name": "bad"},
        "spec": {"clusterIP": "not-an-ip", "type": "ClusterIP",
                 "ports": [{"port": 80, "protocol": "TCP"}]}
    }))
    .unwrap();
    let dp = FakeDataplane::default();
    let h = start(tracker, Arc::new(AtomicUsize::new(0)), dp);
    h.send(SourceEvent::Apply {
        origin: Origin::File("/m/web.yaml".into()),
        object: Object::Service(Box::new(svc)),
    })
    .await;
    h.send(SourceEvent::Apply {
        origin: Origin::File("/m/bad.yaml".into()),
        object: Object::Service(Box::new(bad)),
    })
    .await;
    h.send(SourceEvent::Synced).await;
    for _ in 0..100 {
        if !h.dp.syncs().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let syncs = h.dp.syncs();
    assert_eq!(syncs.first().map(|s| s.1.clone()), Some(Changed::All));
    assert!(h.metrics.encode().contains("shunt_invalid_objects_total 1"));
    assert!(h.health.status().healthy);
    h.stop().await;
}
