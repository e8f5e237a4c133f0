//! PURE: nftables text -> the plan's IR (`plan::nft::ir`), so that a table read back from the
//! kernel can be traced by the same tracer (`plan::nft::trace`) the plan is tested with.
//!
//! Two inputs share one statement grammar:
//! - [`parse_listing`]: `nft list table ip shunt` (or `nft list ruleset`) output, what the
//!   kernel holds. nft 1.0.6 prints priorities symbolically (`dstnat - 10`), marks zero-padded
//!   (`0x00004000`), element comments before the verdict (`k comment "c" : goto x`), and wraps
//!   long element lists over several lines.
//! - [`parse_script`]: the `nft -f` script `plan::nft::text` writes (`add rule ip shunt C ...`),
//!   applied command by command (add, flush, delete), so that a test can feed the plan through
//!   the very parser that reads the kernel back.
//!
//! Only what shunt programs is understood; anything else is a [`ParseError`] naming the line,
//! never silently skipped (a verdict computed from half a rule would be a lie).
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::{IpFamily, Protocol};
use crate::plan::nft::ir::*;
use crate::plan::nft::names::TABLE;

/// One family's `shunt` table: what the tracer and the inspector need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftTable {
    pub chains: BTreeMap<String, ChainDef>,
    pub sets: BTreeMap<String, SetDef>,
    /// Elements per set, by key (the kernel keys elements by key alone).
    pub elements: BTreeMap<String, BTreeMap<Key, Element>>,
}

impl NftTable {
    pub fn chain_defs(&self) -> impl Iterator<Item = &ChainDef> {
        self.chains.values()
    }
    pub fn element_list(&self) -> impl Iterator<Item = &Element> {
        self.elements.values().flat_map(|m| m.values())
    }
    /// The plan's ruleset as the kernel would hold it.
    pub fn from_ruleset(rs: &crate::plan::nft::Ruleset) -> NftTable {
        let mut t = NftTable::default();
        for c in rs.chains() {
            t.chains.insert(c.name.clone(), normalized_chain(c.clone()));
        }
        for s in rs.sets() {
            t.sets.insert(s.name.clone(), s.clone());
            t.elements.entry(s.name.clone()).or_default();
        }
        for e in rs.elements() {
            t.elements
                .entry(e.set.clone())
                .or_default()
                .insert(e.key.clone(), e.clone());
        }
        t
    }
}

/// Nets inside one match are a set to the kernel: order is not meaningful.
fn normalized_chain(mut c: ChainDef) -> ChainDef {
    for r in &mut c.rules {
        for m in &mut r.matches {
            if let Match::Daddr { nets, .. } | Match::Saddr { nets, .. } = m {
                nets.sort();
                nets.dedup();
            }
        }
    }
    c
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("nft text line {line}: {what}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub text: String,
    pub what: String,
}

/// Split into tokens: quoted strings are one token (quotes kept), `{ } , ; :` stand alone
/// (except `:` inside an address or `IP:port`, which has no spaces around it).
fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        if !cur.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                flush(&mut cur, &mut out);
                let mut q = String::from('"');
                for d in chars.by_ref() {
                    q.push(d);
                    if d == '"' {
                        break;
                    }
                }
                out.push(q);
            }
            '{' | '}' | ',' | ';' => {
                flush(&mut cur, &mut out);
                out.push(c.to_string());
            }
            c if c.is_whitespace() => flush(&mut cur, &mut out),
            c => cur.push(c),
        }
    }
    flush(&mut cur, &mut out);
    out
}

fn unquote(t: &str) -> Option<String> {
    t.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .map(str::to_string)
}

struct Cursor<'a> {
    toks: &'a [String],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.toks.get(self.i).map(String::as_str)
    }
    fn next(&mut self) -> Result<&'a str, String> {
        let t = self.peek().ok_or("unexpected end")?;
        self.i += 1;
        Ok(t)
    }
    fn expect(&mut self, want: &str) -> Result<(), String> {
        let t = self.next()?;
        if t == want {
            Ok(())
        } else {
            Err(format!("expected {want:?}, found {t:?}"))
        }
    }
}

fn protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other}")),
    }
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("bad address {s}"))
}

fn parse_num(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("bad number {s}"))
}

