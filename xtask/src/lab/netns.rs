//! Network namespaces the lab owns: creation, `ip -batch` configuration, sysctls, and running a
//! closure on a thread that has joined a namespace.
//!
//! Every namespace is a [`Netns`] guard whose `Drop` runs `ip netns del`; the kernel tears the
//! namespace (and its veths, routes, nft tables, conntrack) down once the last socket and process
//! in it are gone. Nothing here ever touches the root network namespace: every `ip` call carries
//! `-n NAME`, and sysctls are written through `ip netns exec NAME`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Common prefix of every namespace this process creates; `lab gc` removes leftovers of dead pids.
pub fn prefix() -> String {
    format!("shunt-lab-{}-", std::process::id())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating netns {name}"))?;
        let ns = Netns { name };
        ns.batch(&["link set lo up".to_owned()])?;
        Ok(ns)
    }

    /// Runs `ip -n NAME -batch -` with the given lines; the first failing line aborts.
    pub fn batch(&self, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ip -batch")?;
        {
            let mut stdin = child.stdin.take().expect("piped stdin");
            for l in lines {
                writeln!(stdin, "{l}")?;
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ip -n {} -batch failed: {}\ncommands:\n{}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim(),
                lines.join("\n")
            );
        }
        Ok(())
    }

    /// Writes sysctls inside the namespace (`/proc/sys/net` is per network namespace).
    pub fn sysctl(&self, kv: &[(&str, &str)]) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "sysctl", "-q", "-w"]);
        for (k, v) in kv {
            cmd.arg(format!("{k}={v}"));
        }
        run(&mut cmd)
            .with_context(|| format!("sysctl in {}", self.name))
            .map(drop)
    }

    /// Runs a shell snippet inside the namespace (used for ethtool / nft).
    pub fn sh(&self, script: &str) -> Result<String> {
        run(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-ec", script]))
            .with_context(|| format!("in netns {}: {script}", self.name))
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        if !r.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

/// Runs a command, returning stdout; a failure carries stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into the network namespace at `path`. Only this thread changes:
/// `setns(CLONE_NEWNET)` is per task, and sockets keep the namespace they were created in.
pub fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: plain syscall on a valid fd we own for the duration of the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns {path}"));
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `path` and returns its result.
pub fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {path} panicked"))?
    })
}

/// Deletes `shunt-lab-<pid>-*` namespaces whose pid is no longer alive (left by a SIGKILLed run).
pub fn gc() -> Result<usize> {
    let list = run(Command::new("ip").args(["netns", "list"]))?;
    let mut n = 0;
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("shunt-lab-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            run(Command::new("ip").args(["netns", "del", name]))?;
            n += 1;
        }
    }
    Ok(n)
}
