//! Lowering of a `Transaction` to nft's native syntax, the input of `nft -f -` (what
//! kube-proxy's knftables feeds nft as well).
//!
//! Why text rather than JSON (`nft -j -f -`, which shunt used to generate with the `nftables`
//! crate's typed schema), measured on nft 1.0.6 with the
//! same 2,000-Service x 10-endpoint ruleset loaded into an empty namespace: JSON 3.7 s and
//! 470 MB peak RSS in nft, text 2.4 s and 225 MB (nft's JSON parser builds a jansson tree
//! of the whole document before it evaluates a single command). More decisively, nft 1.0.6's
//! JSON parser cannot declare a map keyed by a plain integer (it rejects `"type": "integer"`
//! and knows no `typeof`), which the endpoint-pick map needs (see `build`).
//!
//! The document is written command by command into one buffer, so memory stays
//! proportional to the output, and consecutive element additions (or deletions) of one set
//! are batched into a single `add element` command.
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::ir::*;
use super::names::TABLE;
use super::tx::{Op, Transaction};
use crate::model::IpFamily;

/// nft's quoted strings cannot escape `"`; Kubernetes names never contain one, and a stray
/// one in a comment must not break the whole transaction.
fn quoted(out: &mut String, s: &str) {
    out.push('"');
    out.extend(s.chars().map(|c| if c == '"' { '\'' } else { c }));
    out.push('"');
}

fn hook(h: Hook) -> &'static str {
    match h {
        Hook::Prerouting => "prerouting",
        Hook::Input => "input",
        Hook::Forward => "forward",
        Hook::Output => "output",
        Hook::Postrouting => "postrouting",
    }
}

fn key_type(f: IpFamily, k: KeyType) -> &'static str {
    match (f, k) {
        (IpFamily::V4, KeyType::Addr) => "type ipv4_addr",
        (IpFamily::V6, KeyType::Addr) => "type ipv6_addr",
        (IpFamily::V4, KeyType::AddrProtoPort) => "type ipv4_addr . inet_proto . inet_service",
        (IpFamily::V6, KeyType::AddrProtoPort) => "type ipv6_addr . inet_proto . inet_service",
        (_, KeyType::ProtoPort) => "type inet_proto . inet_service",
        // `typeof` gives the key numgen's own 32-bit integer type; `type integer` is
        // rejected as unqualified and `mark` does not match numgen's datatype.
        (_, KeyType::Pick) => "typeof numgen random mod 1",
    }
}

fn key_expr(f: IpFamily, k: KeyType) -> String {
    match k {
        KeyType::Addr => format!("{} daddr", f.nft()),
        KeyType::AddrProtoPort => format!("{} daddr . meta l4proto . th dport", f.nft()),
        KeyType::ProtoPort => "meta l4proto . th dport".to_string(),
        KeyType::Pick => unreachable!("pick maps are looked up by numgen, see Verdict::Pick"),
    }
}

fn net(out: &mut String, n: &IpNet) {
    if n.prefix_len() == n.max_prefix_len() {
        let _ = write!(out, "{}", n.addr());
    } else {
        let _ = write!(out, "{}/{}", n.network(), n.prefix_len());
    }
}

fn nets(out: &mut String, ns: &[IpNet]) {
    if ns.len() == 1 {
        net(out, &ns[0]);
    } else {
        out.push_str("{ ");
        for (i, n) in ns.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            net(out, n);
        }
        out.push_str(" }");
    }
}