/// `ADDR` or `{ ADDR, ADDR }`.
fn nets(c: &mut Cursor<'_>) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    if c.peek() == Some("{") {
        c.next()?;
        loop {
            match c.next()? {
                "}" => break,
                "," => {}
                t => out.push(parse_net(t)?),
            }
        }
    } else {
        out.push(parse_net(c.next()?)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `nft`'s time values: `10800s`, `3h`, `1d2h3m4s`.
fn duration_secs(s: &str) -> Result<u32, String> {
    let mut total: u64 = 0;
    let mut num = String::new();
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let mult = match ch {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return Err(format!("bad duration {s}")),
        };
        let n: u64 = num.parse().map_err(|_| format!("bad duration {s}"))?;
        total += n * mult;
        num.clear();
    }
    if !num.is_empty() {
        total += num
            .parse::<u64>()
            .map_err(|_| format!("bad duration {s}"))?;
    }
    u32::try_from(total).map_err(|_| format!("duration {s} too long"))
}

/// One rule body (listing line, or what follows `add rule FAMILY TABLE CHAIN`).
fn rule(toks: &[String]) -> Result<Rule, String> {
    let mut c = Cursor { toks, i: 0 };
    let mut r = Rule::default();
    let set_verdict = |r: &mut Rule, v: Verdict| -> Result<(), String> {
        if r.verdict.is_some() {
            return Err("two verdicts".into());
        }
        r.verdict = Some(v);
        Ok(())
    };
    while let Some(t) = c.peek() {
        c.next()?;
        match t {
            "ct" => {
                c.expect("state")?;
                c.expect("new")?;
                r.matches.push(Match::CtStateNew);
            }
            "ip" | "ip6" => {
                let dir = c.next()?;
                if c.peek() == Some(".") {
                    // `ip daddr . meta l4proto . th dport vmap @map`
                    for w in [".", "meta", "l4proto", ".", "th", "dport", "vmap"] {
                        c.expect(w)?;
                    }
                    if dir != "daddr" {
                        return Err(format!("vmap keyed by {dir}"));
                    }
                    let map = c.next()?.strip_prefix('@').ok_or("vmap without @map")?;
                    set_verdict(
                        &mut r,
                        Verdict::Vmap {
                            key: KeyType::AddrProtoPort,
                            map: map.into(),
                        },
                    )?;
                    continue;
                }
                if let Some(set) = c.peek().and_then(|t| t.strip_prefix('@')) {
                    c.next()?;
                    r.matches.push(match dir {
                        "daddr" => Match::DaddrInSet(set.into()),
                        "saddr" => Match::SaddrInSet(set.into()),
                        other => return Err(format!("unknown selector {other}")),
                    });
                    continue;
                }
                let negate = c.peek() == Some("!=");
                if negate {
                    c.next()?;
                }
                let ns = nets(&mut c)?;
                r.matches.push(match dir {
                    "daddr" => Match::Daddr { nets: ns, negate },
                    "saddr" => Match::Saddr { nets: ns, negate },
                    other => return Err(format!("unknown selector {other}")),
                });
            }
            "meta" => match c.next()? {
                "l4proto" => {
                    if c.peek() == Some(".") {
                        for w in [".", "th", "dport", "vmap"] {
                            c.expect(w)?;
                        }
                        let map = c.next()?.strip_prefix('@').ok_or("vmap without @map")?;
                        set_verdict(
                            &mut r,
                            Verdict::Vmap {
                                key: KeyType::ProtoPort,
                                map: map.into(),
                            },
                        )?;
                    } else {
                        r.matches.push(Match::L4Proto(protocol(c.next()?)?));
                    }
                }
                "mark" => match c.next()? {
                    // `meta mark & M == 0`
                    "&" => {
                        let mask = parse_num(c.next()?)?;
                        c.expect("==")?;
                        if parse_num(c.next()?)? != 0 {
                            return Err("mark test against nonzero".into());
                        }
                        r.matches.push(Match::MarkClear(mask));
                    }
                    // `meta mark set meta mark | M` / `^ M`
                    "set" => {
                        c.expect("meta")?;
                        c.expect("mark")?;
                        let op = c.next()?;
                        let m = parse_num(c.next()?)?;
                        r.stmts.push(match op {
                            "|" => Stmt::MarkOr(m),
                            "^" => Stmt::MarkXor(m),
                            other => return Err(format!("mark operator {other}")),
                        });
                    }
                    other => return Err(format!("meta mark {other}")),
                },
                other => return Err(format!("meta {other}")),
            },
            "tcp" | "udp" | "sctp" => {
                c.expect("dport")?;
                let port = parse_num(c.next()?)?;
                let port = u16::try_from(port).map_err(|_| format!("port {port}"))?;
                r.matches.push(Match::Dport(protocol(t)?, port));
            }
            "fib" => {
                let dir = c.next()?;
                c.expect("type")?;
                c.expect("local")?;
                r.matches.push(match dir {
                    "daddr" => Match::FibDaddrLocal,
                    "saddr" => Match::FibSaddrLocal,
                    other => return Err(format!("fib {other}")),
                });
            }
            "masquerade" => {
                if c.peek() == Some("fully-random") {
                    c.next()?;
                }
                r.stmts.push(Stmt::Masquerade);
            }
            "update" => {
                let set = c.next()?.strip_prefix('@').ok_or("update without @set")?;
                c.expect("{")?;
                let fam = c.next()?;
                if fam != "ip" && fam != "ip6" {
                    return Err(format!("update key {fam}"));
                }
                c.expect("saddr")?;
                c.expect("}")?;
                r.stmts.push(Stmt::UpdateSaddr(set.into()));
            }
            "dnat" => {
                // nft prints `dnat to A:P`; in inet tables `dnat ip to`.
                if matches!(c.peek(), Some("ip" | "ip6")) {
                    c.next()?;
                }
                c.expect("to")?;
                let a = c.next()?;
                let to: SocketAddr = a.parse().map_err(|_| format!("dnat target {a}"))?;
                r.stmts.push(Stmt::Dnat(to));
            }
            "numgen" => {
                c.expect("random")?;
                c.expect("mod")?;
                let count = parse_num(c.next()?)?;
                // nft omits `offset 0`.
                let mut offset = 0;
                if c.peek() == Some("offset") {
                    c.next()?;
                    offset = parse_num(c.next()?)?;
                }
                c.expect("vmap")?;
                let map = c.next()?.strip_prefix('@').ok_or("vmap without @map")?;
                set_verdict(
                    &mut r,
                    Verdict::Pick {
                        count,
                        offset,
                        map: map.into(),
                    },
                )?;
            }
            "drop" => set_verdict(&mut r, Verdict::Drop)?,
            "reject" => {
                // `reject with icmp ...`: the kernel's default for `reject` is what we use;
                // any explicit variant is still a reject for the packet's fate.
                if c.peek() == Some("with") {
                    while c.peek().is_some_and(|t| t != "comment") {
                        c.next()?;
                    }
                }
                set_verdict(&mut r, Verdict::Reject)?
            }
            "return" => set_verdict(&mut r, Verdict::Return)?,
            "jump" => set_verdict(&mut r, Verdict::Jump(c.next()?.into()))?,
            "goto" => set_verdict(&mut r, Verdict::Goto(c.next()?.into()))?,
            "comment" => {
                r.comment = Some(unquote(c.next()?).ok_or("comment not quoted")?);
            }
            other => return Err(format!("unknown statement {other}")),
        }
    }
    Ok(r)
}

fn key_type(toks: &[&str]) -> Result<(KeyType, bool), String> {
    let verdict_map = toks.ends_with(&[":", "verdict"]);
    let k = if verdict_map {
        &toks[..toks.len() - 2]
    } else {
        toks
    };
    let kt = match k {
        ["type", "ipv4_addr" | "ipv6_addr"] => KeyType::Addr,
        [
            "type",
            "ipv4_addr" | "ipv6_addr",
            ".",
            "inet_proto",
            ".",
            "inet_service",
        ] => KeyType::AddrProtoPort,
        ["type", "inet_proto", ".", "inet_service"] => KeyType::ProtoPort,
        ["typeof", "numgen", "random", "mod", _] => KeyType::Pick,
        other => return Err(format!("unknown set type {other:?}")),
    };
    Ok((kt, verdict_map))
}

fn parse_key(kt: KeyType, toks: &[&str]) -> Result<Key, String> {
    let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| format!("bad address {s}"));
    let port =
        |s: &str| parse_num(s).and_then(|p| u16::try_from(p).map_err(|_| format!("port {p}")));
    Ok(match (kt, toks) {
        (KeyType::Addr, [a]) => Key::Addr(ip(a)?),
        (KeyType::AddrProtoPort, [a, ".", p, ".", n]) => {
            Key::AddrProtoPort(ip(a)?, protocol(p)?, port(n)?)
        }
        (KeyType::ProtoPort, [p, ".", n]) => Key::ProtoPort(protocol(p)?, port(n)?),
        (KeyType::Pick, [n]) => Key::Pick(parse_num(n)?),
        (kt, other) => return Err(format!("element {other:?} does not fit {kt:?}")),
    })
}

