//! An API server outage of 60 s, with `source::kube::run` feeding a `model::Tracker` as the
//! sync runner does.
//!
//! kube-proxy keeps its rules when the apiserver goes away: client-go's reflectors keep their
//! store and retry with backoff, and the proxier is only told about changes. shunt must do the
//! same: while the API is unreachable nothing may be sent (above all no `Delete`, which would
//! tear down Service rules on every node at once), and after it returns the changes made
//! meanwhile must arrive, resuming each watch from its last resourceVersion when the server
//! still has that history, and relisting (with `Delete` for exactly what vanished) when it
//! answers 410 Gone.
//!
//! Each test takes 60 s (the outage) plus the watchers' reconnect backoff (source/kube.rs
//! `ReconnectBackoff`, capped at 400 ms plus jitter), so a little over a minute. This is its
//! own test binary so that it runs in parallel with the others; the two tests here also run
//! in parallel.
#[path = "support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, Res};
use serde_json::{Value, json};
use shunt::model::{DetectLocal, IpFamily, Kind, NodeConfig, Object, ObjectRef, Snapshot, Tracker};
use shunt::source::{Origin, SourceEvent};
use tokio::sync::mpsc;

const OUTAGE: Duration = Duration::from_secs(60);
/// After the API returns, each watcher retries after its current backoff step (at most 480 ms:
/// source/kube.rs `ReconnectBackoff`). With compacted history the resumed watch then fails
/// with 410 and the relist waits one more step: two steps, plus generous slack for a loaded
/// 2-core machine. A bound, not a performance claim (the test prints the time it took).
const CONVERGE: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(15);
const ALL_RES: [Res; 4] = [
    Res::Services,
    Res::EndpointSlices,
    Res::ServiceCidrs,
    Res::Nodes,
];

fn service(name: &str, ip: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "ns"},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                    "ipFamilies": ["IPv4"], "selector": {"app": name},
                    "ports": [{"name": "http", "port": port, "protocol": "TCP",
                               "targetPort": 8080}]}})
}

fn slice(service: &str, name: &str, addrs: &[&str]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({"addresses": [a], "conditions": {"ready": true, "serving": true,
                   "terminating": false}, "nodeName": "node-a"})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "ns",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn cluster(api: &ApiServer) {
    api.upsert(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}}),
    );
    api.upsert(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDR": "10.0.0.0/24", "podCIDRs": ["10.0.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}}));
    api.upsert(service("web", "10.96.0.10", 80));
    api.upsert(slice("web", "web-1", &["10.0.0.1"]));
    api.upsert(service("db", "10.96.0.20", 5432));
    api.upsert(slice("db", "db-1", &["10.0.0.5"]));
}

/// What is changed while the API is down: an endpoint added, a Service and its slice deleted,
/// a new Service with a slice, the Node relabelled.
fn change_while_down(api: &ApiServer) {
    api.upsert(slice("web", "web-1", &["10.0.0.1", "10.0.0.2"]));
    assert!(api.delete(Res::EndpointSlices, "ns", "db-1"));
    assert!(api.delete(Res::Services, "ns", "db"));
    api.upsert(service("api", "10.96.0.30", 443));
    api.upsert(slice("api", "api-1", &["10.0.0.9"]));
}

