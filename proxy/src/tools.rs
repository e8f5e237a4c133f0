//! `shunt inspect` / `shunt trace`: read what the running shunt programmed and print it.
use anyhow::{Context as _, bail};

use shunt::config::ProxyMode;
use shunt::config::tools::{Common, InspectWhat, Output, ToolCommand, TraceArgs};
use shunt::dataplane::iptables::{Backend, BackendChoice};
use shunt::inspect::read::{self, Target};
use shunt::inspect::{Packet, text};

fn target(c: &Common) -> anyhow::Result<Target> {
    let mode = match c.proxy_mode.as_deref() {
        None => None,
        Some("nftables") => Some(ProxyMode::Nftables),
        Some("iptables") => Some(ProxyMode::Iptables),
        Some("ebpf") => Some(ProxyMode::Ebpf),
        Some(other) => bail!("--proxy-mode {other:?}: expected nftables, iptables or ebpf"),
    };
    let backend = match c
        .iptables_backend
        .parse::<BackendChoice>()
        .context("--iptables-backend")?
    {
        BackendChoice::Auto => None,
        BackendChoice::Legacy => Some(Backend::Legacy),
        BackendChoice::Nft => Some(Backend::Nft),
    };
    Ok(Target {
        mode,
        backend,
        pin_dir: c.pin_dir.clone(),
    })
}

/// Print to stdout; a closed pipe (`| head`) ends the output quietly, as for any CLI tool.
fn print<T: serde::Serialize>(output: Output, value: &T, text: impl FnOnce(&T) -> String) {
    use std::io::Write as _;
    let doc = match output {
        Output::Json => {
            let mut s = serde_json::to_string_pretty(value).expect("plain data serializes");
            s.push('\n');
            s
        }
        Output::Text => text(value),
    };
    let _ = std::io::stdout().lock().write_all(doc.as_bytes());
}

fn ebpf_only(t: &Target, what: &str) -> anyhow::Result<()> {
    let mode = read::detect_mode(t)?;
    if mode != ProxyMode::Ebpf {
        bail!(
            "`shunt inspect {what}` reads the ebpf programs' maps; the programmed mode is {mode} (its conntrack is the kernel's: `conntrack -L`)"
        );
    }
    Ok(())
}

pub fn run(cmd: ToolCommand) -> anyhow::Result<()> {
    match cmd {
        ToolCommand::Inspect(InspectWhat::Services { service, common }) => {
            let t = target(&common)?;
            let mut doc = read::inspect(&t)?;
            if let Some(filter) = &service {
                let matches = |s: &Option<String>| {
                    s.as_deref().is_some_and(|s| {
                        s == filter
                            || s.strip_prefix(filter.as_str())
                                .is_some_and(|r| r.starts_with(':'))
                    })
                };
                for fam in &mut doc.families {
                    fam.frontends.retain(|f| matches(&f.service));
                }
                if doc.families.iter().all(|f| f.frontends.is_empty()) {
                    if doc.mode == "ebpf" {
                        bail!(
                            "ebpf mode: the BPF maps carry no Service names; run without a filter and look for the frontend's address"
                        );
                    }
                    bail!("no programmed frontend belongs to {filter}");
                }
            }
            print(common.output, &doc, text::inspected);
        }
        ToolCommand::Inspect(InspectWhat::Conntrack { common }) => {
            let t = target(&common)?;
            ebpf_only(&t, "conntrack")?;
            let entries = read::read_ebpf_conntrack(&t.pin_dir)?;
            print(common.output, &entries, |es| {
                let mut out = format!("{} entries\n", es.len());
                for e in es {
                    out.push_str(&format!(
                        "  {} {} -> {} {} nat {}{} {} expires in {}s\n",
                        e.protocol,
                        e.src,
                        e.dst,
                        e.direction,
                        e.nat,
                        e.snat.map_or(String::new(), |s| format!(" snat {s}")),
                        e.state,
                        e.expires_in_secs
                    ));
                }
                out
            });
        }
        ToolCommand::Inspect(InspectWhat::Counters { common }) => {
            let t = target(&common)?;
            ebpf_only(&t, "counters")?;
            let counters = read::read_ebpf_counters(&t.pin_dir)?;
            print(common.output, &counters, |cs| {
                cs.iter()
                    .map(|c| {
                        format!(
                            "{:<22} {:>12} packets {:>14} bytes\n",
                            c.name, c.packets, c.bytes
                        )
                    })
                    .collect()
            });
        }
        ToolCommand::Trace(TraceArgs {
            src,
            dst,
            proto,
            common,
        }) => {
            let t = target(&common)?;
            let packet = Packet {
                protocol: proto
                    .parse()
                    .map_err(anyhow::Error::msg)
                    .context("--proto")?,
                src,
                dst: dst.ip(),
                dport: dst.port(),
            };
            if src.is_ipv4() != dst.is_ipv4() {
                bail!("--src {src} and --dst {dst} are of different IP families");
            }
            let result = read::trace(&t, &packet)?;
            print(common.output, &result, text::trace);
        }
    }
    Ok(())
}
