//! IMPURE: the pinned maps' sizes and definitions. Adopting pins with a definition check,
//! replacing a pin whose map differs from what shunt creates now (copying its entries when
//! the layout allows), and the building blocks of growth (a map moved aside, its successor
//! created by the loader, entries copied over, the old pin dropped once the new programs
//! are attached).
//!
//! aya's `EbpfLoader::map_pin_path` opens an existing pin without comparing its definition
//! (aya 0.14 `MapData::create_pinned_by_name`), so shunt compares first: a pin it would not
//! create this way is moved aside to `old_<NAME>` before the load, which then creates and
//! pins the new map; entries are copied pin to pin with the raw BPF syscalls (any key and
//! value size, per-CPU values included), and the aside pin is unlinked at the end, which
//! frees the old map once the previous programs are detached.
use std::collections::BTreeMap;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::maps::MapData;
use shunt_abi::names;

use super::{DataplaneError, io, other};
use crate::plan::ebpf::capacity::{self, Adoption, MapDef, MapSizes};

/// The sizes to create maps with: the configured ones, and those grown since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    pub configured: MapSizes,
    pub grown: BTreeMap<&'static str, u32>,
}

impl Sizes {
    pub fn of(&self, name: &str) -> Option<u32> {
        self.grown
            .get(name)
            .copied()
            .or_else(|| self.configured.of(name))
    }
}

/// The object's definition of every pinned map, with `sizes` applied: what the loader
/// creates for a missing pin.
pub fn wanted_defs(
    object: &[u8],
    sizes: &Sizes,
) -> Result<BTreeMap<&'static str, MapDef>, DataplaneError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| other("parsing the eBPF object", e))?;
    names::ALL
        .iter()
        .map(|&n| {
            let m = obj
                .maps
                .get(n)
                .ok_or_else(|| other(n, "map missing from the object"))?;
            Ok((
                n,
                MapDef {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: sizes.of(n).unwrap_or(m.max_entries()),
                    flags: m.map_flags(),
                },
            ))
        })
        .collect()
}

/// The definition of the map pinned at `path`, as the kernel reports it.
pub fn pinned_def(path: &Path) -> Result<MapDef, DataplaneError> {
    let map =
        MapData::from_pin(path).map_err(|e| other(format!("opening {}", path.display()), e))?;
    raw::info(map.fd().as_fd())
        .map_err(|e| io(format!("BPF_OBJ_GET_INFO_BY_FD {}", path.display()), e))
}

/// Where a replaced map's pin waits until its successor is in use.
pub fn aside_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("old_{name}"))
}

/// A pinned map being replaced by a new one under the same pin name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replaced {
    pub name: &'static str,
    /// Carry the entries over.
    pub copy: bool,
    /// Why, for the log (`field old -> new`).
    pub differs: Vec<String>,
}

/// Move map `name`'s pin aside so that the next load creates it anew.
pub fn set_aside(
    dir: &Path,
    name: &'static str,
    copy: bool,
    differs: Vec<String>,
) -> Result<Replaced, DataplaneError> {
    let (pin, aside) = (dir.join(name), aside_path(dir, name));
    // bpffs supports rename (simple_rename in kernel/bpf/inode.c); the map keeps its users.
    std::fs::rename(&pin, &aside).map_err(|e| io(format!("renaming {}", pin.display()), e))?;
    Ok(Replaced {
        name,
        copy,
        differs,
    })
}

/// Undo [`set_aside`] after a failed replacement: drop the new pin (if any), put the old
/// one back. Best effort: it runs on an error path, whose error is the one reported.
pub fn restore(dir: &Path, replaced: &[Replaced]) {
    for r in replaced {
        let (pin, aside) = (dir.join(r.name), aside_path(dir, r.name));
        if aside.exists() {
            let _ = std::fs::remove_file(&pin);
            if let Err(e) = std::fs::rename(&aside, &pin) {
                tracing::error!("map {}: restoring its pin: {e}", r.name);
            }
        }
    }
}