fn node_config() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        families: vec![IpFamily::V4],
        detect_local: DetectLocal::None,
        masquerade_all: false,
        node_port_addresses: Vec::new(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
    let kind = v["kind"].as_str().unwrap_or_default().to_owned();
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn to_object(v: Value) -> Object {
    match v["kind"].as_str().expect("kind") {
        "Service" => Object::Service(Box::new(parse(v))),
        "EndpointSlice" => Object::EndpointSlice(Box::new(parse(v))),
        "ServiceCIDR" => Object::ServiceCidr(Box::new(parse(v))),
        "Node" => Object::Node(Box::new(parse(v))),
        other => panic!("unexpected kind {other}"),
    }
}

/// The snapshots a fresh tracker computes from the double's current objects: what the
/// followed tracker must converge to.
fn reference(api: &ApiServer) -> Vec<Snapshot> {
    let mut t = Tracker::new(node_config());
    for o in api.with(|s| s.objects()) {
        t.apply(to_object(o)).expect("reference object valid");
    }
    t.take_update();
    t.snapshots().to_vec()
}

fn services(snapshots: &[Snapshot]) -> BTreeSet<String> {
    snapshots[0]
        .services
        .keys()
        .map(|k| k.service.to_string())
        .collect()
}

/// The tracker side of the test: applies source events as the sync runner would.
struct Follower {
    rx: mpsc::Receiver<SourceEvent>,
    tracker: Tracker,
    deletes: Vec<ObjectRef>,
}

impl Follower {
    fn apply(&mut self, ev: SourceEvent) -> bool {
        match ev {
            SourceEvent::Apply {
                origin: Origin::Api,
                object,
            } => self.tracker.apply(object).expect("valid object"),
            SourceEvent::Delete {
                origin: Origin::Api,
                object,
            } => {
                self.tracker.delete(&object);
                self.deletes.push(object);
            }
            SourceEvent::Synced => return true,
            other => panic!("unexpected source event {other:?}"),
        }
        self.tracker.take_update();
        false
    }

    async fn initial_sync(&mut self) {
        loop {
            let ev = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("timed out waiting for the initial lists")
                .expect("source ended");
            if self.apply(ev) {
                return;
            }
        }
    }

    /// Through the whole outage: nothing may arrive and the snapshots must stay exactly as
    /// they were. Checked continuously, not only at the end.
    async fn hold_through_outage(&mut self, api: &ApiServer, before: &[Snapshot]) {
        let start = Instant::now();
        let mut changed = false;
        let mut received = Vec::new();
        while start.elapsed() < OUTAGE {
            if !changed && start.elapsed() >= Duration::from_secs(5) {
                // Well into the outage, when every watcher has failed at least once and is
                // backing off.
                change_while_down(api);
                changed = true;
            }
            let left = OUTAGE.saturating_sub(start.elapsed());
            match tokio::time::timeout(left.min(Duration::from_secs(1)), self.rx.recv()).await {
                Err(_) => {}
                Ok(None) => panic!("the source ended during the outage"),
                Ok(Some(ev)) => {
                    received.push(format!("{ev:?}"));
                    self.apply(ev);
                }
            }
            assert_eq!(
                self.tracker.snapshots(),
                before,
                "snapshots changed {:?} into the outage; events: {received:?}",
                start.elapsed()
            );
        }
        assert!(changed);
        assert!(
            received.is_empty(),
            "events during the outage: {received:?}"
        );
        assert!(self.deletes.is_empty(), "deletes: {:?}", self.deletes);
    }

    /// After the API returns: apply events until the snapshots equal `want` and every object
    /// in `deleted` has been deleted; the time taken.
    async fn converge(&mut self, want: &[Snapshot], deleted: &[ObjectRef]) -> Duration {
        let start = Instant::now();
        while self.tracker.snapshots() != want || !deleted.iter().all(|d| self.deletes.contains(d))
        {
            let left = CONVERGE.checked_sub(start.elapsed()).unwrap_or_else(|| {
                panic!(
                    "not converged {CONVERGE:?} after the API returned: have {:?}, want {:?}",
                    services(self.tracker.snapshots()),
                    services(want)
                )
            });
            match tokio::time::timeout(left, self.rx.recv()).await {
                Err(_) => continue,
                Ok(None) => panic!("the source ended"),
                Ok(Some(ev)) => {
                    self.apply(ev);
                }
            }
        }
        start.elapsed()
    }
}

fn r(kind: Kind, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: "ns".into(),
        name: name.into(),
    }
}

