//! Driving the `shunt` binary exactly through the contract command line (BRIEF.md): manifests
//! directory, process start inside the node namespace, /healthz wait, SIGTERM stop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_yaml::{Mapping, Value};

use crate::lab::netns::{self, Netns};
use crate::scenario::{DetectLocalMode, Scenario};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    Nftables,
    Iptables,
    Ebpf,
}

impl ProxyMode {
    pub fn flag(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ebpf => "ebpf",
        }
    }
}

pub const HEALTHZ: &str = "127.0.0.1:10256";

/// The repository root (parent of xtask/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// `cargo build -p shunt` and the path of the debug binary (honours CARGO_TARGET_DIR).
pub fn build() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building shunt (cargo build -p shunt) ...");
    let st = Command::new(&cargo)
        .args(["build", "-p", "shunt"])
        .current_dir(repo_root())
        .status()
        .context("running cargo build -p shunt")?;
    if !st.success() {
        bail!("cargo build -p shunt failed ({st})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let bin = target.join("debug/shunt");
    if !bin.exists() {
        bail!("{} does not exist after the build", bin.display());
    }
    Ok(bin)
}

fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).expect("static YAML")
}

/// The ServiceCIDR `kubernetes` and the Node object shunt reads besides Services/EndpointSlices.
pub fn cluster_objects(s: &Scenario) -> Vec<Value> {
    let mut cidr = yaml(
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {}",
    );
    let cidrs: Vec<Value> = s
        .cluster
        .service_cidrs
        .iter()
        .map(|c| Value::from(c.to_string()))
        .collect();
    cidr["spec"]["cidrs"] = Value::Sequence(cidrs);

    let mut node = yaml("apiVersion: v1\nkind: Node\nmetadata: {}\nstatus: {}");
    node["metadata"]["name"] = Value::from(s.node.name.clone());
    if let Some(zone) = &s.node.zone {
        let mut labels = Mapping::new();
        labels.insert(
            "topology.kubernetes.io/zone".into(),
            Value::from(zone.clone()),
        );
        node["metadata"]["labels"] = Value::Mapping(labels);
    }
    let addrs: Vec<Value> = s
        .node
        .ips()
        .iter()
        .map(|ip| {
            let mut m = Mapping::new();
            m.insert("type".into(), "InternalIP".into());
            m.insert("address".into(), Value::from(ip.to_string()));
            Value::Mapping(m)
        })
        .collect();
    node["status"]["addresses"] = Value::Sequence(addrs);
    vec![cidr, node]
}

fn object_file_name(i: usize, obj: &Value) -> String {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object")
        .to_lowercase();
    let md = obj.get("metadata");
    let ns = md
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("cluster");
    let name = md
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("unnamed");
    format!("{i:02}-{kind}-{ns}-{name}.yaml")
}

/// Writes one object per file; replaces atomically (rename) so a watcher never reads half a file.
pub fn write_object(dir: &Path, file: &str, obj: &Value) -> Result<PathBuf> {
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, serde_yaml::to_string(obj)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path)
}

/// Writes Services, EndpointSlices, the ServiceCIDR and the Node; returns the file names used.
pub fn write_manifests(s: &Scenario, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let objs = s
        .services
        .iter()
        .chain(&s.endpointslices)
        .cloned()
        .chain(cluster_objects(s));
    for (i, obj) in objs.enumerate() {
        let f = object_file_name(i, &obj);
        write_object(dir, &f, &obj)?;
        names.push(f);
    }
    Ok(names)
}

