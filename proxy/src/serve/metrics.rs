//! kube-proxy's metrics (pkg/proxy/metrics/metrics.go), same names, types and buckets, in
//! the OpenMetrics text format that Prometheus scrapes.
//!
//! prometheus-client appends `_total` to counter names when encoding, so counters are
//! registered without it: `kubeproxy_sync_proxy_rules_endpoint_changes` is exposed as
//! `kubeproxy_sync_proxy_rules_endpoint_changes_total`, exactly kube-proxy's sample name.
//! Upstream has a few gauges whose names end in `_total`
//! (`kubeproxy_sync_proxy_rules_iptables_total`, `…_no_local_endpoints_total`); those are
//! registered with the full name.
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

use crate::model::{PendingChanges, Snapshot};

type Labels = Vec<(String, String)>;
type FGauge = Gauge<f64, AtomicU64>;

/// OpenMetrics content type, as prometheus-client encodes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    registry: Registry,
    pub sync_proxy_rules_duration: Histogram,
    pub sync_full_proxy_rules_duration: Histogram,
    pub sync_partial_proxy_rules_duration: Histogram,
    pub sync_proxy_rules_last_timestamp: FGauge,
    pub sync_proxy_rules_last_queued_timestamp: FGauge,
    pub network_programming_duration: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub iptables_restore_failures_total: Counter,
    pub iptables_partial_restore_failures_total: Counter,
    pub nftables_sync_failures_total: Counter,
    pub nftables_cleanup_failures_total: Counter,
    /// shunt's own: ebpf mode sync failures (kube-proxy has no ebpf mode).
    pub ebpf_sync_failures_total: Counter,
    /// `kubeproxy_sync_proxy_rules_iptables_total{table}` (iptables mode only).
    pub iptables_rules_total: Family<Labels, Gauge>,
    /// shunt's own: rules/objects per table for the other modes.
    pub rules_total: Family<Labels, Gauge>,
    /// `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`.
    pub no_local_endpoints_total: Family<Labels, Gauge>,
    pub proxy_healthz_total: Family<Labels, Counter>,
    pub proxy_livez_total: Family<Labels, Counter>,
    /// shunt's own: objects skipped as invalid (one per warning).
    pub invalid_objects_total: Counter,
    /// shunt's own: stale UDP conntrack entries deleted after syncs.
    pub conntrack_entries_deleted_total: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// metrics.go: ExponentialBuckets(0.001, 2, 15) for the sync durations.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// metrics.go NetworkProgrammingLatency buckets: 0.25s..0.5s, 1s..59s, 60s..115s, 120s..300s.