/// Runs the outage; `compact` forgets the history while the API is down (as after a long
/// outage or an etcd compaction), so watches get 410 Gone on return and must relist.
async fn outage(compact: bool) {
    let api = ApiServer::start().await;
    cluster(&api);
    let (tx, rx) = mpsc::channel(64);
    let source = tokio::spawn(shunt::source::kube::run(
        api.client(),
        "node-a".to_owned(),
        tx,
    ));
    let mut f = Follower {
        rx,
        tracker: Tracker::new(node_config()),
        deletes: Vec::new(),
    };
    f.initial_sync().await;
    let before = f.tracker.snapshots().to_vec();
    assert_eq!(before, reference(&api), "initial sync incomplete");
    assert_eq!(
        services(&before),
        BTreeSet::from(["ns/db".to_owned(), "ns/web".to_owned()])
    );
    let deadline = Instant::now() + WAIT;
    while api.with(|s| s.open_watches()) != 4 {
        assert!(Instant::now() < deadline, "watches did not open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rv_before = api.with(|s| s.resource_version()).to_string();
    let lists_before: Vec<usize> = ALL_RES
        .iter()
        .map(|r| api.with(|s| s.list_requests(*r)))
        .collect();
    let watches_before: Vec<usize> = ALL_RES
        .iter()
        .map(|r| api.with(|s| s.watch_resource_versions(*r).len()))
        .collect();

    api.stop().await;
    let requests_down = api.with(|s| s.requests());
    f.hold_through_outage(&api, &before).await;
    assert_eq!(
        api.with(|s| s.requests()),
        requests_down,
        "requests were served while the double was down"
    );
    if compact {
        api.with(|s| s.compact());
    }
    let want = reference(&api);
    assert_eq!(
        services(&want),
        BTreeSet::from(["ns/api".to_owned(), "ns/web".to_owned()])
    );
    assert_ne!(want, before);

    api.restart().await;
    let gone = [r(Kind::Service, "db"), r(Kind::EndpointSlice, "db-1")];
    let took = f.converge(&want, &gone).await;
    println!(
        "api_outage (compact={compact}): converged {took:?} after the API returned from a \
         {OUTAGE:?} outage"
    );
    // Exactly the deleted objects were deleted.
    let deletes: BTreeSet<ObjectRef> = f.deletes.iter().cloned().collect();
    assert_eq!(deletes, BTreeSet::from(gone));
    assert_eq!(
        f.deletes.len(),
        2,
        "a delete was sent twice: {:?}",
        f.deletes
    );

    // Every watcher has come back by now or does within the bound (the slowest may still be
    // in its backoff when the others have converged).
    let start = Instant::now();
    loop {
        let back =
            ALL_RES
                .iter()
                .zip(&watches_before)
                .zip(&lists_before)
                .all(|((r, watches), lists)| {
                    if compact {
                        // Back means relisted: the resumed watch's 410 alone is not enough.
                        api.with(|s| s.list_requests(*r)) > *lists
                    } else {
                        api.with(|s| s.watch_resource_versions(*r).len()) > *watches
                    }
                });
        if back {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "not every watcher reconnected {CONVERGE:?} after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for ((res, lists), watches) in ALL_RES.iter().zip(&lists_before).zip(&watches_before) {
        let lists_after = api.with(|s| s.list_requests(*res));
        let resumed = api.with(|s| s.watch_resource_versions(*res))[*watches..].to_vec();
        if compact {
            // The resumed watch got 410 Gone, so the watcher relisted.
            assert!(lists_after > *lists, "{res:?} did not relist after 410");
            assert_eq!(
                resumed[0], rv_before,
                "{res:?}: first watch after the outage"
            );
        } else {
            // The history was kept: the watcher resumed from the resourceVersion it had when
            // the API went away (the bookmark sent at watch start), without relisting.
            assert_eq!(
                lists_after, *lists,
                "{res:?} relisted although history was kept"
            );
            assert_eq!(
                resumed[0], rv_before,
                "{res:?}: the first watch after the outage must resume from the last \
                 resourceVersion"
            );
        }
    }

    // Still following after the outage.
    api.upsert(service("web", "10.96.0.10", 8080));
    let want = reference(&api);
    f.converge(&want, &[]).await;

    drop(f);
    tokio::time::timeout(WAIT, source)
        .await
        .expect("source did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn outage_resumes_from_resource_version() {
    outage(false).await;
}

#[tokio::test]
async fn outage_with_compaction_relists() {
    outage(true).await;
}
