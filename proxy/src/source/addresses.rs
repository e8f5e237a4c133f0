//! This node's interface addresses.
//!
//! kube-proxy matches `--nodeport-addresses` CIDRs against *every* address of every interface
//! (pkg/proxy/util/nodeport_addresses.go: `GetNodeIPs` walks `InterfaceAddrs()` and keeps the
//! ones inside a configured CIDR, loopback included when a CIDR covers it). So this source
//! reports all addresses of all interfaces, both families, loopback and IPv6 link-local
//! included, and leaves the filtering to the model, which knows the CIDRs.
//!
//! The set is polled ([`POLL_EVERY`]) rather than followed over rtnetlink: addresses change
//! rarely, a poll is one `getifaddrs(3)` call, and it cannot miss an event. Only changes
//! are sent.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use super::SourceEvent;

const POLL_EVERY: Duration = Duration::from_secs(2);

/// Queue the current address set (`LocalAddresses`) and return it, for [`follow`].
///
/// Call this before starting the object source: the sync runner may run its first sync as
/// soon as that source reports `Synced`, and NodePort frontends under `--nodeport-addresses`
/// CIDRs come from these addresses. Sent from a task of its own, this event could arrive
/// after `Synced`; the first sync then had no NodePort address, `/healthz` answered 200
/// without any NodePort programmed, and NodePort traffic reached the node's own sockets until
/// the next sync (min-sync-period later). kube-proxy has no such window: its proxiers read
/// the interface addresses inside every syncProxyRules (nodePortAddresses.GetNodeIPs).
/// None when the receiver is already gone.
pub async fn initial(tx: &mpsc::Sender<SourceEvent>) -> anyhow::Result<Option<BTreeSet<IpAddr>>> {
    // Startup is strict: without addresses NodePorts cannot be programmed correctly.
    let first = local_addresses().context("reading this node's interface addresses")?;
    Ok(tx
        .send(SourceEvent::LocalAddresses(first.iter().copied().collect()))
        .await
        .is_ok()
        .then_some(first))
}

/// [`initial`] then [`follow`]: `LocalAddresses` now and whenever the set changes, until
/// the receiver is dropped.
pub async fn run(tx: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    match initial(&tx).await? {
        Some(first) => follow(tx, first).await,
        None => Ok(()),
    }
}

/// Send `LocalAddresses` whenever the set differs from `last` (what [`initial`] sent), until
/// the receiver is dropped.
pub async fn follow(tx: mpsc::Sender<SourceEvent>, last: BTreeSet<IpAddr>) -> anyhow::Result<()> {
    let mut last = last;
    let mut ticker = tokio::time::interval(POLL_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let now = match local_addresses() {
            Ok(a) => a,
            Err(e) => {
                // Transient (e.g. ENOMEM): keep the last known set, try again next tick.
                tracing::warn!("reading this node's interface addresses: {e}");
                continue;
            }
        };
        if now != last {
            tracing::info!(addresses = ?now, "node addresses changed");
            last = now;
            if tx
                .send(SourceEvent::LocalAddresses(last.iter().copied().collect()))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
}

/// Every address on every interface (sorted, deduplicated: an address can be on two
/// interfaces, and getifaddrs lists one entry per address per interface).
fn local_addresses() -> nix::Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.insert(IpAddr::V6(v6.ip()));
        }
        // AF_PACKET (link-layer) entries carry no IP address.
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_kept() {
        // kube-proxy's GetNodeIPs keeps loopback addresses when a CIDR covers them, so they
        // must not be filtered here. Compare against what getifaddrs lists for `lo`.
        let addrs = local_addresses().expect("getifaddrs");
        assert!(addrs.iter().all(|a| !a.is_unspecified()), "{addrs:?}");
        let lo: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter(|i| i.interface_name == "lo")
            .filter_map(|i| i.address)
            .filter_map(|a| {
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect();
        for a in &lo {
            assert!(addrs.contains(a), "{a} missing from {addrs:?}");
        }
    }

    #[tokio::test]
    async fn sends_once_then_stops_with_the_receiver() {
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run(tx));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no LocalAddresses within 5s")
            .expect("channel closed");
        let SourceEvent::LocalAddresses(list) = first else {
            panic!("expected LocalAddresses, got {first:?}")
        };
        assert_eq!(
            list,
            local_addresses().unwrap().into_iter().collect::<Vec<_>>()
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("did not stop")
            .unwrap()
            .unwrap();
    }

    /// In a private network namespace (unshare(CLONE_NEWNET) on a dedicated thread, so only
    /// that thread moves and the namespace disappears with it): adding an address is seen.
    #[test]
    fn address_change_is_sent() {
        let handle = std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!(
                    "skipping address_change_is_sent: cannot unshare a netns ({e}); needs root"
                );
                return;
            }
            let ip = |args: &[&str]| {
                // Forked from this thread, so `ip` runs in the private namespace.
                let out = std::process::Command::new("ip").args(args).output();
                match out {
                    Ok(o) if o.status.success() => true,
                    Ok(o) => panic!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
                    Err(e) => {
                        eprintln!("skipping address_change_is_sent: ip: {e}");
                        false
                    }
                }
            };
            // A current-thread runtime keeps `run` (and its getifaddrs calls) on this thread.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (tx, mut rx) = mpsc::channel(4);
                let task = tokio::spawn(run(tx));
                let recv = async |rx: &mut mpsc::Receiver<SourceEvent>| match tokio::time::timeout(
                    Duration::from_secs(10),
                    rx.recv(),
                )
                .await
                {
                    Ok(Some(SourceEvent::LocalAddresses(a))) => a,
                    other => panic!("expected LocalAddresses, got {other:?}"),
                };
                // A fresh namespace: lo is down and has no address.
                assert_eq!(recv(&mut rx).await, Vec::<IpAddr>::new());
                if !ip(&["link", "set", "lo", "up"]) {
                    return;
                }
                let up = recv(&mut rx).await;
                assert!(up.contains(&IpAddr::from([127, 0, 0, 1])), "{up:?}");
                ip(&["addr", "add", "192.0.2.7/24", "dev", "lo"]);
                let mut added = recv(&mut rx).await;
                // lo up and the address add may land in one poll or two.
                if !added.contains(&IpAddr::from([192, 0, 2, 7])) {
                    added = recv(&mut rx).await;
                }
                assert!(added.contains(&IpAddr::from([192, 0, 2, 7])), "{added:?}");
                drop(rx);
                tokio::time::timeout(Duration::from_secs(5), task)
                    .await
                    .expect("did not stop")
                    .unwrap()
                    .unwrap();
            });
        });
        handle.join().expect("netns test thread panicked");
    }
}
