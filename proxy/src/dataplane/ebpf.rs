//! IMPURE: `--proxy-mode ebpf`. Loads shunt's kernel programs (built from `ebpf/` by
//! `build.rs`), keeps their maps pinned under `pin_dir`, writes the map operations that
//! `plan::ebpf` computes, and attaches the tc program with tcx at ingress of the node's
//! interfaces.
//!
//! Restart: the maps are pinned by name (`EbpfLoader::map_pin_path`, which re-uses a pinned
//! map when the file exists), so conntrack entries and backend ids survive a restart and
//! established connections keep flowing; the current map content is read back and becomes
//! the base of the next diff. Before that, each pin's definition is compared with what the
//! object and the size flags would create, and a differing map replaced (entries copied
//! when the layout allows); the maps userspace fills grow when a plan needs more entries
//! (`maps`, `EbpfDataplane::ensure_capacity`). tcx links are pinned too (`tcx_<ifindex>`): a restart attaches
//! the new program first and only then unpins the old link (make-before-break; two programs
//! in the chain share the maps, and the second finds nothing to do on a packet the first
//! already translated).
//!
//! Node-originated traffic is balanced at the socket (cgroup connect/sendmsg/recvmsg/
//! getpeername, 4 and 6, on `cgroup_root`, sockets of the node's network namespace only),
//! pinned as `cg_<program>` links; traffic to node addresses is left to tc on `lo`
//! (masqueraded as kube-proxy does for local sources). bpffs is mounted at /sys/fs/bpf when
//! missing.
//!
//! Both families share the code: every map function here is generic over
//! [`KernelFamily`] (the plan's [`Family`] plus its socket-map key), and each family's
//! snapshot is planned and written into that family's maps.
//!
//! Interfaces that appear between syncs (a new pod's veth) are attached as netlink
//! announces them ([`links`]); every sync still re-scans all of them.
//!
//! Not done yet (see ebpf/README.md): node-originated SCTP.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use shunt_abi::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, Lpm, RevNat, Service4Value,
    ServiceKey, SockFwd, SockRevNat4Key, SockRevNat6Key, SrcRange, names,
};

use super::{Dataplane, DataplaneError, SyncOutcome, SyncRequest};
use crate::model::{IpFamily, Snapshot};
use crate::plan::ebpf::capacity::{self, MapSizes};
use crate::plan::ebpf::{
    Family, MapOp, State, State4, State6, Trie, V4, V6, desired, diff, ids_from_maps, valid_pairs,
};

mod maps;
pub use maps::Sizes;

/// A family as the kernel maps see it: the plan's [`Family`] plus the key type of its
/// socket-level maps (not of the generic shape, see `shunt_abi::SockRevNat6Key`).
pub trait KernelFamily: Family {
    type SockKey: aya::Pod;
}
impl KernelFamily for V4 {
    type SockKey = SockRevNat4Key;
}
impl KernelFamily for V6 {
    type SockKey = SockRevNat6Key;
}

/// The kernel object built by `build.rs` (aya-build) for the bpf target.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shunt"));

/// Name of the tc program in the object.
pub const TC_INGRESS: &str = "shunt_tc_ingress";
/// The cgroup/sock_addr programs (node-originated traffic), in attach order.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "shunt_connect4",
    "shunt_sendmsg4",
    "shunt_recvmsg4",
    "shunt_getpeername4",
    "shunt_connect6",
    "shunt_sendmsg6",
    "shunt_recvmsg6",
    "shunt_getpeername6",
];

/// bpffs' magic number (include/uapi/linux/magic.h BPF_FS_MAGIC).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The compiled kernel object.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Which interfaces get the tc program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interfaces {
    /// Every interface, loopback included (the uplink, pods' host-side veths, and lo for
    /// the node's own traffic to node addresses): re-scanned at every sync, and a veth
    /// created in between is attached when netlink announces it.
    All,
    /// Exactly these (one of them created later is attached when netlink announces it).
    Named(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EbpfOptions {
    /// Cgroup (v2) whose processes get socket-level load balancing (connect4, sendmsg4,
    /// recvmsg4, getpeername4): node-originated traffic to services. Empty: not attached.
    /// On a node this is the cgroup2 root; tests pass a cgroup they create.
    pub cgroup_root: PathBuf,
    /// Directory on bpffs for shunt's pins (maps and links). Default /sys/fs/bpf/shunt.
    pub pin_dir: PathBuf,
    pub interfaces: Interfaces,
    /// Map sizes at creation (capacity flags); the maps userspace fills grow beyond them
    /// when a plan needs more.
    pub map_sizes: MapSizes,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        EbpfOptions {
            cgroup_root: PathBuf::new(),
            pin_dir: PathBuf::from("/sys/fs/bpf/shunt"),
            interfaces: Interfaces::All,
            map_sizes: MapSizes::default(),
        }
    }
}

