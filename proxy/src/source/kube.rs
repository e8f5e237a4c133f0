//! The Kubernetes API as a source.
//!
//! Four kube-rs watchers (list, then watch from the list's resourceVersion, resuming from the
//! last seen resourceVersion or bookmark after a dropped connection and relisting after
//! `410 Gone`) feed one loop that turns their events into `SourceEvent`s.
//!
//! What is watched mirrors kube-proxy (cmd/kube-proxy/app/server.go, `ProxyServer.Run`):
//! * Services, EndpointSlices and ServiceCIDRs come from one informer factory whose list
//!   options carry the label selector `!service.kubernetes.io/service-proxy-name,
//!   !service.kubernetes.io/headless` (objects that belong to another service proxy, and
//!   headless Services' objects, are never seen);
//! * the Node comes from a second factory with field selector `metadata.name=<node name>`.
//!
//! A relist (`Init` … `InitDone`, after a 410 or at start) replaces what was known of a kind:
//! objects not listed again are sent as `Delete`; objects listed again with an unchanged
//! resourceVersion are not re-sent. `Synced` is sent once, when all four initial lists are
//! complete. kube-proxy's proxier only gates its first sync on Services and EndpointSlices
//! (pkg/proxy/nftables/proxier.go: `OnServiceSynced`/`OnEndpointSlicesSynced` call
//! `setInitialized` once both informers have synced);
//! shunt also waits for ServiceCIDRs and the Node so that the first ruleset already has the
//! service-CIDR drop rules and the node's topology labels instead of being corrected one sync
//! later. Errors are logged and retried with `ReconnectBackoff` (below); the loop only ends when
//! the receiver is dropped.
use std::collections::{HashMap, HashSet};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::object::object_ref;
use super::{Origin, SourceEvent};
use crate::model::{Kind, Object, ObjectRef};

/// kube-proxy's label selector for Services, EndpointSlices and ServiceCIDRs: not claimed by
/// another proxy (`service.kubernetes.io/service-proxy-name`, pkg/proxy/apis
/// LabelServiceProxyName) and not headless (`service.kubernetes.io/headless`, core/v1
/// IsHeadlessService). Requirements sorted by key, as labels.Selector.String() prints them.
pub(crate) const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name";

/// Watch Services, EndpointSlices (kube-proxy's label selector), ServiceCIDRs and this node's
/// Node object; send `Synced` once every initial list is complete; follow until the receiver
/// is dropped.
pub async fn run(
    client: ::kube::Client,
    node_name: String,
    tx: mpsc::Sender<SourceEvent>,
) -> anyhow::Result<()> {
    let labelled = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let mut events = futures::stream::select_all([
        typed_watch::<Service>(&client, Kind::Service, labelled.clone(), |o| {
            Object::Service(Box::new(o))
        }),
        typed_watch::<EndpointSlice>(&client, Kind::EndpointSlice, labelled.clone(), |o| {
            Object::EndpointSlice(Box::new(o))
        }),
        typed_watch::<ServiceCIDR>(&client, Kind::ServiceCidr, labelled, |o| {
            Object::ServiceCidr(Box::new(o))
        }),
        typed_watch::<Node>(&client, Kind::Node, node, |o| Object::Node(Box::new(o))),
    ]);

    let mut state = State::default();
    loop {
        let item = tokio::select! {
            _ = tx.closed() => return Ok(()),
            item = events.next() => item,
        };
        // The watchers are infinite streams; an end would be a kube-rs bug, not a reason to
        // stop following the API silently.
        let Some((kind, item)) = item else {
            anyhow::bail!("the API watch streams ended");
        };
        let out = match item {
            Ok(event) => state.handle(kind, event),
            Err(e) => {
                log_watch_error(kind, &e);
                continue;
            }
        };
        for event in out {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

type Tagged = (Kind, Result<Event<Object>, watcher::Error>);

/// Retry delays after a watch or list error: 100 ms doubling to at most 400 ms, each with up
/// to 20 % random jitter, back to 100 ms after any successful event (kube-runtime's
/// StreamBackoff resets on every `Ok`).
///
/// kube-rs' default (client-go's reflector: 800 ms doubling to 30 s) would leave a node's
/// Services stale for up to half a minute after an API outage ends; the dataplane keeps serving
/// the last state meanwhile, but changes made during the outage must be in the kernel within a
/// second of the API's return (issue #8). The cap is what bounds that: each watcher notices the
/// return at its next retry, at most 480 ms later, and the change still has to be listed or
/// watched, synced and committed (`cargo xtask soak --scenario outage` measures the whole path;
/// a 1 s cap measured 1.1 s). The price is at most 2.5 requests a second per watcher, ten per
/// node, while the API is unreachable, each answered cheaply (connection refused) or throttled
/// by the API server's priority and fairness; the jitter spreads the nodes' retries.
struct ReconnectBackoff {
    next: std::time::Duration,
}

impl ReconnectBackoff {
    const MIN: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_millis(400);

    fn new() -> Self {
        ReconnectBackoff { next: Self::MIN }
    }
}

impl Iterator for ReconnectBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter = base.mul_f64(rand::random::<f64>() * 0.2);
        Some(base + jitter)
    }
}

impl kube::runtime::utils::Backoff for ReconnectBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// One kind's watcher with `ReconnectBackoff`, its events converted to `Object`s.
fn typed_watch<K>(
    client: &::kube::Client,
    kind: Kind,
    config: watcher::Config,
    wrap: fn(K) -> Object,
) -> std::pin::Pin<Box<dyn Stream<Item = Tagged> + Send>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    watcher::watcher(api, config)
        .backoff(ReconnectBackoff::new())
        .map(move |r| (kind, r.map(|e| convert(e, wrap))))
        .boxed()
}

