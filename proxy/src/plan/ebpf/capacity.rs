//! PURE: how big shunt's BPF maps are and when they must change.
//!
//! - [`CapacityFlags`] -> [`MapSizes`]: the capacity flags (Cilium's names, see README.md)
//!   resolved into one max_entries per kind of map, both families alike. Cilium's
//!   `--bpf-map-dynamic-size-ratio` sizes the kernel-owned maps (conntrack, socket NAT) from
//!   the node's memory as Cilium does (pkg/option/config.go `calculateDynamicBPFMapSizes`:
//!   a share of total memory, split over the maps in proportion to their default sizes,
//!   never below a floor); a flag given explicitly wins over the ratio.
//! - [`needs`] + [`growth`]: the maps userspace fills (services, backends, reverse NAT,
//!   ClusterIPs) grow when a plan needs more entries than they hold. The need is the union
//!   of the old and new content, because [`super::diff`] writes every put before any delete
//!   (make-before-break), so both contents coexist for a moment.
//! - [`MapDef`] + [`adoption`]: whether a pinned map (left by a previous run, maybe of an
//!   older shunt or with other flags) can be adopted as it is, or must be replaced, with or
//!   without its entries.
use std::collections::BTreeMap;

use shunt_abi::{CtKey, CtValue, RevNat, SockFwd, SockRevNat4Key, SockRevNat6Key, limits, names};

use super::{Family, State};

/// No map grows beyond this (16 Mi entries). Backend ids are u32, so this is a sanity bound
/// on memory, not on the id space.
pub const MAX_ENTRIES: u32 = 1 << 24;
/// Reverse-NAT ids are u16 in service values and affinity keys (ids 1..=65535), so that map
/// never needs more than this.
pub const MAX_REV_NAT: u32 = 1 << 16;
/// The smallest value each size flag accepts (Cilium's LimitTableMin, 1 << 10).
pub const MIN_ENTRIES: u32 = 1 << 10;
/// Floors of dynamic sizing (Cilium's LimitTableAutoGlobalTCPMin / AnyMin / NATMin).
pub const DYN_MIN_CT_TCP: u32 = 1 << 17;
pub const DYN_MIN_CT_ANY: u32 = 1 << 16;
pub const DYN_MIN_SOCK: u32 = 1 << 16;

/// The capacity flags as given (None: not given).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CapacityFlags {
    /// `--bpf-lb-map-max`
    pub lb_map_max: Option<u32>,
    /// `--bpf-ct-global-tcp-max`
    pub ct_tcp_max: Option<u32>,
    /// `--bpf-ct-global-any-max`
    pub ct_any_max: Option<u32>,
    /// `--bpf-sock-rev-map-max`
    pub sock_rev_map_max: Option<u32>,
    /// `--bpf-map-dynamic-size-ratio`, in (0, 1].
    pub dynamic_size_ratio: Option<f64>,
}

/// max_entries of each kind of map (the same for the IPv4 and the IPv6 map of a kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Frontend slots (`--bpf-lb-map-max`).
    pub services: u32,
    /// Backends (`--bpf-lb-map-max`).
    pub backends: u32,
    /// Reverse NAT, one per frontend: a quarter of `--bpf-lb-map-max`, at most 65,536.
    pub rev_nat: u32,
    /// ClusterIPs: a quarter of `--bpf-lb-map-max`.
    pub cluster_ips: u32,
    /// ClientIP affinity entries: a quarter of `--bpf-lb-map-max` (Cilium sizes its
    /// affinity map with the lb limit too).
    pub affinity: u32,
    /// Conntrack, all protocols in one map: TCP max + non-TCP max.
    pub ct: u32,
    /// Socket-level reverse NAT and forward maps (`--bpf-sock-rev-map-max`).
    pub sock: u32,
}

impl Default for MapSizes {
    /// The sizes compiled into the object (`shunt_abi::limits`).
    fn default() -> Self {
        MapSizes {
            services: limits::SERVICES,
            backends: limits::BACKENDS,
            rev_nat: limits::REVNAT,
            cluster_ips: limits::CLUSTER_IPS,
            affinity: limits::AFFINITY,
            ct: limits::CT,
            sock: limits::SOCK_REVNAT,
        }
    }
}

/// Bytes a hash-map entry costs in the kernel besides its key and value (struct htab_elem:
/// hash node, hash, LRU node; rounded as Cilium's estimate does).
const ENTRY_OVERHEAD: u64 = 48;

