//! IMPURE: read what a running shunt programmed (nft, iptables-save, pinned BPF maps), detect
//! the mode, and answer `inspect` / `trace` with the pure parsers and tracers.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
use shunt_abi::{
    Backend as BeEntry, Config, CtKey, CtValue, Lpm, RevNat, Service4Value, ServiceKey, SrcRange,
    names,
};

use super::ebpf::{Fam, Maps};
use super::nft::NftTable;
use super::view::{FamilyView, Inspected};
use super::{Fate, InspectError, Packet, TraceResult};
use crate::config::ProxyMode;
use crate::dataplane::iptables::Backend;
use crate::model::IpFamily;
use crate::plan::ebpf::{Family, State, V4, V6};
use crate::plan::iptables::tracer::{Outcome, Tracer};

/// Where to look.
#[derive(Clone, Debug)]
pub struct Target {
    /// None: detect from what is programmed.
    pub mode: Option<ProxyMode>,
    /// iptables backend; None: whichever holds shunt's chains.
    pub backend: Option<Backend>,
    /// ebpf pins (`/sys/fs/bpf/shunt` by default).
    pub pin_dir: PathBuf,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            mode: None,
            backend: None,
            pin_dir: PathBuf::from("/sys/fs/bpf/shunt"),
        }
    }
}

