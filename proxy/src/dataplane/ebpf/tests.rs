//! BPF_PROG_TEST_RUN fixtures: real packets through the verified tc program with map state
//! written by the real plan, checked field by field and with checksums recomputed from
//! scratch. Need root (CAP_BPF/CAP_SYS_ADMIN); they skip, saying why, otherwise.
use std::collections::BTreeSet;

use aya::Ebpf;
use aya::maps::HashMap;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use shunt_abi::{Ct4Key, Ct4Value, ct_dir, names};

use super::*;
use crate::model::Snapshot;
use crate::plan::ebpf::tests::{ep, ip, snap, snap6, svc, svc6};
use crate::plan::ebpf::{State6, V4, V6};

const TCX_NEXT: u32 = -1i32 as u32;
const TCX_DROP: u32 = 2;
/// bpf_redirect's return value (TC_ACT_REDIRECT == TCX_REDIRECT).
const TCX_REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [10, 1, 0, 9];
const OUTSIDE: [u8; 4] = [8, 8, 4, 4];
const VIP: [u8; 4] = [172, 30, 0, 10];
const NODE: [u8; 4] = [192, 168, 0, 2];

fn root() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: BPF_PROG_TEST_RUN needs root");
        return false;
    }
    true
}

/// Load the object privately (no pins) and write the plan for `s`. No node IP is
/// configured, so nothing is masqueraded: masquerading ends in a FIB lookup in the caller's
/// network namespace, which the netns test exercises instead.
fn setup(s: &Snapshot) -> Ebpf {
    let mut ebpf = load_object(None).expect("load + verify");
    let mut s = s.clone();
    s.network.primary_ip = None;
    let st = desired(&s, &[], &State4::default()).expect("plan");
    apply_ops::<V4>(&mut ebpf, &diff(&State4::default(), &st)).expect("apply");
    ebpf
}

fn run(ebpf: &mut Ebpf, pkt: &[u8]) -> (u32, Vec<u8>) {
    let prog: &mut SchedClassifier = ebpf.program_mut(TC_INGRESS).unwrap().try_into().unwrap();
    let mut out = vec![0u8; 2048];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(pkt);
    opts.data_out = Some(&mut out);
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn sum(b: &[u8], mut acc: u32) -> u32 {
    for c in b.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

const PAYLOAD: &[u8] = b"hello";

/// A TCP (20 bytes, seq 1000, ack 5000 with ACK) or UDP header followed by `PAYLOAD`,
/// checksum left 0, filling `l4` exactly.
fn fill_l4(l4: &mut [u8], proto: u8, sport: u16, dport: u16, flags: u8) {
    let len = l4.len();
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
        l4[8..12].copy_from_slice(&if flags & ACK != 0 { 5000u32 } else { 0 }.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        l4[14..16].copy_from_slice(&1024u16.to_be_bytes());
        l4[20..].copy_from_slice(PAYLOAD);
    } else {
        l4[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        l4[8..].copy_from_slice(PAYLOAD);
    }
}

/// Ethernet + IPv4 (no options) + TCP (20 bytes) or UDP, with correct checksums.
fn packet(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let l4_len = if proto == TCP { 20 } else { 8 } + PAYLOAD.len();
    let mut p = vec![0u8; 14 + 20 + l4_len];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = fold(sum(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    fill_l4(&mut p[34..], proto, sport, dport, flags);
    let csum = l4_csum(&p);
    let off = 34 + if proto == TCP { 16 } else { 6 };
    let csum = if proto == UDP && csum == 0 {
        0xffff
    } else {
        csum
    };
    p[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    p
}

/// The L4 checksum of `p` computed from scratch with the checksum field taken as zero.
fn l4_csum(p: &[u8]) -> u16 {
    let proto = p[23];
    let tot = usize::from(u16::from_be_bytes([p[16], p[17]]));
    let mut l4 = p[34..14 + tot].to_vec();
    let off = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    l4[off] = 0;
    l4[off + 1] = 0;
    let mut acc = 0;
    if proto != 1 {
        acc = sum(&p[26..34], 0) + u32::from(proto) + l4.len() as u32;
    }
    fold(sum(&l4, acc))
}

fn assert_checksums(p: &[u8]) {
    assert_eq!(
        fold(sum(&p[14..34], 0)),
        0,
        "IPv4 header checksum of {p:02x?}"
    );
    let proto = p[23];
    let off = 34
        + match proto {
            TCP => 16,
            UDP => 6,
            _ => 2,
        };
    let have = u16::from_be_bytes([p[off], p[off + 1]]);
    if proto == UDP && have == 0 {
        return;
    }
    let want = l4_csum(p);
    let want = if proto == UDP && want == 0 {
        0xffff
    } else {
        want
    };
    assert_eq!(have, want, "L4 checksum (proto {proto}) of {p:02x?}");
}

fn daddr(p: &[u8]) -> [u8; 4] {
    p[30..34].try_into().unwrap()
}
fn saddr(p: &[u8]) -> [u8; 4] {
    p[26..30].try_into().unwrap()
}
fn sport(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[34], p[35]])
}
fn dport(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[36], p[37]])
}

fn one_backend() -> Snapshot {
    snap(vec![svc("a", "172.30.0.10", vec![ep("10.1.0.1", false)])])
}

#[test]
fn verifier_accepts_tc_program_and_reports_size() {
    if !root() {
        return;
    }
    let ebpf = load_object(None).expect("verifier accepts every program");
    for name in std::iter::once(TC_INGRESS).chain(SOCK_PROGRAMS) {
        let info = ebpf.program(name).unwrap().info().unwrap();
        let xlated = info.size_translated().unwrap_or(0) / 8;
        eprintln!(
            "{name}: xlated {xlated} insns, verifier processed {:?} insns",
            info.verified_instruction_count()
        );
        assert!(xlated > 0, "{name}");
    }
}

#[test]
fn tcp_to_cluster_ip_is_dnatted_and_reply_reverse_natted() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&one_backend());
    let syn = packet(TCP, CLIENT, 40000, VIP, 80, SYN);
    let (rc, out) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr(&out), dport(&out)), ([10, 1, 0, 1], 8080));
    assert_eq!((saddr(&out), sport(&out)), (CLIENT, 40000));
    assert_eq!(&out[54..], b"hello");
    assert_checksums(&out);

    // Both conntrack directions exist.
    let ct: HashMap<_, Ct4Key, Ct4Value> =
        HashMap::try_from(ebpf.map(names::CT4).unwrap()).unwrap();
    let entries: Vec<(Ct4Key, Ct4Value)> = ct.iter().map(Result::unwrap).collect();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().any(|(_, v)| v.dir == ct_dir::FORWARD));
    assert!(entries.iter().any(|(_, v)| v.dir == ct_dir::REPLY));

    // The backend's answer gets the ClusterIP back as its source.
    let reply = packet(TCP, [10, 1, 0, 1], 8080, CLIENT, 40000, SYN | ACK);
    let (rc, out) = run(&mut ebpf, &reply);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr(&out), sport(&out)), (VIP, 80));
    assert_eq!((daddr(&out), dport(&out)), (CLIENT, 40000));
    assert_checksums(&out);

    // The next client packet follows the conntrack entry.
    let ack = packet(TCP, CLIENT, 40000, VIP, 80, ACK);
    let (rc, out) = run(&mut ebpf, &ack);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr(&out), dport(&out)), ([10, 1, 0, 1], 8080));
    assert_checksums(&out);

    // Unrelated traffic passes untouched.
    let other = packet(TCP, CLIENT, 40001, [10, 1, 0, 7], 80, SYN);
    let (rc, out) = run(&mut ebpf, &other);
    assert_eq!((rc, out), (TCX_NEXT, other));
}

#[test]
fn udp_dnat_fixes_checksum_and_keeps_zero_checksum() {
    if !root() {
        return;
    }
    let mut s = svc("u", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    s.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup(&snap(vec![s]));
    let p = packet(UDP, CLIENT, 5353, VIP, 80, 0);
    let (rc, out) = run(&mut ebpf, &p);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr(&out), dport(&out)), ([10, 1, 0, 1], 8080));
    assert_checksums(&out);
    assert_ne!(u16::from_be_bytes([out[40], out[41]]), 0);

    let mut p = packet(UDP, CLIENT, 5354, VIP, 80, 0);
    p[40] = 0;
    p[41] = 0;
    let (rc, out) = run(&mut ebpf, &p);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr(&out), [10, 1, 0, 1]);
    assert_eq!(
        u16::from_be_bytes([out[40], out[41]]),
        0,
        "no checksum stays none"
    );
    assert_checksums(&out);
}

