//! The report: `report.md` (machine, settings, tables, plots), CSV files of every figure, and
//! SVG plots. Rewritten after every (mode, scale) run so an interrupted bench still reports.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::measure::percentile;
use super::{BenchMode, ChangeKind, Run, Settings, svg};

/// The machine and software the figures come from.
pub struct Machine {
    pub fields: Vec<(&'static str, String)>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let t = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&t)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

impl Machine {
    pub fn collect(bin: &Path) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or("unknown".into(), |kib| {
                format!("{:.1} GiB", kib as f64 / 1048576.0)
            });
        let root = crate::shunt::repo_root();
        let root = root.display().to_string();
        let commit = first_line("git", &["-C", &root, "rev-parse", "HEAD"]);
        let dirty = Command::new("git")
            .args(["-C", &root, "status", "--porcelain", "--untracked-files=no"])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty());
        let bin_s = bin.display().to_string();
        Machine {
            fields: vec![
                (
                    "date (UTC)",
                    first_line("date", &["-u", "+%Y-%m-%d %H:%M:%S"]),
                ),
                (
                    "git commit",
                    format!(
                        "{commit}{}",
                        if dirty {
                            " (with uncommitted changes)"
                        } else {
                            ""
                        }
                    ),
                ),
                (
                    "kernel",
                    read("/proc/sys/kernel/osrelease").trim().to_owned(),
                ),
                ("CPU", cpu),
                ("cores", cores.to_string()),
                ("memory", mem),
                (
                    "load average at start",
                    read("/proc/loadavg").trim().to_owned(),
                ),
                (
                    "shunt",
                    format!("{bin_s} ({})", first_line(&bin_s, &["--version"])),
                ),
                ("nft", first_line("nft", &["--version"])),
                (
                    "iptables-legacy",
                    first_line("iptables-legacy", &["--version"]),
                ),
                ("iptables-nft", first_line("iptables-nft", &["--version"])),
                ("iperf3", first_line("iperf3", &["--version"])),
                ("rustc", first_line("rustc", &["--version"])),
            ],
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}
fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "–".into(), f)
}
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}
fn fr(v: Option<f64>) -> String {
    opt(v, |r| format!("{r:.2}×"))
}

/// Per-run derived figures (seconds, ratios) used by tables, CSV and plots alike.
#[derive(Default, Clone, Copy)]
struct Fig {
    cold: Option<f64>,
    change_p50: Option<f64>,
    change_p99: Option<f64>,
    cpu: Option<f64>,
    rss_mib: Option<f64>,
    vip_p50_ms: Option<f64>,
    vip_p99_ms: Option<f64>,
    direct_p50_ms: Option<f64>,
    direct_p99_ms: Option<f64>,
    vip_rate: Option<f64>,
    direct_rate: Option<f64>,
    vip_gbps: Option<f64>,
    direct_gbps: Option<f64>,
}

fn change_all(r: &Run, kind: Option<ChangeKind>) -> Vec<Duration> {
    r.control
        .changes
        .iter()
        .filter(|(k, _)| kind.is_none_or(|w| *k == w))
        .map(|c| c.1)
        .collect()
}

fn fig(r: &Run) -> Fig {
    let ch = change_all(r, None);
    let measured = r.control.cold.is_some();
    let d = r.data.as_ref();
    let p = |v: Option<&Vec<Duration>>, q: f64| {
        v.and_then(|v| percentile(v, q))
            .map(|d| d.as_secs_f64() * 1000.0)
    };
    Fig {
        cold: r.control.cold.map(|d| d.as_secs_f64()),
        change_p50: percentile(&ch, 50.0).map(|d| d.as_secs_f64()),
        change_p99: percentile(&ch, 99.0).map(|d| d.as_secs_f64()),
        cpu: measured.then(|| (r.control.cpu_total + r.control.children_cpu_total).as_secs_f64()),
        rss_mib: (r.control.peak_rss_kib > 0).then(|| r.control.peak_rss_kib as f64 / 1024.0),
        vip_p50_ms: p(d.map(|d| &d.vip), 50.0),
        vip_p99_ms: p(d.map(|d| &d.vip), 99.0),
        direct_p50_ms: p(d.map(|d| &d.direct), 50.0),
        direct_p99_ms: p(d.map(|d| &d.direct), 99.0),
        vip_rate: d.and_then(|d| d.vip_rate),
        direct_rate: d.and_then(|d| d.direct_rate),
        vip_gbps: d.and_then(|d| d.vip_bps).map(|b| b / 1e9),
        direct_gbps: d.and_then(|d| d.direct_bps).map(|b| b / 1e9),
    }
}