fn convert<K>(event: Event<K>, wrap: fn(K) -> Object) -> Event<Object> {
    match event {
        Event::Apply(o) => Event::Apply(wrap(o)),
        Event::Delete(o) => Event::Delete(wrap(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wrap(o)),
        Event::InitDone => Event::InitDone,
    }
}

fn log_watch_error(kind: Kind, e: &watcher::Error) {
    match e {
        // Expected after a long disconnect or etcd compaction: the watcher relists.
        watcher::Error::WatchError(status) if status.code == 410 => {
            tracing::info!(%kind, "watch resourceVersion expired (410 Gone); relisting")
        }
        _ => tracing::warn!(%kind, "watch error (retrying within a second): {e}"),
    }
}

#[derive(Default)]
struct KindState {
    /// Every object of this kind the receiver holds, with the resourceVersion last sent.
    known: HashMap<ObjectRef, Option<String>>,
    /// During a (re)list: the objects listed so far.
    relisting: Option<HashSet<ObjectRef>>,
    listed_once: bool,
}

#[derive(Default)]
struct State {
    kinds: HashMap<Kind, KindState>,
    synced: bool,
}

const ALL_KINDS: [Kind; 4] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::ServiceCidr,
    Kind::Node,
];

fn resource_version(object: &Object) -> Option<String> {
    match object {
        Object::Service(o) => o.metadata.resource_version.clone(),
        Object::EndpointSlice(o) => o.metadata.resource_version.clone(),
        Object::ServiceCidr(o) => o.metadata.resource_version.clone(),
        Object::Node(o) => o.metadata.resource_version.clone(),
    }
}

impl State {
    /// One watcher event -> the `SourceEvent`s it implies (pure).
    fn handle(&mut self, kind: Kind, event: Event<Object>) -> Vec<SourceEvent> {
        let ks = self.kinds.entry(kind).or_default();
        let mut out = Vec::new();
        match event {
            Event::Init => ks.relisting = Some(HashSet::new()),
            Event::InitApply(object) => {
                let r = object_ref(&object);
                if let Some(seen) = ks.relisting.as_mut() {
                    seen.insert(r.clone());
                }
                apply(ks, r, object, &mut out);
            }
            Event::Apply(object) => {
                let r = object_ref(&object);
                apply(ks, r, object, &mut out);
            }
            Event::Delete(object) => {
                let r = object_ref(&object);
                ks.known.remove(&r);
                out.push(SourceEvent::Delete {
                    origin: Origin::Api,
                    object: r,
                });
            }
            Event::InitDone => {
                let seen = ks.relisting.take().unwrap_or_default();
                let mut gone: Vec<ObjectRef> = ks
                    .known
                    .keys()
                    .filter(|r| !seen.contains(*r))
                    .cloned()
                    .collect();
                gone.sort();
                for r in gone {
                    ks.known.remove(&r);
                    out.push(SourceEvent::Delete {
                        origin: Origin::Api,
                        object: r,
                    });
                }
                ks.listed_once = true;
                if !self.synced
                    && ALL_KINDS
                        .iter()
                        .all(|k| self.kinds.get(k).is_some_and(|s| s.listed_once))
                {
                    self.synced = true;
                    out.push(SourceEvent::Synced);
                }
            }
        }
        out
    }
}