#[test]
fn no_endpoints_tcp_is_answered_with_rst() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&snap(vec![svc("a", "172.30.0.10", vec![])]));
    let syn = packet(TCP, CLIENT, 40000, VIP, 80, SYN);
    let (rc, out) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_REDIRECT);
    assert_eq!(out.len(), 54);
    assert_eq!(&out[0..6], &syn[6..12], "MACs swapped");
    assert_eq!((saddr(&out), sport(&out)), (VIP, 80));
    assert_eq!((daddr(&out), dport(&out)), (CLIENT, 40000));
    assert_eq!(out[47], 0x14, "RST|ACK");
    assert_eq!(
        u32::from_be_bytes(out[38..42].try_into().unwrap()),
        0,
        "seq"
    );
    assert_eq!(
        u32::from_be_bytes(out[42..46].try_into().unwrap()),
        1000 + 5 + 1,
        "ack = seq + payload + SYN"
    );
    assert_checksums(&out);

    // An ACK segment: seq = its ack number, RST only.
    let ack = packet(TCP, CLIENT, 40001, VIP, 80, ACK);
    let (rc, out) = run(&mut ebpf, &ack);
    assert_eq!(rc, TCX_REDIRECT);
    assert_eq!(out[47], 0x04);
    assert_eq!(u32::from_be_bytes(out[38..42].try_into().unwrap()), 5000);
    assert_checksums(&out);

    // A ClusterIP's unknown port is rejected too.
    let wrong = packet(TCP, CLIENT, 40002, VIP, 81, SYN);
    assert_eq!(run(&mut ebpf, &wrong).0, TCX_REDIRECT);
}

#[test]
fn no_endpoints_udp_is_answered_with_port_unreachable() {
    if !root() {
        return;
    }
    let mut s = svc("u", "172.30.0.10", vec![]);
    s.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup(&snap(vec![s]));
    let p = packet(UDP, CLIENT, 5353, VIP, 80, 0);
    let (rc, out) = run(&mut ebpf, &p);
    assert_eq!(rc, TCX_REDIRECT);
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!(out[23], 1, "ICMP");
    assert_eq!((saddr(&out), daddr(&out)), (VIP, CLIENT));
    assert_eq!(
        (out[34], out[35]),
        (3, 3),
        "dest unreachable / port unreachable"
    );
    assert_eq!(
        &out[42..70],
        &p[14..42],
        "quotes the original header + 8 bytes"
    );
    assert_checksums(&out);
}

#[test]
fn drops_unallocated_service_ips_and_local_policy_without_local_endpoints() {
    if !root() {
        return;
    }
    let mut local = svc("l", "172.30.0.12", vec![ep("10.1.0.2", false)]);
    local.port.internal_policy_local = true;
    let mut ebpf = setup(&snap(vec![
        svc("a", "172.30.0.10", vec![ep("10.1.0.1", false)]),
        local,
    ]));
    let unalloc = packet(TCP, CLIENT, 40000, [172, 30, 0, 99], 80, SYN);
    assert_eq!(run(&mut ebpf, &unalloc).0, TCX_DROP);
    let l = packet(TCP, CLIENT, 40000, [172, 30, 0, 12], 80, SYN);
    assert_eq!(run(&mut ebpf, &l).0, TCX_DROP);
    // Outside the service CIDR: not ours.
    let out = packet(TCP, CLIENT, 40000, [172, 31, 0, 99], 80, SYN);
    assert_eq!(run(&mut ebpf, &out).0, TCX_NEXT);
}

fn backends_seen(
    ebpf: &mut Ebpf,
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    n: u16,
) -> BTreeSet<[u8; 4]> {
    (0..n)
        .map(|i| {
            let (rc, out) = run(ebpf, &packet(TCP, src, 30000 + i, dst, port, SYN));
            assert_eq!(rc, TCX_NEXT);
            assert_checksums(&out);
            daddr(&out)
        })
        .collect()
}

#[test]
fn random_choice_spreads_and_affinity_sticks() {
    if !root() {
        return;
    }
    let two = vec![ep("10.1.0.1", false), ep("10.1.0.2", false)];
    let mut ebpf = setup(&snap(vec![svc("a", "172.30.0.10", two.clone())]));
    // 64 new connections all landing on one of two backends by chance: p = 2^-63.
    assert_eq!(backends_seen(&mut ebpf, CLIENT, VIP, 80, 64).len(), 2);

    let mut s = svc("a", "172.30.0.10", two);
    s.port.affinity_timeout_seconds = Some(10800);
    let mut ebpf = setup(&snap(vec![s]));
    assert_eq!(backends_seen(&mut ebpf, CLIENT, VIP, 80, 64).len(), 1);
    // Another client is free to land elsewhere, but also sticks.
    assert_eq!(
        backends_seen(&mut ebpf, [10, 1, 0, 10], VIP, 80, 32).len(),
        1
    );
}

#[test]
fn source_ranges_and_local_policy_short_circuit() {
    if !root() {
        return;
    }
    let mut s = svc("lb", "172.30.0.13", vec![ep("10.1.0.2", false)]);
    s.port.node_port = Some(30080);
    s.port.load_balancer_ips = vec![ip("1.2.3.4")];
    s.port.load_balancer_source_ranges = vec!["8.8.0.0/16".parse().unwrap()];
    s.port.external_policy_local = true;
    let mut ebpf = setup(&snap(vec![s.clone()]));
    // eTP=Local, no local endpoint: an outside client is dropped at the NodePort...
    let np = packet(TCP, OUTSIDE, 40000, NODE, 30080, SYN);
    assert_eq!(run(&mut ebpf, &np).0, TCX_DROP);
    // ...while a pod (cluster CIDR 10.0.0.0/8) is sent to the cluster-wide endpoints.
    let (rc, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, NODE, 30080, SYN));
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr(&out), [10, 1, 0, 2]);
    assert_checksums(&out);
    // LoadBalancer IP: a source outside the ranges is dropped before anything else.
    let lb = packet(TCP, [9, 9, 9, 9], 40000, [1, 2, 3, 4], 80, SYN);
    assert_eq!(run(&mut ebpf, &lb).0, TCX_DROP);

    // With eTP=Cluster an allowed source is DNATted on the LB IP.
    s.port.external_policy_local = false;
    let mut ebpf = setup(&snap(vec![s]));
    let (rc, out) = run(
        &mut ebpf,
        &packet(TCP, OUTSIDE, 40000, [1, 2, 3, 4], 80, SYN),
    );
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr(&out), dport(&out)), ([10, 1, 0, 2], 8080));
    assert_checksums(&out);
    let lb = packet(TCP, [9, 9, 9, 9], 40000, [1, 2, 3, 4], 80, SYN);
    assert_eq!(run(&mut ebpf, &lb).0, TCX_DROP);
}

#[test]
fn established_flow_keeps_backend_until_it_is_removed() {
    if !root() {
        return;
    }
    let first = snap(vec![svc("a", "172.30.0.10", vec![ep("10.1.0.1", false)])]);
    assert!(desired(&first, &[], &State4::default()).unwrap().node_ip != 0);
    let mut first = first;
    first.network.primary_ip = None;
    let mut ebpf = load_object(None).unwrap();
    let st1 = desired(&first, &[], &State4::default()).unwrap();
    apply_ops::<V4>(&mut ebpf, &diff(&State4::default(), &st1)).unwrap();
    let syn = packet(TCP, CLIENT, 40000, VIP, 80, SYN);
    assert_eq!(daddr(&run(&mut ebpf, &syn).1), [10, 1, 0, 1]);

    // A second endpoint appears: the flow stays where it is.
    let mut second = snap(vec![svc(
        "a",
        "172.30.0.10",
        vec![ep("10.1.0.1", false), ep("10.1.0.2", false)],
    )]);
    second.network.primary_ip = None;
    let st2 = desired(&second, &[], &st1).unwrap();
    apply_ops::<V4>(&mut ebpf, &diff(&st1, &st2)).unwrap();
    let ack = packet(TCP, CLIENT, 40000, VIP, 80, ACK);
    for _ in 0..16 {
        assert_eq!(daddr(&run(&mut ebpf, &ack).1), [10, 1, 0, 1]);
    }
    // Its endpoint goes away: the flow is sent to the remaining one.
    let mut third = snap(vec![svc("a", "172.30.0.10", vec![ep("10.1.0.2", false)])]);
    third.network.primary_ip = None;
    let st3 = desired(&third, &[], &st2).unwrap();
    apply_ops::<V4>(&mut ebpf, &diff(&st2, &st3)).unwrap();
    assert_eq!(
        read_state::<V4>(&mut ebpf).unwrap(),
        st3,
        "kernel maps == plan"
    );
    let (rc, out) = run(&mut ebpf, &ack);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr(&out), [10, 1, 0, 2]);
    assert_checksums(&out);
}

