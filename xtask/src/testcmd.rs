//! `cargo xtask test`: the one command that runs every test, stopping at the first failure.
//! Order: what needs installing, manifest validation, fmt, clippy, unit/integration/namespace
//! tests, then the packet-level conformance scenarios in nftables mode, in iptables mode
//! (legacy and nft backends) and in ebpf mode, then the short soaks (every scenario) in every
//! mode, then the bench's quick preset.

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
    // Soaks (issue #8), short presets: restart, rolling update, UDP backend replacement,
    // endpoint churn and API outage under counted client load, in every mode; one lab per mode.
    for mode in ["nftables", "iptables", "ebpf"] {
        step(
            &format!("soak, every scenario, short preset ({mode})"),
            Command::new(&me).args([
                "soak",
                "--scenario",
                "all",
                "--mode",
                mode,
                "--preset",
                "short",
            ]),
        )?;
    }
    // Bench smoke test (issue #6): every mode at 100 and 1,000 Services, a few seconds per
    // figure; it fails only if a run could not measure at all, never on a timing. The debug
    // binary the conformance steps built (no release build in CI: no timing is judged here).
    let bench_out = tempfile::Builder::new()
        .prefix("shunt-bench-ci-")
        .tempdir()
        .context("temp dir for the bench report")?;
    step(
        "bench, quick preset (all modes)",
        Command::new(&me)
            .args(["bench", "--quick", "--out"])
            .arg(bench_out.path())
            .arg("--shunt")
            .arg(crate::shunt::build()?),
    )?;
    println!("all tests passed");
    Ok(true)
}
