//! Fragmented datagrams through a Service (ebpf/src/frag.rs): every fragment translated,
//! the first fragment's ports kept in `SHUNT_FRAG4`/`6` for the later ones. Each datagram
//! is built whole with its checksum, cut into fragments, run fragment by fragment, and
//! reassembled from the program's output: the reassembled datagram must carry a valid
//! UDP checksum for its translated addresses and ports.
use aya::maps::HashMap;
use shunt_abi::{Frag4Key, Frag6Key, FragPorts, names};

use super::*;

const BE: [u8; 4] = [10, 1, 0, 1];
/// Payload bytes per fragment (a multiple of 8, RFC 791 / RFC 8200 4.5).
const PER: usize = 600;

fn udp_svc4() -> Snapshot {
    let mut s = svc("u", "172.30.0.10", vec![ep("10.1.0.1", false)]);
    s.port.name.protocol = crate::model::Protocol::Udp;
    snap(vec![s])
}

/// A UDP header + `len` payload bytes (a counting pattern), checksum over `pseudo`'s sum.
fn udp(sport: u16, dport: u16, len: usize, pseudo: u32) -> Vec<u8> {
    let mut u = vec![0u8; 8 + len];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    for (i, b) in u[8..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let c = fold(sum(&u, pseudo + u32::from(UDP) + u.len() as u32));
    let c = if c == 0 { 0xffff } else { c };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// Whether `l4` (a whole UDP datagram) has a valid checksum over the pseudo-header `pseudo`.
fn udp_valid(l4: &[u8], pseudo: u32) -> bool {
    fold(sum(l4, pseudo + u32::from(UDP) + l4.len() as u32)) == 0
}

/// `l4` cut into IPv4 fragments of `PER` bytes with identification `id`.
fn fragments4(src: [u8; 4], dst: [u8; 4], id: u16, l4: &[u8]) -> Vec<Vec<u8>> {
    l4.chunks(PER)
        .enumerate()
        .map(|(i, c)| {
            let off = i * PER;
            let more = off + c.len() < l4.len();
            let mut p = vec![0u8; 34 + c.len()];
            p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip = &mut p[14..34];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + c.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&fo.to_be_bytes());
            ip[8] = 64;
            ip[9] = UDP;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            let s = fold(sum(ip, 0));
            ip[10..12].copy_from_slice(&s.to_be_bytes());
            p[34..].copy_from_slice(c);
            p
        })
        .collect()
}

/// Run every fragment; each must pass on (TCX_NEXT) with a valid IPv4 header checksum,
/// its identification and fragment field unchanged, and (later fragments) its data
/// untouched. Returns the outputs.
fn run_all4(ebpf: &mut Ebpf, frags: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frags
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (rc, out) = run(ebpf, f);
            assert_eq!(rc, TCX_NEXT, "fragment {i}");
            assert_eq!(out.len(), f.len(), "fragment {i}");
            assert_eq!(fold(sum(&out[14..34], 0)), 0, "IPv4 header checksum of {i}");
            assert_eq!(out[18..22], f[18..22], "id and offset of fragment {i}");
            if i > 0 {
                assert_eq!(out[34..], f[34..], "data of later fragment {i}");
            }
            out
        })
        .collect()
}

/// The outputs' data in order, after checking they all carry `src` -> `dst`.
fn reassemble4(outs: &[Vec<u8>], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut l4 = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(
            (saddr(o), daddr(o)),
            (src, dst),
            "addresses of fragment {i}"
        );
        let off = usize::from(u16::from_be_bytes([o[20], o[21]]) & 0x1fff) * 8;
        assert_eq!(off, l4.len(), "fragment {i} in order");
        l4.extend_from_slice(&o[34..]);
    }
    l4
}

fn pseudo4(src: [u8; 4], dst: [u8; 4]) -> u32 {
    sum(&src, sum(&dst, 0))
}

