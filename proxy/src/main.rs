//! shunt: parse and validate the command line, then either clean up (`--cleanup`) or run the
//! proxy until SIGTERM/SIGINT. Exiting never removes rules (kube-proxy doesn't either); only
//! `--cleanup` does.
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use shunt::config::{ConfigError, HostFacts, ProxyMode, Settings};
use shunt::dataplane::Dataplane;
use shunt::dataplane::ebpf::{EbpfDataplane, EbpfOptions, Interfaces};
use shunt::dataplane::iptables::{IptablesDataplane, IptablesOptions};
use shunt::dataplane::nftables::NftablesDataplane;
use shunt::model::Tracker;
use shunt::serve::{self, Metrics, ProxyHealth, ServiceHealthServer};
use shunt::source::{self, SourceEvent};
use shunt::sync::{Runner, RunnerConfig};

mod tools;

/// Room for a burst of watch events (a full relist) without blocking the sources for long.
const EVENT_CHANNEL_CAPACITY: usize = 4096;

fn main() -> ExitCode {
    // `shunt inspect ...` / `shunt trace ...`: shunt's own subcommands; any other command
    // line is kube-proxy's flags, parsed exactly as before.
    if let Some(cmd) = shunt::config::tools::tool_command(std::env::args_os()) {
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => e.exit(),
        };
        return match tools::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shunt: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match Settings::from_args(std::env::args_os(), &HostFacts::detect()) {
        Ok(s) => s,
        // --help/--version print and exit 0; usage errors exit 2, as clap does.
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("shunt: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing(settings.verbosity);
    for w in &settings.warnings {
        warn!("{w}");
    }
    let result = if settings.cleanup_kube_proxy {
        cleanup_kube_proxy()
    } else if settings.cleanup {
        cleanup_all(&settings.pin_dir)
    } else {
        run(settings)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// klog verbosity → tracing levels: 0–1 info, 2–4 debug, 5+ trace (for shunt's own events;
/// libraries get one level less, kube-rs being chatty). RUST_LOG, when set, wins.
fn init_tracing(verbosity: u8) {
    let (own, libs) = match verbosity {
        0..=1 => ("info", "warn"),
        2..=4 => ("debug", "info"),
        _ => ("trace", "debug"),
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{libs},shunt={own}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `--cleanup-kube-proxy`: remove kube-proxy's leftovers (swap-in), report what went.
fn cleanup_kube_proxy() -> anyhow::Result<()> {
    let report = shunt::dataplane::kube_proxy_cleanup::cleanup_kube_proxy(&[])
        .context("removing kube-proxy's leftovers")?;
    for t in &report.iptables {
        info!(
            backend = %t.backend,
            table = %t.table,
            chains = t.chains.len(),
            jump_rules = t.jump_rules.len(),
            "removed kube-proxy iptables state"
        );
    }
    for table in &report.nft_tables {
        info!(table = %table, "removed kube-proxy nftables table");
    }
    for tool in &report.skipped {
        info!(tool = %tool, "not installed; nothing of kube-proxy's to look for there");
    }
    if report.is_empty() {
        info!("no kube-proxy leftovers found");
    }
    Ok(())
}

/// `--cleanup`: remove what every mode shunt knows created (kube-proxy's platformCleanup
/// with cleanupAndExit cleans iptables, ipvs and nftables alike). A backend whose tool is
/// missing has nothing to clean (upstream skips it the same way); a failed removal fails.
fn cleanup_all(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    cleanup_modes(&ProxyMode::ALL, pin_dir)
}

/// Remove what the given modes created; Err names the modes whose cleanup failed.
fn cleanup_modes(modes: &[ProxyMode], pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for &mode in modes {
        match mode {
            ProxyMode::Nftables => {
                cleanup_one(mode, NftablesDataplane::new(), &mut failed);
            }
            ProxyMode::Iptables => cleanup_one(
                mode,
                IptablesDataplane::new(IptablesOptions::default()),
                &mut failed,
            ),
            // Pins and links live under the pin dir only; the cgroup is not needed to
            // remove them (unpinning a link's last reference detaches it).
            ProxyMode::Ebpf => cleanup_one(
                mode,
                EbpfDataplane::new(ebpf_options(None, pin_dir)),
                &mut failed,
            ),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "cleanup failed for mode(s): {}",
            failed
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Clean one mode's leftovers with a freshly constructed backend; a backend that cannot be
/// constructed (tool missing) has nothing to clean.
fn cleanup_one<D: Dataplane>(
    mode: ProxyMode,
    backend: Result<D, shunt::dataplane::DataplaneError>,
    failed: &mut Vec<ProxyMode>,
) {
    match backend {
        Ok(mut dp) => {
            if let Err(e) = dp.cleanup() {
                error!(mode = %mode, "cleanup failed: {e}");
                failed.push(mode);
            } else {
                info!(mode = %mode, "cleaned up");
            }
        }
        Err(e) => warn!(mode = %mode, "skipping cleanup, backend unavailable: {e}"),
    }
}

fn run(settings: Settings) -> anyhow::Result<()> {
    // Check the mode's backend first (it only probes), so an unusable mode fails before
    // anything is changed.
    match settings.mode {
        ProxyMode::Nftables => {
            let dp = NftablesDataplane::new().context("nftables mode: nft is not usable")?;
            netfilter_conntrack(&settings)?;
            start(settings, dp)
        }
        ProxyMode::Iptables => {
            let dp = IptablesDataplane::new(IptablesOptions {
                backend: settings.iptables_backend,
                ..IptablesOptions::default()
            })
            .context("iptables mode: iptables is not usable")?;
            netfilter_conntrack(&settings)?;
            start(settings, dp)
        }
        ProxyMode::Ebpf => {
            let cgroup_root = match &settings.cgroup_root {
                Some(p) => p.clone(),
                None => shunt::dataplane::ebpf::cgroup2_mount()
                    .context("ebpf mode: finding the cgroup2 mount (or pass --cgroup-root)")?,
            };
            let mut opts = ebpf_options(Some(cgroup_root), &settings.pin_dir);
            opts.map_sizes = settings.map_sizes;
            let dp = EbpfDataplane::new(opts)
                .context("ebpf mode: invalid options")?
                .with_conntrack(&settings.conntrack);
            start(settings, dp)
        }
    }
}

/// netfilter modes: kube-proxy's conntrack settings as the nf_conntrack sysctls of the node's
/// network namespace (server_linux.go platformSetup runs setupConntrack before the proxier).
fn netfilter_conntrack(settings: &Settings) -> anyhow::Result<()> {
    use shunt::dataplane::conntrack_sysctl as ct;
    let writes = ct::plan(&settings.conntrack, ct::usable_cpus());
    ct::apply(std::path::Path::new(ct::NETFILTER_SYSCTL_DIR), &writes)
        .context("applying the conntrack settings (--conntrack-* / conntrack:)")?;
    Ok(())
}

/// ebpf mode's options: pins under `pin_dir` (--pin-dir), the tc program on every interface,
/// the socket programs on `cgroup_root` (None: not attached, which cleanup does not need).
fn ebpf_options(cgroup_root: Option<std::path::PathBuf>, pin_dir: &std::path::Path) -> EbpfOptions {
    EbpfOptions {
        cgroup_root: cgroup_root.unwrap_or_default(),
        pin_dir: pin_dir.to_path_buf(),
        interfaces: Interfaces::All,
        map_sizes: Default::default(),
    }
}

/// Clean up after the other modes, then run with `dataplane` until SIGTERM/SIGINT.
fn start<D: Dataplane + 'static>(settings: Settings, dataplane: D) -> anyhow::Result<()> {
    // Switching modes: remove what the other modes left behind, best effort (server.go
    // platformCleanup without cleanupAndExit; upstream ignores its error too, the backends
    // having logged what failed).
    let others: Vec<ProxyMode> = ProxyMode::ALL
        .into_iter()
        .filter(|m| *m != settings.mode)
        .collect();
    if let Err(e) = cleanup_modes(&others, &settings.pin_dir) {
        warn!("leftovers of other proxy modes remain: {e:#}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_with(settings, dataplane))
}

async fn kube_client(settings: &Settings) -> anyhow::Result<kube::Client> {
    let config = match (&settings.kubeconfig, &settings.master) {
        (Some(path), master) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let mut config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("loading kubeconfig {}", path.display()))?;
            // --master overrides the kubeconfig's server (clientcmd.BuildConfigFromFlags).
            if let Some(m) = master {
                config.cluster_url = m.parse().with_context(|| format!("--master {m:?}"))?;
            }
            config
        }
        (None, Some(m)) => kube::Config::new(m.parse().with_context(|| format!("--master {m:?}"))?),
        (None, None) => {
            info!(
                "neither --kubeconfig nor --master was specified; using the in-cluster configuration"
            );
            kube::Config::incluster().context("in-cluster configuration")?
        }
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

async fn run_with<D: Dataplane + 'static>(settings: Settings, dataplane: D) -> anyhow::Result<()> {
    let mode = dataplane.mode();
    info!(
        mode,
        node = %settings.node.node_name,
        families = ?settings.node.families,
        "starting shunt"
    );
    let metrics = Arc::new(Metrics::new());
    // server.go: NewProxyHealthServer(config.HealthzBindAddress, 2*config.SyncPeriod).
    let health = Arc::new(ProxyHealth::new(2 * settings.sync_period));

    if let Some(addr) = settings.healthz_bind_address {
        let listener = tokio::net::TcpListener::bind(addr).await;
        if let Err(e) = &listener {
            error!(address = %addr, "failed to bind the healthz server, retrying: {e}");
        }
        tokio::spawn(serve::serve_forever(
            "healthz",
            addr,
            listener.ok(),
            serve::healthz_router(health.clone(), metrics.clone()),
        ));
    }
    if let Some(addr) = settings.metrics_bind_address {
        let listener = tokio::net::TcpListener::bind(addr).await;
        if let Err(e) = &listener {
            error!(address = %addr, "failed to bind the metrics server, retrying: {e}");
        }
        tokio::spawn(serve::serve_forever(
            "metrics",
            addr,
            listener.ok(),
            serve::metrics_router(metrics.clone(), mode),
        ));
    }

    let (tx, rx) = mpsc::channel::<SourceEvent>(EVENT_CHANNEL_CAPACITY);
    let (fail_tx, mut fail_rx) = mpsc::channel::<anyhow::Error>(2);
    // The addresses go into the channel before the object source starts, so the runner
    // handles them before that source's `Synced`: the first sync (and /healthz 200) already
    // has the NodePort addresses (see `source::addresses::initial`).
    let first_addresses = source::addresses::initial(&tx)
        .await
        .context("local address source")?
        .context("local address source: the sync runner's channel closed at startup")?;
    let objects_source = match &settings.manifests {
        Some(dir) => {
            let dir = dir.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                source::manifests::run(dir.clone(), tx)
                    .await
                    .with_context(|| format!("manifest source {}", dir.display()))
            })
        }
        None => {
            let client = kube_client(&settings).await?;
            let node = settings.node.node_name.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                source::kube::run(client, node, tx)
                    .await
                    .context("Kubernetes API source")
            })
        }
    };
    let addresses_source = {
        let tx = tx.clone();
        tokio::spawn(async move {
            source::addresses::follow(tx, first_addresses)
                .await
                .context("local address source")
        })
    };
    drop(tx);
    for task in [objects_source, addresses_source] {
        let fail_tx = fail_tx.clone();
        tokio::spawn(async move {
            let err = match task.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::new(e).context("source task"),
            };
            let _ = fail_tx.send(err).await;
        });
    }
    drop(fail_tx);

    let runner = Runner::new(
        Tracker::new(settings.node.clone()),
        dataplane,
        RunnerConfig {
            min_sync_period: settings.min_sync_period,
            sync_period: settings.sync_period,
            node_name: settings.node.node_name.clone(),
        },
        metrics,
        health.clone(),
        Some(ServiceHealthServer::new(health)),
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<anyhow::Error>>();
    tokio::spawn(async move {
        let reason = tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM received; exiting, rules left in place"); None }
            _ = sigint.recv() => { info!("SIGINT received; exiting, rules left in place"); None }
            Some(e) = fail_rx.recv() => Some(e),
        };
        let _ = stop_tx.send(reason);
    });
    let (reason_tx, reason_rx) = tokio::sync::oneshot::channel();
    runner
        .run(rx, async move {
            let reason = stop_rx.await.unwrap_or(None);
            let _ = reason_tx.send(reason);
        })
        .await;
    match reason_rx.await.unwrap_or(None) {
        None => Ok(()),
        Some(e) => Err(e),
    }
}
