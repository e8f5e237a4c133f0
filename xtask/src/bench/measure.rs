//! IMPURE: the measurements, each bounded by a deadline. Every figure is read from the data
//! plane itself (a request from the client pod through the VIP, answered or refused by the
//! kernel's rules), never from shunt's own timers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::agent::Answer;
use crate::lab::netns;

/// What one request saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A lab server answered with its name.
    Answer(String),
    /// ECONNREFUSED: a RST (Service without endpoints is rejected in every mode).
    Refused,
    /// Connect timeout, reset mid-request, a non-lab answer, ...
    Other(String),
}

/// Connect + HTTP/1.0 request + full response + close, from the calling thread's namespace.
pub fn request(dst: SocketAddr, connect_timeout: Duration) -> Seen {
    match TcpStream::connect_timeout(&dst, connect_timeout) {
        Ok(c) => exchange(c),
        Err(e) => connect_failed(e),
    }
}

/// [`request`] from a source port the kernel picks inside `ports` (see [`PortRanges`]).
pub fn request_from(dst: SocketAddr, connect_timeout: Duration, ports: (u16, u16)) -> Seen {
    let sock = match Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return Seen::Other(format!("socket: {e}")),
    };
    if let Err(e) = set_local_port_range(&sock, ports) {
        return Seen::Other(format!("IP_LOCAL_PORT_RANGE: {e}"));
    }
    match sock.connect_timeout(&dst.into(), connect_timeout) {
        Ok(()) => exchange(sock.into()),
        Err(e) => connect_failed(e),
    }
}

fn connect_failed(e: std::io::Error) -> Seen {
    if e.kind() == ErrorKind::ConnectionRefused {
        Seen::Refused
    } else {
        Seen::Other(e.to_string())
    }
}

fn exchange(mut c: TcpStream) -> Seen {
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = c.set_nodelay(true);
    if let Err(e) = c.write_all(b"GET / HTTP/1.0\r\n\r\n") {
        return Seen::Other(e.to_string());
    }
    let mut buf = Vec::with_capacity(256);
    if let Err(e) = (&mut c).take(64 * 1024).read_to_end(&mut buf) {
        return Seen::Other(e.to_string());
    }
    match Answer::parse(&String::from_utf8_lossy(&buf)) {
        Some(a) => Seen::Answer(a.name),
        None => Seen::Other(format!(
            "not a lab answer: {:?}",
            String::from_utf8_lossy(&buf)
        )),
    }
}

/// `IP_LOCAL_PORT_RANGE` (include/uapi/linux/in.h, Linux 6.3): a per-socket ephemeral port
/// range, low port in the low 16 bits, high port in the high 16 bits; the kernel intersects
/// it with the namespace's `net.ipv4.ip_local_port_range` (inet_sk_get_local_port_range).
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

fn set_local_port_range(sock: &Socket, (lo, hi): (u16, u16)) -> std::io::Result<()> {
    let v: u32 = u32::from(lo) | (u32::from(hi) << 16);
    // SAFETY: a valid socket descriptor and a 4-byte option value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_LOCAL_PORT_RANGE,
            (&v as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Disjoint source-port ranges for the VIP probes and the direct probes of one client.
///
/// Why: the backend sees both kinds of connection as the same 4-tuple (client:port ->
/// pod:8080), but the client kernel picks ephemeral ports, initial sequence numbers and
/// timestamp offsets per *destination* (secure_tcp_seq / secure_tcp_ts_off hash the VIP or
/// the pod address), so interleaved VIP and direct connections reuse each other's ports in
/// a different sequence space. The backend closes first and holds TIME_WAIT (60 s); a SYN
/// that hits it with an older sequence/timestamp is answered with an ACK
/// (tcp_timewait_state_process), the client resets and re-sends the SYN after
/// TCP_TIMEOUT_MIN (tcp_rcv_synsent_state_process): 8-16 ms per collision. netfilter hides
/// most of it (NAT gives a new connection whose reply tuple is taken another source port,
/// nf_nat_used_tuple / get_unique_tuple, even without a rule); a conntrack-free datapath
/// (shunt's ebpf mode, pure DNAT) does not, so the collisions of the bench's own two probes
/// cut its rate 3-8x. A workload reaching a backend only through its Service never sees
/// this, so the probes get disjoint ranges: every mode, same setsockopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRanges {
    pub vip: (u16, u16),
    pub direct: (u16, u16),
}

impl PortRanges {
    /// The namespace's ephemeral range (`ip_local_port_range`, per network namespace) split
    /// in two halves; call from inside the client namespace. None when the kernel has no
    /// per-socket range (before 6.3) or the range cannot be read.
    pub fn for_this_netns() -> Option<PortRanges> {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let r = PortRanges::split(&text)?;
        let probe = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).ok()?;
        set_local_port_range(&probe, r.vip).ok()?;
        Some(r)
    }

    fn split(range: &str) -> Option<PortRanges> {
        let mut it = range.split_whitespace().map(|v| v.parse::<u16>().ok());
        let (lo, hi) = (it.next()??, it.next()??);
        if hi <= lo {
            return None;
        }
        let mid = lo + (hi - lo) / 2;
        Some(PortRanges {
            vip: (lo, mid),
            direct: (mid + 1, hi),
        })
    }
}