/// One progress line per run (stderr).
pub fn one_line(r: &Run) -> String {
    let f = fig(r);
    format!(
        "{} {}: cold {} s, change p50 {} s (n={}), VIP/direct p50 {}, throughput VIP/direct {}{}",
        r.mode.label(),
        r.services,
        opt(f.cold, |v| format!("{v:.2}")),
        opt(f.change_p50, |v| format!("{v:.2}")),
        r.control.changes.len(),
        fr(ratio(f.vip_p50_ms, f.direct_p50_ms)),
        fr(ratio(f.vip_gbps, f.direct_gbps)),
        r.status
            .as_ref()
            .map_or(String::new(), |s| format!(" [{s}]"))
    )
}

fn status(r: &Run) -> String {
    let mut v: Vec<String> = r.status.iter().cloned().collect();
    v.extend(r.control.change_stuck.iter().cloned());
    if let Some(d) = &r.data {
        if d.failed != (0, 0) {
            v.push(format!(
                "failed requests: {} VIP, {} direct",
                d.failed.0, d.failed.1
            ));
        }
        v.extend(d.notes.iter().cloned());
    }
    if v.is_empty() {
        "ok".into()
    } else {
        v.join("; ").replace('|', "/").replace('\n', " ")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.6}"))
}

pub fn write(
    out: &Path,
    set: &Settings,
    machine: &Machine,
    runs: &[Run],
    elapsed: Duration,
) -> Result<()> {
    let modes: Vec<BenchMode> = {
        let mut m: Vec<BenchMode> = runs.iter().map(|r| r.mode).collect();
        m.dedup();
        m
    };
    let scales = &set.scales;
    let get = |m: BenchMode, s: usize| runs.iter().find(|r| r.mode == m && r.services == s);
    let mut md = String::new();
    let _ = writeln!(md, "# shunt bench ({} preset)\n", set.name);
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}`; {} runs in {:.0} s. How to read it: README.md, section Benchmark.\n",
        if set.name == "quick" { " --quick" } else { "" },
        runs.len(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(md, "## Machine\n\n| | |\n| --- | --- |");
    for (k, v) in &machine.fields {
        let _ = writeln!(md, "| {k} | {} |", v.replace('|', "/"));
    }
    let _ = writeln!(
        md,
        "\n## Settings\n\nScales {:?} Services × {} endpoints (ClusterIP, TCP); {} changes of each kind per scale within {} s; {} interleaved requests per latency figure; request rate over {:.1} s; iperf3 {} s per direction. Cold-sync limit 30 s + 4 ms per Service; one change's limit 15 s + 1 ms per Service.\n",
        scales,
        set.endpoints,
        set.changes,
        set.change_budget.as_secs(),
        set.latency_samples,
        set.rate_window.as_secs_f64(),
        set.iperf_secs
    );

    // Figure 1.
    let _ = writeln!(
        md,
        "## 1. Control plane\n\nCold sync: shunt start to `/healthz` 200 *and* the probed Service answering through its VIP (the kernel carries the objects). A change: manifest write to the first request from the client pod that sees it (endpoint added: answered by the new endpoint; endpoint removed: refused; Service added: its new VIP answers). CPU: utime+stime of shunt and of the tools it ran (nft, iptables-restore) over the whole run; peak RSS: VmHWM.\n"
    );
    let _ = writeln!(
        md,
        "| mode | Services | cold sync s | /healthz 200 s | change p50 s | change p99 s | n | endpoint added p50 | endpoint removed p50 | Service added p50 | CPU cold s | CPU total s (shunt + tools) | peak RSS MiB | status |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let mut cp_csv = String::from(
        "mode,services,endpoints,cold_s,healthz_s,change_p50_s,change_p99_s,changes,endpoint_added_p50_s,endpoint_removed_p50_s,service_added_p50_s,cpu_cold_s,cpu_shunt_s,cpu_tools_s,peak_rss_mib,status\n",
    );
    for r in runs {
        let f = fig(r);
        let kind_p50 = |k| percentile(&change_all(r, Some(k)), 50.0).map(|d| d.as_secs_f64());
        let measured = r.control.cold.is_some();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode.label(),
            r.services,
            opt(r.control.cold, secs),
            opt(r.control.cold_healthz, secs),
            opt(f.change_p50, |v| format!("{v:.2}")),
            opt(f.change_p99, |v| format!("{v:.2}")),
            r.control.changes.len(),
            opt(kind_p50(ChangeKind::EndpointAdded), |v| format!("{v:.2}")),
            opt(kind_p50(ChangeKind::EndpointRemoved), |v| format!("{v:.2}")),
            opt(kind_p50(ChangeKind::ServiceAdded), |v| format!("{v:.2}")),
            opt(measured.then_some(r.control.cpu_cold), secs),
            opt(
                measured.then_some((r.control.cpu_total, r.control.children_cpu_total)),
                |(a, b)| format!("{} + {}", secs(a), secs(b))
            ),
            opt(f.rss_mib, |v| format!("{v:.0}")),
            status(r)
        );
        let _ = writeln!(
            cp_csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.mode.label(),
            r.services,
            set.endpoints,
            num(f.cold),
            num(r.control.cold_healthz.map(|d| d.as_secs_f64())),
            num(f.change_p50),
            num(f.change_p99),
            r.control.changes.len(),
            num(kind_p50(ChangeKind::EndpointAdded)),
            num(kind_p50(ChangeKind::EndpointRemoved)),
            num(kind_p50(ChangeKind::ServiceAdded)),
            num(measured.then_some(r.control.cpu_cold.as_secs_f64())),
            num(measured.then_some(r.control.cpu_total.as_secs_f64())),
            num(measured.then_some(r.control.children_cpu_total.as_secs_f64())),
            num(f.rss_mib),
            csv_field(&status(r))
        );
    }

    // Figure 2.
    let _ = writeln!(
        md,
        "\n## 2. Data plane\n\nFrom the client pod to the probed Service (`{}/web`, the last Service in iptables' dispatch order) through its ClusterIP, and straight to its pod: connect + HTTP/1.0 request + response + close, VIP and direct interleaved, each from its own half of the client's ephemeral port range (so the two never collide in the backend's TIME_WAIT sockets). Rate: sequential short connections per second. Throughput: iperf3 TCP, one stream.\n",
        super::cluster::PROBE_NS
    );
    let _ = writeln!(
        md,
        "| mode | Services | VIP p50 ms | VIP p99 ms | direct p50 ms | direct p99 ms | **VIP ÷ direct p50** | VIP ÷ direct p99 | VIP req/s | direct req/s | VIP Gbit/s | direct Gbit/s | status |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let mut dp_csv = String::from(
        "mode,services,vip_p50_ms,vip_p99_ms,direct_p50_ms,direct_p99_ms,vip_direct_p50,vip_direct_p99,vip_req_s,direct_req_s,vip_gbit_s,direct_gbit_s,samples,status\n",
    );
    for r in runs {
        let f = fig(r);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} |",
            r.mode.label(),
            r.services,
            opt(f.vip_p50_ms, |v| format!("{v:.3}")),
            opt(f.vip_p99_ms, |v| format!("{v:.3}")),
            opt(f.direct_p50_ms, |v| format!("{v:.3}")),
            opt(f.direct_p99_ms, |v| format!("{v:.3}")),
            fr(ratio(f.vip_p50_ms, f.direct_p50_ms)),
            fr(ratio(f.vip_p99_ms, f.direct_p99_ms)),
            opt(f.vip_rate, |v| format!("{v:.0}")),
            opt(f.direct_rate, |v| format!("{v:.0}")),
            opt(f.vip_gbps, |v| format!("{v:.2}")),
            opt(f.direct_gbps, |v| format!("{v:.2}")),
            status(r)
        );
        let _ = writeln!(
            dp_csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.mode.label(),
            r.services,
            num(f.vip_p50_ms),
            num(f.vip_p99_ms),
            num(f.direct_p50_ms),
            num(f.direct_p99_ms),
            num(ratio(f.vip_p50_ms, f.direct_p50_ms)),
            num(ratio(f.vip_p99_ms, f.direct_p99_ms)),
            num(f.vip_rate),
            num(f.direct_rate),
            num(f.vip_gbps),
            num(f.direct_gbps),
            r.data.as_ref().map_or(0, |d| d.vip.len()),
            csv_field(&status(r))
        );
    }

    // Figure 3.
    let _ = writeln!(
        md,
        "\n## 3. Summary\n\nEach mode against going straight to the pod (VIP ÷ direct; latency: lower is better, 1.00× = no cost; rate and throughput: higher is better, 1.00× = no cost) and against iptables (legacy backend, kube-proxy's classic setup: mode ÷ iptables-legacy at the same scale; below 1.00× = less time / memory than iptables).\n"
    );
    let _ = writeln!(
        md,
        "| mode | Services | latency p50 vs direct | latency p99 vs direct | req/s vs direct | throughput vs direct | cold sync vs iptables | change p50 vs iptables | VIP latency p50 vs iptables | CPU vs iptables | peak RSS vs iptables |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut sum_csv = String::from(
        "mode,services,latency_p50_vs_direct,latency_p99_vs_direct,rate_vs_direct,throughput_vs_direct,cold_vs_iptables,change_p50_vs_iptables,vip_p50_vs_iptables,cpu_vs_iptables,rss_vs_iptables\n",
    );
    for r in runs {
        let f = fig(r);
        let ipt = get(BenchMode::IptablesLegacy, r.services)
            .map(fig)
            .unwrap_or_default();
        let row = [
            ratio(f.vip_p50_ms, f.direct_p50_ms),
            ratio(f.vip_p99_ms, f.direct_p99_ms),
            ratio(f.vip_rate, f.direct_rate),
            ratio(f.vip_gbps, f.direct_gbps),
            ratio(f.cold, ipt.cold),
            ratio(f.change_p50, ipt.change_p50),
            ratio(f.vip_p50_ms, ipt.vip_p50_ms),
            ratio(f.cpu, ipt.cpu),
            ratio(f.rss_mib, ipt.rss_mib),
        ];
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            r.mode.label(),
            r.services,
            row.iter().map(|v| fr(*v)).collect::<Vec<_>>().join(" | ")
        );
        let _ = writeln!(
            sum_csv,
            "{},{},{}",
            r.mode.label(),
            r.services,
            row.iter().map(|v| num(*v)).collect::<Vec<_>>().join(",")
        );
    }
    // Growth: from 1,000 Services (or the smallest scale above it... the preset's second scale
    // when 1,000 is absent) to the largest.
    let from = scales
        .iter()
        .copied()
        .find(|s| *s == 1000)
        .or_else(|| scales.iter().copied().min());
    let to = scales.iter().copied().max();
    if let (Some(from), Some(to)) = (from, to)
        && from < to
    {
        let _ = writeln!(
            md,
            "\nGrowth from {from} to {to} Services (value at {to} ÷ value at {from}; – where a scale did not converge or was not run):\n\n| mode | cold sync | change p50 | CPU | peak RSS | VIP latency p50 | VIP ÷ direct p50 | VIP req/s | VIP throughput |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for &m in &modes {
            let (a, b) = (
                get(m, from).map(fig).unwrap_or_default(),
                get(m, to).map(fig).unwrap_or_default(),
            );
            let g = [
                ratio(b.cold, a.cold),
                ratio(b.change_p50, a.change_p50),
                ratio(b.cpu, a.cpu),
                ratio(b.rss_mib, a.rss_mib),
                ratio(b.vip_p50_ms, a.vip_p50_ms),
                ratio(
                    ratio(b.vip_p50_ms, b.direct_p50_ms),
                    ratio(a.vip_p50_ms, a.direct_p50_ms),
                ),
                ratio(b.vip_rate, a.vip_rate),
                ratio(b.vip_gbps, a.vip_gbps),
            ];
            let _ = writeln!(
                md,
                "| {} | {} |",
                m.label(),
                g.iter().map(|v| fr(*v)).collect::<Vec<_>>().join(" | ")
            );
        }
    }

    // Plots.
    type Pick = fn(&Fig) -> Option<f64>;
    let plots: [(&str, &str, &str, Pick); 8] = [
        ("cold-sync.svg", "Cold full sync", "seconds", |f| f.cold),
        (
            "change-p50.svg",
            "One change to the kernel, p50",
            "seconds",
            |f| f.change_p50,
        ),
        (
            "change-p99.svg",
            "One change to the kernel, p99",
            "seconds",
            |f| f.change_p99,
        ),
        (
            "cpu.svg",
            "CPU time, shunt + tools (whole run)",
            "seconds",
            |f| f.cpu,
        ),
        ("peak-rss.svg", "shunt peak RSS", "MiB", |f| f.rss_mib),
        (
            "latency-ratio.svg",
            "Request latency p50, VIP ÷ direct",
            "ratio",
            |f| ratio(f.vip_p50_ms, f.direct_p50_ms),
        ),
        (
            "latency-vip-p99.svg",
            "Request latency via the VIP, p99",
            "ms",
            |f| f.vip_p99_ms,
        ),
        (
            "throughput.svg",
            "TCP throughput via the VIP (iperf3)",
            "Gbit/s",
            |f| f.vip_gbps,
        ),
    ];
    let _ = writeln!(md, "\n## Plots\n");
    for (file, title, unit, pick) in plots {
        let series: Vec<(String, Vec<Option<f64>>)> = modes
            .iter()
            .map(|m| {
                (
                    m.label().to_owned(),
                    scales
                        .iter()
                        .map(|s| get(*m, *s).and_then(|r| pick(&fig(r))))
                        .collect(),
                )
            })
            .collect();
        std::fs::write(
            out.join(file),
            svg::line_chart(title, unit, scales, &series),
        )
        .with_context(|| format!("writing {file}"))?;
        let _ = writeln!(md, "![{title}]({file})\n");
    }
    let _ = writeln!(
        md,
        "CSV: [control-plane.csv](control-plane.csv), [data-plane.csv](data-plane.csv), [summary.csv](summary.csv)."
    );
    for (file, text) in [
        ("report.md", &md),
        ("control-plane.csv", &cp_csv),
        ("data-plane.csv", &dp_csv),
        ("summary.csv", &sum_csv),
    ] {
        std::fs::write(out.join(file), text).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}
