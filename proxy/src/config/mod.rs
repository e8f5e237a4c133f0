//! Command line and `KubeProxyConfiguration` file → validated [`Settings`].
//!
//! Flag names, defaults and meanings are kube-proxy's (cmd/kube-proxy/app/options.go `AddFlags`,
//! pkg/proxy/apis/config/v1alpha1 defaults, validation/validation.go). Precedence is
//! kube-proxy's too (options.go `Complete`): without `--config` the flags are the
//! configuration; with `--config` the file replaces it wholesale, and only
//! `--hostname-override` and the logging flag `-v` still win over the file. Flags that need
//! no config field (`--cleanup`, `--master`, and shunt's `--manifests`, `--cgroup-root`,
//! `--pin-dir`) are honoured either way. Flags ignored because of `--config` are listed in
//! [`Settings::warnings`] (kube-proxy ignores them silently; its help text says so).
//!
//! Nothing here touches the system: [`Settings::from_args`] takes the host facts it needs as
//! an argument, so an invalid command line fails before any socket or nft call.
pub mod conntrack;
pub mod duration;
pub mod file;
pub mod tools;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use crate::model::{DetectLocal, IpFamily, NodeConfig};
use crate::plan::ebpf::capacity::{self, CapacityFlags, MapSizes};
pub use conntrack::ConntrackSettings;
pub use duration::{format_go_duration, parse_go_duration};

/// kube-proxy's default ports (pkg/cluster/ports: ProxyHealthzPort, ProxyStatusPort).
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;
pub const DEFAULT_METRICS_PORT: u16 = 10249;
/// v1alpha1 defaults (defaults.go): syncPeriod 30s, minSyncPeriod 1s.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);

/// Where ebpf mode pins its maps and links unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/shunt";

/// shunt's command line: kube-proxy's flags plus `--manifests`, `--cgroup-root`, `--pin-dir`.
#[derive(Debug, Parser)]
#[command(
    name = "shunt",
    version,
    about = "A drop-in replacement for kube-proxy: nftables, iptables and eBPF modes",
    long_about = None,
    after_help = "shunt's own subcommands (see `shunt inspect --help`, `shunt trace --help`):\n  shunt inspect services [NS/NAME] [-o json]   what is programmed, read back from the kernel\n  shunt inspect conntrack|counters            ebpf mode: conntrack entries, counters\n  shunt trace --src IP --dst IP:PORT [--proto tcp|udp|sctp]   a new packet's verdict"
)]
pub struct Cli {
    /// The path to the configuration file (KubeProxyConfiguration
    /// kubeproxy.config.k8s.io/v1alpha1, YAML or JSON). When given, the file replaces the
    /// flags below except --hostname-override, -v, --master, --cleanup, --manifests,
    /// --cgroup-root and --pin-dir, as kube-proxy does.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// If true cleanup the rules shunt created (every mode) and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup: Option<bool>,

    /// Remove what kube-proxy leaves behind (its iptables chains and jump rules in every
    /// backend and family, its `kube-proxy` nftables tables) and exit; nothing else is touched.
    /// Run once per node after kube-proxy was stopped, before or after starting shunt.
    #[arg(long)]
    pub cleanup_kube_proxy: bool,

    /// Which proxy mode to use: 'iptables' (default), 'nftables' or 'ebpf'. Ignored if a
    /// config file is specified by --config.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,

    /// If non-empty, will be used as the name of the Node shunt is running on. If unset, the
    /// node name is assumed to be the same as the node's hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// The CIDR range of the pods in the cluster (for dual-stack clusters, a comma-separated
    /// dual-stack pair). With --detect-local-mode=ClusterCIDR, traffic from these ranges is
    /// local. Ignored if a config file is specified by --config.
    #[arg(long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,

    /// Mode to use to detect local traffic: ClusterCIDR (default) or None. (NodeCIDR,
    /// BridgeInterface and InterfaceNamePrefix are not supported by shunt.) Ignored if a
    /// config file is specified by --config.
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,

    /// SNAT all traffic sent via Service cluster IPs. Ignored if a config file is specified
    /// by --config.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,

    /// A list of CIDR ranges that contain valid node IPs, or the single string 'primary'.
    /// NodePort connections are accepted only on node IPs in these ranges ('primary': the
    /// node's primary IPs). If unset: all local IPs in iptables mode, 'primary' in nftables
    /// and ebpf modes. Ignored if a config file is specified by --config.
    #[arg(long, value_name = "CIDR[,CIDR...]|primary")]
    pub nodeport_addresses: Option<String>,

    /// The IP address and port for the health check server to serve on (default
    /// 0.0.0.0:10256; empty disables). Ignored if a config file is specified by --config.
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,

    /// The IP address and port for the metrics server to serve on (default 127.0.0.1:10249;
    /// empty disables). Ignored if a config file is specified by --config.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,

    /// How frequently rules are re-synchronized (e.g. '5s', '1m', '2h22m'); default 30s.
    /// Applies to iptables, nftables and ebpf modes. Must be greater than 0.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub iptables_sync_period: Option<Duration>,

    /// The minimum period between rule resyncs (e.g. '5s', '1m'); default 1s. 0 means every
    /// change is synced immediately. Applies to iptables, nftables and ebpf modes.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub iptables_min_sync_period: Option<Duration>,