fn other(what: impl std::fmt::Display, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Other(format!("{what}: {e}"))
}

fn io(what: impl std::fmt::Display, source: std::io::Error) -> DataplaneError {
    DataplaneError::Io {
        what: what.to_string(),
        source,
    }
}

/// Load the object. With `pin_dir`, every map is pinned there by name, re-using pins that
/// exist (adoption after a restart); without, the maps are private to this load (tests).
pub fn load_object(pin_dir: Option<&Path>) -> Result<Ebpf, DataplaneError> {
    load_object_sized(pin_dir, &Sizes::default())
}

/// [`load_object`] creating the maps with `sizes` (EbpfLoader::map_max_entries). A pin that
/// exists is used as it is: [`maps::check_pins`] sets aside the ones to replace first.
pub fn load_object_sized(pin_dir: Option<&Path>, sizes: &Sizes) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(d) => names::ALL.iter().map(|n| (*n, d.join(n))).collect(),
        None => Vec::new(),
    };
    for (n, p) in &paths {
        loader.map_pin_path(n, p.as_path());
    }
    for n in names::ALL {
        if let Some(size) = sizes.of(n) {
            loader.map_max_entries(n, size);
        }
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|e| other("loading the eBPF object", e))?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(TC_INGRESS)
        .ok_or_else(|| other(TC_INGRESS, "missing from the object"))?
        .try_into()
        .map_err(|e| other(TC_INGRESS, e))?;
    prog.load()
        .map_err(|e| other(format!("verifier: {TC_INGRESS}"), e))?;
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| other(name, "missing from the object"))?
            .try_into()
            .map_err(|e| other(name, e))?;
        prog.load()
            .map_err(|e| other(format!("verifier: {name}"), e))?;
    }
    Ok(ebpf)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map, DataplaneError> {
    ebpf.map_mut(name)
        .ok_or_else(|| other(name, "map missing from the object"))
}

fn hash<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<HashMap<&'a mut MapData, K, V>, DataplaneError> {
    HashMap::try_from(map_mut(ebpf, name)?).map_err(|e| other(name, e))
}

fn trie<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<LpmTrie<&'a mut MapData, K, u8>, DataplaneError> {
    LpmTrie::try_from(map_mut(ebpf, name)?).map_err(|e| other(name, e))
}

fn trie_name<F: Family>(t: Trie) -> &'static str {
    match t {
        Trie::ServiceCidr => F::MAPS.service_cidr,
        Trie::LocalCidr => F::MAPS.local_cidr,
    }
}

/// Apply map operations in order to family `F`'s maps. Stops at the first failure (the
/// maps then hold a prefix of the operations, which the ordering keeps consistent for the
/// kernel program).
pub fn apply_ops<F: KernelFamily>(
    ebpf: &mut Ebpf,
    ops: &[MapOp<F::Wire>],
) -> Result<(), DataplaneError> {
    let m = F::MAPS;
    for op in ops {
        let res = match op {
            MapOp::SetConfig(c) => {
                aya::maps::Array::<_, Config<F::Wire>>::try_from(map_mut(ebpf, m.config)?)
                    .map_err(|e| other(m.config, e))?
                    .set(0, c, 0)
            }
            MapOp::PutBackend(id, b) => {
                hash::<u32, Backend<F::Wire>>(ebpf, m.backends)?.insert(id, b, 0)
            }
            MapOp::DelBackend(id) => hash::<u32, Backend<F::Wire>>(ebpf, m.backends)?.remove(id),
            MapOp::PutRevNat(id, r) => {
                hash::<u32, RevNat<F::Wire>>(ebpf, m.rev_nat)?.insert(id, r, 0)
            }
            MapOp::DelRevNat(id) => hash::<u32, RevNat<F::Wire>>(ebpf, m.rev_nat)?.remove(id),
            MapOp::PutService(k, v) => {
                hash::<ServiceKey<F::Wire>, Service4Value>(ebpf, m.services)?.insert(k, v, 0)
            }
            MapOp::DelService(k) => {
                hash::<ServiceKey<F::Wire>, Service4Value>(ebpf, m.services)?.remove(k)
            }
            MapOp::PutClusterIp(a) => hash::<F::Wire, u32>(ebpf, m.cluster_ip)?.insert(a, 1, 0),
            MapOp::DelClusterIp(a) => hash::<F::Wire, u32>(ebpf, m.cluster_ip)?.remove(a),
            MapOp::PutSrcRange(p, r) => {
                trie::<SrcRange<F::Wire>>(ebpf, m.src_range)?.insert(&Key::new(*p, *r), 1, 0)
            }
            MapOp::DelSrcRange(p, r) => {
                trie::<SrcRange<F::Wire>>(ebpf, m.src_range)?.remove(&Key::new(*p, *r))
            }
            MapOp::PutLpm(t, c) => trie::<F::Wire>(ebpf, trie_name::<F>(*t))?.insert(
                &Key::new(c.prefix_len, c.addr),
                1,
                0,
            ),
            MapOp::DelLpm(t, c) => {
                trie::<F::Wire>(ebpf, trie_name::<F>(*t))?.remove(&Key::new(c.prefix_len, c.addr))
            }
        };
        res.map_err(|e| other(format!("map write {op:?}"), e))?;
    }
    Ok(())
}

