//! kube-proxy's conntrack settings: the `--conntrack-*` flags and the config file's
//! `conntrack:` section (KubeProxyConntrackConfiguration), with kube-proxy's defaults
//! (v1alpha1 defaults.go) and validation (validation.go
//! `validateKubeProxyConntrackConfiguration`: every number and duration must be >= 0).
//!
//! Meaning (cmd/kube-proxy/app/server_linux.go `setupConntrack`): a zero duration or a zero
//! `max_per_core` means "leave the kernel's value alone"; `nftables`/`iptables` modes apply
//! them as netfilter sysctls (`dataplane::conntrack_sysctl`), `ebpf` mode as the timeouts of
//! its own conntrack.
use std::time::Duration;

/// `--conntrack-max-per-core` default (defaults.go: 32 * 1024).
pub const DEFAULT_MAX_PER_CORE: u32 = 32 * 1024;
/// `--conntrack-min` default (defaults.go: 128 * 1024).
pub const DEFAULT_MIN: u32 = 128 * 1024;
/// `--conntrack-tcp-timeout-established` default (defaults.go: 24h).
pub const DEFAULT_TCP_ESTABLISHED: Duration = Duration::from_secs(24 * 3600);
/// `--conntrack-tcp-timeout-close-wait` default (defaults.go: 1h, nf_conntrack's
/// default for CLOSE_WAIT too).
pub const DEFAULT_TCP_CLOSE_WAIT: Duration = Duration::from_secs(3600);

/// Validated conntrack settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// Conntrack entries per CPU; 0 leaves `nf_conntrack_max` alone (then `min` is unused).
    pub max_per_core: u32,
    /// Floor for `max_per_core * CPUs`.
    pub min: u32,
    /// Idle timeout of an established TCP connection; 0 leaves the kernel's value.
    pub tcp_established_timeout: Duration,
    /// Idle timeout of a TCP connection in CLOSE_WAIT; 0 leaves the kernel's value.
    pub tcp_close_wait_timeout: Duration,
    /// `nf_conntrack_tcp_be_liberal`: only out-of-window RSTs are marked INVALID.
    pub tcp_be_liberal: bool,
    /// UDP timeout of a flow with no reply yet (`nf_conntrack_udp_timeout`); 0 = leave.
    pub udp_timeout: Duration,
    /// UDP timeout once replies were seen (`nf_conntrack_udp_timeout_stream`); 0 = leave.
    pub udp_stream_timeout: Duration,
}

impl Default for ConntrackSettings {
    fn default() -> Self {
        ConntrackSettings {
            max_per_core: DEFAULT_MAX_PER_CORE,
            min: DEFAULT_MIN,
            tcp_established_timeout: DEFAULT_TCP_ESTABLISHED,
            tcp_close_wait_timeout: DEFAULT_TCP_CLOSE_WAIT,
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }
}
