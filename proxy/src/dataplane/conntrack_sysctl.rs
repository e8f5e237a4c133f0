//! netfilter modes (nftables, iptables): kube-proxy's conntrack settings applied as the
//! kernel's nf_conntrack sysctls, as kube-proxy's conntrack configurer does
//! (cmd/kube-proxy/app/server_linux.go `setupConntrack`, conntrack.go `realConntracker`).
//!
//! [`plan`] is PURE: settings + CPU count -> which sysctl gets which value. [`apply`] is the
//! impure part: it reads each current value and writes where needed, in the network
//! namespace of the calling thread (`/proc/sys/net` resolves to the netns of the task that
//! opens it), which is the node's namespace shunt runs in.
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::config::ConntrackSettings;

/// Where the netfilter sysctls live (procfs, per network namespace except `nf_conntrack_max`).
pub const NETFILTER_SYSCTL_DIR: &str = "/proc/sys/net/netfilter";

/// When a sysctl is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Whenever the current value differs (conntrack.go `setIntSysCtl`).
    Differs,
    /// Only when the current value is smaller: shunt never lowers a limit someone raised
    /// (kube-proxy's SetMax likewise only raises `nf_conntrack_max`).
    Larger,
}

/// One sysctl write of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlWrite {
    /// File name under `/proc/sys/net/netfilter`.
    pub name: &'static str,
    pub value: u64,
    pub when: When,
    /// Global (`nf_conntrack_max`: only the initial network namespace may write it; the
    /// kernel makes it read-only elsewhere, nf_conntrack_standalone.c). A refused write is
    /// logged and skipped, as kube-proxy does for its read-only sysfs case.
    pub global: bool,
}

/// kube-proxy's `getConntrackMax`: `max(max_per_core * cpus, min)`, or None when
/// `max_per_core` is 0 (leave the limit alone).
pub fn conntrack_max(s: &ConntrackSettings, cpus: u32) -> Option<u64> {
    if s.max_per_core == 0 {
        return None;
    }
    Some((u64::from(s.max_per_core) * u64::from(cpus.max(1))).max(u64::from(s.min)))
}

/// The sysctl writes for `s` on a machine with `cpus` usable CPUs, in kube-proxy's order
/// (max first, then the timeouts, be_liberal, the UDP timeouts). A zero duration and a false
/// `tcp_be_liberal` mean "leave the kernel's value": no write.
pub fn plan(s: &ConntrackSettings, cpus: u32) -> Vec<SysctlWrite> {
    let mut out = Vec::new();
    if let Some(max) = conntrack_max(s, cpus) {
        out.push(SysctlWrite {
            name: "nf_conntrack_max",
            value: max,
            when: When::Larger,
            global: true,
        });
    }
    let per_netns = |name, value| SysctlWrite {
        name,
        value,
        when: When::Differs,
        global: false,
    };
    // The kernel takes whole seconds (kube-proxy: int(d / time.Second)); a sub-second
    // non-zero setting still means "set", so it rounds up to 1 instead of to "leave".
    let secs = |d: std::time::Duration| d.as_secs().max(1);
    if !s.tcp_established_timeout.is_zero() {
        out.push(per_netns(
            "nf_conntrack_tcp_timeout_established",
            secs(s.tcp_established_timeout),
        ));
    }
    if !s.tcp_close_wait_timeout.is_zero() {
        out.push(per_netns(
            "nf_conntrack_tcp_timeout_close_wait",
            secs(s.tcp_close_wait_timeout),
        ));
    }
    if s.tcp_be_liberal {
        out.push(per_netns("nf_conntrack_tcp_be_liberal", 1));
    }
    if !s.udp_timeout.is_zero() {
        out.push(per_netns("nf_conntrack_udp_timeout", secs(s.udp_timeout)));
    }
    if !s.udp_stream_timeout.is_zero() {
        out.push(per_netns(
            "nf_conntrack_udp_timeout_stream",
            secs(s.udp_stream_timeout),
        ));
    }
    out
}

/// CPUs this process may run on (Go's runtime.NumCPU, which kube-proxy's detectNumCPU uses:
/// the scheduler affinity mask, not a cgroup quota).
pub fn usable_cpus() -> u32 {
    let n = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count()
        })
        .unwrap_or(0);
    u32::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// An error applying the plan: names the sysctl.
#[derive(Debug, thiserror::Error)]
#[error("conntrack sysctl {path}: {source}")]
pub struct SysctlError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// What `apply` did with one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Written {
        name: &'static str,
        old: u64,
    },
    Unchanged {
        name: &'static str,
    },
    /// A global sysctl this namespace may not write (logged once).
    NotWritable {
        name: &'static str,
    },
}

/// Apply `writes` under `dir` (normally [`NETFILTER_SYSCTL_DIR`]) in the calling thread's
/// network namespace. A per-netns sysctl that cannot be read or written is an error
/// (kube-proxy fails to start then); a refused global one is logged and skipped.
pub fn apply(dir: &Path, writes: &[SysctlWrite]) -> Result<Vec<Applied>, SysctlError> {
    let mut done = Vec::with_capacity(writes.len());
    for w in writes {
        let path = dir.join(w.name);
        let err = |source| SysctlError {
            path: path.clone(),
            source,
        };
        let text = std::fs::read_to_string(&path).map_err(err)?;
        let old: u64 = text.trim().parse().map_err(|_| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a number: {:?}", text.trim()),
            ))
        })?;
        let needed = match w.when {
            When::Differs => old != w.value,
            When::Larger => old < w.value,
        };
        if !needed {
            done.push(Applied::Unchanged { name: w.name });
            continue;
        }
        match std::fs::write(&path, format!("{}\n", w.value)) {
            Ok(()) => {
                info!(sysctl = %path.display(), old, new = w.value, "set conntrack sysctl");
                done.push(Applied::Written { name: w.name, old });
            }
            // Outside the initial network namespace the kernel registers nf_conntrack_max
            // read-only (mode 0444): root gets EACCES; a read-only /proc gives EROFS.
            Err(e)
                if w.global
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::PermissionDenied
                            | std::io::ErrorKind::ReadOnlyFilesystem
                    ) =>
            {
                warn!(
                    sysctl = %path.display(),
                    current = old,
                    wanted = w.value,
                    "cannot raise {} here (it is global: only the initial network namespace \
                     may set it); leaving it as is",
                    w.name
                );
                done.push(Applied::NotWritable { name: w.name });
            }
            Err(e) => return Err(err(e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests;