fn map_verdict(toks: &[&str]) -> Result<Verdict, String> {
    Ok(match toks {
        ["drop"] => Verdict::Drop,
        ["return"] => Verdict::Return,
        ["goto", c] => Verdict::Goto(c.to_string()),
        ["jump", c] => Verdict::Jump(c.to_string()),
        other => return Err(format!("map value {other:?}")),
    })
}

/// The inside of `{ ... }` of an element list: `key [comment "c"] [: verdict], ...`.
fn elements(set: &SetDef, toks: &[String]) -> Result<Vec<Element>, String> {
    let mut out = Vec::new();
    for item in toks.split(|t| t == ",") {
        if item.is_empty() {
            continue;
        }
        let item: Vec<&str> = item.iter().map(String::as_str).collect();
        let mut key_end = item.len();
        let mut comment = None;
        let mut value = None;
        let mut i = 0;
        while i < item.len() {
            match item[i] {
                "comment" => {
                    key_end = key_end.min(i);
                    comment = Some(
                        item.get(i + 1)
                            .and_then(|t| unquote(t))
                            .ok_or("comment not quoted")?,
                    );
                    i += 2;
                }
                ":" => {
                    key_end = key_end.min(i);
                    value = Some(map_verdict(&item[i + 1..])?);
                    break;
                }
                // nft prints per-element timeouts of dynamic sets; affinity entries are
                // kernel state, not the plan's.
                "timeout" | "expires" => {
                    key_end = key_end.min(i);
                    i += 2;
                }
                _ => i += 1,
            }
        }
        out.push(Element {
            set: set.name.clone(),
            key: parse_key(set.key, &item[..key_end])?,
            value,
            comment,
        });
    }
    Ok(out)
}