fn tool(bin: &str, args: &[&str]) -> Result<String, InspectError> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| InspectError::Io {
            what: format!("running {bin}"),
            source: e,
        })?;
    if !out.status.success() {
        return Err(InspectError::Tool {
            tool: format!("{bin} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft list table <family> shunt` for the families that have one.
pub fn read_nft() -> Result<BTreeMap<IpFamily, NftTable>, InspectError> {
    let tables = tool("nft", &["list", "tables"])?;
    let mut out = BTreeMap::new();
    for (fam, f) in [("ip", IpFamily::V4), ("ip6", IpFamily::V6)] {
        if !tables
            .lines()
            .any(|l| l.trim() == format!("table {fam} shunt"))
        {
            continue;
        }
        let text = tool("nft", &["list", "table", fam, "shunt"])?;
        let mut parsed = super::nft::parse_listing(&text).map_err(|e| InspectError::Parse {
            what: format!("nft list table {fam} shunt"),
            msg: e.to_string(),
        })?;
        if let Some(t) = parsed.remove(&f) {
            out.insert(f, t);
        }
    }
    Ok(out)
}

/// `iptables-save` of one backend and family ("" when the tool is missing or fails: nothing
/// of shunt's there). Whole saves (no `-t`): naming a legacy table would create it.
fn save(backend: Backend, family: IpFamily) -> String {
    tool(&backend.binary(family, "-save"), &[]).unwrap_or_default()
}

fn has_shunt_chains(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":SHUNT-"))
}

/// The backend holding shunt's chains (`--iptables-backend` may force one).
pub fn iptables_backend(forced: Option<Backend>) -> Option<Backend> {
    if forced.is_some() {
        return forced;
    }
    let holds = |b| {
        [IpFamily::V4, IpFamily::V6]
            .iter()
            .any(|f| has_shunt_chains(&save(b, *f)))
    };
    match (holds(Backend::Nft), holds(Backend::Legacy)) {
        (true, false) => Some(Backend::Nft),
        (false, true) => Some(Backend::Legacy),
        // Both hold shunt chains (a stale leftover): the dataplane's own choice wins.
        (true, true) => Some(crate::dataplane::iptables::detect_backend(&[])),
        (false, false) => None,
    }
}

/// shunt's iptables chains per family, as tracers.
pub fn read_iptables(backend: Backend) -> Result<BTreeMap<IpFamily, Tracer>, InspectError> {
    let local = local_addresses()?;
    let mut out = BTreeMap::new();
    for f in [IpFamily::V4, IpFamily::V6] {
        let s = save(backend, f);
        if !has_shunt_chains(&s) {
            continue;
        }
        let t = Tracer::from_save(&s, &local).map_err(|e| InspectError::Parse {
            what: backend.binary(f, "-save"),
            msg: e.to_string(),
        })?;
        out.insert(f, t);
    }
    Ok(out)
}

fn pinned(dir: &Path, name: &str) -> Result<Map, InspectError> {
    let path = dir.join(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|e| InspectError::Other(format!("opening pinned map {}: {e}", path.display())))
}

fn map_err(name: &str) -> impl Fn(aya::maps::MapError) -> InspectError + '_ {
    move |e| InspectError::Other(format!("reading {name}: {e}"))
}

/// Family `F`'s userspace-owned maps read back from the pins (no program is loaded; the
/// names are `F::MAPS`, shunt-abi's `names::V4`/`names::V6`).
pub fn read_ebpf_family<F: Fam>(dir: &Path) -> Result<State<F>, InspectError> {
    let m = F::MAPS;
    let mut st = State::<F>::default();
    let cfg: Array<MapData, Config<F::Wire>> =
        Array::try_from(pinned(dir, m.config)?).map_err(map_err(m.config))?;
    st.node_ip = cfg.get(&0, 0).map_err(map_err(m.config))?.node_ip;
    let svc: HashMap<MapData, ServiceKey<F::Wire>, Service4Value> =
        HashMap::try_from(pinned(dir, m.services)?).map_err(map_err(m.services))?;
    for kv in svc.iter() {
        let (k, v) = kv.map_err(map_err(m.services))?;
        st.services.insert(k, v);
    }
    let be: HashMap<MapData, u32, BeEntry<F::Wire>> =
        HashMap::try_from(pinned(dir, m.backends)?).map_err(map_err(m.backends))?;
    for kv in be.iter() {
        let (k, v) = kv.map_err(map_err(m.backends))?;
        st.backends.insert(k, v);
    }
    let rn: HashMap<MapData, u32, RevNat<F::Wire>> =
        HashMap::try_from(pinned(dir, m.rev_nat)?).map_err(map_err(m.rev_nat))?;
    for kv in rn.iter() {
        let (k, v) = kv.map_err(map_err(m.rev_nat))?;
        st.rev_nat.insert(k, v);
    }
    let cip: HashMap<MapData, F::Wire, u32> =
        HashMap::try_from(pinned(dir, m.cluster_ip)?).map_err(map_err(m.cluster_ip))?;
    for k in cip.keys() {
        st.cluster_ips.insert(k.map_err(map_err(m.cluster_ip))?);
    }
    let sr: LpmTrie<MapData, SrcRange<F::Wire>, u8> =
        LpmTrie::try_from(pinned(dir, m.src_range)?).map_err(map_err(m.src_range))?;
    for k in sr.keys() {
        let k = k.map_err(map_err(m.src_range))?;
        st.src_ranges.insert((k.prefix_len(), k.data()));
    }
    for (name, set) in [
        (m.service_cidr, &mut st.service_cidrs),
        (m.local_cidr, &mut st.local_cidrs),
    ] {
        let t: LpmTrie<MapData, F::Wire, u8> =
            LpmTrie::try_from(pinned(dir, name)?).map_err(map_err(name))?;
        for k in t.keys() {
            let k = k.map_err(map_err(name))?;
            set.insert(Lpm {
                prefix_len: k.prefix_len(),
                addr: k.data(),
            });
        }
    }
    crate::plan::ebpf::ids_from_maps(&mut st);
    Ok(st)
}

/// Whether family `F`'s maps are pinned under `dir` (pins adopted from a shunt that
/// predates IPv6 hold the IPv4 maps only).
fn family_pinned<F: Family>(dir: &Path) -> bool {
    dir.join(F::MAPS.services).exists()
}

/// Both families' userspace-owned maps read back from the pins; a family whose maps are
/// not pinned is None.
pub fn read_ebpf_state(dir: &Path) -> Result<Maps, InspectError> {
    let maps = Maps {
        v4: family_pinned::<V4>(dir)
            .then(|| read_ebpf_family::<V4>(dir))
            .transpose()?,
        v6: family_pinned::<V6>(dir)
            .then(|| read_ebpf_family::<V6>(dir))
            .transpose()?,
    };
    if maps.v4.is_none() && maps.v6.is_none() {
        return Err(InspectError::NothingProgrammed {
            pin_dir: dir.display().to_string(),
        });
    }
    Ok(maps)
}

/// `HOST_NETNS[LOOPBACK]`: whether tc is attached to `lo`.
pub fn read_ebpf_loopback(dir: &Path) -> Result<bool, InspectError> {
    let a: Array<MapData, u64> =
        Array::try_from(pinned(dir, names::HOST_NETNS)?).map_err(map_err(names::HOST_NETNS))?;
    Ok(a.get(&shunt_abi::host_ns::LOOPBACK, 0)
        .map_err(map_err(names::HOST_NETNS))?
        != 0)
}

/// The node's addresses in this network namespace (`ip -j addr`).
pub fn local_addresses() -> Result<Vec<IpAddr>, InspectError> {
    let out = tool("ip", &["-j", "addr", "show"])?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| InspectError::Parse {
        what: "ip -j addr".into(),
        msg: e.to_string(),
    })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().and_then(|s| s.parse().ok()))
        .collect())
}

