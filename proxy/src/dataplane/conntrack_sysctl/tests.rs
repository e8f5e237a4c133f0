use std::time::Duration;

use super::*;

fn w(name: &'static str, value: u64) -> SysctlWrite {
    SysctlWrite {
        name,
        value,
        when: When::Differs,
        global: false,
    }
}

fn max(value: u64) -> SysctlWrite {
    SysctlWrite {
        name: "nf_conntrack_max",
        value,
        when: When::Larger,
        global: true,
    }
}

#[test]
fn plan_table() {
    let d = ConntrackSettings::default();
    let h = Duration::from_secs(3600);
    let cases: Vec<(&str, ConntrackSettings, u32, Vec<SysctlWrite>)> = vec![
        (
            "defaults, 2 CPUs: min wins (2*32768 < 131072)",
            d,
            2,
            vec![
                max(131072),
                w("nf_conntrack_tcp_timeout_established", 86400),
                w("nf_conntrack_tcp_timeout_close_wait", 3600),
            ],
        ),
        (
            "defaults, 8 CPUs: per-core wins",
            d,
            8,
            vec![
                max(262144),
                w("nf_conntrack_tcp_timeout_established", 86400),
                w("nf_conntrack_tcp_timeout_close_wait", 3600),
            ],
        ),
        (
            "maxPerCore 0 leaves the max alone, min unused",
            ConntrackSettings {
                max_per_core: 0,
                min: 999_999,
                ..d
            },
            4,
            vec![
                w("nf_conntrack_tcp_timeout_established", 86400),
                w("nf_conntrack_tcp_timeout_close_wait", 3600),
            ],
        ),
        (
            "zeros leave everything",
            ConntrackSettings {
                max_per_core: 0,
                min: 0,
                tcp_established_timeout: Duration::ZERO,
                tcp_close_wait_timeout: Duration::ZERO,
                tcp_be_liberal: false,
                udp_timeout: Duration::ZERO,
                udp_stream_timeout: Duration::ZERO,
            },
            4,
            vec![],
        ),
        (
            "everything set; sub-second rounds up to 1",
            ConntrackSettings {
                max_per_core: 10,
                min: 0,
                tcp_established_timeout: 2 * h,
                tcp_close_wait_timeout: Duration::from_millis(300),
                tcp_be_liberal: true,
                udp_timeout: Duration::from_secs(45),
                udp_stream_timeout: Duration::from_secs(150),
            },
            3,
            vec![
                max(30),
                w("nf_conntrack_tcp_timeout_established", 7200),
                w("nf_conntrack_tcp_timeout_close_wait", 1),
                w("nf_conntrack_tcp_be_liberal", 1),
                w("nf_conntrack_udp_timeout", 45),
                w("nf_conntrack_udp_timeout_stream", 150),
            ],
        ),
        (
            "0 CPUs reported counts as 1",
            ConntrackSettings {
                min: 0,
                tcp_established_timeout: Duration::ZERO,
                tcp_close_wait_timeout: Duration::ZERO,
                ..d
            },
            0,
            vec![max(32768)],
        ),
    ];
    for (what, s, cpus, want) in cases {
        assert_eq!(plan(&s, cpus), want, "{what}");
    }
}

/// `apply` against plain files: writes when the value differs, raises the max only upward,
/// and a missing per-netns sysctl is an error naming it.
#[test]
fn apply_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let put = |n: &str, v: &str| std::fs::write(dir.path().join(n), v).unwrap();
    let get = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
    put("nf_conntrack_max", "500000\n");
    put("nf_conntrack_tcp_timeout_established", "432000\n");
    put("nf_conntrack_udp_timeout", "45\n");
    let got = apply(
        dir.path(),
        &[
            max(131072),
            w("nf_conntrack_tcp_timeout_established", 86400),
            w("nf_conntrack_udp_timeout", 45),
        ],
    )
    .unwrap();
    assert_eq!(
        got,
        vec![
            Applied::Unchanged {
                name: "nf_conntrack_max"
            },
            Applied::Written {
                name: "nf_conntrack_tcp_timeout_established",
                old: 432000
            },
            Applied::Unchanged {
                name: "nf_conntrack_udp_timeout"
            },
        ]
    );
    assert_eq!(get("nf_conntrack_max"), "500000\n", "never lowered");
    assert_eq!(get("nf_conntrack_tcp_timeout_established"), "86400\n");
    apply(dir.path(), &[max(600000)]).unwrap();
    assert_eq!(get("nf_conntrack_max"), "600000\n", "raised");
    let err = apply(dir.path(), &[w("nf_conntrack_tcp_be_liberal", 1)]).unwrap_err();
    assert!(
        err.to_string().contains("nf_conntrack_tcp_be_liberal"),
        "{err}"
    );
}

/// The real sysctls, in a network namespace of this test's own (unshare on a dedicated
/// thread: the namespace goes away with the thread, also after a failed assertion). The
/// per-netns timeouts are set there; nf_conntrack_max is global and read-only outside the
/// initial namespace: logged and skipped, not an error. The root namespace is only read.
#[test]
fn netns_sysctls_are_set_in_the_calling_namespace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping netns_sysctls_are_set_in_the_calling_namespace: needs root");
        return;
    }
    let dir = Path::new(NETFILTER_SYSCTL_DIR);
    if !dir.join("nf_conntrack_tcp_timeout_established").exists() {
        eprintln!("skipping: nf_conntrack is not loaded (no {NETFILTER_SYSCTL_DIR})");
        return;
    }
    let read_all = || {
        [
            "nf_conntrack_max",
            "nf_conntrack_tcp_timeout_established",
            "nf_conntrack_tcp_timeout_close_wait",
            "nf_conntrack_tcp_be_liberal",
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
        ]
        .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
    };
    let root_before = read_all();
    let s = ConntrackSettings {
        max_per_core: 1 << 20,
        min: 0,
        tcp_established_timeout: Duration::from_secs(7 * 3600),
        tcp_close_wait_timeout: Duration::from_secs(1234),
        tcp_be_liberal: true,
        udp_timeout: Duration::from_secs(47),
        udp_stream_timeout: Duration::from_secs(170),
    };
    let (got, values) = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        let got = apply(Path::new(NETFILTER_SYSCTL_DIR), &plan(&s, 2));
        (got, read_all())
    })
    .join()
    .unwrap();
    let got = got.unwrap();
    assert_eq!(
        got[0],
        Applied::NotWritable {
            name: "nf_conntrack_max"
        },
        "{got:?}"
    );
    assert_eq!(
        values[1..].iter().map(|v| v.trim()).collect::<Vec<_>>(),
        ["25200", "1234", "1", "47", "170"]
    );
    assert_eq!(read_all(), root_before, "the root namespace was changed");
}
