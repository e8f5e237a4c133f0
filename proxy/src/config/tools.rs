//! shunt's own subcommands, `shunt inspect ...` and `shunt trace ...`, parsed apart from
//! kube-proxy's flags: a kube-proxy command line never starts with a bare word, so a first
//! argument `inspect` or `trace` selects them and every other command line goes to
//! [`super::Settings::from_args`] unchanged.
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The subcommands.
#[derive(Debug, Parser)]
#[command(
    name = "shunt",
    about = "See into the dataplane of the shunt running on this node (in this network namespace)"
)]
pub enum ToolCommand {
    /// Show what is programmed, read back from the kernel.
    #[command(subcommand)]
    Inspect(InspectWhat),
    /// The verdict a new connection's first packet would get on this node, and why.
    Trace(TraceArgs),
}

#[derive(Debug, Subcommand)]
pub enum InspectWhat {
    /// Every Service frontend with its endpoints and flags, as programmed.
    Services {
        /// Only this Service (`NAMESPACE/NAME`) or port (`NAMESPACE/NAME:PORT`).
        service: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// ebpf mode: the connection tracking entries of the programs, with their NAT.
    Conntrack {
        #[command(flatten)]
        common: Common,
    },
    /// ebpf mode: the programs' counters (summed over CPUs).
    Counters {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Source address of the packet (a node address: the node itself sends it).
    #[arg(long, value_name = "IP")]
    pub src: IpAddr,
    /// Destination address and port (`IP:PORT`, `[IPv6]:PORT`).
    #[arg(long, value_name = "IP:PORT")]
    pub dst: SocketAddr,
    /// Protocol.
    #[arg(long, value_name = "tcp|udp|sctp", default_value = "tcp")]
    pub proto: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
    /// The mode to read (default: detected from what is programmed: the `shunt` nftables
    /// tables, `SHUNT-` iptables chains, pins under --pin-dir).
    #[arg(long, value_name = "nftables|iptables|ebpf")]
    pub proxy_mode: Option<String>,
    /// iptables mode: which backend holds the chains (default: the one that does).
    #[arg(long, value_name = "auto|legacy|nft", default_value = "auto")]
    pub iptables_backend: String,
    /// ebpf mode: where the maps are pinned.
    #[arg(long, value_name = "DIR", default_value = super::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// `Some` when the command line is a subcommand (first argument `inspect` or `trace`).
pub fn tool_command<I, T>(args: I) -> Option<Result<ToolCommand, clap::Error>>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let first = args.get(1)?.to_str()?;
    if !matches!(first, "inspect" | "trace") {
        return None;
    }
    Some(ToolCommand::try_parse_from(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_command_lines_are_not_subcommands() {
        for args in [
            vec![
                "shunt",
                "--proxy-mode",
                "nftables",
                "--manifests",
                "inspect",
            ],
            vec!["shunt", "--cleanup"],
            vec!["shunt"],
            vec!["shunt", "--hostname-override", "trace"],
        ] {
            assert!(tool_command(args.clone()).is_none(), "{args:?}");
        }
    }

    #[test]
    fn subcommands_parse_their_flags() {
        let cmd = tool_command([
            "shunt",
            "trace",
            "--src",
            "10.0.0.2",
            "--dst",
            "[fd00::1]:80",
            "--proto",
            "udp",
            "-o",
            "json",
            "--proxy-mode",
            "iptables",
        ])
        .unwrap()
        .unwrap();
        let ToolCommand::Trace(t) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(t.dst, "[fd00::1]:80".parse().unwrap());
        assert_eq!((t.proto.as_str(), t.common.output), ("udp", Output::Json));
        assert_eq!(t.common.proxy_mode.as_deref(), Some("iptables"));
        assert_eq!(t.common.pin_dir, PathBuf::from("/sys/fs/bpf/shunt"));
        let cmd = tool_command(["shunt", "inspect", "services", "ns1/svc1"])
            .unwrap()
            .unwrap();
        assert!(matches!(
            cmd,
            ToolCommand::Inspect(InspectWhat::Services { service: Some(ref s), .. }) if s == "ns1/svc1"
        ));
        let err = tool_command(["shunt", "trace", "--src", "10.0.0.2", "--dst", "10.0.0.3"])
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("--dst"), "{err}");
    }
}