#[test]
fn ipv4_udp_fragments_to_a_cluster_ip_and_back_are_all_translated() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&udp_svc4());

    // Client -> ClusterIP: 1,400 bytes of payload in three fragments (600, 600, 208).
    let req = udp(5353, 80, 1400, pseudo4(CLIENT, VIP));
    let frags = fragments4(CLIENT, VIP, 0x4242, &req);
    assert_eq!(frags.len(), 3);
    let outs = run_all4(&mut ebpf, &frags[..1]);
    // The first fragment's ports are kept under the datagram's identity as it arrived.
    let fm: HashMap<_, Frag4Key, FragPorts> =
        HashMap::try_from(ebpf.map(names::FRAG4).unwrap()).unwrap();
    let entries: Vec<_> = fm.iter().map(Result::unwrap).collect();
    let want_key = Frag4Key {
        saddr: u32::from_ne_bytes(CLIENT),
        daddr: u32::from_ne_bytes(VIP),
        id: u32::from(u16::from_ne_bytes(0x4242u16.to_be_bytes())),
        proto: UDP,
        pad: [0; 3],
    };
    let want_ports = FragPorts {
        sport: 5353u16.to_be(),
        dport: 80u16.to_be(),
    };
    assert_eq!(entries, vec![(want_key, want_ports)]);
    let mut outs = outs;
    outs.extend(run_all4(&mut ebpf, &frags[1..]));
    let l4 = reassemble4(&outs, CLIENT, BE);
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 8080, "DNATed port");
    assert_eq!(l4[8..], req[8..], "payload");
    assert!(
        udp_valid(&l4, pseudo4(CLIENT, BE)),
        "UDP checksum of the datagram"
    );

    // The backend's 2,000-byte answer in four fragments: every one gets the ClusterIP back.
    let ans = udp(8080, 5353, 2000, pseudo4(BE, CLIENT));
    let frags = fragments4(BE, CLIENT, 0x0101, &ans);
    assert_eq!(frags.len(), 4);
    let outs = run_all4(&mut ebpf, &frags);
    let l4 = reassemble4(&outs, VIP, CLIENT);
    assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), 80, "reverse-NATed port");
    assert_eq!(l4[8..], ans[8..], "payload");
    assert!(
        udp_valid(&l4, pseudo4(VIP, CLIENT)),
        "UDP checksum of the answer"
    );
}

#[test]
fn ipv4_later_fragment_without_its_first_passes_untranslated() {
    if !root() {
        return;
    }
    let mut ebpf = setup(&udp_svc4());
    let req = udp(5353, 80, 1400, pseudo4(CLIENT, VIP));
    let frags = fragments4(CLIENT, VIP, 0x5151, &req);
    // Reordered: the second and last fragments before the first are not ours yet.
    for f in &frags[1..] {
        assert_eq!(run(&mut ebpf, f), (TCX_NEXT, f.clone()));
    }
    // Another datagram's first fragment does not name them either (identification differs).
    let other = fragments4(CLIENT, VIP, 0x5152, &req);
    let (rc, out) = run(&mut ebpf, &other[0]);
    assert_eq!((rc, daddr(&out)), (TCX_NEXT, BE));
    assert_eq!(run(&mut ebpf, &frags[1]), (TCX_NEXT, frags[1].clone()));
    // A later fragment of a datagram to no Service at all: untouched, no flow started.
    let stray = fragments4(CLIENT, [10, 1, 0, 7], 0x5151, &req);
    assert_eq!(run(&mut ebpf, &stray[2]), (TCX_NEXT, stray[2].clone()));
}