fn entry_cost<K, V>() -> u64 {
    let r8 = |n: usize| (n as u64).div_ceil(8) * 8;
    r8(size_of::<K>()) + r8(size_of::<V>()) + ENTRY_OVERHEAD
}

/// Memory one conntrack slot costs: the IPv4 and the IPv6 map both get that size.
fn ct_cost() -> u64 {
    entry_cost::<CtKey<u32>, CtValue<u32>>() + entry_cost::<CtKey<[u32; 4]>, CtValue<[u32; 4]>>()
}

/// One socket slot: forward and reverse map, both families.
fn sock_cost() -> u64 {
    entry_cost::<SockRevNat4Key, SockFwd<u32>>()
        + entry_cost::<SockRevNat4Key, RevNat<u32>>()
        + entry_cost::<SockRevNat6Key, SockFwd<[u32; 4]>>()
        + entry_cost::<SockRevNat6Key, RevNat<[u32; 4]>>()
}

impl MapSizes {
    /// Resolve the flags; `total_memory` is the node's memory in bytes (MemTotal), used only
    /// with a dynamic size ratio. The flags are validated already ([`validate_flag`]).
    pub fn resolve(f: &CapacityFlags, total_memory: u64) -> MapSizes {
        let d = MapSizes::default();
        let lb = f.lb_map_max.unwrap_or(d.services);
        let quarter = (lb / 4).max(1);
        let (mut tcp, mut any, mut sock) = (limits::CT_TCP, limits::CT_ANY, limits::SOCK_REVNAT);
        if let Some(ratio) = f.dynamic_size_ratio {
            let budget = total_memory as f64 * ratio;
            let default_cost =
                (u64::from(tcp) + u64::from(any)) * ct_cost() + u64::from(sock) * sock_cost();
            let scale = budget / default_cost as f64;
            let scaled = |def: u32, floor: u32| -> u32 {
                let v = (f64::from(def) * scale) as u64;
                v.clamp(u64::from(floor), u64::from(MAX_ENTRIES)) as u32
            };
            tcp = scaled(tcp, DYN_MIN_CT_TCP);
            any = scaled(any, DYN_MIN_CT_ANY);
            sock = scaled(sock, DYN_MIN_SOCK);
        }
        let tcp = f.ct_tcp_max.unwrap_or(tcp);
        let any = f.ct_any_max.unwrap_or(any);
        MapSizes {
            services: lb,
            backends: lb,
            rev_nat: quarter.min(MAX_REV_NAT),
            cluster_ips: quarter,
            affinity: quarter,
            ct: tcp.saturating_add(any).min(MAX_ENTRIES),
            sock: f.sock_rev_map_max.unwrap_or(sock),
        }
    }

