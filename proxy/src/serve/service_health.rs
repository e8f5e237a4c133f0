//! healthCheckNodePort servers (pkg/proxy/healthcheck/service_health.go): one HTTP listener
//! per Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`, on the node's
//! NodePort addresses. It answers 200 while the Service has local ready endpoints and the
//! proxy is healthy, 503 otherwise, so that load balancers only send traffic to nodes that
//! can serve it locally.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use super::health::ProxyHealth;
use crate::model::{IpFamily, NodePortIps, ServiceKey, Snapshot};

struct Instance {
    port: u16,
    addrs: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// Bound addresses (with the actual port; differs from `port` only when it is 0 in tests).
    bound: Vec<SocketAddr>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Aborting the serving task drops its listener, which closes the port at once
        // (upstream closes the http.Server the same way when a Service goes away).
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct Shared {
    /// Local ready endpoints per Service.
    endpoints: HashMap<ServiceKey, usize>,
}

/// Owns the listeners; call [`sync`](Self::sync) after each successful sync.
pub struct ServiceHealthServer {
    health: Arc<ProxyHealth>,
    shared: Arc<Mutex<Shared>>,
    instances: BTreeMap<ServiceKey, Instance>,
}

/// What the snapshots ask for: Service → health check port, local ready endpoint counts, and
/// the addresses to listen on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub services: BTreeMap<ServiceKey, u16>,
    pub endpoints: BTreeMap<ServiceKey, usize>,
    pub addrs: Vec<IpAddr>,
}

impl Wanted {
    /// From the per-family snapshots (primary first).
    ///
    /// Endpoints are counted as EndpointsMap.LocalReadyEndpoints does: every local, ready
    /// endpoint of every port of the Service. Families are counted from the first family
    /// that has the Service, as upstream's primary-family proxier owns the listener.
    pub fn from_snapshots(snapshots: &[Snapshot]) -> Wanted {
        let mut w = Wanted::default();
        for snap in snapshots {
            let mut counted_here: BTreeMap<ServiceKey, usize> = BTreeMap::new();
            for (name, state) in &snap.services {
                let Some(port) = state.port.health_check_node_port else {
                    continue;
                };
                if !state.port.external_policy_local || port == 0 {
                    continue;
                }
                let key = name.service.clone();
                if w.endpoints.contains_key(&key) {
                    continue; // an earlier (primary) family already counted it
                }
                w.services.entry(key.clone()).or_insert(port);
                *counted_here.entry(key).or_default() += state
                    .endpoints
                    .iter()
                    .filter(|e| e.is_local && e.ready)
                    .count();
            }
            w.endpoints.extend(counted_here);
        }
        w.addrs = listen_addrs(snapshots);
        w
    }
}

/// service_health.go: all addresses ("0.0.0.0", which Go binds dual-stack) when
/// nodePortAddresses match everything, else the node IPs they select.
fn listen_addrs(snapshots: &[Snapshot]) -> Vec<IpAddr> {
    let all_local_v6 = snapshots.iter().any(|s| {
        s.network.family == IpFamily::V6 && s.network.node_port_ips == NodePortIps::AllLocal
    });
    let mut addrs = Vec::new();
    for s in snapshots {
        match &s.network.node_port_ips {
            NodePortIps::AllLocal => addrs.push(match s.network.family {
                IpFamily::V4 if all_local_v6 => continue,
                IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                // [::] without IPV6_V6ONLY (Linux's default) also accepts IPv4, like Go's
                // wildcard listener.
                IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            }),
            NodePortIps::Addresses(ips) => {
                for ip in ips {
                    // A dual-stack [::] listener already covers IPv4 addresses; binding one
                    // of them as well would fail with EADDRINUSE.
                    if all_local_v6 && ip.is_ipv4() {
                        continue;
                    }
                    addrs.push(*ip);
                }
            }
        }
    }
    if snapshots.is_empty() {
        addrs.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

impl ServiceHealthServer {
    pub fn new(health: Arc<ProxyHealth>) -> ServiceHealthServer {
        ServiceHealthServer {
            health,
            shared: Arc::new(Mutex::new(Shared::default())),
            instances: BTreeMap::new(),
        }
    }

    /// Open listeners for new Services, close those of Services that are gone (or whose port
    /// or addresses changed), and publish endpoint counts (SyncServices + SyncEndpoints).
    /// Must run inside a tokio runtime. A port that cannot be bound is logged and retried at
    /// the next sync, as upstream does.
    pub fn sync(&mut self, wanted: &Wanted) {
        self.instances.retain(|key, inst| {
            let keep = wanted.services.get(key) == Some(&inst.port) && inst.addrs == wanted.addrs;
            if !keep {
                info!(service = %key, port = inst.port, "closing healthcheck");
            }
            keep
        });
        {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared.endpoints = wanted
                .endpoints
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
        }
        for (key, port) in &wanted.services {
            if self.instances.contains_key(key) {
                continue;
            }
            match self.open(key, *port, &wanted.addrs) {
                Ok(inst) => {
                    info!(service = %key, port, "opened healthcheck");
                    self.instances.insert(key.clone(), inst);
                }
                Err(e) => {
                    error!(service = %key, port, "failed to start healthcheck: {e}");
                }
            }
        }
    }

    /// Addresses a Service's health check listens on (for tests and logs).
    pub fn bound(&self, key: &ServiceKey) -> Option<&[SocketAddr]> {
        self.instances.get(key).map(|i| i.bound.as_slice())
    }

    fn open(&self, key: &ServiceKey, port: u16, addrs: &[IpAddr]) -> std::io::Result<Instance> {
        let mut inst = Instance {
            port,
            addrs: addrs.to_vec(),
            tasks: Vec::new(),
            bound: Vec::new(),
        };
        for ip in addrs {
            // Bind synchronously so a taken port is reported now; on error `inst` is dropped
            // and whatever was opened for this Service is closed again (as closeAll upstream).
            let listener = std::net::TcpListener::bind(SocketAddr::new(*ip, port))?;
            listener.set_nonblocking(true)?;
            inst.bound.push(listener.local_addr()?);
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let app = Router::new().fallback(hc_handler).with_state(HcState {
                key: key.clone(),
                health: self.health.clone(),
                shared: self.shared.clone(),
            });
            let key = key.clone();
            inst.tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    error!(service = %key, "healthcheck server failed: {e}");
                }
                debug!(service = %key, "healthcheck closed");
            }));
        }
        Ok(inst)
    }
}

#[derive(Clone)]
struct HcState {
    key: ServiceKey,
    health: Arc<ProxyHealth>,
    shared: Arc<Mutex<Shared>>,
}

async fn hc_handler(State(st): State<HcState>) -> Response {
    let count = st
        .shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .endpoints
        .get(&st.key)
        .copied()
        .unwrap_or(0);
    let healthy = st.health.is_healthy();
    let status = if count != 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::HeaderName::from_static("x-load-balancing-endpoint-weight"),
                HeaderValue::from(count),
            ),
        ],
        hc_body(&st.key, count, healthy),
    )
        .into_response()
}

/// service_health.go's body (a dedented, tab-indented JSON object).
pub fn hc_body(key: &ServiceKey, count: usize, healthy: bool) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        q(&key.namespace),
        q(&key.name)
    )
}