/// The contract command line (without the binary).
pub fn args(s: &Scenario, mode: ProxyMode, manifests: &Path, cgroup: Option<&Path>) -> Vec<String> {
    let join = |v: &[ipnet::IpNet]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut a = vec![
        "--proxy-mode".into(),
        mode.flag().into(),
        "--manifests".into(),
    ];
    a.push(manifests.display().to_string());
    a.extend(["--hostname-override".into(), s.node.name.clone()]);
    match s.cluster.detect_local_mode {
        DetectLocalMode::ClusterCIDR => {
            a.extend(["--detect-local-mode".into(), "ClusterCIDR".into()]);
            a.extend(["--cluster-cidr".into(), join(&s.cluster.cluster_cidrs)]);
        }
        DetectLocalMode::None => a.extend(["--detect-local-mode".into(), "None".into()]),
    }
    if s.cluster.masquerade_all {
        a.push("--masquerade-all".into());
    }
    a.extend([
        "--nodeport-addresses".into(),
        join(&s.cluster.node_port_addresses),
    ]);
    a.extend(["--healthz-bind-address".into(), HEALTHZ.into()]);
    a.extend(["--metrics-bind-address".into(), "127.0.0.1:10249".into()]);
    if let Some(cg) = cgroup {
        a.extend(["--cgroup-root".into(), cg.display().to_string()]);
        a.extend(["--pin-dir".into(), pin_dir_for(cg).display().to_string()]);
    }
    a
}

/// The bpffs directory a lab's ebpf-mode shunt pins in: named like the lab's cgroup, so two
/// labs on one machine (a conformance run beside a bench) never adopt or `--cleanup` each
/// other's maps, and the machine's own /sys/fs/bpf/shunt is never touched.
pub fn pin_dir_for(cgroup: &Path) -> PathBuf {
    Path::new(BPFFS).join(cgroup.file_name().unwrap_or_default())
}

const BPFFS: &str = "/sys/fs/bpf";

/// A cgroup2 directory for ebpf mode, under the machine's cgroup2 mount (never its root), and
/// the lab's pin directory ([`pin_dir_for`]) that goes with it: both are removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    // mountinfo: "... mount-point ... - fstype source opts"
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount found in /proc/self/mountinfo")
}

impl Cgroup {
    pub fn create(tag: &str) -> Result<Cgroup> {
        let mount = cgroup2_mount()?;
        let path = mount.join(format!("{}{tag}", netns::prefix()));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// Removes empty `shunt-lab-<pid>-*` cgroups, and the pin directories of the same name,
    /// of runs that no longer exist.
    pub fn gc() -> usize {
        let mut n = 0;
        if let Ok(mount) = cgroup2_mount() {
            n += gc_dead_runs(&mount, |p| std::fs::remove_dir(p));
        }
        n + gc_dead_runs(Path::new(BPFFS), |p| std::fs::remove_dir_all(p))
    }
}

/// Removes `shunt-lab-<pid>-*` entries of `dir` whose run (pid) is gone; returns how many.
fn gc_dead_runs(dir: &Path, remove: impl Fn(&Path) -> std::io::Result<()>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("shunt-lab-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && remove(&e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The lab's pins first: unpinning its links detaches the programs (a run that did not
        // end with `--cleanup` leaves them; shunt itself has been reaped by now).
        let pins = pin_dir_for(&self.path);
        if pins.exists()
            && let Err(e) = std::fs::remove_dir_all(&pins)
        {
            eprintln!(
                "warning: could not remove pin directory {}: {e}",
                pins.display()
            );
        }
        // rmdir fails while a process is still inside; shunt has been reaped before we get here.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// A running shunt; dropping it SIGTERMs (then SIGKILLs) and reaps it.
pub struct Shunt {
    child: Option<Child>,
    stderr: PathBuf,
    node_ns: String,
}

impl Shunt {
    pub fn start(
        bin: &Path,
        node: &Netns,
        args: &[String],
        mode: ProxyMode,
        log_dir: &Path,
    ) -> Result<Shunt> {
        let stderr = log_dir.join("shunt.stderr");
        let err = std::fs::File::create(&stderr)?;
        // `ip netns exec` remounts /sys, hiding /sys/fs/bpf and the cgroup2 mount (LAB-NOTES):
        // ebpf mode joins only the network namespace with nsenter. Both exec, keeping the pid.
        let mut cmd = if mode == ProxyMode::Ebpf {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", node.path())).arg("--").arg(bin);
            c
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &node.name]).arg(bin);
            c
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(err.try_clone()?)
            .stderr(err);
        // Own process group: a Ctrl-C on the terminal reaches xtask, which stops shunt itself
        // with SIGTERM as the contract says, instead of shunt dying mid-sync.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // If xtask is SIGKILLed, the kernel still stops shunt (PR_SET_PDEATHSIG survives exec).
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Shunt {
            child: Some(child),
            stderr,
            node_ns: node.path(),
        })
    }

    /// The process id while it runs (`ip netns exec` and `nsenter` exec shunt in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stderr_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits (bounded) until GET /healthz answers 200 inside the node namespace.
    pub fn wait_healthy(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            crate::lab::check_interrupted()?;
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "shunt exited ({st}) before /healthz answered 200; stderr:\n{}",
                    self.stderr_tail(40)
                );
            }
            match netns::in_netns(&self.node_ns, || http_get(HEALTHZ.parse()?, "/healthz")) {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("HTTP {code}: {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "shunt /healthz did not answer 200 within {limit:?} (last: {last}); stderr:\n{}",
            self.stderr_tail(40)
        )
    }