/// The mode whose state is programmed (`--proxy-mode` overrides).
pub fn detect_mode(target: &Target) -> Result<ProxyMode, InspectError> {
    if let Some(m) = target.mode {
        return Ok(m);
    }
    let nft = tool("nft", &["list", "tables"])
        .map(|t| {
            t.lines()
                .any(|l| matches!(l.trim(), "table ip shunt" | "table ip6 shunt"))
        })
        .unwrap_or(false);
    if nft {
        return Ok(ProxyMode::Nftables);
    }
    if family_pinned::<V4>(&target.pin_dir) || family_pinned::<V6>(&target.pin_dir) {
        return Ok(ProxyMode::Ebpf);
    }
    if iptables_backend(target.backend).is_some() {
        return Ok(ProxyMode::Iptables);
    }
    Err(InspectError::NothingProgrammed {
        pin_dir: target.pin_dir.display().to_string(),
    })
}

/// `shunt inspect services`.
pub fn inspect(target: &Target) -> Result<Inspected, InspectError> {
    let mode = detect_mode(target)?;
    let families: Vec<FamilyView> = match mode {
        ProxyMode::Nftables => read_nft()?
            .iter()
            .map(|(f, t)| super::view::from_nft(*f, t))
            .collect(),
        ProxyMode::Iptables => {
            let b = iptables_backend(target.backend).ok_or(InspectError::NothingProgrammed {
                pin_dir: target.pin_dir.display().to_string(),
            })?;
            read_iptables(b)?
                .iter()
                .map(|(f, t)| super::view::from_iptables(*f, t.chains()))
                .collect()
        }
        ProxyMode::Ebpf => read_ebpf_state(&target.pin_dir)?.views(),
    };
    if families.is_empty() {
        return Err(InspectError::NothingProgrammed {
            pin_dir: target.pin_dir.display().to_string(),
        });
    }
    Ok(Inspected {
        mode: mode.as_str().into(),
        families,
    })
}

/// Convert the iptables tracer's outcomes.
pub fn iptables_fates(
    outcomes: &std::collections::BTreeSet<Outcome>,
) -> std::collections::BTreeSet<Fate> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Dnat { to, masq } => Fate::Endpoint {
                endpoint: *to,
                masquerade: *masq,
            },
            Outcome::Pass { masq } => Fate::Untouched { masquerade: *masq },
            Outcome::Drop => Fate::Drop,
            Outcome::Reject => Fate::Reject,
        })
        .collect()
}

