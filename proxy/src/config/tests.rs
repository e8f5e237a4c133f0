use std::io::Write as _;

use super::*;

fn host() -> HostFacts {
    HostFacts {
        hostname: "Node-A".into(),
        ipv6: true,
        mem_total: 8 << 30,
    }
}

fn parse(args: &[&str]) -> Result<Settings, ConfigError> {
    let mut v = vec!["shunt"];
    v.extend_from_slice(args);
    Settings::from_args(v, &host())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn defaults_match_kube_proxy() {
    let s = parse(&[]).unwrap();
    assert_eq!(s.mode, ProxyMode::Iptables);
    assert_eq!(s.node.node_name, "node-a");
    assert_eq!(s.node.families, vec![IpFamily::V4, IpFamily::V6]);
    assert_eq!(s.node.detect_local, DetectLocal::ClusterCidr(vec![]));
    assert!(!s.node.masquerade_all);
    // iptables: all local addresses.
    assert_eq!(
        s.node.node_port_addresses,
        vec![net("0.0.0.0/0"), net("::/0")]
    );
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        s.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(s.sync_period, Duration::from_secs(30));
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
    assert!(!s.cleanup);
    assert_eq!(s.verbosity, 0);
}

#[test]
fn binary_contract_command_line() {
    let s = parse(&[
        "--proxy-mode",
        "nftables",
        "--manifests",
        "/tmp/m",
        "--hostname-override",
        "node1",
        "--detect-local-mode",
        "ClusterCIDR",
        "--cluster-cidr",
        "10.0.0.0/8,fd00:10::/64",
        "--masquerade-all",
        "--nodeport-addresses",
        "192.168.0.0/24,2001:db8::/64",
        "--healthz-bind-address",
        "127.0.0.1:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
    ])
    .unwrap();
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.node.node_name, "node1");
    assert_eq!(
        s.node.detect_local,
        DetectLocal::ClusterCidr(vec![net("10.0.0.0/8"), net("fd00:10::/64")])
    );
    assert!(s.node.masquerade_all);
    assert_eq!(
        s.node.node_port_addresses,
        vec![net("192.168.0.0/24"), net("2001:db8::/64")]
    );
    assert_eq!(s.manifests, Some(PathBuf::from("/tmp/m")));
    assert_eq!(
        s.healthz_bind_address,
        Some("127.0.0.1:10256".parse().unwrap())
    );
}

#[test]
fn flag_values_table() {
    // (args, check)
    let s = parse(&["--proxy-mode=nftables"]).unwrap();
    assert_eq!(
        s.node.node_port_addresses,
        vec![],
        "nftables default is primary"
    );
    let s = parse(&["--proxy-mode", "ebpf", "--cgroup-root", "/sys/fs/cgroup"]).unwrap();
    assert_eq!(s.mode, ProxyMode::Ebpf);
    assert_eq!(s.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup")));
    assert_eq!(
        s.pin_dir,
        PathBuf::from("/sys/fs/bpf/shunt"),
        "default pin dir"
    );
    let s = parse(&["--proxy-mode", "ebpf", "--pin-dir", "/sys/fs/bpf/lab1"]).unwrap();
    assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/lab1"));
    let s = parse(&["--detect-local-mode", "None"]).unwrap();
    assert_eq!(s.node.detect_local, DetectLocal::None);
    let s = parse(&["--nodeport-addresses", "primary"]).unwrap();
    assert_eq!(s.node.node_port_addresses, vec![]);
    let s = parse(&["--masquerade-all=false"]).unwrap();
    assert!(!s.node.masquerade_all);
    let s = parse(&["--masquerade-all=true"]).unwrap();
    assert!(s.node.masquerade_all);
    let s = parse(&["--cleanup"]).unwrap();
    assert!(s.cleanup);
    let s = parse(&[
        "--iptables-sync-period",
        "1m0s",
        "--iptables-min-sync-period=500ms",
    ])
    .unwrap();
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_millis(500));
    let s = parse(&["--iptables-min-sync-period=0s"]).unwrap();
    assert_eq!(s.min_sync_period, Duration::ZERO);
    let s = parse(&["--metrics-bind-address", ""]).unwrap();
    assert_eq!(s.metrics_bind_address, None);
    let s = parse(&["--healthz-bind-address", "[::1]:9000"]).unwrap();
    assert_eq!(s.healthz_bind_address, Some("[::1]:9000".parse().unwrap()));
    let s = parse(&["--healthz-bind-address", "127.0.0.2"]).unwrap();
    assert_eq!(
        s.healthz_bind_address,
        Some("127.0.0.2:10256".parse().unwrap())
    );
    let s = parse(&["-v", "4"]).unwrap();
    assert_eq!(s.verbosity, 4);
    let s = parse(&["--v=2"]).unwrap();
    assert_eq!(s.verbosity, 2);
    let s = parse(&["-v=3"]).unwrap();
    assert_eq!(s.verbosity, 3);
    // An empty --hostname-override is "unset" (the host name is used), as in kube-proxy.
    let s = parse(&["--hostname-override", ""]).unwrap();
    assert_eq!(s.node.node_name, "node-a");
    let s = parse(&["--cluster-cidr", "fd00::/48"]).unwrap();
    assert_eq!(s.node.families, vec![IpFamily::V6, IpFamily::V4]);
    // Host bits are dropped, as net.ParseCIDR does.
    let s = parse(&["--cluster-cidr", "10.1.2.3/16"]).unwrap();
    assert_eq!(
        s.node.detect_local,
        DetectLocal::ClusterCidr(vec![net("10.1.0.0/16")])
    );
    let s = parse(&["--hostname-override", "  MiXed  "]).unwrap();
    assert_eq!(s.node.node_name, "mixed");
    let s = parse(&["--master", "https://10.0.0.1:6443", "--kubeconfig", "/k"]).unwrap();
    assert_eq!(s.master.as_deref(), Some("https://10.0.0.1:6443"));
    assert_eq!(s.kubeconfig, Some(PathBuf::from("/k")));
}