    /// Waits (bounded) for the process to exit on its own (`--cleanup` runs).
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            crate::lab::check_interrupted()?;
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "shunt did not exit within {limit:?}; stderr:\n{}",
            self.stderr_tail(20)
        )
    }

    /// SIGKILL (a crash: no shutdown code runs) and reap; the rules stay as they were.
    pub fn kill9(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("shunt already stopped")
        };
        child.kill().context("SIGKILL shunt")?;
        Ok(child.wait()?)
    }

    /// SIGTERM and a bounded wait for exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("shunt already stopped")
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("shunt did not exit within 10 s of SIGTERM (killed)")
    }
}

impl Drop for Shunt {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Minimal HTTP/1.0 GET; returns (status, body). Used for /healthz and by the demo.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    c.set_write_timeout(Some(Duration::from_secs(1)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    c.take(1 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP answer {:?}", text.lines().next().unwrap_or("")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_command_line() {
        let dir = crate::conformance::default_paths(&[]).remove(0);
        let text = std::fs::read_to_string(dir.join("nodeport.yaml")).unwrap();
        let mut s = crate::scenario::parse(&text).unwrap().remove(0);
        let a = args(&s, ProxyMode::Nftables, Path::new("/tmp/m"), None).join(" ");
        assert_eq!(
            a,
            "--proxy-mode nftables --manifests /tmp/m --hostname-override test-node --detect-local-mode ClusterCIDR \
             --cluster-cidr 10.0.0.0/8 --nodeport-addresses 192.168.0.2/32,2001:db8::1/128 \
             --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249"
        );
        s.cluster.detect_local_mode = DetectLocalMode::None;
        s.cluster.masquerade_all = true;
        let a = args(&s, ProxyMode::Ebpf, Path::new("/m"), Some(Path::new("/cg"))).join(" ");
        assert!(
            a.contains("--detect-local-mode None --masquerade-all"),
            "{a}"
        );
        assert!(!a.contains("--cluster-cidr"));
        assert!(
            a.ends_with("--cgroup-root /cg --pin-dir /sys/fs/bpf/cg"),
            "{a}"
        );

        s.node.zone = Some("z1".into());
        let objs = cluster_objects(&s);
        assert_eq!(objs[0]["spec"]["cidrs"][0], Value::from("172.30.0.0/16"));
        assert_eq!(
            objs[1]["metadata"]["labels"]["topology.kubernetes.io/zone"],
            Value::from("z1")
        );
        assert_eq!(
            objs[1]["status"]["addresses"][0]["address"],
            Value::from("192.168.0.2")
        );
        assert_eq!(
            objs[1]["status"]["addresses"][3]["address"],
            Value::from("2001:db8::1")
        );
        assert_eq!(
            objs[1]["status"]["addresses"][0]["type"],
            Value::from("InternalIP")
        );
    }
}