/// Delete kernel-owned entries of family `F` naming a (service, backend) pair that is
/// gone: affinity entries of any protocol, and UDP conntrack entries (both directions), as
/// kube-proxy clears UDP conntrack for removed endpoints. TCP flows are left to fail or
/// finish, as with kube-proxy; the program re-selects when their backend id no longer names
/// their backend. Returns the number of conntrack entries deleted.
pub fn purge_stale<F: KernelFamily>(
    ebpf: &mut Ebpf,
    valid: &BTreeSet<(u16, u32)>,
) -> Result<u64, DataplaneError> {
    let m = F::MAPS;
    let rd = |n: &str, e: aya::maps::MapError| other(format!("reading {n}"), e);
    let mut aff = hash::<AffinityKey<F::Wire>, AffinityValue>(ebpf, m.affinity)?;
    let mut stale = Vec::new();
    for kv in aff.iter() {
        let (k, v) = kv.map_err(|e| rd(m.affinity, e))?;
        if !valid.contains(&(k.rev_nat_id, v.backend_id)) {
            stale.push(k);
        }
    }
    for k in &stale {
        // An LRU entry may have been evicted meanwhile; that is the goal anyway.
        let _ = aff.remove(k);
    }
    let mut ct = hash::<CtKey<F::Wire>, CtValue<F::Wire>>(ebpf, m.ct)?;
    let mut stale = Vec::new();
    for kv in ct.iter() {
        let (k, v) = kv.map_err(|e| rd(m.ct, e))?;
        if k.proto == 17 && !valid.contains(&(v.rev_nat_id, v.backend_id)) {
            stale.push(k);
        }
    }
    let mut deleted = 0;
    for k in &stale {
        if ct.remove(k).is_ok() {
            deleted += 1;
        }
    }
    // Sockets' remembered backends (node-originated traffic) that left their service.
    let mut fwd = hash::<F::SockKey, SockFwd<F::Wire>>(ebpf, m.sock_fwd)?;
    let mut stale = Vec::new();
    for kv in fwd.iter() {
        let (k, v) = kv.map_err(|e| rd(m.sock_fwd, e))?;
        if !valid.contains(&(v.rev_nat_id, v.backend_id)) {
            stale.push(k);
        }
    }
    for k in &stale {
        let _ = fwd.remove(k);
    }
    Ok(deleted)
}

