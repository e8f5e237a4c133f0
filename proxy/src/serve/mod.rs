//! HTTP: `/healthz` and `/livez` on --healthz-bind-address, `/metrics` on
//! --metrics-bind-address, and the per-Service healthCheckNodePort servers.
pub mod health;
pub mod metrics;
pub mod service_health;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{error, info};

pub use health::{HealthStatus, ProxyHealth};
pub use metrics::Metrics;
pub use service_health::ServiceHealthServer;

/// kube-proxy restarts a failed healthz/metrics server every 5 seconds (server.go
/// serveHealthz/serveMetrics, `wait.Until(fn, 5*time.Second, …)`) unless bindAddressHardFail.
const RESTART_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct HealthzState {
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
}

/// `/healthz` and `/livez` (proxy_health.go handlers).
pub fn healthz_router(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(HealthzState { health, metrics })
}

fn json_response(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn healthz(State(st): State<HealthzState>) -> Response {
    let status = st.health.status();
    let code = if status.healthz_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    st.metrics.count_http(false, code.as_u16());
    json_response(code, health::healthz_body(&status))
}

async fn livez(State(st): State<HealthzState>) -> Response {
    let status = st.health.status();
    let code = if status.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    st.metrics.count_http(true, code.as_u16());
    json_response(code, health::livez_body(&status))
}

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    mode: &'static str,
}

/// `/metrics`, plus what kube-proxy's metrics mux also serves that tools rely on:
/// `/proxyMode` (the mode, plain text) and `/healthz` ("ok").
pub fn metrics_router(metrics: Arc<Metrics>, mode: &'static str) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/proxyMode", get(proxy_mode))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(MetricsState { metrics, mode })
}

async fn metrics_handler(State(st): State<MetricsState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        st.metrics.encode(),
    )
        .into_response()
}

async fn proxy_mode(State(st): State<MetricsState>) -> &'static str {
    st.mode
}

/// Serve `app` on `addr` forever, rebinding every 5 s after a failure (kube-proxy's
/// behaviour without bindAddressHardFail). `listener`: an already-bound first listener.
pub async fn serve_forever(
    what: &'static str,
    addr: SocketAddr,
    mut listener: Option<tokio::net::TcpListener>,
    app: Router,
) {
    loop {
        let l = match listener.take() {
            Some(l) => Ok(l),
            None => tokio::net::TcpListener::bind(addr).await,
        };
        match l {
            Ok(l) => {
                info!(address = %addr, "starting {what} server");
                if let Err(e) = axum::serve(l, app.clone()).await {
                    error!(address = %addr, "{what} server failed: {e}");
                }
            }
            Err(e) => error!(address = %addr, "failed to start {what} server: {e}"),
        }
        tokio::time::sleep(RESTART_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests;
