//! `shunt inspect` and `shunt trace`: what a running shunt programmed, read back from the
//! kernel (nft table, iptables chains, BPF maps), and the verdict a new packet would get.
//!
//! Layering, as for the rest of shunt: parsing the read-back state is pure and table-tested
//! (`nft`: nft's text; `iptables`: iptables-save output; `ebpf`: map contents decoded with the
//! shunt-abi types), each into a mode-neutral [`FamilyView`] for `inspect` and a per-mode
//! tracer for `trace` (the same tracers the plans are tested with: `plan::nft::trace`,
//! `plan::iptables::tracer`, and [`ebpf::trace`] modelled on the kernel program). Reading the
//! kernel (running nft / iptables-save, opening pinned maps) is the thin impure layer in
//! [`read`].
pub mod ebpf;
pub mod nft;
pub mod read;
pub mod text;
pub mod view;

#[cfg(test)]
mod netns_tests;
#[cfg(test)]
mod scenario_tests;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::model::{IpFamily, Protocol};

/// The first packet of a new connection, as `shunt trace` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub protocol: Proto,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
}

/// [`Protocol`] with serde support (lower-case, as nft and iptables spell it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl From<Protocol> for Proto {
    fn from(p: Protocol) -> Proto {
        match p {
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Sctp => Proto::Sctp,
        }
    }
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Protocol {
        match p {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
            Proto::Sctp => Protocol::Sctp,
        }
    }
}

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Proto, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Ok(Proto::Sctp),
            other => Err(format!("unknown protocol {other:?} (tcp, udp or sctp)")),
        }
    }
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        Protocol::from(self).as_str()
    }
}

impl Packet {
    pub fn family(&self) -> IpFamily {
        match self.dst {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// One possible fate of the packet (several when the endpoint is chosen at random).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Fate {
    /// DNATed to `endpoint`; `masquerade`: the source is rewritten to a node address.
    Endpoint {
        endpoint: SocketAddr,
        masquerade: bool,
    },
    /// Silently discarded.
    Drop,
    /// Refused (TCP RST / ICMP unreachable, or ECONNREFUSED at a socket hook).
    Reject,
    /// Left alone: goes on to its original destination (`masquerade` if still SNATed).
    Untouched { masquerade: bool },
}

/// `shunt trace`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceResult {
    pub mode: String,
    pub packet: Packet,
    /// Every fate over every endpoint choice (one unless endpoints are chosen at random).
    pub fates: BTreeSet<Fate>,
    /// Why, in the dataplane's own terms (chains, maps, flags), one line each.
    pub why: Vec<String>,
}

/// What `inspect services` shows for one family.
pub use view::{FamilyView, FrontendKind, FrontendView, Inspected};

/// Errors of inspect/trace: nothing programmed, unreadable state, untraceable state.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "nothing programmed by shunt found (no `shunt` nftables table, no SHUNT- iptables chain, no pins under {pin_dir}); is shunt running on this node, in this network namespace?"
    )]
    NothingProgrammed { pin_dir: String },
    #[error("{mode} mode: nothing programmed for {family}")]
    FamilyMissing { mode: String, family: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Tool { tool: String, stderr: String },
    #[error("parsing {what}: {msg}")]
    Parse { what: String, msg: String },
    #[error("tracing: {0}")]
    Trace(String),
    #[error("{0}")]
    Other(String),
}

/// Trace through one family's nft table (read back, or the plan's parsed script).
pub fn nft_trace(
    t: &nft::NftTable,
    local: &[IpAddr],
    p: &Packet,
) -> Result<BTreeSet<Fate>, InspectError> {
    Ok(nft_trace_explained(t, local, p)?.0)
}

/// [`nft_trace`] with, for each fate, the chains its first branch went through.
pub fn nft_trace_explained(
    t: &nft::NftTable,
    local: &[IpAddr],
    p: &Packet,
) -> Result<(BTreeSet<Fate>, Vec<String>), InspectError> {
    let pkt = crate::plan::nft::trace::Packet {
        protocol: p.protocol.into(),
        src: p.src,
        dst: p.dst,
        dport: p.dport,
    };
    let tr = crate::plan::nft::trace::try_trace(t.chain_defs(), t.element_list(), local, &pkt)
        .map_err(|e| InspectError::Trace(e.to_string()))?;
    let fates = read::nft_fates(&tr);
    // Chains that only returned (checks that did not apply) are noise; keep the rest.
    let why = tr
        .paths
        .iter()
        .map(|(fate, path)| {
            let mut chains: Vec<&str> = path
                .iter()
                .map(String::as_str)
                .filter(|c| t.chains.get(*c).is_some_and(|d| !d.rules.is_empty()))
                .collect();
            chains.dedup();
            format!(
                "{}: chains {}",
                text::fate(&read::nft_fate(fate)),
                chains.join(" > ")
            )
        })
        .collect();
    Ok((fates, why))
}

/// Trace through one family's iptables chains.
pub fn iptables_trace(
    t: &crate::plan::iptables::tracer::Tracer,
    p: &Packet,
) -> Result<BTreeSet<Fate>, InspectError> {
    let pkt = crate::plan::iptables::tracer::Packet {
        protocol: p.protocol.into(),
        src: p.src,
        dst: p.dst,
        dport: p.dport,
    };
    let out = t
        .try_trace(&pkt)
        .map_err(|e| InspectError::Trace(e.to_string()))?;
    Ok(read::iptables_fates(&out))
}

/// The programmed frontends the packet's destination matches, one line each.
pub fn explain(view: &FamilyView, p: &Packet) -> Vec<String> {
    let mut out = Vec::new();
    for f in &view.frontends {
        if f.port != p.dport || f.protocol != p.protocol {
            continue;
        }
        let addr_match = match f.address {
            Some(a) => a == p.dst,
            None => view
                .node_port_addresses
                .as_ref()
                .is_none_or(|s| s.contains(&p.dst)),
        };
        if !addr_match {
            continue;
        }
        let mut line = format!(
            "frontend {} {}:{}/{}",
            text::kind(f.kind),
            f.address
                .map_or("<node-port addresses>".to_string(), |a| a.to_string()),
            f.port,
            f.protocol.as_str()
        );
        if let Some(s) = &f.service {
            line.push_str(&format!(" of {s}"));
        }
        line.push_str(&format!(", {} endpoint(s)", f.endpoints.len()));
        if let Some(e) = &f.external_endpoints {
            line.push_str(&format!(" ({} for sources outside the cluster)", e.len()));
        }
        if let Some(ne) = f.no_endpoints {
            line.push_str(&format!(", without endpoints: {ne:?}"));
        }
        if !f.source_ranges.is_empty() {
            line.push_str(&format!(", source ranges {:?}", f.source_ranges));
        }
        if let Some(a) = f.affinity_seconds {
            line.push_str(&format!(
                ", ClientIP affinity {a}s (a first packet has none yet)"
            ));
        }
        out.push(line);
    }
    if out.is_empty()
        && let Some(f) = view
            .frontends
            .iter()
            .find(|f| f.kind == FrontendKind::ClusterIp && f.address == Some(p.dst))
    {
        out.push(format!(
            "{} is the ClusterIP of {} but no Service port {}/{} is programmed on it: refused",
            p.dst,
            f.service.as_deref().unwrap_or("a Service"),
            p.dport,
            p.protocol.as_str()
        ));
    }
    if out.is_empty() {
        out.push(format!(
            "no Service frontend programmed for {}:{}/{}",
            p.dst,
            p.dport,
            p.protocol.as_str()
        ));
    }
    out
}