/// Convert one fate of the nft tracer.
pub fn nft_fate(f: &crate::plan::nft::trace::Fate) -> Fate {
    use crate::plan::nft::trace::Fate as F;
    match f {
        F::Dnat { to, masquerade } => Fate::Endpoint {
            endpoint: *to,
            masquerade: *masquerade,
        },
        F::Passthrough { masquerade } => Fate::Untouched {
            masquerade: *masquerade,
        },
        F::Drop => Fate::Drop,
        F::Reject => Fate::Reject,
    }
}

/// Convert the nft tracer's fates.
pub fn nft_fates(t: &crate::plan::nft::trace::Trace) -> std::collections::BTreeSet<Fate> {
    t.fates.iter().map(nft_fate).collect()
}

/// `shunt trace`.
pub fn trace(target: &Target, p: &Packet) -> Result<TraceResult, InspectError> {
    let mode = detect_mode(target)?;
    let family = p.family();
    let missing = || InspectError::FamilyMissing {
        mode: mode.as_str().into(),
        family: super::view::family_name(family).into(),
    };
    let mut why = Vec::new();
    let (fates, view) = match mode {
        ProxyMode::Nftables => {
            let tables = read_nft()?;
            let t = tables.get(&family).ok_or_else(missing)?;
            let local = local_addresses()?;
            let (fates, paths) = super::nft_trace_explained(t, &local, p)?;
            why = paths;
            (fates, super::view::from_nft(family, t))
        }
        ProxyMode::Iptables => {
            let b = iptables_backend(target.backend).ok_or_else(missing)?;
            let tracers = read_iptables(b)?;
            let t = tracers.get(&family).ok_or_else(missing)?;
            (
                super::iptables_trace(t, p)?,
                super::view::from_iptables(family, t.chains()),
            )
        }
        ProxyMode::Ebpf => {
            let maps = read_ebpf_state(&target.pin_dir)?;
            let view = maps.view_of(family).ok_or_else(missing)?;
            let host = super::ebpf::Host {
                local: local_addresses()?,
                loopback_attached: read_ebpf_loopback(&target.pin_dir)?,
            };
            let (fates, mut why) = maps.trace(&host, p)?;
            why.extend(super::explain(&view, p));
            return Ok(TraceResult {
                mode: mode.as_str().into(),
                packet: *p,
                fates,
                why,
            });
        }
    };
    let mut lines = super::explain(&view, p);
    lines.extend(why);
    Ok(TraceResult {
        mode: mode.as_str().into(),
        packet: *p,
        fates,
        why: lines,
    })
}

/// One conntrack entry of the ebpf programs (`SHUNT_CT4`, `SHUNT_CT6`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct CtEntry {
    pub protocol: String,
    /// The packet's own 5-tuple as it arrives.
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    /// `forward` (client -> frontend) or `reply` (backend -> client).
    pub direction: String,
    /// forward: the backend the destination becomes; reply: the frontend the source becomes.
    pub nat: std::net::SocketAddr,
    /// forward: the masquerade source; reply: the client the destination becomes.
    pub snat: Option<std::net::SocketAddr>,
    pub rev_nat_id: u16,
    pub backend_id: u32,
    /// Connection state (`shunt_abi::ct_state::name`): SYN_SENT, ESTABLISHED, CLOSE_WAIT,
    /// TIME_WAIT, CLOSE (TCP), UNREPLIED, REPLIED (UDP), UNTRACKED (written by a program
    /// without state tracking).
    pub state: String,
    /// Whole seconds until the entry expires if no packet comes; 0: expired (the programs
    /// treat it as absent; the agent's sweep deletes it).
    pub expires_in_secs: u64,
}

/// The programs' conntrack timeouts (`SHUNT_CTTMO`); the kernel defaults when not pinned
/// (maps pinned by a version without it).
fn read_ct_timeouts(dir: &Path) -> Result<shunt_abi::CtTimeouts, InspectError> {
    let name = shunt_abi::names::CT_TIMEOUTS;
    if !dir.join(name).exists() {
        return Ok(shunt_abi::CtTimeouts::default());
    }
    let a: aya::maps::Array<MapData, shunt_abi::CtTimeouts> =
        aya::maps::Array::try_from(pinned(dir, name)?).map_err(map_err(name))?;
    a.get(&0, 0).map_err(map_err(name))
}

