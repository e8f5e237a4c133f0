//! The proxy's own health: kube-proxy's ProxyHealthServer (pkg/proxy/healthcheck/
//! proxy_health.go), for `/healthz`, `/livez` and the healthCheckNodePort servers.
//!
//! Semantics, as upstream: a sync is "queued" when a change arrives (QueuedUpdate) and the
//! proxy becomes unhealthy if the oldest queued change is not programmed (Updated) within
//! `health_timeout` (2 × syncPeriod, server.go). `/healthz` additionally requires the node to
//! be eligible: not being deleted and not tainted `ToBeDeletedByClusterAutoscaler`.
//!
//! One deliberate difference: upstream reports healthy before the first sync ("the proxier
//! is healthy while it's starting up"). shunt answers 503 until its first successful sync,
//! because shunt's contract is that `/healthz` 200 means the rules are in place; kube-proxy's
//! own probes only need the server to become healthy within the probe's grace period, which
//! this still satisfies.
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;

/// Taint the cluster autoscaler sets before deleting a node (proxy_health.go).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct Inner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// Shared between the sync runner (writer) and the HTTP handlers (readers).
#[derive(Debug)]
pub struct ProxyHealth {
    health_timeout: Duration,
    inner: Mutex<Inner>,
}

/// A point-in-time view, for the handlers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// Proxy health, ignoring node eligibility (`/livez`, service health checks).
    pub healthy: bool,
    pub node_eligible: bool,
    pub last_updated: Option<SystemTime>,
    pub current_time: SystemTime,
}

impl HealthStatus {
    /// `/healthz`: healthy and eligible.
    pub fn healthz_ok(&self) -> bool {
        self.healthy && self.node_eligible
    }
}