/// Before a load: finish what a run that died mid-replacement left, then compare every
/// pinned map with `want` and set aside those to replace. A lone aside pin (the run died
/// before its load) is put back and checked again; an aside pin next to a new one (it died
/// after) is dropped, the new map being the one its programs used.
pub fn check_pins(
    dir: &Path,
    want: &BTreeMap<&'static str, MapDef>,
) -> Result<Vec<Replaced>, DataplaneError> {
    let mut out = Vec::new();
    for (&name, w) in want {
        let (pin, aside) = (dir.join(name), aside_path(dir, name));
        if aside.exists() {
            if pin.exists() {
                std::fs::remove_file(&aside)
                    .map_err(|e| io(format!("removing {}", aside.display()), e))?;
            } else {
                std::fs::rename(&aside, &pin)
                    .map_err(|e| io(format!("renaming {}", aside.display()), e))?;
            }
        }
        if !pin.exists() {
            continue;
        }
        let have = pinned_def(&pin)?;
        if let Adoption::Replace { copy, differs } = capacity::adoption(name, &have, w) {
            out.push(set_aside(dir, name, copy, differs)?);
        }
    }
    Ok(out)
}

/// Copy the entries of every replaced map from its aside pin into its new pin. With
/// `again`, only the kernel-owned maps, without overwriting (BPF_NOEXIST): the flows the
/// previous programs created while the new ones were being attached. Logs one line per map.
pub fn copy_replaced(dir: &Path, replaced: &[Replaced], again: bool) -> Result<(), DataplaneError> {
    for r in replaced {
        if !r.copy || (again && capacity::growable(r.name)) {
            continue;
        }
        let (src, dst) = (aside_path(dir, r.name), dir.join(r.name));
        let open = |p: &Path| {
            MapData::from_pin(p).map_err(|e| other(format!("opening {}", p.display()), e))
        };
        let (s, d) = (open(&src)?, open(&dst)?);
        let sdef =
            raw::info(s.fd().as_fd()).map_err(|e| io(format!("info {}", src.display()), e))?;
        let ddef =
            raw::info(d.fd().as_fd()).map_err(|e| io(format!("info {}", dst.display()), e))?;
        let flags = if again {
            raw::BPF_NOEXIST
        } else {
            raw::BPF_ANY
        };
        let n = raw::copy(s.fd().as_fd(), d.fd().as_fd(), &sdef, flags).map_err(|(e, done)| {
            other(
                format!("map {}", r.name),
                format!(
                    "copying its entries into a map of {} entries failed after {done} (of at \
                     most {}): {e}",
                    ddef.max_entries, sdef.max_entries
                ),
            )
        })?;
        if !again && !r.differs.is_empty() {
            tracing::info!(
                "map {}: pinned definition differs ({}), replaced, {n} entries kept",
                r.name,
                r.differs.join(", ")
            );
        }
    }
    for r in replaced.iter().filter(|r| !r.copy && !again) {
        tracing::warn!(
            "map {}: pinned definition differs ({}), entries cannot be carried over: starting empty",
            r.name,
            r.differs.join(", ")
        );
    }
    Ok(())
}

/// After the new programs are attached: pick up flows created meanwhile, then unlink the
/// aside pins (the old maps are freed with their last user).
pub fn finish(dir: &Path, replaced: &[Replaced]) -> Result<(), DataplaneError> {
    copy_replaced(dir, replaced, true)?;
    for r in replaced {
        let aside = aside_path(dir, r.name);
        std::fs::remove_file(&aside).map_err(|e| io(format!("removing {}", aside.display()), e))?;
    }
    Ok(())
}