#[test]
fn removed_endpoint_loses_udp_flows_and_affinity() {
    if !root() {
        return;
    }
    let two = vec![ep("10.1.0.1", false), ep("10.1.0.2", false)];
    let mut u = svc("u", "172.30.0.10", two);
    u.port.name.protocol = crate::model::Protocol::Udp;
    u.port.affinity_timeout_seconds = Some(10800);
    let mut first = snap(vec![u.clone()]);
    first.network.primary_ip = None;
    let mut ebpf = load_object(None).unwrap();
    let st1 = desired(&first, &[], &State4::default()).unwrap();
    apply_ops::<V4>(&mut ebpf, &diff(&State4::default(), &st1)).unwrap();
    let (rc, out) = run(&mut ebpf, &packet(UDP, CLIENT, 5353, VIP, 80, 0));
    assert_eq!(rc, TCX_NEXT);
    let chosen = daddr(&out);
    // Nothing stale while both endpoints exist.
    assert_eq!(purge_stale::<V4>(&mut ebpf, &valid_pairs(&st1)).unwrap(), 0);

    // The chosen endpoint leaves the service.
    let keep = if chosen == [10, 1, 0, 1] {
        "10.1.0.2"
    } else {
        "10.1.0.1"
    };
    u.endpoints = vec![ep(keep, false)];
    u.cluster_endpoints = u.endpoints.clone();
    let mut second = snap(vec![u]);
    second.network.primary_ip = None;
    let st2 = desired(&second, &[], &st1).unwrap();
    apply_ops::<V4>(&mut ebpf, &diff(&st1, &st2)).unwrap();
    assert_eq!(
        purge_stale::<V4>(&mut ebpf, &valid_pairs(&st2)).unwrap(),
        2,
        "both directions"
    );
    let aff: HashMap<_, shunt_abi::Affinity4Key, shunt_abi::AffinityValue> =
        HashMap::try_from(ebpf.map(names::AFFINITY4).unwrap()).unwrap();
    assert_eq!(aff.keys().count(), 0);
    let (rc, out) = run(&mut ebpf, &packet(UDP, CLIENT, 5353, VIP, 80, 0));
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(
        daddr(&out),
        keep.parse::<std::net::Ipv4Addr>().unwrap().octets()
    );
    assert_checksums(&out);
}

#[test]
fn cgroup2_mount_found_in_mountinfo() {
    // Hybrid host (cgroup v1 controllers plus the unified hierarchy), as on this machine.
    let hybrid = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 31 0:29 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
    assert_eq!(
        cgroup2_mount_in(hybrid),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    // Pure v2 host, with optional fields before the separator.
    let v2 =
        "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
    assert_eq!(cgroup2_mount_in(v2), Some(PathBuf::from("/sys/fs/cgroup")));
    // Octal escapes in the mount point are decoded.
    let esc = "36 24 0:30 / /mnt/my\\040cg rw - cgroup2 none rw\n";
    assert_eq!(cgroup2_mount_in(esc), Some(PathBuf::from("/mnt/my cg")));
    // cgroup v1 only: none.
    let v1 = "33 31 0:29 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n";
    assert_eq!(cgroup2_mount_in(v1), None);
}

/// With the tc program in charge of loopback (HOST_NETNS[LOOPBACK] set), the node's own
/// packet to a NodePort (BPF_PROG_TEST_RUN runs on the loopback device, as lo ingress
/// would) goes to the cluster-wide endpoints even under eTP=Local, and the backend's reply
/// is handed back through loopback ingress with both MACs zeroed.
#[test]
fn node_traffic_on_loopback_uses_cluster_endpoints_and_returns_via_lo() {
    if !root() {
        return;
    }
    let mut s = svc("np", "172.30.0.13", vec![ep("10.1.0.2", false)]);
    s.port.node_port = Some(30080);
    s.port.external_policy_local = true;
    let mut ebpf = setup(&snap(vec![s]));
    // Without the flag loopback is not ours: an external source with no local endpoint.
    let np = packet(TCP, NODE, 40000, NODE, 30080, SYN);
    assert_eq!(run(&mut ebpf, &np).0, TCX_DROP);
    aya::maps::Array::<_, u64>::try_from(ebpf.map_mut(names::HOST_NETNS).unwrap())
        .unwrap()
        .set(shunt_abi::host_ns::LOOPBACK, 1, 0)
        .unwrap();
    let (rc, out) = run(&mut ebpf, &np);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr(&out), dport(&out)), ([10, 1, 0, 2], 8080));
    assert_checksums(&out);
    let reply = packet(TCP, [10, 1, 0, 2], 8080, NODE, 40000, SYN | ACK);
    let (rc, out) = run(&mut ebpf, &reply);
    assert_eq!(rc, TCX_REDIRECT);
    assert_eq!((saddr(&out), sport(&out)), (NODE, 30080));
    assert_eq!((daddr(&out), dport(&out)), (NODE, 40000));
    assert_eq!(&out[..12], &[0u8; 12]);
    assert_checksums(&out);
}

// ---- IPv6 ----

const CLIENT6: &str = "fd00:10::9";
const OUTSIDE6: &str = "2001:db8:ff::1";
const VIP6: &str = "fd00:172:30::10";
const BE6: &str = "fd00:10:180::1";

fn a6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// Load privately and write the IPv6 plan for `s` (no node IP: see `setup`).
fn setup6(s: &Snapshot) -> Ebpf {
    let mut ebpf = load_object(None).expect("load + verify");
    let mut s = s.clone();
    s.network.primary_ip = None;
    let st = desired(&s, &[], &State6::default()).expect("plan");
    apply_ops::<V6>(&mut ebpf, &diff(&State6::default(), &st)).expect("apply");
    ebpf
}

/// Ethernet + IPv6 + TCP (20 bytes) or UDP, payload "hello", correct checksum.
fn packet6(proto: u8, src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    let l4_len = if proto == TCP { 20 } else { 8 } + PAYLOAD.len();
    let mut p = vec![0u8; 14 + 40 + l4_len];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    p[14] = 0x60;
    p[18..20].copy_from_slice(&(l4_len as u16).to_be_bytes());
    p[20] = proto;
    p[21] = 64;
    p[22..38].copy_from_slice(&a6(src));
    p[38..54].copy_from_slice(&a6(dst));
    fill_l4(&mut p[54..], proto, sport, dport, flags);
    let c = l4_csum6(&p);
    let off = csum_off6(p[20]);
    p[off..off + 2].copy_from_slice(&c.to_be_bytes());
    p
}

fn csum_off6(proto: u8) -> usize {
    54 + match proto {
        TCP => 16,
        UDP => 6,
        _ => 2, // ICMPv6
    }
}

/// The L4 (TCP, UDP, ICMPv6) checksum of an IPv6 packet from scratch, over the RFC 8200
/// pseudo-header; UDP's computed 0 is sent as 0xffff.
fn l4_csum6(p: &[u8]) -> u16 {
    let len = usize::from(u16::from_be_bytes([p[18], p[19]]));
    let mut l4 = p[54..54 + len].to_vec();
    let off = csum_off6(p[20]) - 54;
    l4[off] = 0;
    l4[off + 1] = 0;
    let acc = sum(&p[22..54], 0) + u32::from(p[20]) + len as u32;
    let c = fold(sum(&l4, acc));
    if p[20] == UDP && c == 0 { 0xffff } else { c }
}

fn assert_checksums6(p: &[u8]) {
    let off = csum_off6(p[20]);
    let have = u16::from_be_bytes([p[off], p[off + 1]]);
    assert_eq!(
        have,
        l4_csum6(p),
        "L4 checksum (next header {}) of {p:02x?}",
        p[20]
    );
}