    /// kube-proxy's IPVS-mode sync period; accepted for compatibility, used only in ipvs
    /// mode, which shunt does not implement.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub ipvs_sync_period: Option<Duration>,

    /// kube-proxy's IPVS-mode minimum sync period; accepted for compatibility (see above).
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub ipvs_min_sync_period: Option<Duration>,

    /// Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is
    /// and ignore --conntrack-min). Ignored if a config file is specified by --config.
    #[arg(long, value_name = "INT", allow_hyphen_values = true)]
    pub conntrack_max_per_core: Option<i64>,

    /// Minimum number of conntrack entries to allocate, regardless of
    /// --conntrack-max-per-core (set --conntrack-max-per-core=0 to leave the limit as-is).
    /// Ignored if a config file is specified by --config.
    #[arg(long, value_name = "INT", allow_hyphen_values = true)]
    pub conntrack_min: Option<i64>,

    /// Idle timeout for established TCP connections (0 to leave as-is); default 24h0m0s.
    /// Ignored if a config file is specified by --config.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub conntrack_tcp_timeout_established: Option<Duration>,

    /// NAT timeout for TCP connections in the CLOSE_WAIT state (0 to leave as-is); default
    /// 1h0m0s. Ignored if a config file is specified by --config.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,

    /// Enable liberal mode for tracking TCP packets (nf_conntrack_tcp_be_liberal = 1).
    /// Ignored if a config file is specified by --config.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,

    /// Idle timeout for UNREPLIED UDP connections (0 to leave as-is). Ignored if a config
    /// file is specified by --config.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub conntrack_udp_timeout: Option<Duration>,

    /// Idle timeout for ASSURED UDP connections (0 to leave as-is). Ignored if a config file
    /// is specified by --config.
    #[arg(long, value_name = "DURATION", value_parser = parse_go_duration, allow_hyphen_values = true)]
    pub conntrack_udp_timeout_stream: Option<Duration>,

    /// Path to kubeconfig file with authorization information (the master location can be
    /// overridden by the master flag). Without it (and without --manifests) the in-cluster
    /// configuration is used.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The address of the Kubernetes API server (overrides any value in kubeconfig).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// Number for the log level verbosity (klog levels: 0-1 info, 2-4 debug, 5+ trace).
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub v: Option<u8>,

    /// shunt only: read Services, EndpointSlices, ServiceCIDRs and the Node from this
    /// directory of manifests instead of the API server.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// shunt only: the cgroup v2 mount the ebpf mode attaches its socket programs to.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,

    /// shunt only: the bpffs directory ebpf mode pins its maps and links in (and adopts
    /// them from on restart; `--cleanup` removes it). One node runs one shunt, so the default
    /// suits a DaemonSet; a separate directory lets several shunts share one machine (labs).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// shunt only: which iptables backend iptables mode drives: 'auto' (whichever the node
    /// already uses, as kube-proxy's image picks it), 'legacy' or 'nft'.
    #[arg(long, value_name = "auto|legacy|nft", default_value = "auto")]
    pub iptables_backend: String,

    /// ebpf mode (Cilium's flag): entries of the service and backend maps, each family;
    /// the reverse-NAT, ClusterIP and affinity maps get a quarter of it (reverse NAT at most
    /// 65536). The service, backend, reverse-NAT and ClusterIP maps grow beyond it when the
    /// cluster needs more. 1024..16777216. [default: 262144]
    #[arg(long = "bpf-lb-map-max", value_name = "N")]
    pub bpf_lb_map_max: Option<u64>,

    /// ebpf mode (Cilium's flag): conntrack entries for TCP. shunt keeps every protocol in
    /// one conntrack map per family, sized TCP + non-TCP. 1024..16777216. [default: 196608]
    #[arg(long = "bpf-ct-global-tcp-max", value_name = "N")]
    pub bpf_ct_global_tcp_max: Option<u64>,

    /// ebpf mode (Cilium's flag): conntrack entries for non-TCP protocols (UDP, SCTP), added
    /// to --bpf-ct-global-tcp-max. 1024..16777216. [default: 65536]
    #[arg(long = "bpf-ct-global-any-max", value_name = "N")]
    pub bpf_ct_global_any_max: Option<u64>,

    /// ebpf mode (Cilium's flag): entries of the socket-level reverse-NAT and forward maps
    /// (node-originated UDP/TCP to services). 1024..16777216. [default: 262144]
    #[arg(long = "bpf-sock-rev-map-max", value_name = "N")]
    pub bpf_sock_rev_map_max: Option<u64>,

    /// ebpf mode (Cilium's flag): size the conntrack and socket maps from this share of the
    /// node's memory, as Cilium does (at least 131072 TCP + 65536 non-TCP conntrack and
    /// 65536 socket entries); the explicit size flags win. In (0, 1], e.g. 0.0025.
    #[arg(long = "bpf-map-dynamic-size-ratio", value_name = "RATIO")]
    pub bpf_map_dynamic_size_ratio: Option<f64>,
}

/// The proxy modes shunt implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    Iptables,
    Nftables,
    Ebpf,
}