/// Send an object unless the receiver already holds this exact resourceVersion of it (a
/// relist re-delivers every object).
fn apply(ks: &mut KindState, r: ObjectRef, object: Object, out: &mut Vec<SourceEvent>) {
    let rv = resource_version(&object);
    if rv.is_some() && ks.known.get(&r) == Some(&rv) {
        return;
    }
    ks.known.insert(r, rv);
    out.push(SourceEvent::Apply {
        origin: Origin::Api,
        object,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::utils::Backoff as _;

    #[test]
    fn reconnect_backoff_is_capped_at_400_ms_and_resets() {
        let mut b = ReconnectBackoff::new();
        let delays: Vec<_> = (&mut b).take(8).collect();
        // 100 ms, 200, then 400 ms for ever, each plus at most 20 % jitter.
        let bases = [100u64, 200, 400, 400, 400, 400, 400, 400];
        for (d, base) in delays.iter().zip(bases) {
            let base = std::time::Duration::from_millis(base);
            assert!(
                *d >= base && *d <= base.mul_f64(1.2),
                "{d:?} vs base {base:?}"
            );
        }
        b.reset();
        assert!(b.next().unwrap() <= std::time::Duration::from_millis(120));
    }

    fn svc(name: &str, rv: &str) -> Object {
        Object::Service(Box::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }))
    }

    fn node(name: &str) -> Object {
        Object::Node(Box::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some("1".into()),
                ..Default::default()
            },
            ..Default::default()
        }))
    }

    fn summary(events: &[SourceEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                SourceEvent::Apply { object, .. } => format!("apply {}", object_ref(object)),
                SourceEvent::Delete { object, .. } => format!("delete {object}"),
                SourceEvent::Synced => "synced".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn synced_once_after_all_four_lists_and_relist_deletes_what_vanished() {
        let mut st = State::default();
        let mut all = Vec::new();
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::ServiceCidr] {
            all.extend(st.handle(kind, Event::Init));
            if kind == Kind::Service {
                all.extend(st.handle(kind, Event::InitApply(svc("a", "1"))));
                all.extend(st.handle(kind, Event::InitApply(svc("b", "2"))));
            }
            all.extend(st.handle(kind, Event::InitDone));
        }
        assert_eq!(summary(&all), ["apply Service ns/a", "apply Service ns/b"]);
        all = st.handle(Kind::Node, Event::Init);
        all.extend(st.handle(Kind::Node, Event::InitApply(node("n"))));
        all.extend(st.handle(Kind::Node, Event::InitDone));
        assert_eq!(summary(&all), ["apply Node n", "synced"]);

        // Watch events.
        let ev = st.handle(Kind::Service, Event::Apply(svc("a", "3")));
        assert_eq!(summary(&ev), ["apply Service ns/a"]);
        let ev = st.handle(Kind::Service, Event::Delete(svc("b", "4")));
        assert_eq!(summary(&ev), ["delete Service ns/b"]);

        // A relist (after 410): unchanged objects are not re-sent, new ones are, vanished
        // ones are deleted; Synced is not sent again.
        let mut ev = st.handle(Kind::Service, Event::Init);
        ev.extend(st.handle(Kind::Service, Event::InitApply(svc("c", "6"))));
        ev.extend(st.handle(Kind::Service, Event::InitDone));
        assert_eq!(summary(&ev), ["apply Service ns/c", "delete Service ns/a"]);
        let mut ev = st.handle(Kind::Service, Event::Init);
        ev.extend(st.handle(Kind::Service, Event::InitApply(svc("c", "6"))));
        ev.extend(st.handle(Kind::Service, Event::InitDone));
        assert!(ev.is_empty(), "{:?}", summary(&ev));
    }
}