fn saddr6(p: &[u8]) -> std::net::Ipv6Addr {
    <[u8; 16]>::try_from(&p[22..38]).unwrap().into()
}
fn daddr6(p: &[u8]) -> std::net::Ipv6Addr {
    <[u8; 16]>::try_from(&p[38..54]).unwrap().into()
}
fn ports6(p: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([p[54], p[55]]),
        u16::from_be_bytes([p[56], p[57]]),
    )
}
fn v6(s: &str) -> std::net::Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn ipv6_tcp_dnat_reverse_nat_and_checksums() {
    if !root() {
        return;
    }
    let mut ebpf = setup6(&snap6(vec![svc6("a", VIP6, vec![ep(BE6, false)])]));
    let syn = packet6(TCP, CLIENT6, 40000, VIP6, 80, SYN);
    let (rc, out) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr6(&out), ports6(&out).1), (v6(BE6), 8080));
    assert_eq!((saddr6(&out), ports6(&out).0), (v6(CLIENT6), 40000));
    assert_eq!(&out[74..], b"hello");
    assert_checksums6(&out);
    let ct: HashMap<_, shunt_abi::Ct6Key, shunt_abi::Ct6Value> =
        HashMap::try_from(ebpf.map(names::CT6).unwrap()).unwrap();
    assert_eq!(ct.keys().count(), 2, "FORWARD and REPLY entries");
    let ct4: HashMap<_, Ct4Key, Ct4Value> =
        HashMap::try_from(ebpf.map(names::CT4).unwrap()).unwrap();
    assert_eq!(ct4.keys().count(), 0, "nothing in the IPv4 table");

    let reply = packet6(TCP, BE6, 8080, CLIENT6, 40000, SYN | ACK);
    let (rc, out) = run(&mut ebpf, &reply);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr6(&out), ports6(&out).0), (v6(VIP6), 80));
    assert_eq!((daddr6(&out), ports6(&out).1), (v6(CLIENT6), 40000));
    assert_checksums6(&out);

    let ack = packet6(TCP, CLIENT6, 40000, VIP6, 80, ACK);
    let (rc, out) = run(&mut ebpf, &ack);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr6(&out), v6(BE6));
    assert_checksums6(&out);

    // UDP too; its checksum is mandatory over IPv6 and must stay right.
    let mut u = svc6("u", VIP6, vec![ep(BE6, false)]);
    u.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup6(&snap6(vec![u]));
    let (rc, out) = run(&mut ebpf, &packet6(UDP, CLIENT6, 5353, VIP6, 80, 0));
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr6(&out), ports6(&out).1), (v6(BE6), 8080));
    assert_checksums6(&out);

    // Unrelated IPv6 traffic passes untouched.
    let other = packet6(TCP, CLIENT6, 40001, "fd00:10::7", 80, SYN);
    assert_eq!(run(&mut ebpf, &other), (TCX_NEXT, other));
}

#[test]
fn ipv6_reject_builds_rst_and_icmpv6_port_unreachable() {
    if !root() {
        return;
    }
    let mut u = svc6("u", "fd00:172:30::11", vec![]);
    u.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup6(&snap6(vec![svc6("a", VIP6, vec![]), u]));
    let syn = packet6(TCP, CLIENT6, 40000, VIP6, 80, SYN);
    let (rc, out) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 20);
    assert_eq!(&out[0..6], &syn[6..12], "MACs swapped");
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!((out[14] >> 4, out[20], out[21]), (6, TCP, 64));
    assert_eq!(u16::from_be_bytes([out[18], out[19]]), 20, "payload length");
    assert_eq!((saddr6(&out), daddr6(&out)), (v6(VIP6), v6(CLIENT6)));
    assert_eq!(ports6(&out), (80, 40000));
    assert_eq!(out[67], 0x14, "RST|ACK");
    assert_eq!(
        u32::from_be_bytes(out[62..66].try_into().unwrap()),
        1000 + 5 + 1,
        "ack = seq + payload + SYN"
    );
    assert_checksums6(&out);
    // A ClusterIP's unknown port: rejected as well.
    let wrong = packet6(TCP, CLIENT6, 40002, VIP6, 81, SYN);
    assert_eq!(run(&mut ebpf, &wrong).0, TCX_REDIRECT);

    let p = packet6(UDP, CLIENT6, 5353, "fd00:172:30::11", 80, 0);
    let (rc, out) = run(&mut ebpf, &p);
    assert_eq!(rc, TCX_REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 8 + 48);
    assert_eq!(out[20], 58, "ICMPv6");
    assert_eq!(
        (saddr6(&out), daddr6(&out)),
        (v6("fd00:172:30::11"), v6(CLIENT6))
    );
    assert_eq!((out[54], out[55]), (1, 4), "unreachable / port unreachable");
    assert_eq!(&out[62..110], &p[14..62], "quotes the header + 8 bytes");
    assert_checksums6(&out);

    // An unallocated address of the service CIDR is dropped; outside it, not ours.
    let un = packet6(TCP, CLIENT6, 40000, "fd00:172:30::99", 80, SYN);
    assert_eq!(run(&mut ebpf, &un).0, TCX_DROP);
    let out = packet6(TCP, CLIENT6, 40000, "fd00:172:31::99", 80, SYN);
    assert_eq!(run(&mut ebpf, &out).0, TCX_NEXT);
}

#[test]
fn ipv6_source_ranges_local_policy_and_affinity() {
    if !root() {
        return;
    }
    let mut s = svc6("lb", "fd00:172:30::13", vec![ep(BE6, false)]);
    s.port.node_port = Some(3001);
    s.port.load_balancer_ips = vec![ip("2001:db8:5::4")];
    s.port.load_balancer_source_ranges = vec!["2001:db8:ff::/48".parse().unwrap()];
    s.port.external_policy_local = true;
    let mut ebpf = setup6(&snap6(vec![s.clone()]));
    // eTP=Local without a local endpoint: outside clients dropped at the NodePort, pods
    // (fd00:10::/64) sent to the cluster-wide endpoints.
    let np = packet6(TCP, OUTSIDE6, 40000, "2001:db8::1", 3001, SYN);
    assert_eq!(run(&mut ebpf, &np).0, TCX_DROP);
    let (rc, out) = run(
        &mut ebpf,
        &packet6(TCP, CLIENT6, 40000, "2001:db8::1", 3001, SYN),
    );
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr6(&out), v6(BE6));
    assert_checksums6(&out);

    // eTP=Cluster: the LB IP admits the range (LPM on 128-bit addresses), drops the rest.
    s.port.external_policy_local = false;
    let mut ebpf = setup6(&snap6(vec![s]));
    let (rc, out) = run(
        &mut ebpf,
        &packet6(TCP, OUTSIDE6, 40000, "2001:db8:5::4", 80, SYN),
    );
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr6(&out), ports6(&out).1), (v6(BE6), 8080));
    assert_checksums6(&out);
    let no = packet6(TCP, "2001:db8:fe::1", 40000, "2001:db8:5::4", 80, SYN);
    assert_eq!(run(&mut ebpf, &no).0, TCX_DROP);

    // ClientIP affinity sticks per client.
    let two = vec![ep(BE6, false), ep("fd00:10:180::2", false)];
    let mut a = svc6("a", VIP6, two.clone());
    let mut ebpf = setup6(&snap6(vec![a.clone()]));
    let seen = |ebpf: &mut Ebpf, n: u16| -> BTreeSet<std::net::Ipv6Addr> {
        (0..n)
            .map(|i| {
                let (rc, out) = run(ebpf, &packet6(TCP, CLIENT6, 30000 + i, VIP6, 80, SYN));
                assert_eq!(rc, TCX_NEXT);
                assert_checksums6(&out);
                daddr6(&out)
            })
            .collect()
    };
    // 64 connections on one of two backends by chance: p = 2^-63.
    assert_eq!(seen(&mut ebpf, 64).len(), 2);
    a.port.affinity_timeout_seconds = Some(10800);
    let mut ebpf = setup6(&snap6(vec![a]));
    assert_eq!(seen(&mut ebpf, 64).len(), 1);
}