/// The body of a set/map declaration (`type ...; flags ...; timeout ...; comment ...;`), as
/// lines of a listing or `;`-separated parts of a script. Returns the definition and the
/// element tokens, if any.
fn set_decl(
    name: &str,
    is_map: bool,
    parts: &[Vec<String>],
) -> Result<(SetDef, Option<Vec<String>>), String> {
    let mut key = None;
    let mut def = SetDef {
        name: name.to_string(),
        key: KeyType::Addr,
        verdict_map: is_map,
        timeout_seconds: None,
        comment: None,
    };
    let mut elems = None;
    for p in parts {
        let strs: Vec<&str> = p.iter().map(String::as_str).collect();
        match strs.first().copied() {
            None => {}
            Some("type" | "typeof") => {
                let (kt, vm) = key_type(&strs)?;
                if vm != is_map {
                    return Err(format!("{name}: verdict type on a set (or none on a map)"));
                }
                key = Some(kt);
            }
            Some("flags") | Some("size") | Some("policy") => {}
            Some("timeout") => {
                def.timeout_seconds =
                    Some(duration_secs(strs.get(1).ok_or("timeout without value")?)?);
            }
            Some("comment") => {
                def.comment = strs.get(1).and_then(|t| unquote(t));
            }
            Some("elements") => {
                // elements = { ... }
                let open = p
                    .iter()
                    .position(|t| t == "{")
                    .ok_or("elements without {")?;
                let close = p
                    .iter()
                    .rposition(|t| t == "}")
                    .ok_or("elements without }")?;
                elems = Some(p[open + 1..close].to_vec());
            }
            Some(other) => return Err(format!("set {name}: unknown property {other}")),
        }
    }
    def.key = key.ok_or_else(|| format!("set {name} without type"))?;
    Ok((def, elems))
}

fn priority(toks: &[&str]) -> Result<i32, String> {
    let named = |s: &str| -> Result<i32, String> {
        Ok(match s {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            n => n.parse().map_err(|_| format!("priority {n}"))?,
        })
    };
    match toks {
        [p] => named(p),
        [p, "+", n] => Ok(named(p)? + named(n)?),
        [p, "-", n] => Ok(named(p)? - named(n)?),
        other => Err(format!("priority {other:?}")),
    }
}