fn match_(out: &mut String, f: IpFamily, m: &Match) {
    let ipx = f.nft();
    match m {
        Match::CtStateNew => out.push_str("ct state new"),
        Match::Daddr { nets: ns, negate } | Match::Saddr { nets: ns, negate } => {
            let dir = if matches!(m, Match::Daddr { .. }) {
                "daddr"
            } else {
                "saddr"
            };
            let _ = write!(out, "{ipx} {dir} {}", if *negate { "!= " } else { "" });
            nets(out, ns);
        }
        Match::DaddrInSet(s) => {
            let _ = write!(out, "{ipx} daddr @{s}");
        }
        Match::SaddrInSet(s) => {
            let _ = write!(out, "{ipx} saddr @{s}");
        }
        Match::Dport(p, port) => {
            let _ = write!(out, "{} dport {port}", p.as_str());
        }
        Match::L4Proto(p) => {
            let _ = write!(out, "meta l4proto {}", p.as_str());
        }
        Match::FibDaddrLocal => out.push_str("fib daddr type local"),
        Match::FibSaddrLocal => out.push_str("fib saddr type local"),
        Match::MarkClear(mask) => {
            let _ = write!(out, "meta mark & {mask:#x} == 0");
        }
    }
}

fn stmt(out: &mut String, f: IpFamily, s: &Stmt) {
    match s {
        Stmt::MarkOr(m) => {
            let _ = write!(out, "meta mark set meta mark | {m:#x}");
        }
        Stmt::MarkXor(m) => {
            let _ = write!(out, "meta mark set meta mark ^ {m:#x}");
        }
        Stmt::Masquerade => out.push_str("masquerade fully-random"),
        Stmt::UpdateSaddr(set) => {
            let _ = write!(out, "update @{set} {{ {} saddr }}", f.nft());
        }
        Stmt::Dnat(a) => match a.ip() {
            IpAddr::V4(ip) => {
                let _ = write!(out, "dnat to {ip}:{}", a.port());
            }
            IpAddr::V6(ip) => {
                let _ = write!(out, "dnat to [{ip}]:{}", a.port());
            }
        },
    }
}

/// A verdict as map data (`goto X`); the plan stores nothing else in maps.
fn verdict_data(out: &mut String, v: &Verdict) {
    match v {
        Verdict::Drop => out.push_str("drop"),
        Verdict::Return => out.push_str("return"),
        Verdict::Jump(c) => {
            let _ = write!(out, "jump {c}");
        }
        Verdict::Goto(c) => {
            let _ = write!(out, "goto {c}");
        }
        Verdict::Reject | Verdict::Vmap { .. } | Verdict::Pick { .. } => {
            unreachable!("verdict {v:?} is not a map value")
        }
    }
}

fn verdict(out: &mut String, f: IpFamily, v: &Verdict) {
    match v {
        Verdict::Reject => out.push_str("reject"),
        Verdict::Vmap { key, map } => {
            let _ = write!(out, "{} vmap @{map}", key_expr(f, *key));
        }
        Verdict::Pick { count, offset, map } => {
            let _ = write!(out, "numgen random mod {count} offset {offset} vmap @{map}");
        }
        _ => verdict_data(out, v),
    }
}

fn rule(out: &mut String, f: IpFamily, chain: &str, r: &Rule) {
    let _ = write!(out, "add rule {} {TABLE} {chain}", f.nft());
    for m in &r.matches {
        out.push(' ');
        match_(out, f, m);
    }
    for s in &r.stmts {
        out.push(' ');
        stmt(out, f, s);
    }
    if let Some(v) = &r.verdict {
        out.push(' ');
        verdict(out, f, v);
    }
    if let Some(c) = &r.comment {
        out.push_str(" comment ");
        quoted(out, c);
    }
    out.push('\n');
}

fn key(out: &mut String, k: &Key) {
    let _ = match k {
        Key::Addr(ip) => write!(out, "{ip}"),
        Key::AddrProtoPort(ip, p, port) => write!(out, "{ip} . {} . {port}", p.as_str()),
        Key::ProtoPort(p, port) => write!(out, "{} . {port}", p.as_str()),
        Key::Pick(n) => write!(out, "{n}"),
    };
}

fn set_kind(verdict_map: bool) -> &'static str {
    if verdict_map { "map" } else { "set" }
}