/// A client reusing a source port for a direct connection to the pod, after a connection
/// through the VIP from that port was DNATed to the same pod port: both have the same
/// pod-side 4-tuple. The pod's replies to the direct connection must come out untouched
/// (the bench saw them rewritten to come from the VIP, so the client reset them and retried
/// after 1 s); the stale VIP flow's entries are dropped, and a later VIP connection from the
/// same port is NATed again both ways.
#[test]
fn direct_connection_reusing_a_vip_flow_port_is_not_reverse_natted() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&one_backend());
    let pod = [10, 1, 0, 1];
    let (rc, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_eq!((rc, daddr(&out)), (TCX_NEXT, pod));

    let direct = packet(TCP, CLIENT, 40000, pod, 8080, SYN);
    assert_eq!(run(&mut ebpf, &direct), (TCX_NEXT, direct));
    let synack = packet(TCP, pod, 8080, CLIENT, 40000, SYN | ACK);
    assert_eq!(
        run(&mut ebpf, &synack),
        (TCX_NEXT, synack.clone()),
        "direct reply untouched"
    );

    // The port reused for the VIP again: a new flow, reverse-NATed again.
    let (rc, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_eq!((rc, daddr(&out), dport(&out)), (TCX_NEXT, pod, 8080));
    let (rc, out) = run(&mut ebpf, &synack);
    assert_eq!((rc, saddr(&out), sport(&out)), (TCX_NEXT, VIP, 80));
    assert_checksums(&out);
}

/// A restart swaps the tc links make-before-break, so for a moment the previous run's
/// program and the new one both run on each packet: the second sees a packet of a live VIP
/// flow already DNATed to the pod. That packet (not a first SYN; any UDP datagram) must not
/// make the program forget the flow: the pod's replies are still reverse-NATed to the VIP.
#[test]
fn live_service_flow_seen_again_after_its_dnat_is_kept() {
    if !root() {
        return;
    }
    let pod = [10, 1, 0, 1];
    let mut ebpf = setup(&one_backend());
    let (rc, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40001, VIP, 80, SYN));
    assert_eq!((rc, daddr(&out)), (TCX_NEXT, pod));
    // The same connection's next packet, DNATed by the other program: passed untouched.
    let seen_again = packet(TCP, CLIENT, 40001, pod, 8080, ACK);
    assert_eq!(run(&mut ebpf, &seen_again), (TCX_NEXT, seen_again));
    let reply = packet(TCP, pod, 8080, CLIENT, 40001, ACK);
    let (rc, out) = run(&mut ebpf, &reply);
    assert_eq!(
        (rc, saddr(&out), sport(&out)),
        (TCX_NEXT, VIP, 80),
        "the live TCP flow is still reverse-NATed"
    );

    let mut u = svc("u", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    u.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup(&snap(vec![u]));
    let (rc, out) = run(&mut ebpf, &packet(UDP, CLIENT, 5360, VIP, 80, 0));
    assert_eq!((rc, daddr(&out)), (TCX_NEXT, pod));
    let seen_again = packet(UDP, CLIENT, 5360, pod, 8080, 0);
    assert_eq!(run(&mut ebpf, &seen_again), (TCX_NEXT, seen_again));
    let (rc, out) = run(&mut ebpf, &packet(UDP, pod, 8080, CLIENT, 5360, 0));
    assert_eq!(
        (rc, saddr(&out), sport(&out)),
        (TCX_NEXT, VIP, 80),
        "the live UDP flow is still reverse-NATed"
    );
}

#[test]
fn ipv6_direct_connection_reusing_a_vip_flow_port_is_not_reverse_natted() {
    if !root() {
        return;
    }
    let mut ebpf = setup6(&snap6(vec![svc6("a", VIP6, vec![ep(BE6, false)])]));
    let (rc, out) = run(&mut ebpf, &packet6(TCP, CLIENT6, 40000, VIP6, 80, SYN));
    assert_eq!((rc, daddr6(&out)), (TCX_NEXT, v6(BE6)));

    let direct = packet6(TCP, CLIENT6, 40000, BE6, 8080, SYN);
    assert_eq!(run(&mut ebpf, &direct), (TCX_NEXT, direct));
    let synack = packet6(TCP, BE6, 8080, CLIENT6, 40000, SYN | ACK);
    assert_eq!(
        run(&mut ebpf, &synack),
        (TCX_NEXT, synack.clone()),
        "direct reply untouched"
    );

    let (rc, out) = run(&mut ebpf, &packet6(TCP, CLIENT6, 40000, VIP6, 80, SYN));
    assert_eq!((rc, daddr6(&out)), (TCX_NEXT, v6(BE6)));
    let (rc, out) = run(&mut ebpf, &synack);
    assert_eq!((rc, saddr6(&out), ports6(&out).0), (TCX_NEXT, v6(VIP6), 80));
    assert_checksums6(&out);
}

// ---- ICMP errors about translated flows (ebpf/src/icmp_err.rs) ----

/// Ethernet + IPv4 + ICMP error `ty`/`code` (rest of header: `rest`, e.g. the MTU of a
/// fragmentation-needed) quoting `quote` (an IP packet, possibly cut), checksums right.
fn icmp4_error(src: [u8; 4], dst: [u8; 4], ty: u8, code: u8, rest: u32, quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = fold(sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 34];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    p[22] = 64;
    p[23] = 1;
    p[26..30].copy_from_slice(&src);
    p[30..34].copy_from_slice(&dst);
    let c = fold(sum(&p[14..34], 0));
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}

/// The outer IPv4 and ICMP checksums of an ICMP error, its quoted IPv4 header's checksum,
/// and, when the quote is the whole packet, the quoted TCP/UDP checksum: all from scratch.
fn assert_icmp4_checksums(p: &[u8]) {
    assert_checksums(p);
    let quote = &p[42..];
    assert_eq!(fold(sum(&quote[..20], 0)), 0, "inner IPv4 header checksum");
    if usize::from(u16::from_be_bytes([quote[2], quote[3]])) == quote.len() {
        let mut inner = vec![0u8; 14];
        inner.extend_from_slice(quote);
        assert_checksums(&inner);
    }
}

#[test]
fn icmp_errors_about_a_dnatted_tcp_flow_reach_the_client_translated() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&one_backend());
    let be = [10, 1, 0, 1];
    let syn = packet(TCP, CLIENT, 40000, VIP, 80, SYN);
    let (rc, dnatted) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr(&dnatted), be);

    // The backend says "fragmentation needed, MTU 1400" about the packet it received:
    // the client must see it from the ClusterIP, quoting exactly what it sent.
    let err = icmp4_error(be, CLIENT, 3, 4, 1400, &dnatted[14..]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr(&out), daddr(&out)), (VIP, CLIENT));
    assert_eq!(out[34..36], [3, 4]);
    assert_eq!(out[38..42], 1400u32.to_be_bytes());
    assert_eq!(
        &out[42..],
        &syn[14..],
        "the quote is the client's own packet again"
    );
    assert_icmp4_checksums(&out);

    // A router's error (time exceeded), quoting only the RFC 792 minimum (header + 8
    // bytes, no TCP checksum in reach): translated alike, its source the frontend too
    // (netfilter rewrites the outer source of a DNATed connection's related errors).
    let router = [10, 1, 0, 254];
    let err = icmp4_error(router, CLIENT, 11, 0, 0, &dnatted[14..42]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr(&out), daddr(&out)), (VIP, CLIENT));
    assert_eq!(&out[42..70], &syn[14..42]);
    assert_icmp4_checksums(&out);

    // An error about a flow nobody translated, and an echo request, pass untouched.
    let other = packet(TCP, CLIENT, 40001, be, 8080, SYN);
    let err = icmp4_error(be, CLIENT, 3, 4, 1400, &other[14..]);
    assert_eq!(run(&mut ebpf, &err), (TCX_NEXT, err.clone()));
    let echo = icmp4_error(be, CLIENT, 8, 0, 1, &[0u8; 8]);
    assert_eq!(run(&mut ebpf, &echo), (TCX_NEXT, echo.clone()));
}

#[test]
fn icmp_error_from_the_client_about_a_reply_reaches_the_backend_translated() {
    if !root() {
        return;
    }
    let mut s = svc("u", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    s.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup(&snap(vec![s]));
    let be = [10, 1, 0, 1];
    let (rc, _) = run(&mut ebpf, &packet(UDP, CLIENT, 5353, VIP, 80, 0));
    assert_eq!(rc, TCX_NEXT);
    let reply = packet(UDP, be, 8080, CLIENT, 5353, 0);
    let (rc, rnatted) = run(&mut ebpf, &reply);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr(&rnatted), sport(&rnatted)), (VIP, 80));

    // The client's port unreachable about the answer it got from the ClusterIP goes to the
    // backend, quoting the backend's own packet; its source (the client) stays.
    let err = icmp4_error(CLIENT, VIP, 3, 3, 0, &rnatted[14..]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr(&out), daddr(&out)), (CLIENT, be));
    assert_eq!(&out[42..], &reply[14..]);
    assert_icmp4_checksums(&out);

    // A quoted UDP packet without checksum keeps none.
    let mut nocsum = rnatted.clone();
    nocsum[40] = 0;
    nocsum[41] = 0;
    let err = icmp4_error(CLIENT, VIP, 3, 3, 0, &nocsum[14..]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((out[42 + 26], out[42 + 27]), (0, 0));
    assert_eq!(u16::from_be_bytes([out[42 + 20], out[42 + 21]]), 8080);
    assert_icmp4_checksums(&out);
}

