//! Proves, on a freshly built lab and before any proxy runs, that the lab can tell every
//! outcome apart: endpoint hits (with the real peer address), passthrough to the node and to
//! the router's sink, reject (ECONNREFUSED, also through the node-originated EPERM path) and
//! drop (timeout) produced by a temporary nft table in the node namespace.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::lab::plan::{LAB_PORT, LAB_V4, LAB_V6, Plan, Role};
use crate::lab::probe::{Outcome, retry_refusal};
use crate::lab::topology::Lab;
use crate::scenario::Protocol;

const TABLE: &str = "shunt_lab_selftest";

#[derive(Debug)]
pub struct Report {
    pub checks: usize,
}

fn expect_answer(
    lab: &Lab,
    proto: Protocol,
    src: IpAddr,
    dst: SocketAddr,
    name: &str,
    t: Duration,
) -> Result<()> {
    match lab.probe(proto, src, dst, t)? {
        Outcome::Answered { answer, client }
            if answer.name == name && answer.local == dst && answer.peer == client =>
        {
            Ok(())
        }
        o => bail!(
            "self-test: {proto:?} {src} -> {dst}: expected an unmasqueraded answer from {name}, got {o}"
        ),
    }
}

fn expect(
    lab: &Lab,
    proto: Protocol,
    src: IpAddr,
    dst: SocketAddr,
    want: &Outcome,
    t: Duration,
) -> Result<()> {
    let o = if *want == Outcome::Refused {
        retry_refusal(|| lab.probe(proto, src, dst, t))?
    } else {
        lab.probe(proto, src, dst, t)?
    };
    if &o != want {
        bail!("self-test: {proto:?} {src} -> {dst}: expected {want}, got {o}");
    }
    Ok(())
}