/// `type nat hook prerouting priority dstnat; policy accept;` (tokens without the `;`s).
fn base_hook(toks: &[&str]) -> Result<BaseHook, String> {
    let kind = match toks.get(1) {
        Some(&"filter") => ChainType::Filter,
        Some(&"nat") => ChainType::Nat,
        other => return Err(format!("chain type {other:?}")),
    };
    if toks.get(2) != Some(&"hook") || toks.get(4) != Some(&"priority") {
        return Err(format!("base chain {toks:?}"));
    }
    let hook = match toks[3] {
        "prerouting" => Hook::Prerouting,
        "input" => Hook::Input,
        "forward" => Hook::Forward,
        "output" => Hook::Output,
        "postrouting" => Hook::Postrouting,
        other => return Err(format!("hook {other}")),
    };
    let end = toks.iter().position(|t| *t == ";").unwrap_or(toks.len());
    Ok(BaseHook {
        kind,
        hook,
        priority: priority(&toks[5..end])?,
    })
}

fn family(s: &str) -> Option<IpFamily> {
    match s {
        "ip" => Some(IpFamily::V4),
        "ip6" => Some(IpFamily::V6),
        _ => None,
    }
}

/// `nft list table ...` / `nft list ruleset` output -> the `shunt` tables it holds.
pub fn parse_listing(text: &str) -> Result<BTreeMap<IpFamily, NftTable>, ParseError> {
    enum Block {
        None,
        /// Inside a table; `Some` when it is one of ours.
        Table(Option<IpFamily>),
        Set {
            name: String,
            is_map: bool,
            parts: Vec<Vec<String>>,
        },
        Chain(ChainDef),
        /// Any other block (flowtable, ...) of a foreign table: skipped.
        Skip(usize),
    }
    let mut out: BTreeMap<IpFamily, NftTable> = BTreeMap::new();
    let mut fam: Option<IpFamily> = None;
    let mut block = Block::None;
    // A set property spanning lines (long `elements = { ...` lists).
    let mut pending: Option<Vec<String>> = None;
    for (n, raw) in text.lines().enumerate() {
        let err = |what: String| ParseError {
            line: n + 1,
            text: raw.to_string(),
            what,
        };
        // `nft -a` handles: a trailing `# handle N` is not part of the rule.
        let line = match raw.find(" # handle") {
            Some(k) => &raw[..k],
            None => raw,
        };
        let toks = tokenize(line);
        if let Some(mut acc) = pending.take() {
            acc.extend(toks);
            let depth: i32 = acc
                .iter()
                .map(|t| match t.as_str() {
                    "{" => 1,
                    "}" => -1,
                    _ => 0,
                })
                .sum();
            if depth > 0 {
                pending = Some(acc);
            } else if let Block::Set { parts, .. } = &mut block {
                parts.push(acc);
            }
            continue;
        }
        if toks.is_empty() {
            continue;
        }
        let strs: Vec<&str> = toks.iter().map(String::as_str).collect();
        block = match block {
            Block::None => match strs.as_slice() {
                ["table", f, name, "{"] => {
                    let ours = *name == TABLE;
                    fam = if ours { family(f) } else { None };
                    if let Some(f) = fam {
                        out.entry(f).or_default();
                    }
                    Block::Table(fam)
                }
                _ => return Err(err("expected a table".into())),
            },
            Block::Table(ours) => match strs.as_slice() {
                ["}"] => Block::None,
                _ if ours.is_none() => {
                    if strs.last() == Some(&"{") {
                        Block::Skip(1)
                    } else {
                        Block::Table(None)
                    }
                }
                ["set" | "map", name, "{"] => Block::Set {
                    name: name.to_string(),
                    is_map: strs[0] == "map",
                    parts: Vec::new(),
                },
                ["chain", name, "{"] => Block::Chain(ChainDef {
                    name: name.to_string(),
                    base: None,
                    rules: Vec::new(),
                }),
                // Table properties (comment, flags).
                ["comment", ..] | ["flags", ..] => Block::Table(ours),
                _ => return Err(err("unexpected line in table".into())),
            },
            Block::Skip(depth) => {
                let d = depth + strs.iter().filter(|t| **t == "{").count()
                    - strs.iter().filter(|t| **t == "}").count();
                if d == 0 {
                    Block::Table(None)
                } else {
                    Block::Skip(d)
                }
            }
            Block::Set {
                name,
                is_map,
                mut parts,
            } => {
                if strs == ["}"] {
                    let (def, elems) = set_decl(&name, is_map, &parts).map_err(&err)?;
                    let t = out.get_mut(&fam.expect("inside our table")).expect("entry");
                    let m = t.elements.entry(name.clone()).or_default();
                    for e in elements(&def, &elems.unwrap_or_default()).map_err(&err)? {
                        m.insert(e.key.clone(), e);
                    }
                    t.sets.insert(name, def);
                    Block::Table(fam)
                } else {
                    let opens = strs.iter().filter(|t| **t == "{").count();
                    let closes = strs.iter().filter(|t| **t == "}").count();
                    if opens > closes {
                        pending = Some(toks);
                    } else {
                        parts.push(toks);
                    }
                    Block::Set {
                        name,
                        is_map,
                        parts,
                    }
                }
            }
            Block::Chain(mut c) => {
                if strs == ["}"] {
                    let t = out.get_mut(&fam.expect("inside our table")).expect("entry");
                    t.chains.insert(c.name.clone(), normalized_chain(c));
                    Block::Table(fam)
                } else if strs.first() == Some(&"type") {
                    c.base = Some(base_hook(&strs).map_err(&err)?);
                    Block::Chain(c)
                } else {
                    c.rules.push(rule(&toks).map_err(&err)?);
                    Block::Chain(c)
                }
            }
        };
    }
    if !matches!(block, Block::None) {
        return Err(ParseError {
            line: text.lines().count(),
            text: String::new(),
            what: "unterminated block".into(),
        });
    }
    Ok(out)
}