/// Read family `F`'s userspace-owned maps back (after adopting pins, or after a failed
/// write).
pub fn read_state<F: KernelFamily>(ebpf: &mut Ebpf) -> Result<State<F>, DataplaneError> {
    let m = F::MAPS;
    let mut st = State::<F>::default();
    let rd = |n: &str, e: aya::maps::MapError| other(format!("reading {n}"), e);
    st.node_ip = aya::maps::Array::<_, Config<F::Wire>>::try_from(map_mut(ebpf, m.config)?)
        .map_err(|e| other(m.config, e))?
        .get(&0, 0)
        .map_err(|e| rd(m.config, e))?
        .node_ip;
    for kv in hash::<ServiceKey<F::Wire>, Service4Value>(ebpf, m.services)?.iter() {
        let (k, v) = kv.map_err(|e| rd(m.services, e))?;
        st.services.insert(k, v);
    }
    for kv in hash::<u32, Backend<F::Wire>>(ebpf, m.backends)?.iter() {
        let (k, v) = kv.map_err(|e| rd(m.backends, e))?;
        st.backends.insert(k, v);
    }
    for kv in hash::<u32, RevNat<F::Wire>>(ebpf, m.rev_nat)?.iter() {
        let (k, v) = kv.map_err(|e| rd(m.rev_nat, e))?;
        st.rev_nat.insert(k, v);
    }
    for k in hash::<F::Wire, u32>(ebpf, m.cluster_ip)?.keys() {
        st.cluster_ips.insert(k.map_err(|e| rd(m.cluster_ip, e))?);
    }
    for k in trie::<SrcRange<F::Wire>>(ebpf, m.src_range)?.keys() {
        let k = k.map_err(|e| rd(m.src_range, e))?;
        st.src_ranges.insert((k.prefix_len(), k.data()));
    }
    for (t, set) in [
        (Trie::ServiceCidr, &mut st.service_cidrs),
        (Trie::LocalCidr, &mut st.local_cidrs),
    ] {
        let name = trie_name::<F>(t);
        for k in trie::<F::Wire>(ebpf, name)?.keys() {
            let k = k.map_err(|e| rd(name, e))?;
            set.insert(Lpm {
                prefix_len: k.prefix_len(),
                addr: k.data(),
            });
        }
    }
    ids_from_maps(&mut st);
    Ok(st)
}

/// Write the difference between `state` and the plan `want` (family `F`), purge kernel state that
/// names removed backends, and make the result the new base.
fn sync_family<F: KernelFamily>(
    ebpf: &mut Ebpf,
    state: &mut State<F>,
    want: State<F>,
    outcome: &mut SyncOutcome,
) -> Result<(), DataplaneError> {
    let ops = diff(state, &want);
    if let Err(e) = apply_ops::<F>(ebpf, &ops) {
        // Re-base on what the kernel holds, so the next sync diffs correctly.
        *state = read_state(ebpf)?;
        return Err(e);
    }
    if ops
        .iter()
        .any(|o| matches!(o, MapOp::PutService(..) | MapOp::DelService(_)))
    {
        outcome.conntrack_deleted += purge_stale::<F>(ebpf, &valid_pairs(&want))?;
    }
    let tag = match F::FAMILY {
        IpFamily::V4 => "4",
        IpFamily::V6 => "6",
    };
    outcome
        .rules_total
        .push((format!("services{tag}"), want.services.len() as u64));
    outcome
        .rules_total
        .push((format!("backends{tag}"), want.backends.len() as u64));
    *state = want;
    Ok(())
}

