//! IMPURE: builds a [`Plan`] in network namespaces and runs the lab's servers.
//!
//! Transit links carry no routable address: every hop is an onlink route via a link-local
//! gateway (169.254.1.1 / fe80::1) with a permanent neighbour entry for the peer's MAC, so the
//! kernel can never pick a transit address as a masquerade source and nothing waits for ARP/ND.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::lab::agent::{Mode, Servers};
use crate::lab::netns::{self, Netns};
use crate::lab::plan::{LAB_V4, LAB_V6, Plan, Role};
use crate::lab::probe::{self, Outcome};
use crate::scenario::Protocol;

static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

const GW4: &str = "169.254.1.1";
const GW6: &str = "fe80::1";

/// Field order matters: servers are stopped before the namespaces are deleted.
pub struct Lab {
    servers: Servers,
    /// ebpf mode: node- and pod-originated probes run in a child process inside this cgroup,
    /// so cgroup socket hooks attached under `--cgroup-root` see them as they would a node's
    /// processes. External and remote-node clients stay outside.
    pub probe_cgroup: Option<std::path::PathBuf>,
    pub plan: Plan,
    pub node: Netns,
    pub rtr: Netns,
    pub ext: Netns,
    pub node2: Netns,
    pub pods: Vec<Netns>,
}

fn mac(link: usize, side: u8) -> String {
    format!(
        "02:5a:{:02x}:{:02x}:{:02x}:{side:02x}",
        (link >> 8) & 0xff,
        link & 0xff,
        std::process::id() & 0xff
    )
}