/// Family `F`'s conntrack entries (`F::MAPS.ct`).
fn read_ebpf_conntrack_of<F: Fam>(dir: &Path, out: &mut Vec<CtEntry>) -> Result<(), InspectError> {
    use shunt_abi::ct_dir;
    use std::net::SocketAddr;
    let name = F::MAPS.ct;
    let sa = |a: F::Wire, p: u16| SocketAddr::new(F::from_wire(a).into(), u16::from_be(p));
    let ct: HashMap<MapData, CtKey<F::Wire>, CtValue<F::Wire>> =
        HashMap::try_from(pinned(dir, name)?).map_err(map_err(name))?;
    let timeouts = read_ct_timeouts(dir)?;
    let now = crate::dataplane::ebpf::ct_sweep::now_ns();
    for kv in ct.iter() {
        let (k, v) = kv.map_err(map_err(name))?;
        out.push(CtEntry {
            protocol: match k.proto {
                6 => "tcp".into(),
                17 => "udp".into(),
                n => n.to_string(),
            },
            src: sa(k.saddr, k.sport),
            dst: sa(k.daddr, k.dport),
            direction: match v.dir {
                ct_dir::FORWARD => "forward".into(),
                ct_dir::REPLY => "reply".into(),
                d => format!("unknown({d})"),
            },
            nat: sa(v.nat_addr, v.nat_port),
            // The programs leave the address zero when there is no second rewrite.
            snat: (v.snat_addr != F::Wire::default()).then(|| sa(v.snat_addr, v.snat_port)),
            rev_nat_id: v.rev_nat_id,
            backend_id: v.backend_id,
            state: shunt_abi::ct_state::name(v.pad2).into(),
            expires_in_secs: timeouts
                .left_ns(k.proto, v.pad2, v.last_seen_ns, now)
                .map_or(0, |ns| ns / 1_000_000_000),
        });
    }
    Ok(())
}

/// `shunt inspect conntrack` (ebpf mode): both families' entries (a family whose maps are
/// not pinned has none).
pub fn read_ebpf_conntrack(dir: &Path) -> Result<Vec<CtEntry>, InspectError> {
    let mut out = Vec::new();
    if family_pinned::<V4>(dir) {
        read_ebpf_conntrack_of::<V4>(dir, &mut out)?;
    }
    if family_pinned::<V6>(dir) {
        read_ebpf_conntrack_of::<V6>(dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// One counter of `SHUNT_STATS`, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterEntry {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Names of the `shunt_abi::stat` slots, in slot order (a slot added to the ABI later shows
/// as `slot N` until named here).
pub const COUNTER_NAMES: &[&str] = &[
    "packets_seen",
    "dnat",
    "rev_nat",
    "drop_no_endpoints",
    "reject_no_endpoints",
    "drop_unallocated",
    "reject_invalid_port",
    "drop_source_range",
    "errors",
    "sock_xlate",
    "snat",
];

/// `shunt inspect counters` (ebpf mode).
pub fn read_ebpf_counters(dir: &Path) -> Result<Vec<CounterEntry>, InspectError> {
    use aya::maps::PerCpuArray;
    let stats: PerCpuArray<MapData, shunt_abi::Counter> =
        PerCpuArray::try_from(pinned(dir, names::STATS)?).map_err(map_err(names::STATS))?;
    let mut out = Vec::new();
    for i in 0..shunt_abi::stat::COUNT {
        let per_cpu = stats.get(&i, 0).map_err(map_err(names::STATS))?;
        out.push(CounterEntry {
            name: COUNTER_NAMES
                .get(i as usize)
                .map_or_else(|| format!("slot {i}"), |n| n.to_string()),
            packets: per_cpu.iter().map(|c| c.packets).sum(),
            bytes: per_cpu.iter().map(|c| c.bytes).sum(),
        });
    }
    Ok(out)
}