fn set_decl(out: &mut String, f: IpFamily, d: &SetDef) {
    let _ = write!(
        out,
        "add {} {} {TABLE} {} {{ {}",
        set_kind(d.verdict_map),
        f.nft(),
        d.name,
        key_type(f, d.key)
    );
    if d.verdict_map {
        out.push_str(" : verdict");
    }
    out.push(';');
    if let Some(t) = d.timeout_seconds {
        let _ = write!(out, " flags timeout; timeout {t}s;");
    }
    if let Some(c) = &d.comment {
        out.push_str(" comment ");
        quoted(out, c);
        out.push(';');
    }
    out.push_str(" }\n");
}

/// The open `add element`/`delete element` command that further elements join.
#[derive(PartialEq)]
struct OpenElements<'a> {
    add: bool,
    set: &'a str,
}

/// The script for `nft -f -`, appended to `out`.
pub fn write_text(tx: &Transaction, out: &mut String) {
    for fam in &tx.families {
        let f = fam.family;
        let fam_name = f.nft();
        let mut open: Option<OpenElements<'_>> = None;
        for op in &fam.ops {
            let elem = match op {
                Op::AddElement(e) => Some((true, e)),
                Op::DeleteElement(e) => Some((false, e)),
                _ => None,
            };
            if let Some((add, e)) = elem {
                let this = OpenElements { add, set: &e.set };
                if open.as_ref() == Some(&this) {
                    out.push_str(", ");
                } else {
                    if open.is_some() {
                        out.push_str(" }\n");
                    }
                    let _ = write!(
                        out,
                        "{} element {fam_name} {TABLE} {} {{ ",
                        if add { "add" } else { "delete" },
                        e.set
                    );
                    open = Some(this);
                }
                key(out, &e.key);
                if add {
                    if let Some(c) = &e.comment {
                        out.push_str(" comment ");
                        quoted(out, c);
                    }
                    if let Some(v) = &e.value {
                        out.push_str(" : ");
                        verdict_data(out, v);
                    }
                }
                continue;
            }
            if open.take().is_some() {
                out.push_str(" }\n");
            }
            match op {
                Op::AddTable => {
                    let _ = writeln!(out, "add table {fam_name} {TABLE}");
                }
                Op::DeleteTable => {
                    let _ = writeln!(out, "delete table {fam_name} {TABLE}");
                }
                Op::AddChain { name, base: None } => {
                    let _ = writeln!(out, "add chain {fam_name} {TABLE} {name}");
                }
                Op::AddChain {
                    name,
                    base: Some(b),
                } => {
                    let kind = match b.kind {
                        ChainType::Filter => "filter",
                        ChainType::Nat => "nat",
                    };
                    let _ = writeln!(
                        out,
                        "add chain {fam_name} {TABLE} {name} {{ type {kind} hook {} priority {}; policy accept; }}",
                        hook(b.hook),
                        b.priority
                    );
                }
                Op::FlushChain(name) => {
                    let _ = writeln!(out, "flush chain {fam_name} {TABLE} {name}");
                }
                Op::DeleteChain(name) => {
                    let _ = writeln!(out, "delete chain {fam_name} {TABLE} {name}");
                }
                Op::AddRule { chain, rule: r } => rule(out, f, chain, r),
                Op::AddSet(d) => set_decl(out, f, d),
                Op::FlushSet(d) => {
                    let _ = writeln!(
                        out,
                        "flush {} {fam_name} {TABLE} {}",
                        set_kind(d.verdict_map),
                        d.name
                    );
                }
                Op::DeleteSet { name, verdict_map } => {
                    let _ = writeln!(
                        out,
                        "delete {} {fam_name} {TABLE} {name}",
                        set_kind(*verdict_map)
                    );
                }
                Op::AddElement(_) | Op::DeleteElement(_) => unreachable!("handled above"),
            }
        }
        if open.is_some() {
            out.push_str(" }\n");
        }
    }
}

/// The whole script as a string.
pub fn to_text(tx: &Transaction) -> String {
    let mut out = String::new();
    write_text(tx, &mut out);
    out
}
