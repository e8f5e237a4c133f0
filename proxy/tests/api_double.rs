//! `source::kube::run` against an in-process API double speaking the real list/watch
//! protocol: initial list + Synced, changes, deletes, selector semantics, resume after dropped
//! watches (from the last resourceVersion, no relist) and relist after 410 Gone.
#[path = "support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeSet;
use std::time::Duration;

use apiserver::{ApiServer, Res};
use serde_json::{Value, json};
use shunt::model::{Kind, Object, ObjectRef};
use shunt::source::{Origin, SourceEvent};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

fn service(name: &str, port: u16, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "ns", "labels": labels},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port, "protocol": "TCP"}]}})
}

fn r(kind: Kind, ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: ns.into(),
        name: name.into(),
    }
}

fn ref_of(o: &Object) -> ObjectRef {
    let (kind, m) = match o {
        Object::Service(o) => (Kind::Service, &o.metadata),
        Object::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
        Object::ServiceCidr(o) => (Kind::ServiceCidr, &o.metadata),
        Object::Node(o) => (Kind::Node, &o.metadata),
    };
    r(
        kind,
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or(""),
    )
}

async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a source event")
        .expect("source closed the channel")
}

fn expect_apply(ev: SourceEvent) -> Object {
    match ev {
        SourceEvent::Apply {
            origin: Origin::Api,
            object,
        } => object,
        other => panic!("expected Apply from the API, got {other:?}"),
    }
}

fn expect_delete(ev: SourceEvent) -> ObjectRef {
    match ev {
        SourceEvent::Delete {
            origin: Origin::Api,
            object,
        } => object,
        other => panic!("expected Delete from the API, got {other:?}"),
    }
}

fn port(o: &Object) -> i32 {
    match o {
        Object::Service(s) => s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        other => panic!("not a Service: {other:?}"),
    }
}

/// Poll a condition on the double (bounded).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watches_follow_the_api() {
    let api = ApiServer::start().await;
    api.upsert(service("web", 80, json!({})));
    // Excluded by kube-proxy's label selector.
    api.upsert(service(
        "headless",
        80,
        json!({"service.kubernetes.io/headless": ""}),
    ));
    api.upsert(service(
        "other",
        80,
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    ));
    api.upsert(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "ns",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}],
        "ports": [{"port": 8080}]}),
    );
    api.upsert(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}}),
    );
    api.upsert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}));
    // Another node: excluded by the field selector.
    api.upsert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}));

    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(shunt::source::kube::run(
        api.client(),
        "node-a".to_owned(),
        tx,
    ));

    // Initial lists, then Synced exactly once.
    let mut initial = BTreeSet::new();
    loop {
        match next(&mut rx).await {
            SourceEvent::Synced => break,
            ev => {
                let o = expect_apply(ev);
                assert!(initial.insert(ref_of(&o)), "sent twice: {}", ref_of(&o));
            }
        }
    }
    assert_eq!(
        initial,
        BTreeSet::from([
            r(Kind::Service, "ns", "web"),
            r(Kind::EndpointSlice, "ns", "web-1"),
            r(Kind::ServiceCidr, "", "kubernetes"),
            r(Kind::Node, "", "node-a"),
        ])
    );
    eventually("all four watches open", || {
        api.with(|s| s.open_watches()) == 4
    })
    .await;

    // A change propagates as Apply.
    api.upsert(service("web", 81, json!({})));
    let o = expect_apply(next(&mut rx).await);
    assert_eq!((ref_of(&o), port(&o)), (r(Kind::Service, "ns", "web"), 81));

    // Changes to filtered-out objects are not seen.
    api.upsert(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b",
        "labels": {"x": "y"}}}),
    );
    // A delete propagates as Delete.
    assert!(api.delete(Res::EndpointSlices, "ns", "web-1"));
    assert_eq!(
        expect_delete(next(&mut rx).await),
        r(Kind::EndpointSlice, "ns", "web-1")
    );

    // A Service that becomes headless leaves the label selector: Delete; and comes back.
    api.upsert(service(
        "web",
        81,
        json!({"service.kubernetes.io/headless": ""}),
    ));
    assert_eq!(
        expect_delete(next(&mut rx).await),
        r(Kind::Service, "ns", "web")
    );
    api.upsert(service("web", 82, json!({})));
    let o = expect_apply(next(&mut rx).await);
    assert_eq!(port(&o), 82);

    // The server drops every watch and a change happens while none is connected: the
    // watchers resume from their last resourceVersion (no relist) and get the change.
    let lists_before = api.with(|s| s.list_requests(Res::Services));
    let watches_before = api.with(|s| s.watch_requests(Res::Services));
    api.with(|s| {
        s.drop_watches();
        s.upsert(service("web", 83, json!({})));
    });
    let o = expect_apply(next(&mut rx).await);
    assert_eq!(port(&o), 83);
    assert_eq!(
        api.with(|s| s.list_requests(Res::Services)),
        lists_before,
        "a dropped watch must be resumed, not relisted"
    );
    assert!(api.with(|s| s.watch_requests(Res::Services)) > watches_before);
    eventually("watches reopened", || api.with(|s| s.open_watches()) == 4).await;

    // Later changes still arrive on the resumed watch.
    api.upsert(service("web", 84, json!({})));
    assert_eq!(port(&expect_apply(next(&mut rx).await)), 84);

    // A deletion while disconnected, then history compacted: the resumed watch gets 410 Gone,
    // the watcher relists, and the deletion is delivered as Delete. Nothing else is re-sent.
    api.with(|s| {
        s.drop_watches();
        assert!(s.delete(Res::Services, "ns", "web"));
        s.compact();
    });
    assert_eq!(
        expect_delete(next(&mut rx).await),
        r(Kind::Service, "ns", "web")
    );
    assert!(
        api.with(|s| s.list_requests(Res::Services)) > lists_before,
        "410 must cause a relist"
    );

    // And the relisted watch keeps following.
    api.upsert(service("api", 443, json!({})));
    let o = expect_apply(next(&mut rx).await);
    assert_eq!((ref_of(&o), port(&o)), (r(Kind::Service, "ns", "api"), 443));

    // The source stops when the receiver is dropped.
    drop(rx);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("kube source did not stop")
        .unwrap()
        .unwrap();
}

/// kube-rs lists in pages of 500 (client-go's pager default): a large initial list arrives
/// complete before Synced.
#[tokio::test]
async fn paginated_initial_list() {
    let api = ApiServer::start().await;
    const N: usize = 1203;
    for i in 0..N {
        api.upsert(service(&format!("svc-{i:04}"), 80, json!({})));
    }
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(shunt::source::kube::run(
        api.client(),
        "node-a".to_owned(),
        tx,
    ));
    let mut seen = BTreeSet::new();
    loop {
        match next(&mut rx).await {
            SourceEvent::Synced => break,
            ev => {
                seen.insert(ref_of(&expect_apply(ev)));
            }
        }
    }
    assert_eq!(seen.len(), N);
    assert_eq!(
        api.with(|s| s.list_requests(Res::Services)),
        3,
        "3 pages of 500"
    );
    drop(rx);
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