/// statfs(2) f_type of `dir` (nix's `statfs` needs its `fs` feature; libc is enough).
fn fs_magic(dir: &Path) -> Result<i64, DataplaneError> {
    use std::os::unix::ffi::OsStrExt as _;
    let what = || format!("statfs {}", dir.display());
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| other(what(), e))?;
    let mut buf = std::mem::MaybeUninit::<nix::libc::statfs>::zeroed();
    // SAFETY: valid NUL-terminated path and a properly sized out buffer.
    let rc = unsafe { nix::libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io(what(), std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it filled the buffer.
    // f_type is __fsword_t: i64 on x86_64, narrower on some architectures.
    #[allow(clippy::unnecessary_cast)]
    Ok(unsafe { buf.assume_init() }.f_type as i64)
}

/// The cookie of this process' network namespace (SO_NETNS_COOKIE, kernel >= 5.14), the
/// value bpf_get_netns_cookie gives the socket programs for the node's own sockets.
fn netns_cookie() -> Result<u64, DataplaneError> {
    use std::os::fd::AsRawFd as _;
    // Unbound: a fresh namespace may not even have lo up.
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io("a socket to read SO_NETNS_COOKIE", e.into()))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: valid socket fd, out buffer and its length.
    let rc = unsafe {
        nix::libc::getsockopt(
            sock.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io(
            "getsockopt SO_NETNS_COOKIE",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}

/// The loopback device's ifindex in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;

/// net.ipv4.conf.lo.accept_local=1 in this network namespace. The node's own masqueraded
/// flows to a node address (a NodePort) get their replies back through loopback ingress
/// with the frontend, a local address, as source. A packet the stack itself loops back
/// carries its route and is never checked, but one redirected there by BPF has none, and
/// fib_validate_source refuses a local source unless accept_local (iptables' conntrack
/// does this reverse NAT after routing, at LOCAL_IN, so it never needs it). Only loopback:
/// no other interface is affected; kube-proxy likewise sets the sysctls its mode needs
/// (route_localnet) and leaves them on exit.
fn allow_local_source_on_lo() -> Result<(), DataplaneError> {
    const PATH: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => std::fs::write(PATH, "1").map_err(|e| io(format!("writing {PATH}"), e)),
    }
}

/// Where a node (and a DaemonSet's hostPath) finds bpffs.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Mount bpffs at `/sys/fs/bpf` when `pin_dir` lies under it and it is not a bpffs yet.
/// `ip netns exec` remounts /sys in a private mount namespace, and some hosts never mount
/// bpffs at all; a DaemonSet would find it mounted there (systemd and kubelet hosts do), so
/// shunt mounts it the same way. Returns whether it mounted.
fn ensure_bpffs(pin_dir: &Path) -> Result<bool, DataplaneError> {
    let mnt = Path::new(BPFFS_MOUNT);
    if !pin_dir.starts_with(mnt) || fs_magic(mnt)? == BPF_FS_MAGIC {
        return Ok(false);
    }
    // Mode 0700 as systemd mounts it (mount-setup.c): pins are only for root.
    nix::mount::mount(
        Some("bpf"),
        mnt,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|e| io(format!("mounting bpffs at {BPFFS_MOUNT}"), e.into()))?;
    tracing::info!("mounted bpffs at {BPFFS_MOUNT}");
    Ok(true)
}

/// The first cgroup2 mount point in a /proc/self/mountinfo text (proc(5): fields up to the
/// ` - ` separator, then the filesystem type). A mount point with a space is octal-escaped
/// (`\040`) there.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mp = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mp)))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host's cgroup2 mount (the unified hierarchy: /sys/fs/cgroup on a cgroup-v2 host,
/// /sys/fs/cgroup/unified in hybrid mode), read from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, DataplaneError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io("reading /proc/self/mountinfo", e))?;
    cgroup2_mount_in(&text).ok_or_else(|| other("/proc/self/mountinfo", "no cgroup2 mount"))
}

/// Pin a freshly attached link at `tmp`, then unpin (detach) the link of a previous run at
/// `fin`, then move the new pin to `fin`: make-before-break across restarts.
fn replace_link(link: FdLink, tmp: &Path, fin: &Path) -> Result<(), DataplaneError> {
    let _ = std::fs::remove_file(tmp);
    link.pin(tmp).map_err(|e| {
        other(
            format!("pinning a link at {}", tmp.display()),
            std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()),
        )
    })?;
    if fin.exists() {
        let old = PinnedLink::from_pin(fin)
            .map_err(|e| other(format!("adopting {}", fin.display()), e))?;
        drop(
            old.unpin()
                .map_err(|e| io(format!("unpinning {}", fin.display()), e))?,
        );
    }
    std::fs::rename(tmp, fin).map_err(|e| io(format!("renaming {}", tmp.display()), e))
}

/// Loaded programs, adopted maps and the state last written (per family).
struct Loaded {
    ebpf: Ebpf,
    state4: State4,
    state6: State6,
    /// The tc program's attachments, shared with the link watcher.
    tc: Arc<Mutex<links::TcLinks>>,
    /// Attaches to interfaces as netlink announces them; stopped when dropped (or taken
    /// before a growth replaces the programs).
    watcher: Option<links::Watcher>,
    /// The socket programs are attached (or there is no cgroup to attach them to).
    cgroup_attached: bool,
    /// Current max_entries of the maps that grow (`capacity::growable`).
    sizes: BTreeMap<&'static str, u32>,
}

/// The eBPF backend. Creating it touches nothing; the first `sync` loads and attaches.
pub struct EbpfDataplane {
    opts: EbpfOptions,
    loaded: Option<Loaded>,
    /// The programs' conntrack timeouts (`with_conntrack`), and their sweep.
    ct_timeouts: shunt_abi::CtTimeouts,
    ct_sweeper: ct_sweep::Sweeper,
}

impl EbpfDataplane {
    pub fn new(opts: EbpfOptions) -> Result<Self, DataplaneError> {
        if opts.pin_dir.as_os_str().is_empty() {
            return Err(other("pin_dir", "empty path"));
        }
        Ok(EbpfDataplane {
            opts,
            loaded: None,
            ct_timeouts: shunt_abi::CtTimeouts::default(),
            ct_sweeper: ct_sweep::Sweeper::default(),
        })
    }