fn plen(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn addr_cmd(ip: IpAddr, dev: &str) -> String {
    // nodad: an address in DAD is "tentative" and cannot be bound or used as a source.
    let nodad = if ip.is_ipv6() { " nodad" } else { "" };
    format!("addr add {ip}/{} dev {dev}{nodad}", plen(ip))
}

/// Default routes of both families via the link-local gateway whose MAC is `peer_mac`.
fn gw_cmds(dev: &str, peer_mac: &str) -> Vec<String> {
    vec![
        format!("neigh add {GW4} lladdr {peer_mac} dev {dev} nud permanent"),
        format!("neigh add {GW6} lladdr {peer_mac} dev {dev} nud permanent"),
        format!("route add default via {GW4} dev {dev} onlink"),
        format!("route add ::/0 via {GW6} dev {dev}"),
    ]
}

/// A host (or prefix) reachable directly on `dev` at `peer_mac`.
fn host_cmds(ip: IpAddr, dev: &str, peer_mac: &str) -> Vec<String> {
    vec![
        format!("route add {ip}/{} dev {dev}", plen(ip)),
        format!("neigh add {ip} lladdr {peer_mac} dev {dev} nud permanent"),
    ]
}

fn via_cmd(net: ipnet::IpNet, dev: &str) -> String {
    let gw = if matches!(net, ipnet::IpNet::V4(_)) {
        GW4
    } else {
        GW6
    };
    format!("route replace {net} via {gw} dev {dev} onlink")
}

impl Lab {
    pub fn build(plan: Plan) -> Result<Lab> {
        Self::build_named(plan, &std::collections::BTreeMap::new(), Mode::Line)
    }

    /// Like [`Lab::build`], endpoint servers answering as `names[ip]` (default `ep-IP`) in `mode`.
    pub fn build_named(
        plan: Plan,
        names: &std::collections::BTreeMap<IpAddr, String>,
        mode: Mode,
    ) -> Result<Lab> {
        let base = format!(
            "{}{}-",
            netns::prefix(),
            LAB_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let node = Netns::create(format!("{base}node"))?;
        let rtr = Netns::create(format!("{base}rtr"))?;
        let ext = Netns::create(format!("{base}ext"))?;
        let node2 = Netns::create(format!("{base}n2"))?;
        let mut pods = Vec::new();
        for i in 0..plan.pods.len() {
            pods.push(Netns::create(format!("{base}p{i}"))?);
        }
        let lab = Lab {
            servers: Servers::new(),
            probe_cgroup: None,
            plan,
            node,
            rtr,
            ext,
            node2,
            pods,
        };
        lab.configure().context("configuring the lab topology")?;
        let mut lab = lab;
        lab.start_servers(names, mode)?;
        Ok(lab)
    }

    fn all(&self) -> impl Iterator<Item = &Netns> {
        [&self.node, &self.rtr, &self.ext, &self.node2]
            .into_iter()
            .chain(self.pods.iter())
    }

    fn configure(&self) -> Result<()> {
        // Defaults first, so every interface created afterwards inherits them.
        for ns in self.all() {
            ns.sysctl(&[
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ])?;
        }
        for ns in [&self.node, &self.rtr] {
            ns.sysctl(&[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ])?;
        }
        // LAB-NOTES: the sink's policy-routed local delivery needs early demux off, or an
        // established socket's cached input route bypasses the iif rule.
        self.rtr.sysctl(&[
            ("net.ipv4.tcp_early_demux", "0"),
            ("net.ipv4.udp_early_demux", "0"),
        ])?;

        let (m_up, m_rn) = (mac(0, 1), mac(0, 2));
        let (m_n2, m_n2e) = (mac(1, 1), mac(1, 2));
        let (m_re, m_ee) = (mac(2, 1), mac(2, 2));
        let mut node = vec![
            format!(
                "link add uplink address {m_up} type veth peer name tonode address {m_rn} netns {}",
                self.rtr.name
            ),
            format!(
                "link add n2 address {m_n2} type veth peer name eth0 address {m_n2e} netns {}",
                self.node2.name
            ),
        ];
        let mut veths: Vec<(&Netns, String)> = vec![
            (&self.node, "uplink".into()),
            (&self.node, "n2".into()),
            (&self.rtr, "tonode".into()),
        ];
        veths.extend([
            (&self.rtr, "toext".into()),
            (&self.ext, "eth0".into()),
            (&self.node2, "eth0".into()),
        ]);
        for (i, pod) in self.pods.iter().enumerate() {
            let (a, b) = (mac(10 + i, 1), mac(10 + i, 2));
            node.push(format!(
                "link add p{i} address {a} type veth peer name eth0 address {b} netns {}",
                pod.name
            ));
            veths.push((&self.node, format!("p{i}")));
            veths.push((pod, "eth0".into()));
        }
        self.node.batch(&node)?;
        self.rtr.batch(&[format!(
            "link add toext address {m_re} type veth peer name eth0 address {m_ee} netns {}",
            self.ext.name
        )])?;
        for (ns, dev) in &veths {
            ns.batch(&[format!("link set {dev} up")])?;
        }
        // Veths fill in checksums lazily (CHECKSUM_PARTIAL); with tx offload on, a packet
        // rewritten by NAT/BPF can be delivered with a wrong checksum and still be accepted.
        for ns in self.all() {
            let devs: Vec<&str> = veths
                .iter()
                .filter(|(n, _)| n.name == ns.name)
                .map(|(_, d)| d.as_str())
                .collect();
            let script: Vec<String> = devs
                .iter()
                .map(|d| format!("ethtool -K {d} tx off >/dev/null"))
                .collect();
            ns.sh(&script.join("; "))?;
        }

        // Node: lab primaries first (masquerade source), then the node addresses.
        let p = &self.plan;
        let mut cmds = vec![
            addr_cmd(IpAddr::V4(LAB_V4), "uplink"),
            addr_cmd(IpAddr::V6(LAB_V6), "uplink"),
        ];
        cmds.extend(p.node_ips.iter().map(|ip| addr_cmd(*ip, "uplink")));
        cmds.extend(gw_cmds("uplink", &m_rn));
        for (i, ip) in p.pods.iter().enumerate() {
            cmds.extend(host_cmds(*ip, &format!("p{i}"), &mac(10 + i, 2)));
        }
        for ip in &p.remotes {
            cmds.extend(host_cmds(*ip, "n2", &m_n2e));
        }
        self.node.batch(&cmds)?;

        for (i, (ip, pod)) in p.pods.iter().zip(&self.pods).enumerate() {
            let mut c = vec![addr_cmd(*ip, "eth0")];
            c.extend(gw_cmds("eth0", &mac(10 + i, 1)));
            pod.batch(&c)?;
        }

        let mut c: Vec<String> = p.remotes.iter().map(|ip| addr_cmd(*ip, "eth0")).collect();
        c.extend(gw_cmds("eth0", &m_n2));
        self.node2.batch(&c)?;

        let mut c: Vec<String> = p.externals.iter().map(|ip| addr_cmd(*ip, "eth0")).collect();
        c.extend(gw_cmds("eth0", &m_re));
        self.ext.batch(&c)?;

        let mut c = vec![
            format!("neigh add {GW4} lladdr {m_up} dev tonode nud permanent"),
            format!("neigh add {GW6} lladdr {m_up} dev tonode nud permanent"),
        ];
        c.extend(p.to_node.iter().map(|net| via_cmd(*net, "tonode")));
        for ip in &p.externals {
            c.extend(host_cmds(*ip, "toext", &m_ee));
        }
        // Packets the node forwards back without DNAT (VIPs, service CIDRs) are delivered
        // locally to the sink instead of being routed to the node again.
        c.push("rule add from 0.0.0.0/0 iif tonode lookup 100 pref 100".into());
        c.extend(
            p.sink_prefixes
                .iter()
                .map(|net| format!("route add local {net} dev lo table 100")),
        );
        self.rtr.batch(&c)?;
        // `ip rule` defaults to IPv4 and a batch line cannot carry `-6`.
        let v6rule = [
            "-6",
            "-n",
            &self.rtr.name,
            "rule",
            "add",
            "iif",
            "tonode",
            "lookup",
            "100",
            "pref",
            "100",
        ];
        netns::run(std::process::Command::new("ip").args(v6rule))?;
        Ok(())
    }

    fn start_servers(
        &mut self,
        names: &std::collections::BTreeMap<IpAddr, String>,
        mode: Mode,
    ) -> Result<()> {
        let p = self.plan.clone();
        for (ip, ports) in &p.servers {
            let listen: Vec<(Protocol, SocketAddr)> = ports
                .iter()
                .map(|(proto, port)| (*proto, SocketAddr::new(*ip, *port)))
                .collect();
            let ns = self.ns_of(*ip).path();
            let name = names.get(ip).cloned().unwrap_or_else(|| format!("ep-{ip}"));
            self.servers.spawn(&ns, &name, &listen, mode)?;
        }
        let node: Vec<_> = p.node_listen.iter().copied().collect();
        self.servers
            .spawn(&self.node.path(), "node", &node, Mode::Line)?;
        let sink: Vec<_> = p.sink_listen.iter().copied().collect();
        self.servers
            .spawn(&self.rtr.path(), "sink", &sink, Mode::Line)?;
        Ok(())
    }

    /// The namespace a source (or server) address lives in.
    pub fn ns_of(&self, ip: IpAddr) -> &Netns {
        match self.plan.role(ip) {
            Role::Node => &self.node,
            Role::Pod(i) => &self.pods[i],
            Role::Remote => &self.node2,
            Role::External => &self.ext,
        }
    }

    /// One probe from `src` (in whichever namespace owns it) to `dst`.
    pub fn probe(
        &self,
        proto: Protocol,
        src: IpAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Outcome> {
        crate::lab::check_interrupted()?;
        let ns = self.ns_of(src).path();
        let in_cgroup = matches!(self.plan.role(src), Role::Node | Role::Pod(_));
        match &self.probe_cgroup {
            Some(cg) if in_cgroup => probe_in_cgroup(&ns, cg, proto, src, dst, timeout),
            _ => netns::in_netns(&ns, || probe::probe(proto, src, dst, timeout)),
        }
        .with_context(|| format!("probe {proto:?} {src} -> {dst}"))
    }
}

/// Runs `xtask lab-agent probe` (this binary) as a child that first joins `cgroup`, then the
/// network namespace, and prints the encoded [`Outcome`]. Bounded by the probe timeout + 10 s.
fn probe_in_cgroup(
    ns: &str,
    cgroup: &std::path::Path,
    proto: Protocol,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Outcome> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut child = std::process::Command::new(exe)
        .args(["lab-agent", "probe", "--netns", ns, "--cgroup"])
        .arg(cgroup)
        .args([
            "--proto",
            &format!("{proto:?}"),
            "--src",
            &src.to_string(),
            "--dst",
            &dst.to_string(),
        ])
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + timeout + Duration::from_secs(10);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("lab-agent probe did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Outcome::decode(&text).with_context(|| {
        format!(
            "lab-agent probe: {:?} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}
