//! Builds the kernel programs in `../ebpf` for the bpf target and leaves the object in OUT_DIR,
//! where `dataplane::ebpf` embeds it with `aya::include_bytes_aligned!`.
//!
//! The rustup toolchains on our build machines carry no `rust-src`, so the eBPF crate is built
//! with the toolchain `debian` (Debian's rustc-web + rust-web-src, linked with `rustup toolchain
//! link debian /usr`), and bpf-linker from crates.io. aya-build only passes
//! `-Z build-std=core` when RUSTC_BOOTSTRAP is 1 (aya-build 0.2.0, `use_build_std`).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SHUNT_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("SHUNT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian".into());
    // SAFETY: build scripts are single-threaded at this point; the variable is read by
    // aya-build below and inherited by the nested cargo it spawns.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };

    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("proxy/ has no parent"))?
        .join("ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // aya-build watches the eBPF crate's directory; the ABI crate lives below it.
    aya_build::build_ebpf(
        [Package {
            name: "shunt-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs failed; run `bash scripts/install-deps.sh` to install the \
         debian toolchain and bpf-linker",
    )
}