#[test]
fn icmp_error_about_a_masqueraded_flow_is_readdressed_to_the_client() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&one_backend());
    let be = [10, 1, 0, 1];
    let w = |a: [u8; 4]| u32::from_ne_bytes(a);
    // The entries a masqueraded flow CLIENT:40000 -> VIP:80 => NODE:61000 -> BE:8080 has
    // (written directly: masquerading needs a node IP, whose FIB path PROG_TEST_RUN cannot
    // take; the packet's contents are what this checks).
    let mut ct: HashMap<_, Ct4Key, Ct4Value> =
        HashMap::try_from(ebpf.map_mut(names::CT4).unwrap()).unwrap();
    let key = Ct4Key {
        saddr: w(be),
        daddr: w(NODE),
        sport: 8080u16.to_be(),
        dport: 61000u16.to_be(),
        proto: TCP,
        pad: [0; 3],
    };
    let val = Ct4Value {
        nat_addr: w(VIP),
        nat_port: 80u16.to_be(),
        rev_nat_id: 1,
        backend_id: 1,
        dir: ct_dir::REPLY,
        flags: shunt_abi::ct_flags::REDIRECT,
        snat_port: 40000u16.to_be(),
        snat_addr: w(CLIENT),
        pad2: 0,
        last_seen_ns: 0,
    };
    ct.insert(key, val, 0).unwrap();
    let sent = packet(TCP, NODE, 61000, be, 8080, ACK);
    let err = icmp4_error(be, NODE, 3, 4, 1400, &sent[14..]);
    let (_, out) = run(&mut ebpf, &err);
    // Forwarded (FIB lookup + redirect: TTL decremented), addressed to the client.
    assert_eq!((saddr(&out), daddr(&out)), (VIP, CLIENT));
    assert_eq!(out[22], 63);
    let orig = packet(TCP, CLIENT, 40000, VIP, 80, ACK);
    assert_eq!(&out[42..], &orig[14..]);
    assert_icmp4_checksums(&out);
}

/// Ethernet + IPv6 + ICMPv6 error quoting `quote`, checksum right.
fn icmp6_error(src: &str, dst: &str, ty: u8, code: u8, rest: u32, quote: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 54];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    p[14] = 0x60;
    p[18..20].copy_from_slice(&((8 + quote.len()) as u16).to_be_bytes());
    p[20] = 58;
    p[21] = 64;
    p[22..38].copy_from_slice(&a6(src));
    p[38..54].copy_from_slice(&a6(dst));
    p.extend_from_slice(&[ty, code, 0, 0]);
    p.extend_from_slice(&rest.to_be_bytes());
    p.extend_from_slice(quote);
    let c = l4_csum6(&p);
    p[56..58].copy_from_slice(&c.to_be_bytes());
    p
}

fn assert_icmp6_checksums(p: &[u8]) {
    assert_checksums6(p);
    let quote = &p[62..];
    if usize::from(u16::from_be_bytes([quote[4], quote[5]])) + 40 == quote.len() {
        let mut inner = vec![0u8; 14];
        inner.extend_from_slice(quote);
        assert_checksums6(&inner);
    }
}

#[test]
fn ipv6_icmp_errors_about_translated_flows_are_translated_back() {
    if !root() {
        return;
    }
    let mut ebpf = setup6(&snap6(vec![svc6("a", VIP6, vec![ep(BE6, false)])]));
    let syn = packet6(TCP, CLIENT6, 40000, VIP6, 80, SYN);
    let (rc, dnatted) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_NEXT);

    // Packet too big from the backend: the client sees it from the frontend, quoting its
    // own packet (the ICMPv6 checksum covers the new pseudo-header and the new quote).
    let err = icmp6_error(BE6, CLIENT6, 2, 0, 1280, &dnatted[14..]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr6(&out), daddr6(&out)), (v6(VIP6), v6(CLIENT6)));
    assert_eq!(out[58..62], 1280u32.to_be_bytes());
    assert_eq!(&out[62..], &syn[14..]);
    assert_icmp6_checksums(&out);

    // Cut quote (header + 8 bytes): ports translated, no TCP checksum to fix.
    let err = icmp6_error("fd00:10::fe", CLIENT6, 3, 0, 0, &dnatted[14..62]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(saddr6(&out), v6(VIP6));
    assert_eq!(&out[62..], &syn[14..62]);
    assert_icmp6_checksums(&out);

    // The client's error about the frontend's answer goes to the backend.
    let reply = packet6(TCP, BE6, 8080, CLIENT6, 40000, SYN | ACK);
    let (rc, rnatted) = run(&mut ebpf, &reply);
    assert_eq!(rc, TCX_NEXT);
    let err = icmp6_error(CLIENT6, VIP6, 1, 4, 0, &rnatted[14..]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr6(&out), daddr6(&out)), (v6(CLIENT6), v6(BE6)));
    assert_eq!(&out[62..], &reply[14..]);
    assert_icmp6_checksums(&out);

    // Not about a translated flow, or not an error: untouched.
    let other = packet6(TCP, CLIENT6, 40001, BE6, 8080, SYN);
    let err = icmp6_error(BE6, CLIENT6, 2, 0, 1280, &other[14..]);
    assert_eq!(run(&mut ebpf, &err), (TCX_NEXT, err.clone()));
    let echo = icmp6_error(BE6, CLIENT6, 128, 0, 1, &[]);
    assert_eq!(run(&mut ebpf, &echo), (TCX_NEXT, echo.clone()));
}

// ---- SCTP (ebpf/src/sctp.rs) ----

const SCTP: u8 = 132;

/// CRC32c (RFC 9260 appendix A), bit by bit: an implementation independent of the
/// program's incremental update.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The CRC32c an SCTP packet (common header + chunks) must carry: computed with the
/// checksum field zero, stored little-endian (RFC 9260 appendix A, the kernel's
/// sctp_compute_cksum).
fn sctp_crc(sctp: &[u8]) -> [u8; 4] {
    let mut s = sctp.to_vec();
    s[8..12].fill(0);
    crc32c(&s).to_le_bytes()
}

/// SCTP common header (verification tag 0x01020304) + one DATA chunk carrying `data_len`
/// bytes of a pattern, CRC right.
fn sctp_payload(sport: u16, dport: u16, data_len: usize) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    s.extend_from_slice(&[0; 4]);
    // DATA chunk: type 0, flags B|E, length, TSN, stream id/seq, PPID, data (padded to 4).
    let chunk_len = 16 + data_len;
    s.extend_from_slice(&[0, 3]);
    s.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    s.extend((0..data_len).map(|i| (i * 7 + 3) as u8));
    s.resize(s.len().next_multiple_of(4), 0);
    let c = sctp_crc(&s);
    s[8..12].copy_from_slice(&c);
    s
}

fn sctp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, data_len: usize) -> Vec<u8> {
    let s = sctp_payload(sport, dport, data_len);
    let mut p = packet(UDP, src, sport, dst, dport, 0)[..34].to_vec();
    p[23] = SCTP;
    p[16..18].copy_from_slice(&((20 + s.len()) as u16).to_be_bytes());
    p[24..26].fill(0);
    let c = fold(sum(&p[14..34], 0));
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&s);
    p
}

fn assert_sctp4(p: &[u8]) {
    assert_eq!(fold(sum(&p[14..34], 0)), 0, "IPv4 header checksum");
    assert_eq!(p[42..46], sctp_crc(&p[34..]), "SCTP CRC32c of {p:02x?}");
}

#[test]
fn crc32c_reference_vector() {
    // RFC 3720 B.4 / the usual check value of CRC-32C.
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn sctp_dnat_reverse_nat_and_crc32c() {
    if !root() {
        return;
    }
    let mut s = svc("s", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    s.port.name.protocol = crate::model::Protocol::Sctp;
    let mut ebpf = setup(&snap(vec![s]));
    let be = [10, 1, 0, 1];
    // Several lengths: the update carries the port change through L - 4 zero bytes.
    for (i, len) in [1usize, 100, 1024, 1400].into_iter().enumerate() {
        let cport = 40000 + i as u16;
        let pkt = sctp4(CLIENT, cport, VIP, 80, len);
        let (rc, out) = run(&mut ebpf, &pkt);
        assert_eq!(rc, TCX_NEXT, "len {len}");
        assert_eq!((daddr(&out), dport(&out)), (be, 8080));
        assert_eq!((saddr(&out), sport(&out)), (CLIENT, cport));
        assert_eq!(out[46..], pkt[46..], "chunks untouched");
        assert_ne!(out[42..46], pkt[42..46], "a port change changes the CRC");
        assert_sctp4(&out);

        // The backend's answer comes back from the frontend.
        let reply = sctp4(be, 8080, CLIENT, cport, len);
        let (rc, out) = run(&mut ebpf, &reply);
        assert_eq!(rc, TCX_NEXT);
        assert_eq!((saddr(&out), sport(&out)), (VIP, 80));
        assert_eq!((daddr(&out), dport(&out)), (CLIENT, cport));
        assert_sctp4(&out);
    }
}

#[test]
fn sctp_address_only_dnat_keeps_the_crc() {
    if !root() {
        return;
    }
    let mut e = ep("10.1.0.1", false);
    e.port = 80;
    let mut s = svc("s", "172.30.0.10", vec![e]);
    s.port.name.protocol = crate::model::Protocol::Sctp;
    let mut ebpf = setup(&snap(vec![s]));
    let pkt = sctp4(CLIENT, 40000, VIP, 80, 64);
    let (rc, out) = run(&mut ebpf, &pkt);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr(&out), dport(&out)), ([10, 1, 0, 1], 80));
    // No pseudo-header in the CRC: the same bytes, still right.
    assert_eq!(out[42..46], pkt[42..46]);
    assert_sctp4(&out);
}