    /// The configured size of pinned map `name`; None for maps whose size is fixed by the
    /// object (arrays, LPM tries).
    pub fn of(&self, name: &str) -> Option<u32> {
        let kind = map_kind(name)?;
        Some(match kind {
            Kind::Services => self.services,
            Kind::Backends => self.backends,
            Kind::RevNat => self.rev_nat,
            Kind::ClusterIps => self.cluster_ips,
            Kind::Affinity => self.affinity,
            Kind::Ct => self.ct,
            Kind::Sock => self.sock,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    Backends,
    RevNat,
    ClusterIps,
    Affinity,
    Ct,
    Sock,
}

fn map_kind(name: &str) -> Option<Kind> {
    [names::V4, names::V6].iter().find_map(|m| {
        Some(if name == m.services {
            Kind::Services
        } else if name == m.backends {
            Kind::Backends
        } else if name == m.rev_nat {
            Kind::RevNat
        } else if name == m.cluster_ip {
            Kind::ClusterIps
        } else if name == m.affinity {
            Kind::Affinity
        } else if name == m.ct {
            Kind::Ct
        } else if name == m.sock_rev_nat || name == m.sock_fwd {
            Kind::Sock
        } else {
            return None;
        })
    })
}

/// Whether map `name` is one userspace fills from the plan (and may grow): its content is
/// the plan's, so a bigger copy is equivalent. The kernel-owned maps (conntrack, affinity,
/// socket NAT) are LRU maps holding live flows: they are sized by flags only and kept.
pub fn growable(name: &str) -> bool {
    matches!(
        map_kind(name),
        Some(Kind::Services | Kind::Backends | Kind::RevNat | Kind::ClusterIps)
    )
}

/// The largest size map `name` may grow to.
pub fn ceiling(name: &str) -> u32 {
    match map_kind(name) {
        Some(Kind::RevNat) => MAX_REV_NAT,
        _ => MAX_ENTRIES,
    }
}

/// Check one size flag's value against its bounds.
pub fn validate_size(value: u64, min: u32, max: u32) -> Result<u32, String> {
    if value < u64::from(min) || value > u64::from(max) {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(value as u32)
}

/// Check `--bpf-map-dynamic-size-ratio` (Cilium: a share of memory in (0, 1]).
pub fn validate_ratio(value: f64) -> Result<f64, String> {
    if !(value > 0.0 && value <= 1.0) {
        return Err("must be a fraction in (0, 1], e.g. 0.0025".into());
    }
    Ok(value)
}

fn union_len<K: Ord, A, B>(old: &BTreeMap<K, A>, new: &BTreeMap<K, B>) -> usize {
    old.len() + new.keys().filter(|k| !old.contains_key(*k)).count()
}

/// Entries each growable map of family `F` holds at the peak of moving from `old` to `new`.
pub fn needs<F: Family>(old: &State<F>, new: &State<F>) -> [(&'static str, usize); 4] {
    let m = F::MAPS;
    let cips = old.cluster_ips.len()
        + new
            .cluster_ips
            .iter()
            .filter(|a| !old.cluster_ips.contains(*a))
            .count();
    [
        (m.services, union_len(&old.services, &new.services)),
        (m.backends, union_len(&old.backends, &new.backends)),
        (m.rev_nat, union_len(&old.rev_nat, &new.rev_nat)),
        (m.cluster_ip, cips),
    ]
}

/// The size a map of `size` entries grows to for `need` entries: None when it fits; else the
/// next power of two above need + 25% headroom (so a cluster growing steadily does not
/// re-grow at every sync), capped at the map's ceiling.
pub fn grown_size(name: &str, need: usize, size: u32) -> Result<Option<u32>, GrowError> {
    if need <= size as usize {
        return Ok(None);
    }
    let max = ceiling(name);
    if need > max as usize {
        return Err(GrowError {
            map: name.to_string(),
            need,
            size,
            max,
        });
    }
    let want = (need as u64 + need as u64 / 4).next_power_of_two();
    Ok(Some(want.min(u64::from(max)) as u32))
}

/// A map cannot hold what the plan needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("map {map} would need {need} entries: its size is {size} and it cannot grow beyond {max}")]
pub struct GrowError {
    pub map: String,
    pub need: usize,
    pub size: u32,
    pub max: u32,
}

/// One map growing: name, old size, new size.
pub type Growth = (&'static str, u32, u32);

/// Which maps must grow for `needs`, given their current sizes (maps missing from `sizes`
/// are not checked).
pub fn growth(
    needs: &[(&'static str, usize)],
    sizes: &BTreeMap<&'static str, u32>,
) -> Result<Vec<Growth>, GrowError> {
    let mut out = Vec::new();
    for &(name, need) in needs {
        let Some(&size) = sizes.get(name) else {
            continue;
        };
        if let Some(new) = grown_size(name, need, size)? {
            out.push((name, size, new));
        }
    }
    Ok(out)
}

/// A map's definition as the kernel reports it (bpf_map_info) or as shunt would create it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// What to do with a pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Use it as it is.
    Adopt,
    /// Create the map as shunt defines it now and replace the pin; `copy`: the entries can
    /// be carried over (same type family, key and value sizes). `differs` names each field
    /// that differs, `field old -> new`.
    Replace { copy: bool, differs: Vec<String> },
}

// include/uapi/linux/bpf.h enum bpf_map_type
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Compare a pinned map's definition with the wanted one. A growable map that is bigger
/// than configured (grown by a previous run) is adopted: shrinking it would only make the
/// first sync grow it again.
pub fn adoption(name: &str, pinned: &MapDef, want: &MapDef) -> Adoption {
    let mut differs = Vec::new();
    let mut field = |what: &str, a: u32, b: u32| {
        if a != b {
            differs.push(format!("{what} {a} -> {b}"));
        }
    };
    field("type", pinned.map_type, want.map_type);
    field("key_size", pinned.key_size, want.key_size);
    field("value_size", pinned.value_size, want.value_size);
    field("flags", pinned.flags, want.flags);
    if !(growable(name) && pinned.max_entries > want.max_entries) {
        field("max_entries", pinned.max_entries, want.max_entries);
    }
    if differs.is_empty() {
        return Adoption::Adopt;
    }
    let hashlike = |t: u32| t == BPF_MAP_TYPE_HASH || t == BPF_MAP_TYPE_LRU_HASH;
    let same_type =
        pinned.map_type == want.map_type || (hashlike(pinned.map_type) && hashlike(want.map_type));
    let copy =
        same_type && pinned.key_size == want.key_size && pinned.value_size == want.value_size;
    Adoption::Replace { copy, differs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ebpf::tests::{ep, snap, svc};
    use crate::plan::ebpf::{State4, V4, desired};

    #[test]
    fn grown_size_table() {
        let be = names::BACKENDS4;
        let rn = names::REVNAT4;
        // (map, need, size) -> new size
        let cases: &[(&str, usize, u32, Option<u32>)] = &[
            (be, 0, 1024, None),
            (be, 1024, 1024, None),
            // 1025 + 25% = 1281 -> 2048
            (be, 1025, 1024, Some(2048)),
            // 300,000 backends (30k Services x 10): 375,000 -> 524,288
            (be, 300_000, 262_144, Some(524_288)),
            // headroom crossing a power of two: 1,700 + 425 = 2,125 -> 4,096
            (be, 1_700, 1_024, Some(4_096)),
            // capped at the ceiling
            (be, 15_000_000, 1 << 23, Some(MAX_ENTRIES)),
            (rn, 60_000, 16_384, Some(MAX_REV_NAT)),
        ];
        for &(map, need, size, want) in cases {
            assert_eq!(
                grown_size(map, need, size).unwrap(),
                want,
                "{map} {need} {size}"
            );
        }
        let err = grown_size(rn, 70_000, 65_536).unwrap_err();
        assert_eq!(err.map, rn);
        assert_eq!((err.need, err.size, err.max), (70_000, 65_536, MAX_REV_NAT));
        let msg = err.to_string();
        assert!(msg.contains(rn) && msg.contains("70000"), "{msg}");
    }

    #[test]
    fn growth_only_for_maps_that_do_not_fit() {
        let sizes: BTreeMap<&'static str, u32> = [
            (names::SERVICES4, 1024),
            (names::BACKENDS4, 1024),
            (names::REVNAT4, 256),
            (names::CLUSTER_IP4, 256),
        ]
        .into_iter()
        .collect();
        let needs = [
            (names::SERVICES4, 3_900),
            (names::BACKENDS4, 1_000),
            (names::REVNAT4, 300),
            (names::CLUSTER_IP4, 256),
            // Not tracked: ignored.
            (names::SERVICES6, 1 << 30),
        ];
        assert_eq!(
            growth(&needs, &sizes).unwrap(),
            vec![(names::SERVICES4, 1024, 8192), (names::REVNAT4, 256, 512)]
        );
    }

    #[test]
    fn needs_count_old_and_new_content_together() {
        let eps =
            |n: u8| -> Vec<_> { (1..=n).map(|i| ep(&format!("10.1.1.{i}"), false)).collect() };
        let a = snap(vec![svc("a", "172.30.0.1", eps(3))]);
        let old = desired(&a, &[], &State4::default()).unwrap();
        // Replace service a by b with other backends: both live during the diff.
        let b = snap(vec![svc(
            "b",
            "172.30.0.2",
            (4..=8).map(|i| ep(&format!("10.1.1.{i}"), false)).collect(),
        )]);
        let new = desired(&b, &[], &old).unwrap();
        let n: BTreeMap<_, _> = needs::<V4>(&old, &new).into_iter().collect();
        // Freed ids are reused, so a key written in place counts once.
        let keys = |a: &State4, b: &State4| {
            let mut k: Vec<u32> = a
                .backends
                .keys()
                .chain(b.backends.keys())
                .copied()
                .collect();
            k.sort_unstable();
            k.dedup();
            k.len()
        };
        assert_eq!(n[names::BACKENDS4], keys(&old, &new));
        assert_eq!(n[names::BACKENDS4], 5, "ids 1..=3 reused, 4 and 5 new");
        assert_eq!(n[names::SERVICES4], old.services.len() + new.services.len());
        assert_eq!(n[names::REVNAT4], 1, "the one frontend id reused");
        assert_eq!(n[names::CLUSTER_IP4], 2);
        // Unchanged content needs what it has.
        let same: BTreeMap<_, _> = needs::<V4>(&old, &old).into_iter().collect();
        assert_eq!(same[names::BACKENDS4], 3);
    }

    fn def(t: u32, k: u32, v: u32, max: u32, flags: u32) -> MapDef {
        MapDef {
            map_type: t,
            key_size: k,
            value_size: v,
            max_entries: max,
            flags,
        }
    }

    #[test]
    fn adoption_table() {
        let lru = BPF_MAP_TYPE_LRU_HASH;
        let hash = BPF_MAP_TYPE_HASH;
        let ct = names::CT4;
        let be = names::BACKENDS4;
        let cases: Vec<(&str, MapDef, MapDef, Adoption)> = vec![
            (
                ct,
                def(lru, 16, 32, 1000, 0),
                def(lru, 16, 32, 1000, 0),
                Adoption::Adopt,
            ),
            // Size flag changed: replaced, entries kept.
            (
                ct,
                def(lru, 16, 32, 262_144, 0),
                def(lru, 16, 32, 4096, 0),
                Adoption::Replace {
                    copy: true,
                    differs: vec!["max_entries 262144 -> 4096".into()],
                },
            ),
            // A value layout change: cannot be copied.
            (
                ct,
                def(lru, 16, 24, 1000, 0),
                def(lru, 16, 32, 1000, 0),
                Adoption::Replace {
                    copy: false,
                    differs: vec!["value_size 24 -> 32".into()],
                },
            ),
            // Hash -> LRU with the same layout: copied.
            (
                ct,
                def(hash, 16, 32, 1000, 1),
                def(lru, 16, 32, 1000, 0),
                Adoption::Replace {
                    copy: true,
                    differs: vec!["type 1 -> 9".into(), "flags 1 -> 0".into()],
                },
            ),
            // Array -> hash: not copied even with equal sizes.
            (
                be,
                def(2, 4, 8, 1000, 0),
                def(hash, 4, 8, 1000, 1),
                Adoption::Replace {
                    copy: false,
                    differs: vec!["type 2 -> 1".into(), "flags 0 -> 1".into()],
                },
            ),
            // A grown map bigger than configured is adopted; a smaller one is replaced.
            (
                be,
                def(hash, 4, 8, 524_288, 1),
                def(hash, 4, 8, 262_144, 1),
                Adoption::Adopt,
            ),
            (
                be,
                def(hash, 4, 8, 1024, 1),
                def(hash, 4, 8, 262_144, 1),
                Adoption::Replace {
                    copy: true,
                    differs: vec!["max_entries 1024 -> 262144".into()],
                },
            ),
            // Kernel-owned maps are never "grown": bigger is a flag change too.
            (
                ct,
                def(lru, 16, 32, 524_288, 0),
                def(lru, 16, 32, 262_144, 0),
                Adoption::Replace {
                    copy: true,
                    differs: vec!["max_entries 524288 -> 262144".into()],
                },
            ),
        ];
        for (name, pinned, want, expect) in cases {
            assert_eq!(adoption(name, &pinned, &want), expect, "{name} {pinned:?}");
        }
    }

    #[test]
    fn sizes_of_each_pinned_map() {
        let s = MapSizes {
            services: 1,
            backends: 2,
            rev_nat: 3,
            cluster_ips: 4,
            affinity: 5,
            ct: 6,
            sock: 7,
        };
        for (m, tag) in [(names::V4, "4"), (names::V6, "6")] {
            let got = [
                s.of(m.services),
                s.of(m.backends),
                s.of(m.rev_nat),
                s.of(m.cluster_ip),
                s.of(m.affinity),
                s.of(m.ct),
                s.of(m.sock_rev_nat),
                s.of(m.sock_fwd),
                s.of(m.src_range),
                s.of(m.config),
            ];
            assert_eq!(
                got,
                [
                    Some(1),
                    Some(2),
                    Some(3),
                    Some(4),
                    Some(5),
                    Some(6),
                    Some(7),
                    Some(7),
                    None,
                    None
                ],
                "family {tag}"
            );
        }
        assert_eq!(s.of(names::STATS), None);
        let grow: Vec<_> = names::ALL.iter().filter(|n| growable(n)).collect();
        assert_eq!(grow.len(), 8, "{grow:?}");
        // The defaults are the object's compiled sizes.
        let d = MapSizes::default();
        assert_eq!(d.ct, limits::CT_TCP + limits::CT_ANY);
        assert_eq!(MapSizes::resolve(&CapacityFlags::default(), 0), d);
    }
}