/// Polls `dst` from namespace `ns` until `want` holds or `limit` passes; returns the time from
/// `since` to the first request that saw it (`None`: not within the limit).
pub fn until(
    ns: &str,
    dst: SocketAddr,
    since: Instant,
    limit: Duration,
    want: impl Fn(&Seen) -> bool + Send,
) -> Result<Option<Duration>> {
    netns::in_netns(ns, move || {
        while since.elapsed() < limit {
            crate::lab::check_interrupted()?;
            // A dropped SYN (no rule yet for a new VIP) costs one connect timeout per poll.
            let seen = request(dst, Duration::from_millis(50));
            if want(&seen) {
                return Ok(Some(since.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(None)
    })
}

/// The shunt process started for `manifests` (the `ip netns exec`/`nsenter` wrapper execs
/// shunt, so it keeps the spawned pid): found by its command line.
pub fn find_pid(manifests: &str) -> Result<u32> {
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"--manifests" && w[1] == manifests.as_bytes());
        if ours && !args.iter().any(|a| *a == b"--cleanup") {
            return Ok(pid);
        }
    }
    bail!("no shunt process with --manifests {manifests}")
}

/// CPU and memory of a process from procfs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    /// utime + stime of shunt itself (proc(5) fields 14, 15).
    pub cpu: Duration,
    /// cutime + cstime: its reaped children (nft, iptables-restore) (fields 16, 17).
    pub children_cpu: Duration,
    /// VmHWM: peak resident set size.
    pub peak_rss_kib: u64,
    /// State `Z` or gone: shunt exited.
    pub exited: bool,
}

pub fn proc_stat(pid: u32) -> ProcStat {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return ProcStat {
            exited: true,
            ..ProcStat::default()
        };
    };
    // The command name (field 2) may hold spaces; fields after its closing paren are fixed.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / hz;
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let exited = f.first() == Some(&"Z");
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    ProcStat {
        cpu: Duration::from_secs_f64(tick(11) + tick(12)),
        children_cpu: Duration::from_secs_f64(tick(13) + tick(14)),
        peak_rss_kib: peak,
        exited,
    }
}

/// `HTTP GET /healthz` on shunt's healthz address inside the node namespace answered 200.
pub fn healthy(node_ns: &str) -> bool {
    netns::in_netns(node_ns, || {
        crate::shunt::http_get(crate::shunt::HEALTHZ.parse()?, "/healthz")
    })
    .is_ok_and(|(code, _)| code == 200)
}

/// A child process killed (and reaped) when dropped; the kernel SIGKILLs it if xtask dies.
pub struct Guard(Child);

impl Guard {
    pub fn spawn(cmd: &mut Command) -> Result<Guard> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Guard(
            cmd.spawn().with_context(|| format!("starting {cmd:?}"))?,
        ))
    }

    /// Bounded wait for exit; killed at the deadline. Returns stdout.
    pub fn wait(mut self, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if self.0.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("did not finish within {limit:?} (killed)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        Ok(out)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `iperf3 -s` on the probed pod (bound to its address, one process for the whole lab).
pub fn iperf_server(pod_ns: &str, bind: &str, port: u16) -> Result<Guard> {
    let g = Guard::spawn(
        Command::new("ip")
            .args(["netns", "exec", pod_ns, "iperf3", "-s", "-B", bind])
            .args(["-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    // Its listener is up once the port accepts (bounded); the probe connection it sees first is
    // closed before sending a cookie, which iperf3 logs and ignores.
    let addr: SocketAddr = format!("{bind}:{port}").parse()?;
    let up = netns::in_netns(&format!("/run/netns/{pod_ns}"), || {
        for _ in 0..100 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(false)
    })?;
    if !up {
        bail!("iperf3 -s on {addr} did not listen within 5 s");
    }
    Ok(g)
}

/// One iperf3 TCP run from the client namespace; received bits per second.
pub fn iperf(client_ns: &str, dst: SocketAddr, secs: u64) -> Result<f64> {
    let g = Guard::spawn(
        Command::new("ip")
            .args(["netns", "exec", client_ns, "iperf3", "-J", "-c"])
            .arg(dst.ip().to_string())
            .args(["-p", &dst.port().to_string(), "-t", &secs.to_string()])
            .args(["--connect-timeout", "3000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let out = g
        .wait(Duration::from_secs(secs + 15))
        .with_context(|| format!("iperf3 -c {dst}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("iperf3 -J output for {dst}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 -c {dst}: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 -c {dst}: no end.sum_received.bits_per_second"))
}

/// Percentile (nearest rank) of unsorted samples.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let s = ms(&[5, 1, 4, 2, 3]);
        assert_eq!(percentile(&s, 50.0), Some(Duration::from_millis(3)));
        assert_eq!(percentile(&s, 99.0), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&s, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
        let h: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&h, 99.0), Some(Duration::from_millis(99)));
    }

    #[test]
    fn port_ranges_split() {
        assert_eq!(
            PortRanges::split("32768\t60999\n"),
            Some(PortRanges {
                vip: (32768, 46883),
                direct: (46884, 60999)
            })
        );
        assert_eq!(PortRanges::split("1024 1024"), None);
        assert_eq!(PortRanges::split("garbage"), None);
    }

    #[test]
    fn own_stat() {
        let s = proc_stat(std::process::id());
        assert!(!s.exited);
        assert!(s.peak_rss_kib > 0);
        assert!(proc_stat(u32::MAX).exited);
    }
}