#[test]
fn ipv6_sctp_dnat_reverse_nat_and_crc32c() {
    if !root() {
        return;
    }
    let mut s = svc6("s", VIP6, vec![ep(BE6, false)]);
    s.port.name.protocol = crate::model::Protocol::Sctp;
    let mut ebpf = setup6(&snap6(vec![s]));
    let p6 = |src: &str, sport: u16, dst: &str, dport: u16| {
        let s = sctp_payload(sport, dport, 300);
        let mut p = packet6(UDP, src, sport, dst, dport, 0)[..54].to_vec();
        p[20] = SCTP;
        p[18..20].copy_from_slice(&(s.len() as u16).to_be_bytes());
        p.extend_from_slice(&s);
        p
    };
    let pkt = p6(CLIENT6, 40000, VIP6, 80);
    let (rc, out) = run(&mut ebpf, &pkt);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((daddr6(&out), ports6(&out)), (v6(BE6), (40000, 8080)));
    assert_eq!(out[62..66], sctp_crc(&out[54..]));
    let (rc, out) = run(&mut ebpf, &p6(BE6, 8080, CLIENT6, 40000));
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr6(&out), ports6(&out)), (v6(VIP6), (80, 40000)));
    assert_eq!(out[62..66], sctp_crc(&out[54..]));
}

// ---- IPv6 extension headers (ebpf/src/ipv6_ext.rs) ----

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;

/// `p` (from `packet6`) with 8-byte extension headers of the given kinds inserted after the
/// fixed header, in order: options headers carry one PadN, a fragment header `frag` (offset
/// and flags word), a routing header `segments left` = `frag` as well.
fn with_ext(p: &[u8], kinds: &[u8], frag: u16) -> Vec<u8> {
    let upper = p[20];
    let mut out = p[..54].to_vec();
    out[20] = kinds[0];
    for (i, &k) in kinds.iter().enumerate() {
        let nh = kinds.get(i + 1).copied().unwrap_or(upper);
        let h: [u8; 8] = match k {
            FRAGMENT => {
                let f = frag.to_be_bytes();
                [nh, 0, f[0], f[1], 0, 0, 0x12, 0x34]
            }
            ROUTING => [nh, 0, 4, frag as u8, 0, 0, 0, 0],
            _ => [nh, 0, 1, 4, 0, 0, 0, 0],
        };
        out.extend_from_slice(&h);
    }
    out.extend_from_slice(&p[54..]);
    let len = u16::from_be_bytes([p[18], p[19]]) + 8 * kinds.len() as u16;
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// `p` without its `n` extension headers (8 bytes each), the upper-layer protocol `upper`
/// named by the fixed header again: the checksum helpers then apply (the pseudo-header
/// counts the upper-layer length, RFC 8200 8.1, not the extension headers).
fn strip_ext(p: &[u8], n: usize, upper: u8) -> Vec<u8> {
    let mut out = p[..54].to_vec();
    out[20] = upper;
    out.extend_from_slice(&p[54 + 8 * n..]);
    let len = u16::from_be_bytes([p[18], p[19]]) - 8 * n as u16;
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_ports() {
    if !root() {
        return;
    }
    let mut u = svc6("u", VIP6, vec![ep(BE6, false)]);
    u.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup6(&snap6(vec![svc6("a", VIP6, vec![ep(BE6, false)]), u]));

    // Hop-by-hop + destination options before TCP: DNAT, then reverse NAT of the answer.
    let syn = with_ext(
        &packet6(TCP, CLIENT6, 40000, VIP6, 80, SYN),
        &[HOPOPTS, DSTOPTS],
        0,
    );
    let (rc, out) = run(&mut ebpf, &syn);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!(daddr6(&out), v6(BE6));
    assert_eq!(out[54..70], syn[54..70], "extension headers kept");
    let plain = strip_ext(&out, 2, TCP);
    assert_eq!(ports6(&plain), (40000, 8080));
    assert_checksums6(&plain);
    let reply = with_ext(
        &packet6(TCP, BE6, 8080, CLIENT6, 40000, SYN | ACK),
        &[HOPOPTS],
        0,
    );
    let (rc, out) = run(&mut ebpf, &reply);
    assert_eq!(rc, TCX_NEXT);
    let plain = strip_ext(&out, 1, TCP);
    assert_eq!((saddr6(&plain), ports6(&plain)), (v6(VIP6), (80, 40000)));
    assert_checksums6(&plain);

    // A first fragment (offset 0, more fragments) carries the ports: translated.
    let first = with_ext(
        &packet6(UDP, CLIENT6, 5353, VIP6, 80, 0),
        &[FRAGMENT],
        0x0001,
    );
    let (rc, out) = run(&mut ebpf, &first);
    assert_eq!(rc, TCX_NEXT);
    let plain = strip_ext(&out, 1, UDP);
    assert_eq!((daddr6(&plain), ports6(&plain)), (v6(BE6), (5353, 8080)));
    assert_checksums6(&plain);

    // A later fragment of that datagram (same identification): the first fragment's
    // ports from the fragment map (tests/frag.rs has the whole datagrams), addresses only.
    let later = with_ext(
        &packet6(UDP, CLIENT6, 5354, VIP6, 80, 0),
        &[FRAGMENT],
        0x0008,
    );
    let (rc, out) = run(&mut ebpf, &later);
    assert_eq!((rc, daddr6(&out)), (TCX_NEXT, v6(BE6)));
    assert_eq!(out[54..], later[54..], "no L4 header in a later fragment");
    // Untouched: a routing header with segments left (not the final destination yet),
    // more than four extension headers.
    let routed = with_ext(&packet6(TCP, CLIENT6, 40001, VIP6, 80, SYN), &[ROUTING], 1);
    assert_eq!(run(&mut ebpf, &routed), (TCX_NEXT, routed.clone()));
    let deep = with_ext(
        &packet6(TCP, CLIENT6, 40002, VIP6, 80, SYN),
        &[HOPOPTS, DSTOPTS, ROUTING, DSTOPTS, DSTOPTS],
        0,
    );
    assert_eq!(run(&mut ebpf, &deep), (TCX_NEXT, deep.clone()));
    // Four are walked (segments left 0: the final destination).
    let four = with_ext(
        &packet6(TCP, CLIENT6, 40003, VIP6, 80, SYN),
        &[HOPOPTS, ROUTING, FRAGMENT, DSTOPTS],
        0,
    );
    let (rc, out) = run(&mut ebpf, &four);
    assert_eq!(rc, TCX_NEXT);
    let plain = strip_ext(&out, 4, TCP);
    assert_eq!((daddr6(&plain), ports6(&plain)), (v6(BE6), (40003, 8080)));
    assert_checksums6(&plain);

    // An ICMPv6 packet too big behind a hop-by-hop header, about the first flow.
    let dnatted = run(&mut ebpf, &packet6(TCP, CLIENT6, 40004, VIP6, 80, SYN)).1;
    let err = with_ext(
        &icmp6_error(BE6, CLIENT6, 2, 0, 1280, &dnatted[14..]),
        &[HOPOPTS],
        0,
    );
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    let plain = strip_ext(&out, 1, 58);
    assert_eq!(saddr6(&plain), v6(VIP6));
    assert_eq!(
        &plain[62..],
        &packet6(TCP, CLIENT6, 40004, VIP6, 80, SYN)[14..]
    );
    assert_icmp6_checksums(&plain);
}

#[test]
fn icmp_error_quoting_sctp_gets_its_ports_back() {
    if !root() {
        return;
    }
    let mut s = svc("s", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    s.port.name.protocol = crate::model::Protocol::Sctp;
    let mut ebpf = setup(&snap(vec![s]));
    let be = [10, 1, 0, 1];
    let sent = sctp4(CLIENT, 40000, VIP, 80, 1200);
    let (rc, dnatted) = run(&mut ebpf, &sent);
    assert_eq!(rc, TCX_NEXT);
    // Fragmentation needed from the backend's side, quoting 100 bytes of the DNATed packet.
    let err = icmp4_error(be, CLIENT, 3, 4, 1000, &dnatted[14..114]);
    let (rc, out) = run(&mut ebpf, &err);
    assert_eq!(rc, TCX_NEXT);
    assert_eq!((saddr(&out), daddr(&out)), (VIP, CLIENT));
    // Addresses and ports as the client sent them; the quoted CRC is left as it was.
    assert_eq!(&out[42..62], &sent[14..34], "inner IPv4 header");
    assert_eq!(&out[62..66], &sent[34..38], "inner ports");
    assert_eq!(&out[66..], &dnatted[38..114]);
    assert_checksums(&out);
}

// Conntrack state and timeouts (ebpf/src/ct.rs, shunt_abi::ct_state).

const FIN: u8 = 0x01;
const RST: u8 = 0x04;

fn ct4(ebpf: &Ebpf) -> Vec<(Ct4Key, Ct4Value)> {
    let ct: HashMap<_, Ct4Key, Ct4Value> =
        HashMap::try_from(ebpf.map(names::CT4).unwrap()).unwrap();
    ct.iter().map(Result::unwrap).collect()
}

/// Both entries of the one flow in the map carry `state` (and the same FIN bits).
fn assert_state(ebpf: &Ebpf, state: u8, what: &str) {
    let e = ct4(ebpf);
    assert_eq!(e.len(), 2, "{what}: {e:?}");
    for (_, v) in &e {
        assert_eq!(
            ct_state::name(v.pad2),
            ct_state::name(u32::from(state)),
            "{what}: {v:?}"
        );
    }
    assert_eq!(e[0].1.pad2, e[1].1.pad2, "{what}: both entries agree");
}

/// Make every entry look idle for `secs` (written back from userspace).
fn age(ebpf: &mut Ebpf, secs: u64) {
    let entries = ct4(ebpf);
    let mut ct: HashMap<_, Ct4Key, Ct4Value> =
        HashMap::try_from(ebpf.map_mut(names::CT4).unwrap()).unwrap();
    let then = ct_sweep::now_ns() - secs * 1_000_000_000;
    for (k, mut v) in entries {
        v.last_seen_ns = then;
        ct.insert(k, v, 0).unwrap();
    }
}

use shunt_abi::{CtTimeouts, ct_state};

#[test]
fn tcp_state_syn_synack_established_fin_rst() {
    if !root() {
        return;
    }
    let pod = [10, 1, 0, 1];
    let mut ebpf = setup(&one_backend());
    run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_state(&ebpf, ct_state::TCP_SYN_SENT, "after SYN");
    // The client's retransmitted SYN does not establish.
    run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_state(&ebpf, ct_state::TCP_SYN_SENT, "after a second SYN");
    let (_, out) = run(&mut ebpf, &packet(TCP, pod, 8080, CLIENT, 40000, SYN | ACK));
    assert_eq!(saddr(&out), VIP);
    assert_state(&ebpf, ct_state::TCP_ESTABLISHED, "after SYN-ACK");
    run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, ACK));
    assert_state(&ebpf, ct_state::TCP_ESTABLISHED, "after ACK");
    run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, FIN | ACK));
    assert_state(&ebpf, ct_state::TCP_CLOSE_WAIT, "after the client's FIN");
    // Half closed: the backend's data still flows back, reverse-NATed.
    let (_, out) = run(&mut ebpf, &packet(TCP, pod, 8080, CLIENT, 40000, ACK));
    assert_eq!(saddr(&out), VIP);
    run(&mut ebpf, &packet(TCP, pod, 8080, CLIENT, 40000, FIN | ACK));
    assert_state(&ebpf, ct_state::TCP_TIME_WAIT, "after both FINs");
    let (_, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, ACK));
    assert_eq!(daddr(&out), pod, "the last ACK is still translated");

    // A new SYN on the finished tuple opens a new connection.
    let (_, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_eq!(daddr(&out), pod);
    assert_state(&ebpf, ct_state::TCP_SYN_SENT, "reopened");
    run(&mut ebpf, &packet(TCP, pod, 8080, CLIENT, 40000, SYN | ACK));
    let (_, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, RST));
    assert_eq!(daddr(&out), pod, "the RST itself reaches the backend");
    assert_state(&ebpf, ct_state::TCP_CLOSE, "after RST");
    let t = CtTimeouts::default();
    let (_, v) = ct4(&ebpf)[0];
    assert_eq!(t.secs(TCP, v.pad2), 10, "closed: 10 s");
}

