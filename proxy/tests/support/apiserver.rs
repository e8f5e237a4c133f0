//! An in-process double of the Kubernetes API server, enough of it for kube-rs watchers:
//! list and watch of services, endpointslices, servicecidrs and nodes.
//!
//! It follows the API conventions (https://kubernetes.io/docs/reference/using-api/api-concepts/):
//! * one global resourceVersion, bumped by every change and written into the object;
//! * `GET <collection>` returns a `<Kind>List` whose `metadata.resourceVersion` is the current
//!   one; list items carry no apiVersion/kind, as the real server omits them;
//! * `GET <collection>?watch=true&resourceVersion=N` streams newline-delimited JSON watch
//!   events with chunked encoding: the changes after N, then live ones. With a label or field
//!   selector an object that starts matching arrives as ADDED and one that stops matching as
//!   DELETED, as the watch cache does. `resourceVersion` "" or "0" starts with synthetic
//!   ADDED events for the current state;
//! * with `allowWatchBookmarks=true` a BOOKMARK carries the current resourceVersion at the
//!   start of a watch and whenever a change is filtered out for that watcher;
//! * a watch from a resourceVersion older than the compacted history gets an ERROR event with
//!   a Status of code 410 (reason Expired) and the stream ends, as the real server answers;
//! * `limit`/`continue` paginate lists;
//! * `timeoutSeconds` ends the watch.
//!
//! Test hooks mutate objects, compact history and drop all open watches, optionally all in one
//! critical section so that a change happens while no watch is connected. `stop` takes the
//! whole server down (listener closed: connections are refused; open connections closed) and
//! `restart` brings it back on the same address with its state, like an apiserver outage.
#![allow(dead_code)] // each test binary uses a different part of the double

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The collections served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Services,
    EndpointSlices,
    ServiceCidrs,
    Nodes,
}

impl Res {
    const ALL: [Res; 4] = [
        Res::Services,
        Res::EndpointSlices,
        Res::ServiceCidrs,
        Res::Nodes,
    ];

    fn path(self) -> &'static str {
        match self {
            Res::Services => "/api/v1/services",
            Res::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::ServiceCidrs => "/apis/networking.k8s.io/v1/servicecidrs",
            Res::Nodes => "/api/v1/nodes",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Res::Services | Res::Nodes => "v1",
            Res::EndpointSlices => "discovery.k8s.io/v1",
            Res::ServiceCidrs => "networking.k8s.io/v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
            Res::ServiceCidrs => "ServiceCIDR",
            Res::Nodes => "Node",
        }
    }
    fn of_kind(kind: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| r.kind() == kind)
    }
    fn namespaced(self) -> bool {
        matches!(self, Res::Services | Res::EndpointSlices)
    }
}

type Key = (Res, String, String);

struct Change {
    rv: u64,
    res: Res,
    old: Option<Value>,
    /// `None`: deleted.
    new: Option<Value>,
}