#[test]
fn no_ipv6_means_single_family() {
    let h = HostFacts {
        hostname: "n".into(),
        ipv6: false,
        mem_total: 8 << 30,
    };
    let s = Settings::from_args(["shunt"], &h).unwrap();
    assert_eq!(s.node.families, vec![IpFamily::V4]);
    assert!(Settings::from_args(["shunt", "--cluster-cidr", "fd00::/48"], &h).is_err());
}

#[test]
fn bad_flags_name_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--proxy-mode", "ipvs"], "--proxy-mode"),
        (&["--proxy-mode", "bogus"], "--proxy-mode"),
        (&["--detect-local-mode", "NodeCIDR"], "not supported"),
        (
            &["--detect-local-mode", "BridgeInterface"],
            "--detect-local-mode",
        ),
        (&["--detect-local-mode", "Whatever"], "--detect-local-mode"),
        (&["--cluster-cidr", "10.0.0.0/33"], "--cluster-cidr"),
        (&["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"], "dual-stack"),
        (
            &["--cluster-cidr", "10.0.0.0/8,fd00::/8,10.1.0.0/16"],
            "--cluster-cidr",
        ),
        (&["--nodeport-addresses", "1.2.3.4"], "--nodeport-addresses"),
        (&["--nodeport-addresses", "primary,10.0.0.0/8"], "primary"),
        (
            &["--healthz-bind-address", "nonsense"],
            "--healthz-bind-address",
        ),
        (
            &["--healthz-bind-address", "127.0.0.1:0"],
            "--healthz-bind-address",
        ),
        (
            &["--metrics-bind-address", "1.2.3.4:99999"],
            "--metrics-bind-address",
        ),
        (&["--iptables-sync-period", "30"], "--iptables-sync-period"),
        (&["--iptables-sync-period", "0s"], "--iptables-sync-period"),
        (&["--iptables-sync-period", "-1s"], "--iptables-sync-period"),
        (
            &[
                "--iptables-sync-period",
                "1s",
                "--iptables-min-sync-period",
                "2s",
            ],
            "--iptables-min-sync-period",
        ),
        (&["--hostname-override", "  "], "--hostname-override"),
        (&["--masquerade-all=maybe"], "--masquerade-all"),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--manifests", "/m", "--kubeconfig", "/k"], "--manifests"),
        (&["--bpf-lb-map-max", "100"], "--bpf-lb-map-max"),
        (&["--bpf-lb-map-max", "0"], "--bpf-lb-map-max"),
        (&["--bpf-lb-map-max=-5"], "--bpf-lb-map-max"),
        (&["--bpf-lb-map-max", "lots"], "--bpf-lb-map-max"),
        (&["--bpf-lb-map-max", "16777217"], "--bpf-lb-map-max"),
        (
            &["--bpf-ct-global-tcp-max", "1023"],
            "--bpf-ct-global-tcp-max",
        ),
        (
            &["--bpf-ct-global-any-max", "99999999999"],
            "--bpf-ct-global-any-max",
        ),
        (&["--bpf-sock-rev-map-max", "12"], "--bpf-sock-rev-map-max"),
        (
            &["--bpf-map-dynamic-size-ratio", "0"],
            "--bpf-map-dynamic-size-ratio",
        ),
        (
            &["--bpf-map-dynamic-size-ratio", "1.5"],
            "--bpf-map-dynamic-size-ratio",
        ),
        (
            &["--bpf-map-dynamic-size-ratio=-0.1"],
            "--bpf-map-dynamic-size-ratio",
        ),
        (
            &["--bpf-map-dynamic-size-ratio", "NaN"],
            "--bpf-map-dynamic-size-ratio",
        ),
        (
            &["--bpf-map-dynamic-size-ratio", "x"],
            "--bpf-map-dynamic-size-ratio",
        ),
    ];
    for (args, needle) in cases {
        let err = parse(args)
            .expect_err(&format!("{args:?} should fail"))
            .to_string();
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should contain {needle:?}"
        );
    }
}

