//! Human-readable output of `shunt inspect` and `shunt trace` (the JSON output is the serde
//! form of the same structures).
use std::fmt::Write as _;

use super::view::{FrontendKind, FrontendView, Inspected};
use super::{Fate, TraceResult};

pub fn kind(k: FrontendKind) -> &'static str {
    match k {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::ExternalIp => "externalIP",
        FrontendKind::LoadBalancer => "LoadBalancer",
        FrontendKind::External => "external",
    }
}

fn frontend(out: &mut String, f: &FrontendView) {
    let addr = match f.address {
        Some(std::net::IpAddr::V6(a)) => format!("[{a}]"),
        Some(a) => a.to_string(),
        None => "*".to_string(),
    };
    let _ = write!(
        out,
        "  {:<12} {addr}:{}/{}",
        kind(f.kind),
        f.port,
        f.protocol.as_str()
    );
    if let Some(s) = &f.service {
        let _ = write!(out, "  {s}");
    }
    out.push('\n');
    let list = |eps: &std::collections::BTreeSet<std::net::SocketAddr>| {
        eps.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !f.endpoints.is_empty() {
        let _ = writeln!(out, "      endpoints: {}", list(&f.endpoints));
    }
    if let Some(e) = &f.external_endpoints {
        let _ = writeln!(
            out,
            "      from outside the cluster: {}",
            if e.is_empty() { "-".into() } else { list(e) }
        );
    }
    let mut flags = Vec::new();
    if let Some(ne) = f.no_endpoints {
        flags.push(format!("no endpoints: {ne:?}").to_lowercase());
    }
    if let Some(a) = f.affinity_seconds {
        flags.push(format!("ClientIP affinity {a}s"));
    }
    if !f.source_ranges.is_empty() {
        let r: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
        flags.push(format!("source ranges {}", r.join(", ")));
    }
    if f.masquerade {
        flags.push("masquerades some sources".into());
    }
    if !flags.is_empty() {
        let _ = writeln!(out, "      {}", flags.join("; "));
    }
}

pub fn inspected(doc: &Inspected) -> String {
    let mut out = String::new();
    for fam in &doc.families {
        let _ = write!(out, "{} mode, {}", doc.mode, fam.family);
        if let Some(n) = &fam.node_port_addresses {
            let a: Vec<String> = n.iter().map(ToString::to_string).collect();
            let _ = write!(out, ", NodePorts on {}", a.join(", "));
        }
        let _ = writeln!(out, ": {} frontend(s)", fam.frontends.len());
        for f in &fam.frontends {
            frontend(&mut out, f);
        }
    }
    out
}

pub fn trace(t: &TraceResult) -> String {
    let p = &t.packet;
    let mut out = format!(
        "{} {} -> {}:{} ({} mode)\n",
        p.protocol.as_str(),
        p.src,
        match p.dst {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        },
        p.dport,
        t.mode
    );
    for f in &t.fates {
        let _ = writeln!(out, "  verdict: {}", fate(f));
    }
    for w in &t.why {
        let _ = writeln!(out, "  why: {w}");
    }
    out
}

/// One fate, one line.
pub fn fate(f: &Fate) -> String {
    match f {
        Fate::Endpoint {
            endpoint,
            masquerade,
        } => format!(
            "DNAT to {endpoint}{}",
            if *masquerade { ", masqueraded" } else { "" }
        ),
        Fate::Drop => "DROP".into(),
        Fate::Reject => "REJECT".into(),
        Fate::Untouched { masquerade } => format!(
            "untouched (not a Service){}",
            if *masquerade { ", masqueraded" } else { "" }
        ),
    }
}