struct Watch {
    res: Res,
    labels: Selector,
    fields: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// The state behind the double. Hooks get `&mut Store` inside one critical section.
pub struct Store {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    floor: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    lists: HashMap<Res, usize>,
    watch_requests: HashMap<Res, usize>,
    /// The `resourceVersion` parameter of every watch request, in order.
    watch_from: Vec<(Res, String)>,
    /// Requests answered since the server started (all endpoints).
    requests: usize,
    /// Set by `ApiServer::stop` while the server shuts down: a request that still reaches the
    /// handler on an old connection is refused instead of served.
    down: bool,
}

impl Store {
    /// Create or replace an object (its `kind` picks the collection). Returns the new
    /// resourceVersion.
    pub fn upsert(&mut self, mut object: Value) -> u64 {
        let kind = object["kind"]
            .as_str()
            .expect("object without kind")
            .to_owned();
        let res = Res::of_kind(&kind).unwrap_or_else(|| panic!("kind {kind} not served"));
        let name = object["metadata"]["name"]
            .as_str()
            .expect("no name")
            .to_owned();
        let ns = if res.namespaced() {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        self.rv += 1;
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        if res.namespaced() {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.entry("uid")
            .or_insert_with(|| json!(format!("uid-{}-{ns}-{name}", kind.to_lowercase())));
        object["apiVersion"] = json!(res.api_version());
        let old = self.objects.insert((res, ns, name), object.clone());
        self.record(Change {
            rv: self.rv,
            res,
            old,
            new: Some(object),
        });
        self.rv
    }

    /// Delete an object; returns whether it existed.
    pub fn delete(&mut self, res: Res, namespace: &str, name: &str) -> bool {
        let Some(old) = self
            .objects
            .remove(&(res, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        self.rv += 1;
        self.record(Change {
            rv: self.rv,
            res,
            old: Some(old),
            new: None,
        });
        true
    }

    /// Forget the history: watches from any resourceVersion before now get 410 Gone.
    pub fn compact(&mut self) {
        self.floor = self.rv;
        self.history.clear();
    }

    /// End every open watch stream (like an apiserver restart or a load balancer reset).
    pub fn drop_watches(&mut self) {
        self.watches.clear();
    }

    pub fn list_requests(&self, res: Res) -> usize {
        self.lists.get(&res).copied().unwrap_or(0)
    }

    pub fn watch_requests(&self, res: Res) -> usize {
        self.watch_requests.get(&res).copied().unwrap_or(0)
    }

    /// The `resourceVersion` of each watch request for `res`, oldest first ("" if absent).
    pub fn watch_resource_versions(&self, res: Res) -> Vec<String> {
        self.watch_from
            .iter()
            .filter(|(r, _)| *r == res)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn requests(&self) -> usize {
        self.requests
    }

    /// Every stored object, with apiVersion and kind.
    pub fn objects(&self) -> Vec<Value> {
        self.objects
            .iter()
            .map(|((res, _, _), o)| with_type(*res, o.clone()))
            .collect()
    }

    pub fn open_watches(&self) -> usize {
        self.watches.iter().filter(|w| !w.tx.is_closed()).count()
    }

    fn record(&mut self, change: Change) {
        let mut watches = std::mem::take(&mut self.watches);
        watches.retain(|w| {
            if w.res != change.res {
                return true;
            }
            let line = match event_for(w, &change) {
                Some(ev) => ev,
                None if w.bookmarks => bookmark(w.res, change.rv),
                None => return true,
            };
            w.tx.send(line).is_ok()
        });
        self.watches = watches;
        self.history.push(change);
    }
}

/// The watch event a change means for one watcher, honouring its selectors.
fn event_for(w: &Watch, change: &Change) -> Option<Bytes> {
    let matches = |o: &Option<Value>| {
        o.as_ref()
            .is_some_and(|o| w.labels.matches_labels(o) && w.fields.matches_fields(o))
    };
    let (was, is) = (matches(&change.old), matches(&change.new));
    let (ty, object) = match (was, is, &change.new) {
        (true, true, Some(new)) => ("MODIFIED", new.clone()),
        (false, true, Some(new)) => ("ADDED", new.clone()),
        (true, false, Some(new)) => ("DELETED", new.clone()),
        (true, false, None) => {
            // A deleted object is sent as last seen, at the deletion's resourceVersion.
            let mut old = change.old.clone().expect("deleted object");
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", old)
        }
        _ => return None,
    };
    Some(line(ty, with_type(change.res, object)))
}

fn with_type(res: Res, mut object: Value) -> Value {
    object["apiVersion"] = json!(res.api_version());
    object["kind"] = json!(res.kind());
    object
}

fn line(ty: &str, object: Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("json");
    s.push(b'\n');
    Bytes::from(s)
}

fn bookmark(res: Res, rv: u64) -> Bytes {
    line(
        "BOOKMARK",
        json!({"apiVersion": res.api_version(), "kind": res.kind(),
               "metadata": {"resourceVersion": rv.to_string()}}),
    )
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A label or field selector: comma-separated `k`, `!k`, `k=v`, `k==v`, `k!=v` terms.
#[derive(Clone, Debug, Default)]
struct Selector(Vec<Term>);

#[derive(Clone, Debug)]
enum Term {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
}

impl Selector {
    fn parse(s: &str) -> Selector {
        Selector(
            s.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| {
                    if let Some((k, v)) = t.split_once("!=") {
                        Term::NotEq(k.trim().into(), v.trim().into())
                    } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                        Term::Eq(k.trim().into(), v.trim().into())
                    } else if let Some(k) = t.strip_prefix('!') {
                        Term::NotExists(k.trim().into())
                    } else {
                        Term::Exists(t.into())
                    }
                })
                .collect(),
        )
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Exists(k) => get(k).is_some(),
            Term::NotExists(k) => get(k).is_none(),
            Term::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
            Term::NotEq(k, v) => get(k).as_deref() != Some(v.as_str()),
        })
    }

    fn matches_labels(&self, o: &Value) -> bool {
        self.matches(|k| o["metadata"]["labels"][k].as_str().map(str::to_owned))
    }

    /// The field selectors every resource supports: metadata.name and metadata.namespace.
    fn matches_fields(&self, o: &Value) -> bool {
        self.matches(|k| match k {
            "metadata.name" => o["metadata"]["name"].as_str().map(str::to_owned),
            "metadata.namespace" => Some(
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            _ => None,
        })
    }

    fn field_keys_supported(&self) -> bool {
        self.0.iter().all(|t| {
            let k = match t {
                Term::Exists(k) | Term::NotExists(k) | Term::Eq(k, _) | Term::NotEq(k, _) => k,
            };
            k == "metadata.name" || k == "metadata.namespace"
        })
    }
}

/// A running double. Dropping it stops the server.
pub struct ApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    serving: Mutex<Option<Serving>>,
}

/// The accept loop while the server is up.
struct Serving {
    task: tokio::task::JoinHandle<()>,
    shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.serving.lock().expect("serving lock").take() {
            s.task.abort();
        }
    }
}

/// Serve `store` on `listener` until the returned sender fires. Graceful shutdown (axum
/// `with_graceful_shutdown`) stops accepting at once, drops the listener, tells every
/// connection to close once its in-flight request is done (hyper closes idle keep-alive
/// connections immediately) and resolves when all connections are gone.
fn serve(listener: tokio::net::TcpListener, store: Arc<Mutex<Store>>) -> Serving {
    let app = axum::Router::new().fallback(handle).with_state(store);
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    Serving { task, shutdown }
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let store = Arc::new(Mutex::new(Store {
            rv: 1,
            floor: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            watches: Vec::new(),
            lists: HashMap::new(),
            watch_requests: HashMap::new(),
            watch_from: Vec::new(),
            requests: 0,
            down: false,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let serving = serve(listener, store.clone());
        ApiServer {
            addr,
            store,
            serving: Mutex::new(Some(serving)),
        }
    }

    /// Take the server down: end every watch stream, stop accepting (new connections are
    /// refused, as from a stopped apiserver) and close every open connection. Returns once no
    /// connection is left. The state is kept for `restart`.
    pub async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .expect("serving lock")
            .take()
            .expect("stop: the double is not running");
        self.with(|s| {
            s.down = true;
            s.drop_watches();
        });
        let _ = serving.shutdown.send(());
        tokio::time::timeout(Duration::from_secs(10), serving.task)
            .await
            .expect("the double did not close its connections within 10 s")
            .expect("serve task");
    }

    /// Serve again on the same address with the same state (and history, so watches can
    /// resume from their resourceVersion unless `compact` was called meanwhile).
    pub async fn restart(&self) {
        let mut serving = self.serving.lock().expect("serving lock");
        assert!(serving.is_none(), "restart: the double is running");
        // std sets SO_REUSEADDR on Unix listeners, so the previous listener's connections
        // left in TIME_WAIT (the server closed them) do not block the bind.
        let listener = std::net::TcpListener::bind(self.addr)
            .unwrap_or_else(|e| panic!("rebind {}: {e}", self.addr));
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        self.with(|s| s.down = false);
        *serving = Some(serve(listener, self.store.clone()));
    }

    /// A kube client for this server: plain HTTP, no authentication.
    pub fn client(&self) -> kube::Client {
        let url: axum::http::Uri = format!("http://{}", self.addr).parse().expect("uri");
        let config = kube::Config::new(url);
        kube::Client::try_from(config).expect("kube client")
    }

    /// Run a hook in one critical section.
    pub fn with<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.store.lock().expect("store lock"))
    }