fn network_programming_buckets() -> Vec<f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
        .collect()
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let sync_proxy_rules_duration = Histogram::new(sync_buckets());
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_proxy_rules_duration.clone(),
        );
        let sync_full_proxy_rules_duration = Histogram::new(sync_buckets());
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            sync_full_proxy_rules_duration.clone(),
        );
        let sync_partial_proxy_rules_duration = Histogram::new(sync_buckets());
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            sync_partial_proxy_rules_duration.clone(),
        );
        let sync_proxy_rules_last_timestamp = FGauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            sync_proxy_rules_last_timestamp.clone(),
        );
        let sync_proxy_rules_last_queued_timestamp = FGauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            sync_proxy_rules_last_queued_timestamp.clone(),
        );
        let network_programming_duration = Histogram::new(network_programming_buckets());
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming_duration.clone(),
        );
        let endpoint_changes_pending = Gauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            endpoint_changes_pending.clone(),
        );
        let endpoint_changes_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes_total.clone(),
        );
        let service_changes_pending = Gauge::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            service_changes_pending.clone(),
        );
        let service_changes_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes_total.clone(),
        );
        let iptables_restore_failures_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            iptables_restore_failures_total.clone(),
        );
        let iptables_partial_restore_failures_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            iptables_partial_restore_failures_total.clone(),
        );
        let nftables_sync_failures_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            "Cumulative proxy nftables sync failures",
            nftables_sync_failures_total.clone(),
        );
        let nftables_cleanup_failures_total = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
            "Cumulative proxy nftables cleanup failures",
            nftables_cleanup_failures_total.clone(),
        );
        let ebpf_sync_failures_total = Counter::default();
        registry.register(
            "shunt_sync_proxy_rules_ebpf_sync_failures",
            "Cumulative ebpf-mode sync failures",
            ebpf_sync_failures_total.clone(),
        );
        let iptables_rules_total = Family::<Labels, Gauge>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            iptables_rules_total.clone(),
        );
        let rules_total = Family::<Labels, Gauge>::default();
        registry.register(
            "shunt_sync_proxy_rules_total",
            "Rules (nftables, eBPF map entries) in the programmed state, by table",
            rules_total.clone(),
        );
        let no_local_endpoints_total = Family::<Labels, Gauge>::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            no_local_endpoints_total.clone(),
        );
        let proxy_healthz_total = Family::<Labels, Counter>::default();
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            proxy_healthz_total.clone(),
        );
        let proxy_livez_total = Family::<Labels, Counter>::default();
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            proxy_livez_total.clone(),
        );
        let invalid_objects_total = Counter::default();
        registry.register(
            "shunt_invalid_objects",
            "Objects skipped because they are invalid",
            invalid_objects_total.clone(),
        );
        let conntrack_entries_deleted_total = Counter::default();
        registry.register(
            "shunt_conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted after syncs",
            conntrack_entries_deleted_total.clone(),
        );
        Metrics {
            registry,
            sync_proxy_rules_duration,
            sync_full_proxy_rules_duration,
            sync_partial_proxy_rules_duration,
            sync_proxy_rules_last_timestamp,
            sync_proxy_rules_last_queued_timestamp,
            network_programming_duration,
            endpoint_changes_pending,
            endpoint_changes_total,
            service_changes_pending,
            service_changes_total,
            iptables_restore_failures_total,
            iptables_partial_restore_failures_total,
            nftables_sync_failures_total,
            nftables_cleanup_failures_total,
            ebpf_sync_failures_total,
            iptables_rules_total,
            rules_total,
            no_local_endpoints_total,
            proxy_healthz_total,
            proxy_livez_total,
            invalid_objects_total,
            conntrack_entries_deleted_total,
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; prometheus-client only fails on fmt errors.
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }

    pub fn set_pending(&self, pending: PendingChanges) {
        self.service_changes_pending
            .set(i64::try_from(pending.services).unwrap_or(i64::MAX));
        self.endpoint_changes_pending
            .set(i64::try_from(pending.endpoint_slices).unwrap_or(i64::MAX));
    }

    /// kubeproxy_sync_proxy_rules_no_local_endpoints_total as the proxiers count it: service
    /// ports with a Local policy and no local endpoints, internal and external separately
    /// (external only when something external reaches the port).
    pub fn set_no_local_endpoints(&self, snapshots: &[Snapshot]) {
        let (mut internal, mut external) = (0i64, 0i64);
        for snap in snapshots {
            for state in snap.services.values() {
                if !state.local_endpoints.is_empty() {
                    continue;
                }
                if state.port.internal_policy_local {
                    internal += 1;
                }
                if state.port.external_policy_local && state.port.externally_accessible() {
                    external += 1;
                }
            }
        }
        self.no_local_endpoints_total
            .get_or_create(&vec![("traffic_policy".into(), "internal".into())])
            .set(internal);
        self.no_local_endpoints_total
            .get_or_create(&vec![("traffic_policy".into(), "external".into())])
            .set(external);
    }

    pub fn set_rules_total(&self, mode: &str, rules: &[(String, u64)]) {
        let family = if mode == "iptables" {
            &self.iptables_rules_total
        } else {
            &self.rules_total
        };
        for (table, count) in rules {
            family
                .get_or_create(&vec![("table".into(), table.clone())])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// A sync failed in `mode`; `partial` if it was a partial sync.
    pub fn count_sync_failure(&self, mode: &str, partial: bool) {
        match mode {
            "iptables" => {
                self.iptables_restore_failures_total.inc();
                if partial {
                    self.iptables_partial_restore_failures_total.inc();
                }
            }
            "nftables" => {
                self.nftables_sync_failures_total.inc();
            }
            _ => {
                self.ebpf_sync_failures_total.inc();
            }
        }
    }

    pub fn count_http(&self, livez: bool, code: u16) {
        let family = if livez {
            &self.proxy_livez_total
        } else {
            &self.proxy_healthz_total
        };
        family
            .get_or_create(&vec![("code".into(), code.to_string())])
            .inc();
    }
}

/// Seconds since the Unix epoch, for the *_timestamp_seconds gauges.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_kube_proxy_names() {
        let m = Metrics::new();
        m.sync_proxy_rules_duration.observe(0.01);
        m.sync_full_proxy_rules_duration.observe(0.01);
        m.sync_partial_proxy_rules_duration.observe(0.002);
        m.network_programming_duration.observe(1.5);
        m.endpoint_changes_total.inc();
        m.service_changes_total.inc();
        m.count_sync_failure("nftables", false);
        m.count_sync_failure("iptables", true);
        m.count_http(false, 200);
        m.count_http(true, 503);
        m.invalid_objects_total.inc();
        m.set_pending(PendingChanges {
            services: 2,
            endpoint_slices: 3,
        });
        m.set_rules_total("iptables", &[("nat".into(), 12)]);
        m.set_no_local_endpoints(&[]);
        m.sync_proxy_rules_last_timestamp
            .set(unix_seconds(SystemTime::now()));
        let text = m.encode();
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds ",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 0",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 3",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_pending 2",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 1",
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total 0",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 12",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "kubeproxy_proxy_livez_total{code=\"503\"} 1",
            "shunt_invalid_objects_total 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn network_programming_buckets_match_upstream() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 2 + 59 + 12 + 7);
        assert_eq!(&b[..3], &[0.25, 0.5, 1.0]);
        assert_eq!(b[60], 59.0);
        assert_eq!(b[61], 60.0);
        assert_eq!(b[72], 115.0);
        assert_eq!(b[73], 120.0);
        assert_eq!(*b.last().unwrap(), 300.0);
    }
}
