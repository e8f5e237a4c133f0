//! The built binary's command-line contract: `--help`, and invalid flags or config files fail
//! with a non-zero exit and a message naming the flag or field, before anything is touched.
use std::io::Write as _;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn shunt(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shunt"))
        .args(args)
        // Only shunt's own verbosity settings matter here.
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning shunt");
    // Every case here must end by itself (it fails validation); bound the wait anyway.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("waiting for shunt").is_some() {
            return child.wait_with_output().expect("collecting output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting output");
            panic!(
                "shunt {args:?} did not exit; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn help_lists_kube_proxy_flags() {
    let out = shunt(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--proxy-mode",
        "--config",
        "--hostname-override",
        "--cluster-cidr",
        "--detect-local-mode",
        "--masquerade-all",
        "--nodeport-addresses",
        "--healthz-bind-address",
        "--metrics-bind-address",
        "--iptables-sync-period",
        "--iptables-min-sync-period",
        "--cleanup",
        "--kubeconfig",
        "--master",
        "--v",
        "--manifests",
        "--cgroup-root",
        "--conntrack-max-per-core",
        "--conntrack-min",
        "--conntrack-tcp-timeout-established",
        "--conntrack-tcp-timeout-close-wait",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout",
        "--conntrack-udp-timeout-stream",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn bad_flags_fail_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().to_str().unwrap();
    let base = [
        "--manifests",
        manifests,
        "--hostname-override",
        "node1",
        "--healthz-bind-address",
        "127.0.0.1:10256",
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--proxy-mode", "bogus"], "--proxy-mode"),
        (&["--proxy-mode", "ipvs"], "--proxy-mode"),
        (&["--cluster-cidr", "10.0.0.0/33"], "--cluster-cidr"),
        (&["--detect-local-mode", "NodeCIDR"], "--detect-local-mode"),
        (
            &["--nodeport-addresses", "not-a-cidr"],
            "--nodeport-addresses",
        ),
        (
            &["--metrics-bind-address", "localhost"],
            "--metrics-bind-address",
        ),
        (&["--iptables-sync-period", "30"], "--iptables-sync-period"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let out = shunt(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{extra:?} should fail; stderr: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{extra:?}: stderr should name {needle}: {stderr}"
        );
    }
}

#[test]
fn bad_config_file_fails_naming_the_field() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(
        b"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
          mode: nftables\nnftables:\n  syncPeriod: often\n",
    )
    .unwrap();
    let out = shunt(&["--config", f.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nftables.syncPeriod"), "{stderr}");

    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nfancyMode: true\n")
        .unwrap();
    let out = shunt(&["--config", f.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("fancyMode"), "{stderr}");

    let out = shunt(&["--config", "/nonexistent/kube-proxy.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/kube-proxy.yaml"));
}