impl ProxyMode {
    /// Every mode, for `--cleanup` (which removes whatever any mode left behind, as
    /// kube-proxy's platformCleanup does for iptables, ipvs and nftables together).
    pub const ALL: [ProxyMode; 3] = [ProxyMode::Nftables, ProxyMode::Iptables, ProxyMode::Ebpf];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
            ProxyMode::Ebpf => "ebpf",
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Facts about the host that settings depend on; gathered by `main`, faked in tests.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// The kernel's host name (kube-proxy's default node name).
    pub hostname: String,
    /// True if the kernel has IPv6 (then both families are programmed, as kube-proxy runs
    /// its dual-stack proxier whenever both families work).
    pub ipv6: bool,
    /// MemTotal in bytes (0 when unknown): --bpf-map-dynamic-size-ratio's base.
    pub mem_total: u64,
}

impl HostFacts {
    /// Read the host name and IPv6 availability; reads only, changes nothing.
    pub fn detect() -> HostFacts {
        // uname(2)'s nodename, as Go's os.Hostname reads it.
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| mem_total_in(&t))
            .unwrap_or(0);
        HostFacts {
            hostname,
            ipv6,
            mem_total,
        }
    }
}

/// MemTotal of a /proc/meminfo text, in bytes (proc(5): the value is in kB).
pub fn mem_total_in(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The ebpf map sizes from the capacity flags (shunt-only flags: they apply with --config
/// too). Each invalid value names its flag.
fn map_sizes(cli: &Cli, host: &HostFacts) -> Result<MapSizes, ConfigError> {
    let size = |v: Option<u64>, flag: &str| -> Result<Option<u32>, ConfigError> {
        v.map(|v| {
            capacity::validate_size(v, capacity::MIN_ENTRIES, capacity::MAX_ENTRIES)
                .map_err(|reason| Src::Flag(flag).invalid(v.to_string(), reason))
        })
        .transpose()
    };
    let flags = CapacityFlags {
        lb_map_max: size(cli.bpf_lb_map_max, "bpf-lb-map-max")?,
        ct_tcp_max: size(cli.bpf_ct_global_tcp_max, "bpf-ct-global-tcp-max")?,
        ct_any_max: size(cli.bpf_ct_global_any_max, "bpf-ct-global-any-max")?,
        sock_rev_map_max: size(cli.bpf_sock_rev_map_max, "bpf-sock-rev-map-max")?,
        dynamic_size_ratio: cli
            .bpf_map_dynamic_size_ratio
            .map(|r| {
                capacity::validate_ratio(r).map_err(|reason| {
                    Src::Flag("bpf-map-dynamic-size-ratio").invalid(r.to_string(), reason)
                })
            })
            .transpose()?,
    };
    if flags.dynamic_size_ratio.is_some() && host.mem_total == 0 {
        return Err(Src::Flag("bpf-map-dynamic-size-ratio").invalid(
            cli.bpf_map_dynamic_size_ratio
                .unwrap_or_default()
                .to_string(),
            "the node's memory is unknown (no MemTotal in /proc/meminfo)",
        ));
    }
    Ok(MapSizes::resolve(&flags, host.mem_total))
}

/// Everything shunt runs with, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: ProxyMode,
    pub node: NodeConfig,
    /// None: disabled (empty --healthz-bind-address).
    pub healthz_bind_address: Option<SocketAddr>,
    /// None: disabled (empty --metrics-bind-address).
    pub metrics_bind_address: Option<SocketAddr>,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub cleanup: bool,
    /// `--cleanup-kube-proxy`
    pub cleanup_kube_proxy: bool,
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub manifests: Option<PathBuf>,
    pub cgroup_root: Option<PathBuf>,
    /// `--pin-dir`
    pub pin_dir: PathBuf,
    /// `--iptables-backend`
    pub iptables_backend: crate::dataplane::iptables::BackendChoice,
    /// ebpf map sizes (`--bpf-lb-map-max`, `--bpf-ct-global-*-max`, `--bpf-sock-rev-map-max`,
    /// `--bpf-map-dynamic-size-ratio`).
    pub map_sizes: MapSizes,
    /// klog verbosity level.
    pub verbosity: u8,
    /// `--conntrack-*` / the file's `conntrack:` section.
    pub conntrack: ConntrackSettings,
    /// Things worth a warning once logging is up (flags ignored because of --config, fields
    /// shunt reads but does not act on).
    pub warnings: Vec<String>,
}

/// A command line or config file shunt cannot run with. Each names the flag or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Clap's own error (unknown flag, missing value, --help, --version).
    #[error("{0}")]
    Cli(#[from] clap::Error),
    #[error("config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// `what` is the flag (`--cluster-cidr`) or the file field (`clusterCIDR` in FILE).
    #[error("invalid value {value:?} for {what}: {reason}")]
    Invalid {
        what: String,
        value: String,
        reason: String,
    },
}

/// Where a value came from, for error messages naming the flag or the file field.
#[derive(Clone, Copy)]
enum Src<'a> {
    Flag(&'a str),
    Field(&'a str, &'a std::path::Path),
}

impl Src<'_> {
    fn name(&self) -> String {
        match self {
            Src::Flag(f) => format!("--{f}"),
            Src::Field(f, p) => format!("{f} in {}", p.display()),
        }
    }
    fn invalid(&self, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            what: self.name(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// The configuration before validation: kube-proxy's internal KubeProxyConfiguration,
/// reduced to what shunt uses, with where each value came from.
struct Raw<'a> {
    mode: (Option<String>, Src<'a>),
    hostname_override: (Option<String>, Src<'a>),
    cluster_cidr: (Option<String>, Src<'a>),
    detect_local_mode: (Option<String>, Src<'a>),
    masquerade_all: bool,
    node_port_addresses: (Option<Vec<String>>, Src<'a>),
    healthz: (Option<String>, Src<'a>),
    metrics: (Option<String>, Src<'a>),
    sync_period: (Option<Duration>, Src<'a>),
    min_sync_period: (Option<Duration>, Src<'a>),
    kubeconfig: Option<PathBuf>,
    verbosity: u8,
    conntrack: RawConntrack<'a>,
}

/// The conntrack settings before defaulting and validation. Durations are parsed already
/// (a flag by its value parser, a file field in `from_file`), both rejecting negatives.
struct RawConntrack<'a> {
    max_per_core: (Option<i64>, Src<'a>),
    min: (Option<i64>, Src<'a>),
    tcp_established_timeout: Option<Duration>,
    tcp_close_wait_timeout: Option<Duration>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<Duration>,
    udp_stream_timeout: Option<Duration>,
}

impl RawConntrack<'_> {
    /// kube-proxy's defaulting: an unset value takes the default; an explicit 0 stays 0
    /// ("leave the kernel's value"), as defaults.go only fills nil fields.
    fn validate(self) -> Result<ConntrackSettings, ConfigError> {
        let d = ConntrackSettings::default();
        // validation.go: maxPerCore and min must be >= 0; they are int32 fields.
        let count = |(v, src): (Option<i64>, Src<'_>), default: u32| match v {
            None => Ok(default),
            Some(n) if n < 0 => {
                Err(src.invalid(n.to_string(), "must be greater than or equal to 0"))
            }
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| i32::try_from(*n).is_ok())
                .ok_or_else(|| src.invalid(n.to_string(), "must fit in a 32-bit signed integer")),
        };
        Ok(ConntrackSettings {
            max_per_core: count(self.max_per_core, d.max_per_core)?,
            min: count(self.min, d.min)?,
            tcp_established_timeout: self
                .tcp_established_timeout
                .unwrap_or(d.tcp_established_timeout),
            tcp_close_wait_timeout: self
                .tcp_close_wait_timeout
                .unwrap_or(d.tcp_close_wait_timeout),
            tcp_be_liberal: self.tcp_be_liberal.unwrap_or(d.tcp_be_liberal),
            udp_timeout: self.udp_timeout.unwrap_or(d.udp_timeout),
            udp_stream_timeout: self.udp_stream_timeout.unwrap_or(d.udp_stream_timeout),
        })
    }
}

impl Settings {
    /// Parse and validate a command line (`args` includes the program name).
    pub fn from_args<I, T>(args: I, host: &HostFacts) -> Result<Settings, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        Settings::from_cli(cli, host)
    }

    pub fn from_cli(cli: Cli, host: &HostFacts) -> Result<Settings, ConfigError> {
        let mut warnings = Vec::new();
        let file_text;
        let file_cfg;
        let raw = match &cli.config {
            None => Raw {
                mode: (cli.proxy_mode.clone(), Src::Flag("proxy-mode")),
                hostname_override: (
                    cli.hostname_override.clone(),
                    Src::Flag("hostname-override"),
                ),
                cluster_cidr: (cli.cluster_cidr.clone(), Src::Flag("cluster-cidr")),
                detect_local_mode: (
                    cli.detect_local_mode.clone(),
                    Src::Flag("detect-local-mode"),
                ),
                masquerade_all: cli.masquerade_all.unwrap_or(false),
                node_port_addresses: (
                    // pflag StringSlice: comma separated; an empty value means an empty list.
                    cli.nodeport_addresses.as_deref().map(split_list),
                    Src::Flag("nodeport-addresses"),
                ),
                healthz: (
                    cli.healthz_bind_address.clone(),
                    Src::Flag("healthz-bind-address"),
                ),
                metrics: (
                    cli.metrics_bind_address.clone(),
                    Src::Flag("metrics-bind-address"),
                ),
                // options.go processV1Alpha1Flags: --iptables-* set the sync periods in every
                // mode but ipvs.
                sync_period: (cli.iptables_sync_period, Src::Flag("iptables-sync-period")),
                min_sync_period: (
                    cli.iptables_min_sync_period,
                    Src::Flag("iptables-min-sync-period"),
                ),
                kubeconfig: cli.kubeconfig.clone(),
                verbosity: cli.v.unwrap_or(0),
                conntrack: RawConntrack {
                    max_per_core: (
                        cli.conntrack_max_per_core,
                        Src::Flag("conntrack-max-per-core"),
                    ),
                    min: (cli.conntrack_min, Src::Flag("conntrack-min")),
                    tcp_established_timeout: cli.conntrack_tcp_timeout_established,
                    tcp_close_wait_timeout: cli.conntrack_tcp_timeout_close_wait,
                    tcp_be_liberal: cli.conntrack_tcp_be_liberal,
                    udp_timeout: cli.conntrack_udp_timeout,
                    udp_stream_timeout: cli.conntrack_udp_timeout_stream,
                },
            },
            Some(path) => {
                file_text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                file_cfg = file::parse(&file_text).map_err(|reason| ConfigError::File {
                    path: path.clone(),
                    reason,
                })?;
                warnings.extend(ignored_flags(&cli));
                from_file(&file_cfg, path, &cli, &mut warnings)?
            }
        };
        if cli.ipvs_sync_period.is_some() || cli.ipvs_min_sync_period.is_some() {
            warnings.push(
                "--ipvs-sync-period/--ipvs-min-sync-period only apply to ipvs mode; ignored".into(),
            );
        }
        Settings::validate(raw, &cli, host, warnings)
    }

    fn validate(
        raw: Raw<'_>,
        cli: &Cli,
        host: &HostFacts,
        warnings: Vec<String>,
    ) -> Result<Settings, ConfigError> {
        let mode = parse_mode(raw.mode.0.as_deref(), raw.mode.1)?;
        let map_sizes = map_sizes(cli, host)?;
        let conntrack = raw.conntrack.validate()?;

        // --hostname-override wins over the file (options.go processHostnameOverrideFlag); an
        // explicitly empty flag is an error there. The name is trimmed and lower-cased as
        // nodeutil.GetHostname does.
        // An empty flag counts as unset there (`len(o.hostnameOverride) > 0`).
        let flag = cli.hostname_override.as_ref().filter(|f| !f.is_empty());
        let node_name = match (flag, &raw.hostname_override.0) {
            (Some(flag), _) => {
                let name = flag.trim();
                if name.is_empty() {
                    return Err(Src::Flag("hostname-override")
                        .invalid(flag.clone(), "empty hostname-override is invalid"));
                }
                name.to_lowercase()
            }
            (None, Some(file)) if !file.trim().is_empty() => file.trim().to_lowercase(),
            _ => {
                let name = host.hostname.trim().to_lowercase();
                if name.is_empty() {
                    return Err(Src::Flag("hostname-override")
                        .invalid("", "the host name is empty; set --hostname-override"));
                }
                name
            }
        };

        let cluster_cidrs = parse_cluster_cidrs(raw.cluster_cidr.0.as_deref(), raw.cluster_cidr.1)?;

        // Linux default (server_linux.go platformApplyDefaults): ClusterCIDR. With no cluster
        // CIDR for a family the detector is a no-op for that family, which is what the model
        // does with an empty list.
        let detect_local = match raw.detect_local_mode.0.as_deref() {
            None | Some("") | Some("ClusterCIDR") => {
                DetectLocal::ClusterCidr(cluster_cidrs.clone())
            }
            Some("None") => DetectLocal::None,
            Some(m @ ("NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix")) => {
                return Err(raw
                    .detect_local_mode
                    .1
                    .invalid(m, "not supported by shunt (supported: ClusterCIDR, None)"));
            }
            Some(other) => {
                return Err(raw.detect_local_mode.1.invalid(
                    other,
                    "must be one of ClusterCIDR, NodeCIDR, BridgeInterface, \
                     InterfaceNamePrefix, None (shunt supports ClusterCIDR and None)",
                ));
            }
        };

        let node_port_addresses = parse_node_port_addresses(
            raw.node_port_addresses.0.as_deref(),
            raw.node_port_addresses.1,
            mode,
        )?;

        let healthz_bind_address = parse_bind_address(
            raw.healthz.0.as_deref(),
            raw.healthz.1,
            "0.0.0.0",
            DEFAULT_HEALTHZ_PORT,
        )?;
        let metrics_bind_address = parse_bind_address(
            raw.metrics.0.as_deref(),
            raw.metrics.1,
            "127.0.0.1",
            DEFAULT_METRICS_PORT,
        )?;

        // v1alpha1 defaulting replaces a zero period by the default (defaults.go), so "0s"
        // in the file means the default, as it does for kube-proxy.
        let sync_period = raw
            .sync_period
            .0
            .filter(|d| !d.is_zero() || matches!(raw.sync_period.1, Src::Flag(_)))
            .unwrap_or(DEFAULT_SYNC_PERIOD);
        let min_sync_period = raw
            .min_sync_period
            .0
            .filter(|d| !d.is_zero() || matches!(raw.min_sync_period.1, Src::Flag(_)))
            .unwrap_or(DEFAULT_MIN_SYNC_PERIOD);
        if sync_period.is_zero() {
            return Err(raw
                .sync_period
                .1
                .invalid(format_go_duration(sync_period), "must be greater than 0"));
        }
        if min_sync_period > sync_period {
            return Err(raw.sync_period.1.invalid(
                format_go_duration(sync_period),
                format!(
                    "must be greater than or equal to {} ({})",
                    raw.min_sync_period.1.name(),
                    format_go_duration(min_sync_period)
                ),
            ));
        }

        // Families: primary first. The primary family is the first cluster CIDR's (kube-proxy
        // takes it from the node IP, which the model learns from the Node object later; the
        // pod CIDR order is the best hint available before that), IPv4 otherwise.
        let primary = cluster_cidrs
            .first()
            .map(IpFamily::of_net)
            .unwrap_or(IpFamily::V4);
        let mut families = vec![primary];
        let secondary = match primary {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        };
        if secondary == IpFamily::V4 || host.ipv6 {
            families.push(secondary);
        }
        if primary == IpFamily::V6 && !host.ipv6 {
            return Err(raw.cluster_cidr.1.invalid(
                cluster_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                "the primary cluster CIDR is IPv6 but this kernel has no IPv6",
            ));
        }

        if let Some(dir) = &cli.manifests
            && cli.kubeconfig.is_some()
        {
            return Err(Src::Flag("manifests").invalid(
                dir.display().to_string(),
                "--manifests and --kubeconfig are mutually exclusive",
            ));
        }

        Ok(Settings {
            mode,
            node: NodeConfig {
                node_name,
                families,
                detect_local,
                masquerade_all: raw.masquerade_all,
                node_port_addresses,
            },
            healthz_bind_address,
            metrics_bind_address,
            sync_period,
            min_sync_period,
            cleanup: cli.cleanup.unwrap_or(false),
            cleanup_kube_proxy: cli.cleanup_kube_proxy,
            kubeconfig: raw.kubeconfig,
            master: cli.master.clone().filter(|m| !m.is_empty()),
            manifests: cli.manifests.clone(),
            iptables_backend: cli
                .iptables_backend
                .parse()
                .map_err(|_| ConfigError::Invalid {
                    what: "--iptables-backend".into(),
                    value: cli.iptables_backend.clone(),
                    reason: "must be auto, legacy or nft".into(),
                })?,
            cgroup_root: cli.cgroup_root.clone(),
            pin_dir: cli.pin_dir.clone(),
            map_sizes,
            verbosity: raw.verbosity,
            conntrack,
            warnings,
        })
    }
}

/// The configuration from a file; flags only for -v (copyLogsFromFlags) and kubeconfig
/// fallback semantics as kube-proxy: the file's clientConnection.kubeconfig replaces the flag.
fn from_file<'a>(
    cfg: &'a file::KubeProxyConfiguration,
    path: &'a std::path::Path,
    cli: &Cli,
    warnings: &mut Vec<String>,
) -> Result<Raw<'a>, ConfigError> {
    let mode = cfg.mode.clone();
    // conversion.go: masqueradeAll and the sync periods come from the section of the
    // configured mode (nftables.* for nftables, iptables.* otherwise; ipvs.* for ipvs).
    let is_nft = mode.as_deref() == Some("nftables");
    let (masq, sync_s, min_s, sync_name, min_name) = if is_nft {
        let n = cfg.nftables.as_ref();
        (
            n.and_then(|n| n.masquerade_all),
            n.and_then(|n| n.sync_period.clone()),
            n.and_then(|n| n.min_sync_period.clone()),
            "nftables.syncPeriod",
            "nftables.minSyncPeriod",
        )
    } else {
        let i = cfg.iptables.as_ref();
        (
            i.and_then(|i| i.masquerade_all),
            i.and_then(|i| i.sync_period.clone()),
            i.and_then(|i| i.min_sync_period.clone()),
            "iptables.syncPeriod",
            "iptables.minSyncPeriod",
        )
    };
    let dur =
        |v: Option<String>, name: &'a str| -> Result<(Option<Duration>, Src<'a>), ConfigError> {
            let src = Src::Field(name, path);
            match v {
                None => Ok((None, src)),
                Some(s) => parse_go_duration(&s)
                    .map(|d| (Some(d), src))
                    .map_err(|reason| src.invalid(s, reason)),
            }
        };
    let sync_period = dur(sync_s, sync_name)?;
    let min_sync_period = dur(min_s, min_name)?;
    let ct = cfg.conntrack.as_ref();
    let ct_dur = |name: &'a str, v: Option<&String>| dur(v.cloned(), name).map(|(d, _)| d);
    let conntrack = RawConntrack {
        max_per_core: (
            ct.and_then(|c| c.max_per_core).map(i64::from),
            Src::Field("conntrack.maxPerCore", path),
        ),
        min: (
            ct.and_then(|c| c.min).map(i64::from),
            Src::Field("conntrack.min", path),
        ),
        tcp_established_timeout: ct_dur(
            "conntrack.tcpEstablishedTimeout",
            ct.and_then(|c| c.tcp_established_timeout.as_ref()),
        )?,
        tcp_close_wait_timeout: ct_dur(
            "conntrack.tcpCloseWaitTimeout",
            ct.and_then(|c| c.tcp_close_wait_timeout.as_ref()),
        )?,
        tcp_be_liberal: ct.and_then(|c| c.tcp_be_liberal),
        udp_timeout: ct_dur(
            "conntrack.udpTimeout",
            ct.and_then(|c| c.udp_timeout.as_ref()),
        )?,
        udp_stream_timeout: ct_dur(
            "conntrack.udpStreamTimeout",
            ct.and_then(|c| c.udp_stream_timeout.as_ref()),
        )?,
    };
    // Durations shunt does not act on are still checked, so a typo does not pass silently.
    let mut other_durations: Vec<(&str, Option<&String>)> =
        vec![("configSyncPeriod", cfg.config_sync_period.as_ref())];
    if let Some(i) = &cfg.ipvs {
        other_durations.extend([
            ("ipvs.syncPeriod", i.sync_period.as_ref()),
            ("ipvs.minSyncPeriod", i.min_sync_period.as_ref()),
            ("ipvs.tcpTimeout", i.tcp_timeout.as_ref()),
            ("ipvs.tcpFinTimeout", i.tcp_fin_timeout.as_ref()),
            ("ipvs.udpTimeout", i.udp_timeout.as_ref()),
        ]);
    }
    if !is_nft && let Some(n) = &cfg.nftables {
        other_durations.extend([
            ("nftables.syncPeriod", n.sync_period.as_ref()),
            ("nftables.minSyncPeriod", n.min_sync_period.as_ref()),
        ]);
    }
    if is_nft && let Some(i) = &cfg.iptables {
        other_durations.extend([
            ("iptables.syncPeriod", i.sync_period.as_ref()),
            ("iptables.minSyncPeriod", i.min_sync_period.as_ref()),
        ]);
    }
    for (name, v) in other_durations {
        if let Some(s) = v {
            parse_go_duration(s)
                .map_err(|reason| Src::Field(name, path).invalid(s.clone(), reason))?;
        }
    }
    for (name, bit) in [
        (
            "iptables.masqueradeBit",
            cfg.iptables.as_ref().and_then(|i| i.masquerade_bit),
        ),
        (
            "nftables.masqueradeBit",
            cfg.nftables.as_ref().and_then(|n| n.masquerade_bit),
        ),
    ] {
        if let Some(b) = bit
            && !(0..=31).contains(&b)
        {
            return Err(
                Src::Field(name, path).invalid(b.to_string(), "must be within the range [0, 31]")
            );
        }
    }
    // validation.go: bindAddress must be an IP. shunt takes the primary family from the
    // cluster CIDRs and the Node object instead, so the value itself is not used.
    if let Some(b) = cfg.bind_address.as_deref().filter(|b| !b.is_empty()) {
        b.parse::<IpAddr>().map_err(|_| {
            Src::Field("bindAddress", path)
                .invalid(b, "not a valid textual representation of an IP address")
        })?;
    }
    if let Some(adj) = cfg.oom_score_adj
        && !(-1000..=1000).contains(&adj)
    {
        return Err(Src::Field("oomScoreAdj", path)
            .invalid(adj.to_string(), "must be within the range [-1000, 1000]"));
    }
    if let Some(dl) = &cfg.detect_local {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        if set(&dl.bridge_interface) || set(&dl.interface_name_prefix) {
            warnings.push(format!(
                "{}: detectLocal.bridgeInterface/interfaceNamePrefix are ignored (shunt supports \
                 detectLocalMode ClusterCIDR and None)",
                path.display()
            ));
        }
    }
    if cfg.feature_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        warnings.push(format!(
            "{}: featureGates are ignored by shunt",
            path.display()
        ));
    }
    let kubeconfig = cfg
        .client_connection
        .as_ref()
        .and_then(|c| c.kubeconfig.clone())
        .filter(|k| !k.is_empty())
        .map(PathBuf::from);
    Ok(Raw {
        mode: (mode, Src::Field("mode", path)),
        hostname_override: (
            cfg.hostname_override.clone(),
            Src::Field("hostnameOverride", path),
        ),
        cluster_cidr: (cfg.cluster_cidr.clone(), Src::Field("clusterCIDR", path)),
        detect_local_mode: (
            cfg.detect_local_mode.clone(),
            Src::Field("detectLocalMode", path),
        ),
        masquerade_all: masq.unwrap_or(false),
        node_port_addresses: (
            cfg.node_port_addresses.clone(),
            Src::Field("nodePortAddresses", path),
        ),
        healthz: (
            cfg.healthz_bind_address.clone(),
            Src::Field("healthzBindAddress", path),
        ),
        metrics: (
            cfg.metrics_bind_address.clone(),
            Src::Field("metricsBindAddress", path),
        ),
        sync_period,
        min_sync_period,
        kubeconfig,
        // Logging flags win over the file (options.go copyLogsFromFlags).
        verbosity: cli
            .v
            .or_else(|| cfg.logging.as_ref().and_then(|l| l.verbosity))
            .unwrap_or(0),
        conntrack,
    })
}

/// Flags given together with --config that kube-proxy ignores.
fn ignored_flags(cli: &Cli) -> Vec<String> {
    let given = [
        ("proxy-mode", cli.proxy_mode.is_some()),
        ("cluster-cidr", cli.cluster_cidr.is_some()),
        ("detect-local-mode", cli.detect_local_mode.is_some()),
        ("masquerade-all", cli.masquerade_all.is_some()),
        ("nodeport-addresses", cli.nodeport_addresses.is_some()),
        ("healthz-bind-address", cli.healthz_bind_address.is_some()),
        ("metrics-bind-address", cli.metrics_bind_address.is_some()),
        ("iptables-sync-period", cli.iptables_sync_period.is_some()),
        (
            "iptables-min-sync-period",
            cli.iptables_min_sync_period.is_some(),
        ),
        ("kubeconfig", cli.kubeconfig.is_some()),
        (
            "conntrack-max-per-core",
            cli.conntrack_max_per_core.is_some(),
        ),
        ("conntrack-min", cli.conntrack_min.is_some()),
        (
            "conntrack-tcp-timeout-established",
            cli.conntrack_tcp_timeout_established.is_some(),
        ),
        (
            "conntrack-tcp-timeout-close-wait",
            cli.conntrack_tcp_timeout_close_wait.is_some(),
        ),
        (
            "conntrack-tcp-be-liberal",
            cli.conntrack_tcp_be_liberal.is_some(),
        ),
        ("conntrack-udp-timeout", cli.conntrack_udp_timeout.is_some()),
        (
            "conntrack-udp-timeout-stream",
            cli.conntrack_udp_timeout_stream.is_some(),
        ),
    ];
    given
        .iter()
        .filter(|(_, g)| *g)
        .map(|(f, _)| format!("--{f} is ignored because --config is given (as in kube-proxy)"))
        .collect()
}

fn split_list(s: &str) -> Vec<String> {
    if s.trim().is_empty() {
        return Vec::new();
    }
    s.split(',').map(|p| p.trim().to_string()).collect()
}

fn parse_mode(value: Option<&str>, src: Src<'_>) -> Result<ProxyMode, ConfigError> {
    match value {
        // Blank means kube-proxy's default on Linux: iptables.
        None | Some("") | Some("iptables") => Ok(ProxyMode::Iptables),
        Some("nftables") => Ok(ProxyMode::Nftables),
        Some("ebpf") => Ok(ProxyMode::Ebpf),
        Some(m @ ("ipvs" | "kernelspace" | "userspace")) => Err(src.invalid(
            m,
            "not supported by shunt (supported: iptables, nftables, ebpf)",
        )),
        Some(other) => Err(src.invalid(other, "must be one of iptables, nftables, ebpf")),
    }
}

fn parse_cidr(s: &str, src: Src<'_>) -> Result<IpNet, ConfigError> {
    // Go's net.ParseCIDR accepts host bits ("10.0.0.1/8" is 10.0.0.0/8); so do we.
    s.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
        src.invalid(
            s,
            "must be a valid CIDR (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)",
        )
    })
}

/// validation.go: one CIDR, or two of different families.
fn parse_cluster_cidrs(value: Option<&str>, src: Src<'_>) -> Result<Vec<IpNet>, ConfigError> {
    let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    let parts: Vec<&str> = value.split(',').collect();
    if parts.len() > 2 {
        return Err(src.invalid(
            value,
            "only one CIDR allowed or a valid dual-stack pair (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
        ));
    }
    let cidrs = parts
        .iter()
        .map(|p| parse_cidr(p, src))
        .collect::<Result<Vec<_>, _>>()?;
    if cidrs.len() == 2 && IpFamily::of_net(&cidrs[0]) == IpFamily::of_net(&cidrs[1]) {
        return Err(src.invalid(
            value,
            "must be a valid dual-stack pair, one CIDR of each family (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
        ));
    }
    Ok(cidrs)
}

/// `primary` (alone) or CIDRs. Unset: all local IPs for iptables (kube-proxy's historical
/// default), `primary` for nftables (server_linux.go platformApplyDefaults) and ebpf.
/// `NodeConfig::node_port_addresses` spells `primary` as the empty list.
fn parse_node_port_addresses(
    value: Option<&[String]>,
    src: Src<'_>,
    mode: ProxyMode,
) -> Result<Vec<IpNet>, ConfigError> {
    let list: Vec<&str> = value.unwrap_or_default().iter().map(|s| s.trim()).collect();
    if list.is_empty() {
        return Ok(match mode {
            ProxyMode::Iptables => vec![
                "0.0.0.0/0".parse().expect("literal CIDR"),
                "::/0".parse().expect("literal CIDR"),
            ],
            ProxyMode::Nftables | ProxyMode::Ebpf => Vec::new(),
        });
    }
    if list.contains(&"primary") {
        if list.len() == 1 {
            return Ok(Vec::new());
        }
        return Err(src.invalid(list.join(","), "'primary' cannot be combined with CIDRs"));
    }
    list.iter().map(|s| parse_cidr(s, src)).collect()
}

/// `IP:port`, or a bare IP (kube-proxy appends the default port, AppendPortIfNeeded), or ""
/// to disable. The port must be 1..=65535 (validation.go validateHostPort).
fn parse_bind_address(
    value: Option<&str>,
    src: Src<'_>,
    default_ip: &str,
    default_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    let value = match value {
        None => {
            return Ok(Some(SocketAddr::new(
                default_ip.parse().expect("literal IP"),
                default_port,
            )));
        }
        Some(v) if v.trim().is_empty() => return Ok(None),
        Some(v) => v.trim(),
    };
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(Some(SocketAddr::new(ip, default_port)));
    }
    if let Some(ip) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']'))
        && let Ok(ip) = ip.parse::<IpAddr>()
    {
        return Ok(Some(SocketAddr::new(ip, default_port)));
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(src.invalid(value, "must be IP:port"));
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host
        .parse()
        .map_err(|_| src.invalid(value, "must be IP:port with a valid IP"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| src.invalid(value, "must be IP:port with a valid port (1-65535)"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests;