#[test]
fn config_file_yaml() {
    let f = config_file(
        r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
hostnameOverride: From-File
detectLocalMode: ClusterCIDR
nodePortAddresses: ["10.0.0.0/8"]
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: ""
nftables:
  masqueradeAll: true
  syncPeriod: 1m0s
  minSyncPeriod: 250ms
iptables:
  masqueradeAll: false
  syncPeriod: 30s
  minSyncPeriod: 1s
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
  burst: 10
logging:
  verbosity: 3
  format: text
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
oomScoreAdj: -999
"#,
    );
    let path = f.path().to_str().unwrap();
    let s = parse(&["--config", path]).unwrap();
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.node.node_name, "from-file");
    assert_eq!(
        s.node.detect_local,
        DetectLocal::ClusterCidr(vec![net("10.244.0.0/16"), net("fd00:10:244::/56")])
    );
    assert!(
        s.node.masquerade_all,
        "nftables.masqueradeAll applies in nftables mode"
    );
    assert_eq!(s.node.node_port_addresses, vec![net("10.0.0.0/8")]);
    assert_eq!(
        s.healthz_bind_address,
        Some("127.0.0.1:20256".parse().unwrap())
    );
    assert_eq!(s.metrics_bind_address, None);
    assert_eq!(s.sync_period, Duration::from_secs(60));
    assert_eq!(s.min_sync_period, Duration::from_millis(250));
    assert_eq!(
        s.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(s.verbosity, 3);
}

#[test]
fn config_file_json_and_mode_sections() {
    let f = config_file(
        r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration",
            "iptables":{"masqueradeAll":true,"syncPeriod":"45s","minSyncPeriod":"0s"},
            "nftables":{"masqueradeAll":false,"syncPeriod":"10s"}}"#,
    );
    let s = parse(&["--config", f.path().to_str().unwrap()]).unwrap();
    assert_eq!(s.mode, ProxyMode::Iptables);
    assert!(
        s.node.masquerade_all,
        "iptables.masqueradeAll applies outside nftables mode"
    );
    assert_eq!(s.sync_period, Duration::from_secs(45));
    // v1alpha1 defaulting turns a zero minSyncPeriod into 1s.
    assert_eq!(s.min_sync_period, Duration::from_secs(1));
}

