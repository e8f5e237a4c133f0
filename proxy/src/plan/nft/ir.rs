//! The plan's own description of an nftables ruleset: small enough to interpret in tests
//! (see `trace`), precise enough to lower 1:1 to nft's JSON (see `json`).
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::{IpFamily, Protocol};

/// Bit kube-proxy marks packets with to request masquerade (--masquerade-bit default 14).
pub const MASQ_MARK: u32 = 0x4000;

/// netfilter hook of a base chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

/// nft base chain type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainType {
    Filter,
    Nat,
}

/// What makes a chain a base chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BaseHook {
    pub kind: ChainType,
    pub hook: Hook,
    /// Numeric priority (NF_IP_PRI_NAT_DST = -100 is nft's "dstnat", NF_IP_PRI_NAT_SRC = 100
    /// is "srcnat").
    pub priority: i32,
}

/// A chain and its rules, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainDef {
    pub name: String,
    pub base: Option<BaseHook>,
    pub rules: Vec<Rule>,
}

/// Key layout of a named set or map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyType {
    /// `ipv4_addr` / `ipv6_addr`
    Addr,
    /// `ipvX_addr . inet_proto . inet_service`
    AddrProtoPort,
    /// `inet_proto . inet_service`
    ProtoPort,
}

/// A named set (`verdict_map == false`) or verdict map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    pub key: KeyType,
    pub verdict_map: bool,
    /// Elements expire after this many seconds (the set gets the `timeout` flag). nft 1.0.6's
    /// JSON parser rejects the `dynamic` flag, and a set with `timeout` that a rule `update`s
    /// works without it (the kernel marks it dynamic itself).
    pub timeout_seconds: Option<u32>,
    pub comment: Option<String>,
}

/// One element key. Addresses are of the table's family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Addr(IpAddr),
    AddrProtoPort(IpAddr, Protocol, u16),
    ProtoPort(Protocol, u16),
}

/// An element of a named set (value `None`) or verdict map.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    pub set: String,
    pub key: Key,
    pub value: Option<Verdict>,
    /// Shown by `nft list` (upstream names the service port on no-endpoint elements). Not
    /// part of the element's identity: the kernel keys elements by `key` alone.
    pub comment: Option<String>,
}

/// Verdicts, including the vmap lookups that end in one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Drop,
    Reject,
    Return,
    Jump(String),
    Goto(String),
    /// `<key> vmap @map`: no verdict if the key is not in the map.
    Vmap {
        key: KeyType,
        map: String,
    },
    /// `numgen random mod N vmap { 0 : goto c0, 1 : goto c1, ... }`
    RandomGoto(Vec<String>),
}

/// Conditions of a rule; all must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `ct state new`
    CtStateNew,
    /// `ip daddr X`, `ip daddr { X, Y }`, with `!=` when `negate`.
    Daddr { nets: Vec<IpNet>, negate: bool },
    /// `ip saddr ...`, like `Daddr`.
    Saddr { nets: Vec<IpNet>, negate: bool },
    /// `ip daddr @set`
    DaddrInSet(String),
    /// `ip saddr @set`
    SaddrInSet(String),
    /// `tcp dport 80`
    Dport(Protocol, u16),
    /// `meta l4proto tcp`
    L4Proto(Protocol),
    /// `fib daddr type local`
    FibDaddrLocal,
    /// `fib saddr type local`
    FibSaddrLocal,
    /// `mark and M == 0`
    MarkClear(u32),
}

/// Non-verdict actions of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `mark set mark or M`
    MarkOr(u32),
    /// `mark set mark xor M`
    MarkXor(u32),
    /// `masquerade fully-random` (terminal in a nat chain)
    Masquerade,
    /// `update @set { ip saddr }`
    UpdateSaddr(String),
    /// `dnat to ADDR:PORT` (terminal in a nat chain)
    Dnat(SocketAddr),
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub stmts: Vec<Stmt>,
    pub verdict: Option<Verdict>,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, stmts: Vec<Stmt>, verdict: Option<Verdict>) -> Rule {
        Rule {
            matches,
            stmts,
            verdict,
            comment: None,
        }
    }
    pub fn with_comment(mut self, comment: &str) -> Rule {
        self.comment = Some(comment.to_string());
        self
    }
}

/// `ip daddr X` for one address.
pub fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The loopback range excluded from NodePorts (`ip daddr != 127.0.0.0/8`, `ip6 daddr != ::1`).
pub fn loopback(family: IpFamily) -> IpNet {
    match family {
        IpFamily::V4 => "127.0.0.0/8".parse().expect("literal CIDR"),
        IpFamily::V6 => "::1/128".parse().expect("literal CIDR"),
    }
}