/// `l4` cut into IPv6 fragments (fragment header, RFC 8200 4.5) with identification `id`.
fn fragments6(src: &str, dst: &str, id: u32, l4: &[u8]) -> Vec<Vec<u8>> {
    l4.chunks(PER)
        .enumerate()
        .map(|(i, c)| {
            let off = i * PER;
            let more = off + c.len() < l4.len();
            let mut p = vec![0u8; 62 + c.len()];
            p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            p[14] = 0x60;
            p[18..20].copy_from_slice(&((8 + c.len()) as u16).to_be_bytes());
            p[20] = FRAGMENT;
            p[21] = 64;
            p[22..38].copy_from_slice(&a6(src));
            p[38..54].copy_from_slice(&a6(dst));
            let fo = off as u16 | u16::from(more);
            p[54] = UDP;
            p[56..58].copy_from_slice(&fo.to_be_bytes());
            p[58..62].copy_from_slice(&id.to_be_bytes());
            p[62..].copy_from_slice(c);
            p
        })
        .collect()
}

fn pseudo6(src: &str, dst: &str) -> u32 {
    sum(&a6(src), sum(&a6(dst), 0))
}

fn run_all6(ebpf: &mut Ebpf, frags: &[Vec<u8>], src: &str, dst: &str) -> Vec<u8> {
    let mut l4 = Vec::new();
    for (i, f) in frags.iter().enumerate() {
        let (rc, out) = run(ebpf, f);
        assert_eq!(rc, TCX_NEXT, "fragment {i}");
        assert_eq!(
            (saddr6(&out), daddr6(&out)),
            (v6(src), v6(dst)),
            "fragment {i}"
        );
        assert_eq!(out[54..62], f[54..62], "fragment header of {i}");
        if i > 0 {
            assert_eq!(out[62..], f[62..], "data of later fragment {i}");
        }
        l4.extend_from_slice(&out[62..]);
    }
    l4
}

#[test]
fn ipv6_udp_fragments_to_a_cluster_ip_and_back_are_all_translated() {
    if !root() {
        return;
    }
    let mut u = svc6("u", VIP6, vec![ep(BE6, false)]);
    u.port.name.protocol = crate::model::Protocol::Udp;
    let mut ebpf = setup6(&snap6(vec![u]));

    let req = udp(5353, 80, 1400, pseudo6(CLIENT6, VIP6));
    let frags = fragments6(CLIENT6, VIP6, 0xdead_beef, &req);
    assert_eq!(frags.len(), 3);
    // A later fragment before its first: untouched.
    assert_eq!(run(&mut ebpf, &frags[2]), (TCX_NEXT, frags[2].clone()));
    let l4 = run_all6(&mut ebpf, &frags, CLIENT6, BE6);
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 8080, "DNATed port");
    assert_eq!(l4[8..], req[8..], "payload");
    assert!(udp_valid(&l4, pseudo6(CLIENT6, BE6)), "UDP checksum");
    let fm: HashMap<_, Frag6Key, FragPorts> =
        HashMap::try_from(ebpf.map(names::FRAG6).unwrap()).unwrap();
    let entries: Vec<_> = fm.iter().map(Result::unwrap).collect();
    let w = |s: &str| {
        let o = a6(s);
        core::array::from_fn(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()))
    };
    let want_key = Frag6Key {
        saddr: w(CLIENT6),
        daddr: w(VIP6),
        id: u32::from_ne_bytes(0xdead_beefu32.to_be_bytes()),
        proto: UDP,
        pad: [0; 3],
    };
    let want_ports = FragPorts {
        sport: 5353u16.to_be(),
        dport: 80u16.to_be(),
    };
    assert_eq!(entries, vec![(want_key, want_ports)]);

    let ans = udp(8080, 5353, 2000, pseudo6(BE6, CLIENT6));
    let frags = fragments6(BE6, CLIENT6, 7, &ans);
    assert_eq!(frags.len(), 4);
    let l4 = run_all6(&mut ebpf, &frags, VIP6, CLIENT6);
    assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), 80, "reverse-NATed port");
    assert_eq!(l4[8..], ans[8..], "payload");
    assert!(
        udp_valid(&l4, pseudo6(VIP6, CLIENT6)),
        "UDP checksum of the answer"
    );
}