#[test]
fn expired_tcp_entry_is_not_used_and_a_new_syn_picks_again() {
    if !root() {
        return;
    }
    let pod = [10, 1, 0, 1];
    let mut ebpf = setup(&one_backend());
    ct_sweep::write_timeouts(
        &mut ebpf,
        CtTimeouts {
            tcp_established: 5,
            ..Default::default()
        },
    )
    .unwrap();
    run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    run(&mut ebpf, &packet(TCP, pod, 8080, CLIENT, 40000, SYN | ACK));
    assert_state(&ebpf, ct_state::TCP_ESTABLISHED, "established");
    // Idle for 4 s of 5: still live.
    age(&mut ebpf, 4);
    let (_, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, ACK));
    assert_eq!(daddr(&out), pod);
    // The partner entry was refreshed with it (the flow's last packet counts for both).
    let now = ct_sweep::now_ns();
    for (_, v) in ct4(&ebpf) {
        assert!(now - v.last_seen_ns < 2_000_000_000, "{v:?}");
    }
    // Idle for 6 s of 5: gone. A stale non-SYN packet is not translated and the entry
    // it met is deleted.
    age(&mut ebpf, 6);
    let ack = packet(TCP, CLIENT, 40000, VIP, 80, ACK);
    assert_eq!(run(&mut ebpf, &ack), (TCX_NEXT, ack.clone()));
    assert_eq!(ct4(&ebpf).len(), 1, "the FORWARD entry was deleted");
    // The sweep removes the other one.
    assert_eq!(
        ct_sweep::sweep_family::<V4>(
            &mut ebpf,
            &CtTimeouts {
                tcp_established: 5,
                ..Default::default()
            },
            ct_sweep::now_ns()
        )
        .unwrap(),
        1
    );
    assert!(ct4(&ebpf).is_empty());
    // A new SYN chooses a backend again and tracks anew.
    let (rc, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_eq!((rc, daddr(&out), dport(&out)), (TCX_NEXT, pod, 8080));
    assert_state(&ebpf, ct_state::TCP_SYN_SENT, "new flow");
    // An expired SYN_SENT entry (120 s) met by a retransmitted SYN: a new flow too.
    age(&mut ebpf, 121);
    let (rc, out) = run(&mut ebpf, &packet(TCP, CLIENT, 40000, VIP, 80, SYN));
    assert_eq!((rc, daddr(&out)), (TCX_NEXT, pod));
    assert_state(&ebpf, ct_state::TCP_SYN_SENT, "new flow again");
}

#[test]
fn udp_timeouts_unreplied_and_stream() {
    if !root() {
        return;
    }
    let pod = [10, 1, 0, 1];
    let mut u = svc("u", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    u.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup(&snap(vec![u]));
    let t = CtTimeouts {
        udp: 5,
        udp_stream: 20,
        ..Default::default()
    };
    ct_sweep::write_timeouts(&mut ebpf, t).unwrap();
    run(&mut ebpf, &packet(UDP, CLIENT, 5353, VIP, 80, 0));
    assert_state(&ebpf, ct_state::UDP_UNREPLIED, "first datagram");
    // Unreplied for 6 s of 5: the next datagram is a new flow (translated, tracked anew).
    age(&mut ebpf, 6);
    let (rc, out) = run(&mut ebpf, &packet(UDP, CLIENT, 5353, VIP, 80, 0));
    assert_eq!((rc, daddr(&out)), (TCX_NEXT, pod));
    let now = ct_sweep::now_ns();
    assert!(
        ct4(&ebpf)
            .iter()
            .all(|(_, v)| now - v.last_seen_ns < 2_000_000_000)
    );
    // A reply makes it a stream: 20 s.
    let (_, out) = run(&mut ebpf, &packet(UDP, pod, 8080, CLIENT, 5353, 0));
    assert_eq!(saddr(&out), VIP);
    assert_state(&ebpf, ct_state::UDP_REPLIED, "replied");
    age(&mut ebpf, 6);
    let (_, out) = run(&mut ebpf, &packet(UDP, pod, 8080, CLIENT, 5353, 0));
    assert_eq!(saddr(&out), VIP, "a stream lives 20 s");
    age(&mut ebpf, 21);
    let reply = packet(UDP, pod, 8080, CLIENT, 5353, 0);
    assert_eq!(
        run(&mut ebpf, &reply),
        (TCX_NEXT, reply.clone()),
        "expired: the reply is no longer reverse-NATed"
    );
}

mod frag;