/// The current size of each growable pinned map.
pub fn current_sizes(dir: &Path) -> Result<BTreeMap<&'static str, u32>, DataplaneError> {
    names::ALL
        .iter()
        .filter(|n| capacity::growable(n))
        .map(|&n| Ok((n, pinned_def(&dir.join(n))?.max_entries)))
        .collect()
}

/// The bpf(2) commands shunt needs on maps it only knows by fd and definition; aya's typed
/// maps need the key and value types at compile time.
pub mod raw {
    use std::io;
    use std::os::fd::{AsRawFd as _, BorrowedFd};

    use nix::libc;

    use crate::plan::ebpf::capacity::MapDef;

    // include/uapi/linux/bpf.h enum bpf_cmd
    const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
    pub const BPF_ANY: u64 = 0;
    pub const BPF_NOEXIST: u64 = 1;
    // enum bpf_map_type: values are per CPU, round_up(value_size, 8) bytes each.
    const PER_CPU: [u32; 3] = [5, 6, 10];

    /// The BPF_MAP_*_ELEM part of union bpf_attr.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    /// The BPF_OBJ_GET_INFO_BY_FD part of union bpf_attr.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// The head of struct bpf_map_info (the kernel fills min(info_len, its size) bytes).
    #[repr(C)]
    #[derive(Default)]
    struct MapInfoHead {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<()> {
        // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the command's layout and
        // the pointers inside it point to buffers of the sizes the map's definition gives.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                (attr as *mut T).cast::<libc::c_void>(),
                size_of::<T>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn info(fd: BorrowedFd<'_>) -> io::Result<MapDef> {
        let mut head = MapInfoHead::default();
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<MapInfoHead>() as u32,
            info: (&mut head as *mut MapInfoHead) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(MapDef {
            map_type: head.map_type,
            key_size: head.key_size,
            value_size: head.value_size,
            max_entries: head.max_entries,
            flags: head.map_flags,
        })
    }

    fn elem(fd: BorrowedFd<'_>, key: *const u8, value: *mut u8, flags: u64) -> ElemAttr {
        ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            pad: 0,
            key: key as u64,
            value: value as u64,
            flags,
        }
    }

    /// Copy every entry of `src` (definition `def`) into `dst`, with update `flags`; an
    /// entry already in `dst` is kept under BPF_NOEXIST. Entries that vanish while copying
    /// (LRU eviction, a flow ending) are skipped. Returns the number written, or the error
    /// and that number so far.
    pub fn copy(
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        def: &MapDef,
        flags: u64,
    ) -> Result<u64, (io::Error, u64)> {
        let vlen = if PER_CPU.contains(&def.map_type) {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| (e, 0))?;
            (def.value_size as usize).div_ceil(8) * 8 * cpus
        } else {
            def.value_size as usize
        };
        let ks = def.key_size as usize;
        let (mut key, mut next, mut val) = (vec![0u8; ks], vec![0u8; ks], vec![0u8; vlen]);
        let mut done = 0u64;
        let mut first = true;
        // get_next_key restarts from the first key when the current one was deleted
        // meanwhile (htab_map_get_next_key), so an LRU map under traffic could cycle:
        // bounded by twice its size.
        let bound = u64::from(def.max_entries) * 2 + 16;
        for _ in 0..bound {
            let kp = if first {
                std::ptr::null()
            } else {
                key.as_ptr()
            };
            let mut a = elem(src, kp, next.as_mut_ptr(), 0);
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(done),
                Err(e) => return Err((e, done)),
            }
            first = false;
            key.copy_from_slice(&next);
            let mut a = elem(src, key.as_ptr(), val.as_mut_ptr(), 0);
            match bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err((e, done)),
            }
            let mut a = elem(dst, key.as_ptr(), val.as_mut_ptr(), flags);
            match bpf(BPF_MAP_UPDATE_ELEM, &mut a) {
                Ok(()) => done += 1,
                Err(e) if flags == BPF_NOEXIST && e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err((e, done)),
            }
        }
        Ok(done)
    }
}