    pub fn upsert(&self, object: Value) -> u64 {
        self.with(|s| s.upsert(object))
    }

    pub fn delete(&self, res: Res, namespace: &str, name: &str) -> bool {
        self.with(|s| s.delete(res, namespace, name))
    }
}

async fn handle(
    State(store): State<Arc<Mutex<Store>>>,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(res) = Res::ALL.into_iter().find(|r| r.path() == uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status(404, "NotFound", &format!("no route {}", uri.path()))),
        )
            .into_response();
    };
    let labels = Selector::parse(q.get("labelSelector").map_or("", String::as_str));
    let fields = Selector::parse(q.get("fieldSelector").map_or("", String::as_str));
    if !fields.field_keys_supported() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(status(400, "BadRequest", "field label not supported")),
        )
            .into_response();
    }
    let matching = |o: &Value| labels.matches_labels(o) && fields.matches_fields(o);
    let mut store = store.lock().expect("store lock");
    if store.down {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(status(503, "ServiceUnavailable", "shutting down")),
        )
            .into_response();
    }
    store.requests += 1;

    if q.get("watch").map(String::as_str) != Some("true") {
        *store.lists.entry(res).or_default() += 1;
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((r, _, _), o)| *r == res && matching(o))
            .map(|(_, o)| {
                let mut o = o.clone();
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                o
            })
            .collect();
        // Pagination: `limit` and an opaque `continue` token. The token pins the
        // resourceVersion of the first page, as the real server's snapshot reads do; the double
        // keeps no snapshots, so a change between pages answers 410 Expired, like a continue
        // token whose revision was compacted.
        let offset = match q.get("continue").filter(|c| !c.is_empty()) {
            None => 0,
            Some(token) => {
                let parsed = token.split_once(':').and_then(|(rv, off)| {
                    Some((rv.parse::<u64>().ok()?, off.parse::<usize>().ok()?))
                });
                match parsed {
                    Some((rv, off)) if rv == store.rv => off,
                    _ => {
                        return (
                            StatusCode::GONE,
                            axum::Json(status(410, "Expired", "continue token expired")),
                        )
                            .into_response();
                    }
                }
            }
        };
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let total = items.len();
        let page: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
        let next = offset.saturating_add(page.len());
        let mut metadata = json!({"resourceVersion": store.rv.to_string()});
        if next < total {
            metadata["continue"] = json!(format!("{}:{next}", store.rv));
            metadata["remainingItemCount"] = json!(total - next);
        }
        let body = json!({
            "apiVersion": res.api_version(),
            "kind": format!("{}List", res.kind()),
            "metadata": metadata,
            "items": page,
        });
        return axum::Json(body).into_response();
    }

    *store.watch_requests.entry(res).or_default() += 1;
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let from = q.get("resourceVersion").map_or("", String::as_str);
    store.watch_from.push((res, from.to_owned()));
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let watch = Watch {
        res,
        labels: labels.clone(),
        fields: fields.clone(),
        bookmarks,
        tx,
    };
    let mut open = true;
    if from.is_empty() || from == "0" {
        // "Any" resourceVersion: the current state as ADDED events.
        for ((r, _, _), o) in &store.objects {
            if *r == res && matching(o) {
                let _ = watch.tx.send(line("ADDED", with_type(res, o.clone())));
            }
        }
    } else {
        let Ok(n) = from.parse::<u64>() else {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(status(400, "BadRequest", "invalid resourceVersion")),
            )
                .into_response();
        };
        if n < store.floor {
            // What the real server does for a watch from a compacted revision: 200, one
            // ERROR event carrying a 410 Status, end of stream.
            let msg = format!("too old resource version: {n} ({})", store.floor);
            let _ = watch.tx.send(line("ERROR", status(410, "Expired", &msg)));
            open = false;
        } else {
            for change in store.history.iter().filter(|c| c.rv > n && c.res == res) {
                if let Some(ev) = event_for(&watch, change) {
                    let _ = watch.tx.send(ev);
                }
            }
        }
    }
    if open {
        if bookmarks {
            let _ = watch.tx.send(bookmark(res, store.rv));
        }
        store.watches.push(watch);
    }
    drop(store);

    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let stream =
        futures::StreamExt::take_until(stream, tokio::time::sleep(Duration::from_secs(timeout)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}