pub fn run(lab: &Lab, timeout: Duration) -> Result<Report> {
    let p = &lab.plan;
    let mut checks = 0;
    // 1. Every endpoint server, directly from an external client (no proxy: no DNAT, no SNAT).
    for (ip, ports) in &p.servers {
        let ext = Plan::lab_external(ip.is_ipv6());
        for &(proto, port) in ports {
            if proto == Protocol::SCTP {
                continue;
            }
            expect_answer(
                lab,
                proto,
                ext,
                SocketAddr::new(*ip, port),
                &format!("ep-{ip}"),
                timeout,
            )?;
            checks += 1;
        }
    }
    // 2. Node-port numbers on every node address answer "node" (passthrough baseline), and
    //    the sink answers for VIPs the node forwards without DNAT.
    for &(proto, dst) in &p.node_listen {
        expect_answer(
            lab,
            proto,
            Plan::lab_external(dst.is_ipv6()),
            dst,
            "node",
            timeout,
        )?;
        checks += 1;
    }
    for &(proto, dst) in &p.sink_listen {
        if proto == Protocol::SCTP {
            continue;
        }
        expect_answer(
            lab,
            proto,
            Plan::lab_external(dst.is_ipv6()),
            dst,
            "sink",
            timeout,
        )?;
        checks += 1;
    }
    // 3. reject and drop, both from outside (input hook) and node-originated (output hook).
    let primaries: Vec<IpAddr> = p
        .node_ips
        .iter()
        .find(|i| i.is_ipv6() == p.ipv6)
        .into_iter()
        .copied()
        .collect();
    for verdict in ["reject", "drop"] {
        lab.node.sh(&format!(
            "nft -f - <<'EOF'\ntable inet {TABLE} {{\n chain input {{\n  type filter hook input priority 0;\n  meta l4proto {{ tcp, udp }} th dport {LAB_PORT} {verdict}\n }}\n chain output {{\n  type filter hook output priority 0;\n  meta l4proto {{ tcp, udp }} th dport {LAB_PORT} {verdict}\n }}\n}}\nEOF"
        ))?;
        let want = if verdict == "reject" {
            Outcome::Refused
        } else {
            Outcome::Timeout
        };
        // The four probes are independent; run them at once so drop costs one timeout, not four.
        let mut cases = Vec::new();
        for &ip in &primaries {
            for proto in [Protocol::TCP, Protocol::UDP] {
                cases.push((
                    proto,
                    Plan::lab_external(ip.is_ipv6()),
                    SocketAddr::new(ip, LAB_PORT),
                ));
                cases.push((proto, ip, SocketAddr::new(ip, LAB_PORT)));
            }
        }
        let want = &want;
        std::thread::scope(|sc| {
            let hs: Vec<_> = cases
                .iter()
                .map(|&(proto, src, dst)| {
                    sc.spawn(move || expect(lab, proto, src, dst, want, timeout))
                })
                .collect();
            hs.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
            })
        })?;
        checks += cases.len();
        lab.node.sh(&format!("nft delete table inet {TABLE}"))?;
    }
    // 4. Masquerade is visible: SNAT on the way to a local pod makes the server see the node's
    //    lab primary address (LAB-NOTES: the uplink's first address is the masquerade source).
    let pod_target = p.servers.iter().find_map(|(ip, ports)| {
        let Role::Pod(i) = p.role(*ip) else {
            return None;
        };
        let port = ports.iter().find(|(proto, _)| *proto == Protocol::TCP)?.1;
        Some((i, SocketAddr::new(*ip, port)))
    });
    if let Some((i, dst)) = pod_target {
        lab.node.sh(&format!(
            "nft -f - <<'EOF'\ntable inet {TABLE} {{\n chain post {{\n  type nat hook postrouting priority 100;\n  oifname \"p{i}\" masquerade\n }}\n}}\nEOF"
        ))?;
        let want = if dst.is_ipv6() {
            IpAddr::V6(LAB_V6)
        } else {
            IpAddr::V4(LAB_V4)
        };
        let src = Plan::lab_external(dst.is_ipv6());
        match lab.probe(Protocol::TCP, src, dst, timeout)? {
            Outcome::Answered { answer, .. } if answer.peer.ip() == want => checks += 1,
            o => bail!(
                "self-test: masquerade {src} -> {dst}: expected the server to see {want}, got {o}"
            ),
        }
        lab.node.sh(&format!("nft delete table inet {TABLE}"))?;
    }
    // 5. With the table gone the node answers again: nothing of the self-test is left behind.
    for &ip in &primaries {
        expect_answer(
            lab,
            Protocol::TCP,
            ip,
            SocketAddr::new(ip, LAB_PORT),
            "node",
            timeout,
        )?;
        checks += 1;
    }
    Ok(Report { checks })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root + tools, else the reason to skip.
    fn skip_reason() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("needs root for network namespaces".into());
        }
        crate::missing_tool().map(|t| format!("`{t}` not on PATH"))
    }

    fn lab_for(id: &str) -> Lab {
        let all = crate::scenario::load(&crate::conformance::default_paths(&[])).unwrap();
        let s = all.into_iter().find(|s| s.id == id).unwrap();
        Lab::build(Plan::new(&s).unwrap()).unwrap()
    }

    #[test]
    fn selftest_passes_on_a_fresh_lab() {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
        let lab = lab_for("basic_clusterip/base");
        let r = run(&lab, Duration::from_millis(1000)).unwrap();
        assert!(r.checks > 30, "{} checks", r.checks);
    }

    #[test]
    fn selftest_fails_when_the_node_drops_forwarded_traffic() {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
        let lab = lab_for("nodeport/ipv4");
        let t = "nft add table inet broken; nft add chain inet broken f \
                 '{ type filter hook forward priority 0; policy drop; }'";
        lab.node.sh(t).unwrap();
        let e = run(&lab, Duration::from_millis(500)).unwrap_err();
        assert!(format!("{e:#}").contains("timeout"), "{e:#}");
    }
}