#[test]
fn config_file_precedence() {
    let f = config_file(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: nftables\nhostnameOverride: file-node\nlogging:\n  verbosity: 1\n",
    );
    let s = parse(&[
        "--config",
        f.path().to_str().unwrap(),
        "--proxy-mode",
        "iptables",
        "--masquerade-all",
        "--hostname-override",
        "flag-node",
        "-v",
        "5",
        "--cleanup",
        "--master",
        "http://127.0.0.1:8080",
    ])
    .unwrap();
    // The file wins for ordinary flags...
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert!(!s.node.masquerade_all);
    // ...but not for --hostname-override, -v and the flags without a config field.
    assert_eq!(s.node.node_name, "flag-node");
    assert_eq!(s.verbosity, 5);
    assert!(s.cleanup);
    assert_eq!(s.master.as_deref(), Some("http://127.0.0.1:8080"));
    assert!(s.warnings.iter().any(|w| w.contains("--proxy-mode")));
    assert!(s.warnings.iter().any(|w| w.contains("--masquerade-all")));
}

#[test]
fn bad_config_files_name_the_field() {
    let header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let cases: &[(&str, &str)] = &[
        ("bogusField: 1\n", "bogusField"),
        ("iptables:\n  notAField: true\n", "notAField"),
        ("mode: ipvs\n", "mode in"),
        ("mode: nope\n", "mode in"),
        ("clusterCIDR: 10.0.0.0/99\n", "clusterCIDR"),
        ("detectLocalMode: InterfaceNamePrefix\n", "detectLocalMode"),
        ("nodePortAddresses: [\"x\"]\n", "nodePortAddresses"),
        ("healthzBindAddress: \"1.2.3.4:x\"\n", "healthzBindAddress"),
        ("metricsBindAddress: \"foo\"\n", "metricsBindAddress"),
        ("iptables:\n  syncPeriod: 30\n", "iptables.syncPeriod"),
        (
            "mode: nftables\nnftables:\n  minSyncPeriod: 1x\n",
            "nftables.minSyncPeriod",
        ),
        (
            "mode: nftables\nnftables:\n  syncPeriod: 1s\n  minSyncPeriod: 5s\n",
            "nftables.syncPeriod",
        ),
        (
            "conntrack:\n  tcpCloseWaitTimeout: soon\n",
            "conntrack.tcpCloseWaitTimeout",
        ),
        ("oomScoreAdj: 5000\n", "oomScoreAdj"),
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit"),
        ("masqueradeAll: true\n", "masqueradeAll"),
        ("bindAddress: 1.2.3\n", "bindAddress"),
    ];
    for (body, needle) in cases {
        let f = config_file(&format!("{header}{body}"));
        let err = parse(&["--config", f.path().to_str().unwrap()])
            .expect_err(&format!("{body:?} should fail"))
            .to_string();
        assert!(
            err.contains(needle),
            "{body:?}: {err:?} should contain {needle:?}"
        );
    }
    for (text, needle) in [
        ("kind: KubeProxyConfiguration\n", "apiVersion"),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1beta9\nkind: KubeProxyConfiguration\n",
            "apiVersion",
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: Pod\n",
            "kind",
        ),
        ("{{{ not yaml", "config file"),
    ] {
        let f = config_file(text);
        let err = parse(&["--config", f.path().to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{text:?}: {err:?}");
    }
    let err = parse(&["--config", "/nonexistent/shunt.yaml"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/shunt.yaml"), "{err}");
}

/// A file with every v1alpha1 field at its defaulted value (the shape kubeadm writes) loads.
#[test]
fn config_file_with_all_v1alpha1_fields() {
    let f = config_file(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#,
    );
    let s = parse(&["--config", f.path().to_str().unwrap()]).unwrap();
    let defaults = parse(&[]).unwrap();
    assert_eq!(s.mode, defaults.mode);
    assert_eq!(s.node, defaults.node);
    assert_eq!(s.healthz_bind_address, defaults.healthz_bind_address);
    assert_eq!(s.metrics_bind_address, defaults.metrics_bind_address);
    assert_eq!(
        (s.sync_period, s.min_sync_period),
        (defaults.sync_period, defaults.min_sync_period)
    );
    assert_eq!(
        s.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
}

#[test]
fn map_size_flags_table() {
    let d = MapSizes::default();
    // (args, expected sizes)
    let cases: Vec<(&[&str], MapSizes)> = vec![
        (&[], d),
        (
            &["--bpf-lb-map-max", "1024"],
            MapSizes {
                services: 1024,
                backends: 1024,
                rev_nat: 256,
                cluster_ips: 256,
                affinity: 256,
                ..d
            },
        ),
        (
            &["--bpf-lb-map-max", "1048576"],
            MapSizes {
                services: 1 << 20,
                backends: 1 << 20,
                // Reverse-NAT ids are u16.
                rev_nat: 1 << 16,
                cluster_ips: 1 << 18,
                affinity: 1 << 18,
                ..d
            },
        ),
        (
            &[
                "--bpf-ct-global-tcp-max",
                "524288",
                "--bpf-ct-global-any-max",
                "262144",
            ],
            MapSizes { ct: 786_432, ..d },
        ),
        (
            &["--bpf-ct-global-any-max", "1024"],
            MapSizes {
                ct: shunt_abi::limits::CT_TCP + 1024,
                ..d
            },
        ),
        (
            &["--bpf-sock-rev-map-max", "4096"],
            MapSizes { sock: 4096, ..d },
        ),
    ];
    for (args, want) in cases {
        let s = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(s.map_sizes, want, "{args:?}");
    }
}

#[test]
fn dynamic_size_ratio_scales_with_memory() {
    let with_mem = |mem: u64, args: &[&str]| {
        let h = HostFacts {
            mem_total: mem,
            ..host()
        };
        let mut v = vec!["shunt"];
        v.extend_from_slice(args);
        Settings::from_args(v, &h)
    };
    let r = ["--bpf-map-dynamic-size-ratio", "0.0025"];
    // A small node: the floors (Cilium's 131072 TCP + 65536 other, 65536 socket).
    let small = with_mem(4 << 30, &r).unwrap().map_sizes;
    assert_eq!(small.ct, (1 << 17) + (1 << 16));
    assert_eq!(small.sock, 1 << 16);
    // A big node: proportionally more, same TCP:other ratio as the defaults (3:1).
    let big = with_mem(256 << 30, &r).unwrap().map_sizes;
    assert!(big.ct > MapSizes::default().ct, "{big:?}");
    assert!(big.sock > small.sock, "{big:?}");
    let big2 = with_mem(512 << 30, &r).unwrap().map_sizes;
    assert!(
        big2.ct > big.ct && big2.ct <= 2 * big.ct + 2,
        "{big:?} {big2:?}"
    );
    // The load-balancing maps do not depend on memory.
    assert_eq!(big.services, MapSizes::default().services);
    // An explicit flag wins over the ratio.
    let mut args = r.to_vec();
    args.extend([
        "--bpf-ct-global-tcp-max",
        "2048",
        "--bpf-ct-global-any-max",
        "1024",
    ]);
    assert_eq!(with_mem(256 << 30, &args).unwrap().map_sizes.ct, 3072);
    // Unknown memory: refused, naming the flag.
    let err = with_mem(0, &r).unwrap_err().to_string();
    assert!(err.contains("--bpf-map-dynamic-size-ratio"), "{err}");
}

#[test]
fn mem_total_parsing() {
    assert_eq!(
        mem_total_in("MemTotal:        8048576 kB\nMemFree: 1 kB\n"),
        Some(8048576 * 1024)
    );
    assert_eq!(mem_total_in("MemFree: 1 kB\n"), None);
    assert_eq!(mem_total_in("MemTotal: lots kB\n"), None);
}

/// kube-proxy's conntrack flags: names, defaults (v1alpha1 defaults.go) and an explicit 0
/// meaning "leave the kernel's value".
#[test]
fn conntrack_flags_table() {
    let h = Duration::from_secs(3600);
    let d = ConntrackSettings {
        max_per_core: 32768,
        min: 131072,
        tcp_established_timeout: 24 * h,
        tcp_close_wait_timeout: h,
        tcp_be_liberal: false,
        udp_timeout: Duration::ZERO,
        udp_stream_timeout: Duration::ZERO,
    };
    let cases: &[(&[&str], ConntrackSettings)] = &[
        (&[], d),
        (
            &["--conntrack-max-per-core", "0", "--conntrack-min=7"],
            ConntrackSettings {
                max_per_core: 0,
                min: 7,
                ..d
            },
        ),
        (
            &[
                "--conntrack-tcp-timeout-established=2h",
                "--conntrack-tcp-timeout-close-wait",
                "0s",
            ],
            ConntrackSettings {
                tcp_established_timeout: 2 * h,
                tcp_close_wait_timeout: Duration::ZERO,
                ..d
            },
        ),
        (
            &["--conntrack-tcp-be-liberal"],
            ConntrackSettings {
                tcp_be_liberal: true,
                ..d
            },
        ),
        (&["--conntrack-tcp-be-liberal=false"], d),
        (
            &[
                "--conntrack-udp-timeout=45s",
                "--conntrack-udp-timeout-stream",
                "3m",
            ],
            ConntrackSettings {
                udp_timeout: Duration::from_secs(45),
                udp_stream_timeout: Duration::from_secs(180),
                ..d
            },
        ),
    ];
    for (args, want) in cases {
        let s = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(s.conntrack, *want, "{args:?}");
    }
}

#[test]
fn bad_conntrack_flags_name_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--conntrack-max-per-core", "-1"],
            "--conntrack-max-per-core",
        ),
        (
            &["--conntrack-max-per-core", "x"],
            "--conntrack-max-per-core",
        ),
        (&["--conntrack-min", "-5"], "--conntrack-min"),
        (&["--conntrack-min", "4294967296"], "--conntrack-min"),
        (
            &["--conntrack-tcp-timeout-established", "-1s"],
            "--conntrack-tcp-timeout-established",
        ),
        (
            &["--conntrack-tcp-timeout-close-wait", "10"],
            "--conntrack-tcp-timeout-close-wait",
        ),
        (
            &["--conntrack-udp-timeout", "soon"],
            "--conntrack-udp-timeout",
        ),
        (
            &["--conntrack-udp-timeout-stream", "-2m"],
            "--conntrack-udp-timeout-stream",
        ),
        (
            &["--conntrack-tcp-be-liberal=maybe"],
            "--conntrack-tcp-be-liberal",
        ),
    ];
    for (args, needle) in cases {
        let err = parse(args)
            .expect_err(&format!("{args:?} should fail"))
            .to_string();
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} should contain {needle:?}"
        );
    }
}