/// The `nft -f` script `plan::nft::text` writes, applied command by command to empty tables
/// (what the kernel would hold after it, starting from nothing).
pub fn parse_script(text: &str) -> Result<BTreeMap<IpFamily, NftTable>, ParseError> {
    let mut out: BTreeMap<IpFamily, NftTable> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |what: String| ParseError {
            line: n + 1,
            text: line.to_string(),
            what,
        };
        let toks = tokenize(line);
        if toks.is_empty() {
            continue;
        }
        let s: Vec<&str> = toks.iter().map(String::as_str).collect();
        if s.len() < 4 || s[3] != TABLE {
            return Err(err("not a command on table shunt".into()));
        }
        let f = family(s[2]).ok_or_else(|| err(format!("family {}", s[2])))?;
        let t = out.entry(f).or_default();
        match (s[0], s[1]) {
            ("add", "table") => {}
            ("delete", "table") => {
                out.remove(&f);
            }
            ("add", "chain") => {
                let name = s.get(4).ok_or_else(|| err("chain name".into()))?;
                let base = match s.get(5) {
                    Some(&"{") => Some(base_hook(&s[6..]).map_err(&err)?),
                    None => None,
                    Some(other) => return Err(err(format!("after chain name: {other}"))),
                };
                let c = t.chains.entry(name.to_string()).or_insert(ChainDef {
                    name: name.to_string(),
                    base,
                    rules: Vec::new(),
                });
                c.base = base.or(c.base);
            }
            ("flush", "chain") => {
                if let Some(c) = t.chains.get_mut(s[4]) {
                    c.rules.clear();
                }
            }
            ("delete", "chain") => {
                t.chains.remove(s[4]);
            }
            ("add", "rule") => {
                let r = rule(&toks[5..]).map_err(&err)?;
                let c = t
                    .chains
                    .get_mut(s[4])
                    .ok_or_else(|| err("rule for a missing chain".into()))?;
                c.rules.push(r);
                let normalized = normalized_chain(c.clone());
                *c = normalized;
            }
            ("add", "set" | "map") => {
                let name = s[4];
                let body: Vec<String> = toks[6..toks.len() - 1].to_vec();
                let parts: Vec<Vec<String>> =
                    body.split(|t| t == ";").map(<[String]>::to_vec).collect();
                let (def, _) = set_decl(name, s[1] == "map", &parts).map_err(&err)?;
                t.elements.entry(name.to_string()).or_default();
                t.sets.insert(name.to_string(), def);
            }
            ("flush", "set" | "map") => {
                t.elements.entry(s[4].to_string()).or_default().clear();
            }
            ("delete", "set" | "map") => {
                t.sets.remove(s[4]);
                t.elements.remove(s[4]);
            }
            (op @ ("add" | "delete"), "element") => {
                let def = t
                    .sets
                    .get(s[4])
                    .ok_or_else(|| err("element of a missing set".into()))?
                    .clone();
                let body = &toks[6..toks.len() - 1];
                let m = t.elements.entry(def.name.clone()).or_default();
                for e in elements(&def, body).map_err(&err)? {
                    if op == "add" {
                        m.insert(e.key.clone(), e);
                    } else {
                        m.remove(&e.key);
                    }
                }
            }
            (a, b) => return Err(err(format!("unknown command {a} {b}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
