//! `cargo xtask test`: the one command that runs every test, stopping at the first failure.
//! Order: what needs installing, manifest validation, fmt, clippy, unit/integration/namespace
//! tests, then the packet-level conformance scenarios in nftables mode and in iptables mode
//! (legacy and nft backends), then the short restart soak in both modes.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::shunt::repo_root;

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    println!("==> {name}");
    let st = cmd
        .current_dir(repo_root())
        .status()
        .with_context(|| format!("{name}: could not start {cmd:?}"))?;
    if !st.success() {
        bail!("step `{name}` failed ({st}); stopping");
    }
    Ok(())
}

pub fn run() -> Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let deps = repo_root().join("scripts/install-deps.sh");
    if deps.exists() {
        step("install dependencies", Command::new("bash").arg(&deps))?;
    } else {
        println!(
            "==> install dependencies: {} not present, skipped",
            deps.display()
        );
    }
    step(
        "validate manifests (kubectl kustomize + kubernetes-validate)",
        Command::new("bash").arg(repo_root().join("scripts/validate-manifests.sh")),
    )?;
    step(
        "cargo fmt --check",
        Command::new(&cargo).args(["fmt", "--all", "--check"]),
    )?;
    step(
        "cargo clippy",
        Command::new(&cargo).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("note: not root; tests that need network namespaces will skip themselves");
    }
    step(
        "cargo test",
        Command::new(&cargo).args(["test", "--workspace"]),
    )?;
    // A fresh process: conformance installs its own signal handling and namespace guards.
    let me = std::env::current_exe().context("locating the xtask binary")?;
    step(
        "conformance (nftables)",
        Command::new(&me).args(["conformance", "--mode", "nftables"]),
    )?;
    // iptables mode through both backends of the iptables tool (issue: legacy and nft).
    for backend in ["legacy", "nft"] {
        step(
            &format!("conformance (iptables, {backend} backend)"),
            Command::new(&me).args([
                "conformance",
                "--mode",
                "iptables",
                &format!("--shunt-arg=--iptables-backend={backend}"),
            ]),
        )?;
    }
    // ebpf mode: the kernel programs (tc + cgroup socket hooks), both IP families.
    step(
        "conformance (ebpf)",
        Command::new(&me).args(["conformance", "--mode", "ebpf"]),
    )?;
    // Restart soak (short preset): SIGKILL + restart under load must not cost a connection.
    for mode in ["nftables", "iptables"] {
        step(
            &format!("soak restart, short preset ({mode})"),
            Command::new(&me).args(["soak", "--mode", mode, "--preset", "short"]),
        )?;
    }
    println!("all tests passed");
    Ok(true)
}