/// The file's `conntrack:` section: unset fields take the defaults, explicit zeros stay,
/// errors name the field, and the conntrack flags are ignored next to --config.
#[test]
fn conntrack_config_file_table() {
    let header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let d = ConntrackSettings::default();
    let cases: &[(&str, ConntrackSettings)] = &[
        ("", d),
        ("conntrack: {}\n", d),
        (
            "conntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: 0s\n",
            ConntrackSettings {
                max_per_core: 0,
                tcp_established_timeout: Duration::ZERO,
                tcp_close_wait_timeout: Duration::ZERO,
                ..d
            },
        ),
        (
            "conntrack:\n  min: 10\n  tcpBeLiberal: true\n  udpTimeout: 1m\n  udpStreamTimeout: 2m30s\n",
            ConntrackSettings {
                min: 10,
                tcp_be_liberal: true,
                udp_timeout: Duration::from_secs(60),
                udp_stream_timeout: Duration::from_secs(150),
                ..d
            },
        ),
    ];
    for (body, want) in cases {
        let f = config_file(&format!("{header}{body}"));
        let s = parse(&["--config", f.path().to_str().unwrap(), "--conntrack-min=1"])
            .unwrap_or_else(|e| panic!("{body:?}: {e}"));
        assert_eq!(s.conntrack, *want, "{body:?}");
        assert!(
            s.warnings.iter().any(|w| w.contains("--conntrack-min")),
            "{:?}",
            s.warnings
        );
    }
    for (body, needle) in [
        ("conntrack:\n  maxPerCore: -1\n", "conntrack.maxPerCore"),
        ("conntrack:\n  min: -1\n", "conntrack.min"),
        (
            "conntrack:\n  tcpEstablishedTimeout: -1h\n",
            "conntrack.tcpEstablishedTimeout",
        ),
        ("conntrack:\n  udpTimeout: 5\n", "conntrack.udpTimeout"),
        (
            "conntrack:\n  udpStreamTimeout: x\n",
            "conntrack.udpStreamTimeout",
        ),
    ] {
        let f = config_file(&format!("{header}{body}"));
        let err = parse(&["--config", f.path().to_str().unwrap()])
            .expect_err(&format!("{body:?} should fail"))
            .to_string();
        assert!(err.contains(needle), "{body:?}: {err:?}");
    }
}