    /// Use kube-proxy's conntrack settings for the programs' conntrack timeouts.
    pub fn with_conntrack(mut self, s: &crate::config::ConntrackSettings) -> Self {
        self.ct_timeouts = ct_sweep::timeouts(s);
        self
    }

    fn start(&mut self) -> Result<Loaded, DataplaneError> {
        let dir = &self.opts.pin_dir;
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
        if fs_magic(dir)? != BPF_FS_MAGIC {
            return Err(other(
                format!("pin_dir {}", dir.display()),
                "not on a bpffs (mount -t bpf bpf /sys/fs/bpf)",
            ));
        }
        // Pins whose definition differs from what shunt creates now (older shunt, other
        // size flags) are set aside and replaced, their entries copied when possible.
        let sizes = Sizes {
            configured: self.opts.map_sizes,
            grown: Default::default(),
        };
        let replaced = maps::check_pins(dir, &maps::wanted_defs(OBJECT, &sizes)?)?;
        let mut ebpf = match load_object_sized(Some(dir), &sizes) {
            Ok(e) => e,
            Err(e) => {
                maps::restore(dir, &replaced);
                return Err(e);
            }
        };
        if let Err(e) = maps::copy_replaced(dir, &replaced, false) {
            drop(ebpf);
            maps::restore(dir, &replaced);
            return Err(e);
        }
        let state4 = read_state::<V4>(&mut ebpf)?;
        let state6 = read_state::<V6>(&mut ebpf)?;
        let cookie = netns_cookie()?;
        aya::maps::Array::<_, u64>::try_from(map_mut(&mut ebpf, names::HOST_NETNS)?)
            .map_err(|e| other(names::HOST_NETNS, e))?
            .set(shunt_abi::host_ns::COOKIE, cookie, 0)
            .map_err(|e| other(names::HOST_NETNS, e))?;
        ct_sweep::write_timeouts(&mut ebpf, self.ct_timeouts)?;
        let (tc, watcher) = self.tc_links(&mut ebpf)?;
        let mut loaded = Loaded {
            ebpf,
            state4,
            state6,
            tc,
            watcher: Some(watcher),
            cgroup_attached: false,
            sizes: maps::current_sizes(dir)?,
        };
        self.attach_cgroup(&mut loaded)?;
        self.attach_interfaces(&mut loaded)?;
        // The new programs are attached: the replaced maps' previous copies can go.
        maps::finish(dir, &replaced)?;
        Ok(loaded)
    }

