//! Real fragments through a ClusterIP (ebpf/src/frag.rs): the client and the backend send
//! 3,000-byte UDP datagrams over veths of MTU 1500, so the kernel cuts each into three
//! IPv4 fragments; the node's tc program must translate every fragment (DNAT on the way
//! in, reverse NAT of the answer) for either side to reassemble anything at all. The same
//! over IPv6 (fragment headers).
use super::*;

/// Answers each datagram with its bytes reversed.
const BIG_UDP_SERVER: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',8080))\ns.settimeout(30)\nwhile True:\n  d,a=s.recvfrom(65535)\n  s.sendto(d[::-1],a)\n";

/// The same, IPv6.
const BIG_UDP_SERVER6: &str = "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\ns.bind(('::',8080))\ns.settimeout(30)\nwhile True:\n  d,a=s.recvfrom(65535)\n  s.sendto(d[::-1],a)\n";

/// Sends 3,000 bytes to `addr`:`port` and prints "<answer length> <answer is the request
/// reversed> <answer's source>", or the error's name.
const BIG_UDP_CLIENT: &str = "import socket,sys\ns=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\nd=bytes((i*7)%256 for i in range(3000))\ntry:\n  s.sendto(d,(sys.argv[1],int(sys.argv[2])))\n  r,a=s.recvfrom(65535)\n  print(len(r),r==d[::-1],a[0])\nexcept Exception as e:\n  print(type(e).__name__)\n";

#[test]
fn udp_datagrams_bigger_than_the_mtu_cross_a_clusterip_whole() {
    if !can_run(&["ip", "ethtool", "python3", "mount"]) {
        return;
    }
    let mut lab = match setup_tagged("f") {
        Ok(l) => l,
        Err(e) => panic!("lab setup: {e}"),
    };
    lab.serve("b", &[BIG_UDP_SERVER], 1);
    for (ns, dev) in [("c", "eth0"), ("b", "eth0"), ("n", "toc"), ("n", "tob")] {
        let mtu = lab.exec(ns, &["cat", &format!("/sys/class/net/{dev}/mtu")]);
        assert_eq!(mtu.as_deref().map(str::trim), Ok("1500"), "{ns} {dev}");
    }
    // Straight to the backend: the path itself carries fragments both ways.
    assert_eq!(big(&lab, "10.1.1.2", "8080"), "3000 True 10.1.1.2");
    // Without shunt the ClusterIP leads nowhere.
    assert_eq!(big(&lab, "172.30.0.12", "80"), "TimeoutError");
    let opts = EbpfOptions {
        cgroup_root: lab.cgroup.clone(),
        pin_dir: lab.bpffs.join("shunt"),
        interfaces: Interfaces::All,
        ..Default::default()
    };
    let mut dns = svc("dns", "172.30.0.12", vec![ep("10.1.1.2", false)]);
    dns.port.name.protocol = crate::model::Protocol::Udp;
    let s = snap(vec![dns]);
    let mut dp = in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
        dp
    });
    // Twice: a second datagram of the same flow takes the conntrack entries, with new
    // identifications.
    for i in 0..2 {
        assert_eq!(
            big(&lab, "172.30.0.12", "80"),
            "3000 True 172.30.0.12",
            "datagram {i}"
        );
    }
    // Both first fragments (request and answer) of each exchange were recorded.
    {
        let frags: aya::maps::HashMap<_, shunt_abi::Frag4Key, shunt_abi::FragPorts> =
            aya::maps::HashMap::try_from(
                dp.loaded
                    .as_mut()
                    .unwrap()
                    .ebpf
                    .map(shunt_abi::names::FRAG4)
                    .unwrap(),
            )
            .unwrap();
        let n = frags.iter().filter(Result::is_ok).count();
        assert!(n >= 4, "fragment map entries: {n}");
    }
    in_node(&lab, || dp.cleanup().unwrap());
}

fn big(lab: &Lab, addr: &str, port: &str) -> String {
    lab.exec("c", &["python3", "-c", BIG_UDP_CLIENT, addr, port])
        .unwrap_or_else(|e| e)
        .trim()
        .to_string()
}

#[test]
fn ipv6_udp_datagrams_bigger_than_the_mtu_cross_a_clusterip_whole() {
    if !can_run(&["ip", "ethtool", "python3", "mount"]) {
        return;
    }
    let mut lab = setup_tagged("f6").unwrap_or_else(|e| panic!("lab setup: {e}"));
    add_ipv6(&lab);
    lab.serve("b", &[BIG_UDP_SERVER6], 1);
    assert_eq!(big(&lab, "fd01:2::2", "8080"), "3000 True fd01:2::2");
    assert_eq!(big(&lab, "fd00:172:30::12", "80"), "TimeoutError");
    let opts = EbpfOptions {
        cgroup_root: lab.cgroup.clone(),
        pin_dir: lab.bpffs.join("shunt"),
        interfaces: Interfaces::All,
        ..Default::default()
    };
    let mut dns = svc6("dns", "fd00:172:30::12", vec![ep("fd01:2::2", false)]);
    dns.port.name.protocol = crate::model::Protocol::Udp;
    let mut s = snap6(vec![dns]);
    s.network.primary_ip = Some("fd01:1::1".parse().unwrap());
    s.network.local_detector =
        crate::model::LocalDetector::ClusterCidr(vec!["fd01::/16".parse().unwrap()]);
    let mut dp = in_node(&lab, || {
        let mut dp = EbpfDataplane::new(opts.clone()).unwrap();
        sync(&mut dp, &s);
        dp
    });
    for i in 0..2 {
        assert_eq!(
            big(&lab, "fd00:172:30::12", "80"),
            "3000 True fd00:172:30::12",
            "datagram {i}"
        );
    }
    {
        let frags: aya::maps::HashMap<_, shunt_abi::Frag6Key, shunt_abi::FragPorts> =
            aya::maps::HashMap::try_from(
                dp.loaded
                    .as_mut()
                    .unwrap()
                    .ebpf
                    .map(shunt_abi::names::FRAG6)
                    .unwrap(),
            )
            .unwrap();
        let n = frags.iter().filter(Result::is_ok).count();
        assert!(n >= 4, "fragment map entries: {n}");
    }
    in_node(&lab, || dp.cleanup().unwrap());
}