impl ProxyHealth {
    pub fn new(health_timeout: Duration) -> ProxyHealth {
        ProxyHealth {
            health_timeout,
            inner: Mutex::new(Inner {
                last_updated: None,
                oldest_pending: None,
                // Eligible until a Node event says otherwise (proxy_health.go).
                node_eligible: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the plain timestamps inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that needs a sync (QueuedUpdate): remember the oldest one.
    pub fn queued_update_at(&self, now: SystemTime) {
        let mut inner = self.lock();
        if inner.oldest_pending.is_none() {
            inner.oldest_pending = Some(now);
        }
    }

    pub fn queued_update(&self) {
        self.queued_update_at(SystemTime::now());
    }

    /// A sync succeeded (Updated): nothing is pending any more.
    pub fn updated_at(&self, now: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending = None;
        inner.last_updated = Some(now);
    }

    pub fn updated(&self) {
        self.updated_at(SystemTime::now());
    }

    /// proxy_health.go SyncNode: ineligible when deleting or tainted for deletion.
    pub fn sync_node(&self, node: &Node) {
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        self.lock().node_eligible = !(deleting || tainted);
    }

    /// This node's Node object is gone: the node is not eligible for traffic.
    pub fn node_deleted(&self) {
        self.lock().node_eligible = false;
    }

    pub fn status_at(&self, now: SystemTime) -> HealthStatus {
        let inner = self.lock();
        let late = inner.oldest_pending.is_some_and(|queued| {
            now.duration_since(queued).unwrap_or(Duration::ZERO) >= self.health_timeout
        });
        HealthStatus {
            healthy: inner.last_updated.is_some() && !late,
            node_eligible: inner.node_eligible,
            last_updated: inner.last_updated,
            current_time: now,
        }
    }

    pub fn status(&self) -> HealthStatus {
        self.status_at(SystemTime::now())
    }

    /// IsHealthy: proxy health without node eligibility.
    pub fn is_healthy(&self) -> bool {
        self.status().healthy
    }
}

/// The `/healthz` body, byte for byte as proxy_health.go prints it (Go's `%q` of a
/// time.Time, without the monotonic-clock suffix). When healthy, lastUpdated is the current
/// time, as upstream does for compatibility.
pub fn healthz_body(status: &HealthStatus) -> String {
    let last = if status.healthz_ok() {
        Some(status.current_time)
    } else {
        status.last_updated
    };
    format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": {}}}",
        go_time(last),
        go_time(Some(status.current_time)),
        status.node_eligible
    )
}

/// The `/livez` body (no nodeEligible).
pub fn livez_body(status: &HealthStatus) -> String {
    let last = if status.healthy {
        Some(status.current_time)
    } else {
        status.last_updated
    };
    format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
        go_time(last),
        go_time(Some(status.current_time))
    )
}

/// Go's `time.Time.String()` in UTC: "2006-01-02 15:04:05.999999999 +0000 UTC"; the zero
/// time for None ("0001-01-01 00:00:00 +0000 UTC").
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01 00:00:00 +0000 UTC".into();
    };
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push_str(" +0000 UTC");
    s
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn state_machine() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        // Before the first sync: unhealthy (shunt's contract), even with nothing queued.
        assert!(!h.status_at(t(0)).healthy);
        h.queued_update_at(t(0));
        assert!(!h.status_at(t(1)).healthy);
        h.updated_at(t(2));
        let s = h.status_at(t(3));
        assert!(s.healthy && s.healthz_ok());
        assert_eq!(s.last_updated, Some(t(2)));
        // A change queued and not synced stays healthy until health_timeout...
        h.queued_update_at(t(10));
        assert!(h.status_at(t(69)).healthy);
        // ...a later change does not move the oldest pending time...
        h.queued_update_at(t(50));
        // ...and at health_timeout the proxy is unhealthy.
        assert!(!h.status_at(t(70)).healthy);
        h.updated_at(t(71));
        assert!(
            h.status_at(t(500)).healthy,
            "nothing pending: healthy however old"
        );
    }

    #[test]
    fn node_eligibility() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        h.updated_at(t(0));
        let mut node = Node::default();
        h.sync_node(&node);
        assert!(h.status_at(t(1)).healthz_ok());
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        h.sync_node(&node);
        let s = h.status_at(t(1));
        assert!(s.healthy, "livez ignores eligibility");
        assert!(!s.healthz_ok());
        node.spec = None;
        h.sync_node(&node);
        assert!(h.status_at(t(1)).healthz_ok());
        node.metadata.deletion_timestamp = Some(Time(Default::default()));
        h.sync_node(&node);
        assert!(!h.status_at(t(1)).healthz_ok());
        node.metadata.deletion_timestamp = None;
        h.sync_node(&node);
        h.node_deleted();
        assert!(!h.status_at(t(1)).healthz_ok());
    }

    #[test]
    fn bodies_match_upstream_format() {
        let now = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        let healthy = HealthStatus {
            healthy: true,
            node_eligible: true,
            last_updated: Some(now - Duration::from_secs(5)),
            current_time: now,
        };
        assert_eq!(
            healthz_body(&healthy),
            "{\"lastUpdated\": \"2023-11-14 22:13:20.12 +0000 UTC\",\"currentTime\": \
             \"2023-11-14 22:13:20.12 +0000 UTC\", \"nodeEligible\": true}"
        );
        let starting = HealthStatus {
            healthy: false,
            node_eligible: true,
            last_updated: None,
            current_time: now,
        };
        assert_eq!(
            livez_body(&starting),
            "{\"lastUpdated\": \"0001-01-01 00:00:00 +0000 UTC\",\"currentTime\": \
             \"2023-11-14 22:13:20.12 +0000 UTC\"}"
        );
        let v: serde_json::Value = serde_json::from_str(&healthz_body(&starting)).unwrap();
        assert_eq!(v["nodeEligible"], serde_json::Value::Bool(true));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(
            go_time(Some(SystemTime::UNIX_EPOCH)),
            "1970-01-01 00:00:00 +0000 UTC"
        );
    }
}