    /// A second handle on the loaded tc program for attaching, and the netlink watcher that
    /// attaches it to interfaces as they appear. The watcher subscribes before the caller's
    /// first scan: an interface created in between is seen by one of the two (attaching
    /// twice is a no-op).
    fn tc_links(
        &self,
        ebpf: &mut Ebpf,
    ) -> Result<(Arc<Mutex<links::TcLinks>>, links::Watcher), DataplaneError> {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS)
            .ok_or_else(|| other(TC_INGRESS, "missing"))?
            .try_into()
            .map_err(|e| other(TC_INGRESS, e))?;
        let tc = Arc::new(Mutex::new(links::TcLinks::new(prog, &self.opts.pin_dir)?));
        let watcher = links::Watcher::start(tc.clone(), self.opts.interfaces.clone())?;
        Ok((tc, watcher))
    }

    /// Attach the socket programs to `cgroup_root`, make-before-break over the links of a
    /// previous run (or of the programs before a growth).
    fn attach_cgroup(&self, l: &mut Loaded) -> Result<(), DataplaneError> {
        if self.opts.cgroup_root.as_os_str().is_empty() {
            l.cgroup_attached = true;
            return Ok(());
        }
        let cg = &self.opts.cgroup_root;
        let cgf = std::fs::File::open(cg)
            .map_err(|e| io(format!("opening cgroup {}", cg.display()), e))?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = l
                .ebpf
                .program_mut(name)
                .ok_or_else(|| other(name, "missing"))?
                .try_into()
                .map_err(|e| other(name, e))?;
            // aya attaches with bpf_link_create (kernel >= 5.7); a cgroup link takes no
            // flags (cgroup_bpf_link_attach rejects any) and always coexists with other
            // links, so the previous run's program stays attached next to the new one
            // until replace_link unpins it. `Single` is the flag-less mode.
            let id = prog
                .attach(&cgf, CgroupAttachMode::Single)
                .map_err(|e| other(format!("attaching {name} to {}", cg.display()), e))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| other(name, e))?
                .try_into()
                .map_err(|e| other(name, e))?;
            replace_link(
                link,
                &self.opts.pin_dir.join(format!("cgnew_{name}")),
                &self.opts.pin_dir.join(format!("cg_{name}")),
            )?;
        }
        l.cgroup_attached = true;
        Ok(())
    }

    /// Attach the tc program to every wanted interface it is not attached to yet, and drop
    /// link pins of interfaces that no longer exist (their links died with the device).
    fn attach_interfaces(&self, l: &mut Loaded) -> Result<(), DataplaneError> {
        let present =
            l.tc.lock()
                .unwrap_or_else(|p| p.into_inner())
                .scan(&self.opts.interfaces)?;
        let on_lo = present.contains(&LOOPBACK_IFINDEX);
        if on_lo {
            allow_local_source_on_lo()?;
        }
        // Tell the socket programs whether loopback is covered (else they must balance
        // node-originated traffic to node addresses themselves).
        let on_lo = u64::from(on_lo);
        aya::maps::Array::<_, u64>::try_from(map_mut(&mut l.ebpf, names::HOST_NETNS)?)
            .map_err(|e| other(names::HOST_NETNS, e))?
            .set(shunt_abi::host_ns::LOOPBACK, on_lo, 0)
            .map_err(|e| other(names::HOST_NETNS, e))?;
        Ok(())
    }

    /// Plan each snapshot, grow the maps a plan does not fit in, write the plans.
    fn sync_loaded(
        &self,
        l: &mut Loaded,
        snapshots: &[Snapshot],
        local: &[IpAddr],
        outcome: &mut SyncOutcome,
    ) -> Result<(), DataplaneError> {
        for snap in snapshots {
            let plan_err = |e| other("planning", e);
            match snap.network.family {
                IpFamily::V4 => {
                    let want = desired(snap, local, &l.state4).map_err(plan_err)?;
                    self.ensure_capacity(l, &capacity::needs(&l.state4, &want))?;
                    sync_family(&mut l.ebpf, &mut l.state4, want, outcome)?
                }
                IpFamily::V6 => {
                    let want = desired(snap, local, &l.state6).map_err(plan_err)?;
                    self.ensure_capacity(l, &capacity::needs(&l.state6, &want))?;
                    sync_family(&mut l.ebpf, &mut l.state6, want, outcome)?
                }
            }
        }
        Ok(())
    }

    /// Grow the maps that cannot hold `needs` entries: new, bigger maps filled with the
    /// current entries, the programs loaded against them and attached make-before-break
    /// (tcx and cgroup links replaced, see `replace_link`), the pins replaced, the old
    /// programs and maps released. The maps of live flows (conntrack, affinity, socket NAT)
    /// are adopted by the new programs through their pins, so no connection notices.
    fn ensure_capacity(
        &self,
        l: &mut Loaded,
        needs: &[(&'static str, usize)],
    ) -> Result<(), DataplaneError> {
        let growth = capacity::growth(needs, &l.sizes).map_err(|e| other("map capacity", e))?;
        if growth.is_empty() {
            return Ok(());
        }
        let dir = &self.opts.pin_dir;
        let mut sizes = Sizes {
            configured: self.opts.map_sizes,
            grown: l.sizes.clone(),
        };
        let mut replaced = Vec::new();
        for &(name, old, new) in &growth {
            let need = needs.iter().find(|n| n.0 == name).map_or(0, |n| n.1);
            tracing::info!("map {name}: growing from {old} to {new} entries ({need} needed)");
            sizes.grown.insert(name, new);
            match maps::set_aside(dir, name, true, Vec::new()) {
                Ok(r) => replaced.push(r),
                Err(e) => {
                    maps::restore(dir, &replaced);
                    return Err(e);
                }
            }
        }
        let fail = |e: DataplaneError| {
            let what: Vec<String> = growth
                .iter()
                .map(|(n, old, new)| format!("{n} {old} -> {new}"))
                .collect();
            other(format!("growing maps ({})", what.join(", ")), e)
        };
        let ebpf = match load_object_sized(Some(dir), &sizes)
            .and_then(|e| maps::copy_replaced(dir, &replaced, false).map(|()| e))
        {
            Ok(e) => e,
            Err(e) => {
                maps::restore(dir, &replaced);
                return Err(fail(e));
            }
        };
        // From here the new maps are pinned and hold everything: the new programs become
        // the instance even if an attach fails (the next sync retries the attaches).
        let mut ebpf = ebpf;
        // The previous programs' watcher stops first: left running, it could attach the old
        // program to a new interface after the new one did, replacing the newer link.
        // Interfaces created meanwhile are found by the new watcher or the scan below.
        l.watcher = None;
        let (tc, watcher) = match self.tc_links(&mut ebpf) {
            Ok(t) => t,
            Err(e) => {
                maps::restore(dir, &replaced);
                return Err(fail(e));
            }
        };
        let mut next = Loaded {
            ebpf,
            state4: std::mem::take(&mut l.state4),
            state6: std::mem::take(&mut l.state6),
            tc,
            watcher: Some(watcher),
            cgroup_attached: false,
            sizes: sizes.grown.clone(),
        };
        let res = self
            .attach_cgroup(&mut next)
            .and_then(|()| self.attach_interfaces(&mut next));
        // Dropping the previous instance closes its program and map fds; its links were
        // unpinned by replace_link, so it is detached and freed.
        *l = next;
        res.map_err(fail)?;
        maps::finish(dir, &replaced)
    }

    fn local_addrs() -> Result<Vec<IpAddr>, DataplaneError> {
        let mut out = BTreeSet::new();
        for a in nix::ifaddrs::getifaddrs().map_err(|e| io("getifaddrs", e.into()))? {
            let Some(addr) = a.address.as_ref() else {
                continue;
            };
            if let Some(s) = addr.as_sockaddr_in() {
                out.insert(IpAddr::V4(s.ip()));
            } else if let Some(s) = addr.as_sockaddr_in6() {
                out.insert(IpAddr::V6(s.ip()));
            }
        }
        Ok(out.into_iter().collect())
    }
}

impl Dataplane for EbpfDataplane {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn sync(&mut self, request: SyncRequest<'_>) -> Result<SyncOutcome, DataplaneError> {
        match self.loaded.take() {
            None => self.loaded = Some(self.start()?),
            Some(mut l) => {
                let res = if l.cgroup_attached {
                    Ok(())
                } else {
                    self.attach_cgroup(&mut l)
                };
                let res = res.and_then(|()| self.attach_interfaces(&mut l));
                self.loaded = Some(l);
                res?;
            }
        }
        let local = Self::local_addrs()?;
        let mut outcome = SyncOutcome {
            full: true,
            ..Default::default()
        };
        let Some(mut l) = self.loaded.take() else {
            return Err(other("ebpf", "not loaded"));
        };
        let res = self.sync_loaded(&mut l, request.snapshots, &local, &mut outcome);
        if res.is_ok() {
            match self
                .ct_sweeper
                .maybe_sweep::<V4, V6>(&mut l.ebpf, &self.ct_timeouts)
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "swept expired conntrack entries"),
                // The sweep only reclaims memory early; a failure does not fail the sync.
                Err(e) => tracing::warn!("conntrack sweep: {e}"),
            }
        }
        self.loaded = Some(l);
        res.map(|()| outcome)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.loaded = None;
        let dir = &self.opts.pin_dir;
        // Not on a bpffs (e.g. /sys/fs/bpf unmounted, or /sys remounted by `ip netns exec`):
        // nothing of ours can be pinned here. Every bpffs mount is a new, empty instance
        // (bpf_get_tree uses get_tree_nodev), so mounting one to look would find nothing;
        // and pins made in a private mount namespace died with it, detaching their links.
        match fs_magic(dir) {
            Ok(m) if m == BPF_FS_MAGIC => {}
            Ok(_) => return Ok(()),
            Err(DataplaneError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(format!("reading {}", dir.display()), e)),
        };
        for ent in entries {
            let ent = ent.map_err(|e| io(format!("reading {}", dir.display()), e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            // Only what we pin: our map names and our link pins. Removing a link's last pin
            // (no fd open any more) detaches it.
            if names::ALL.contains(&name.as_str())
                || name
                    .strip_prefix("old_")
                    .is_some_and(|n| names::ALL.contains(&n))
                || name.starts_with("tcx")
                || name.starts_with("cg")
            {
                std::fs::remove_file(ent.path())
                    .map_err(|e| io(format!("removing {}", ent.path().display()), e))?;
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            // Something not ours is left there: keep it.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(()),
            Err(e) => Err(io(format!("removing {}", dir.display()), e)),
        }
    }
}

pub mod ct_sweep;
mod links;
#[cfg(test)]
mod netns_tests;
#[cfg(test)]
mod tests;
