//! The tc program's attachments, followed through netlink: interfaces that appear after a
//! sync (a new pod's host-side veth) get the program as soon as the kernel announces them,
//! instead of at the next sync (up to `--sync-period` later when nothing else changes).
//!
//! Dataplane-internal: this knows interfaces and ifindexes, never Services or Pods. The
//! sync's full re-scan ([`TcLinks::scan`]) stays the safety net; the watcher only makes it
//! happen sooner for one interface.
//!
//! Kernel behaviour relied on:
//! - A `NETLINK_ROUTE` socket bound to the `RTMGRP_LINK` group gets an `RTM_NEWLINK` for
//!   every link registered in (or moved into) its network namespace and for every change
//!   of one (rtmsg_ifinfo from register_netdevice, dev_change_name, __dev_notify_flags), and
//!   an `RTM_DELLINK` when one is unregistered (rtnl_notify in unregister_netdevice_many).
//! - A just-created veth is down (no IFF_UP until `ip link set up`). tcx attach does not
//!   need the device up (tcx_prog_attach only looks the device up by ifindex), so the program
//!   is attached at creation and is in place before the first packet can arrive.
//! - When the socket's receive buffer overflows, recvmsg fails once with ENOBUFS
//!   (netlink_overrun): events were lost, so the watcher re-scans every interface.
//! - A tcx link dies with its device (dev_tcx_uninstall on unregister); its pin then only
//!   holds a defunct link, which is why the pin is removed on `RTM_DELLINK`.
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, TcAttachType};
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt, socket,
    sockopt,
};
use tracing::{debug, info, warn};

use super::{Interfaces, TC_INGRESS, io, other, replace_link};
use crate::dataplane::DataplaneError;

/// rtnetlink.h: multicast group of link events (RTMGRP_LINK, group 1).
const RTMGRP_LINK: u32 = 1;
/// rtnetlink.h message types.
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
/// if_link.h: the interface name attribute.
const IFLA_IFNAME: u16 = 3;
/// sizeof(struct nlmsghdr), sizeof(struct ifinfomsg).
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
/// Receive buffer asked for: link events are small (about 1.5 KiB each with all their
/// attributes); this holds a few hundred, so a burst of pod creations is not an overrun.
const RCVBUF: usize = 1 << 20;
/// One datagram read at a time; a link message fits (the kernel sizes them by
/// if_nlmsg_size, well below this), a longer one is truncated and skipped.
const READ_BUF: usize = 64 * 1024;
/// Datagrams handled per wakeup before polling again (the stop pipe stays responsive).
const MAX_BATCH: usize = 256;

/// The tc program's own handle and the interfaces it is attached to by this instance,
/// shared by the sync (full scan) and the watcher (one interface at a time).
pub(super) struct TcLinks {
    /// A second handle on the loaded tc program, so the watcher thread can attach it
    /// without the sync's `Ebpf` (which it must not lock across a whole sync).
    prog: SchedClassifier,
    /// ifindexes the program is attached to by this instance.
    pub(super) attached: BTreeSet<u32>,
    pin_dir: PathBuf,
}

impl TcLinks {
    /// Takes a second handle on `prog` through a transient pin (aya opens programs only by
    /// pin or from an object); the pin is removed at once, the handle keeps the program.
    pub(super) fn new(prog: &mut SchedClassifier, pin_dir: &Path) -> Result<Self, DataplaneError> {
        let tmp = pin_dir.join("tcxprog");
        let _ = std::fs::remove_file(&tmp);
        prog.pin(&tmp)
            .map_err(|e| other(format!("pinning {TC_INGRESS} at {}", tmp.display()), e))?;
        let opened = SchedClassifier::from_pin(&tmp);
        std::fs::remove_file(&tmp).map_err(|e| io(format!("removing {}", tmp.display()), e))?;
        Ok(TcLinks {
            prog: opened.map_err(|e| other(format!("opening {}", tmp.display()), e))?,
            attached: BTreeSet::new(),
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Link pins are named by ifindex: bpffs refuses names with a dot (bpf_lookup in
    /// kernel/bpf/inode.c), which interface names like `eth0.100` have.
    pub(super) fn pin(&self, ifindex: u32, new: bool) -> PathBuf {
        let prefix = if new { "tcxnew_" } else { "tcx_" };
        self.pin_dir.join(format!("{prefix}{ifindex}"))
    }

    /// Attaches the program at tcx ingress of `ifname` (`ifindex`) unless this instance
    /// already did; the link is pinned make-before-break over a previous run's.
    pub(super) fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DataplaneError> {
        if self.attached.contains(&ifindex) {
            return Ok(());
        }
        let id = self
            .prog
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|e| other(format!("attaching {TC_INGRESS} to {ifname} ingress"), e))?;
        let link: FdLink = self
            .prog
            .take_link(id)
            .map_err(|e| other(ifname, e))?
            .try_into()
            .map_err(|e| other(ifname, e))?;
        replace_link(link, &self.pin(ifindex, true), &self.pin(ifindex, false))?;
        self.attached.insert(ifindex);
        Ok(())
    }

    /// The device `ifindex` is gone: its link died with it; drop the pin and forget it.
    fn forget(&mut self, ifindex: u32) {
        self.attached.remove(&ifindex);
        let pin = self.pin(ifindex, false);
        match std::fs::remove_file(&pin) {
            Ok(()) => debug!(ifindex, "removed the link pin of a deleted interface"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(pin = %pin.display(), "removing a deleted interface's link pin: {e}"),
        }
    }

    /// Full scan: attach to every wanted interface, forget the ones that are gone, and
    /// remove link pins (also a previous run's) of interfaces that no longer exist.
    /// Returns the ifindexes present.
    pub(super) fn scan(&mut self, sel: &Interfaces) -> Result<BTreeSet<u32>, DataplaneError> {
        let ifaces: Vec<String> = match sel {
            Interfaces::Named(v) => v.clone(),
            Interfaces::All => nix::net::if_::if_nameindex()
                .map_err(|e| io("listing interfaces", e.into()))?
                .iter()
                // Loopback included: the node's own traffic to its node addresses
                // (NodePorts) is translated there, so it can be masqueraded.
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect(),
        };
        let mut present = BTreeSet::new();
        for ifname in &ifaces {
            let Ok(ifindex) = nix::net::if_::if_nametoindex(ifname.as_str()) else {
                // Gone between listing and now (a pod being deleted); a Named interface
                // that does not exist is an error.
                if matches!(sel, Interfaces::Named(_)) {
                    return Err(other(format!("interface {ifname}"), "does not exist"));
                }
                continue;
            };
            present.insert(ifindex);
            self.attach(ifname, ifindex)?;
        }
        self.attached.retain(|i| present.contains(i));
        let dir = &self.pin_dir;
        let entries =
            std::fs::read_dir(dir).map_err(|e| io(format!("reading {}", dir.display()), e))?;
        for ent in entries.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(idx) = name
                .strip_prefix("tcx_")
                .and_then(|i| i.parse::<u32>().ok())
                && !present.contains(&idx)
                && nix::net::if_::if_indextoname(idx).is_err()
            {
                let _ = std::fs::remove_file(ent.path());
            }
        }
        Ok(present)
    }
}

/// One link event out of a netlink datagram.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LinkEvent {
    /// RTM_NEWLINK: created, moved in, renamed, or changed (flags, up/down).
    New { ifindex: u32, name: String },
    /// RTM_DELLINK: unregistered (or moved out of this namespace).
    Del { ifindex: u32 },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
/// NLMSG_ALIGN / RTA_ALIGN: 4 bytes.
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses the link messages of one datagram (several nlmsghdr back to back, each an
/// ifinfomsg then rtattrs). Anything malformed ends parsing of that datagram; other
/// message types are skipped.
pub(super) fn parse(buf: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(len) = u32_at(buf, at).map(|l| l as usize) {
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        let msg = &buf[at..at + len];
        at += align4(len);
        let Some(ty) = u16_at(msg, 4) else { break };
        if ty != RTM_NEWLINK && ty != RTM_DELLINK {
            continue;
        }
        // ifinfomsg: family u8, pad u8, type u16, index i32, flags u32, change u32.
        let Some(ifindex) = u32_at(msg, NLMSG_HDRLEN + 4) else {
            continue;
        };
        if ty == RTM_DELLINK {
            out.push(LinkEvent::Del { ifindex });
            continue;
        }
        let mut a = NLMSG_HDRLEN + IFINFOMSG_LEN;
        let mut name = None;
        while let (Some(alen), Some(aty)) = (u16_at(msg, a), u16_at(msg, a + 2)) {
            let alen = alen as usize;
            if alen < 4 || a + alen > msg.len() {
                break;
            }
            // The nested/byte-order flag bits are not used by IFLA_IFNAME.
            if aty & 0x3fff == IFLA_IFNAME {
                let v = &msg[a + 4..a + alen];
                let v = v.split(|b| *b == 0).next().unwrap_or(v);
                name = Some(String::from_utf8_lossy(v).into_owned());
                break;
            }
            a += align4(alen);
        }
        if let Some(name) = name {
            out.push(LinkEvent::New { ifindex, name });
        }
    }
    out
}

/// The netlink watcher thread; stopped (and joined) on drop.
pub(super) struct Watcher {
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Subscribes to link events in the calling thread's network namespace (the socket is
    /// created here, so the thread's namespace does not matter) and starts the thread.
    pub(super) fn start(
        links: Arc<Mutex<TcLinks>>,
        sel: Interfaces,
    ) -> Result<Watcher, DataplaneError> {
        let sock = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| io("opening a NETLINK_ROUTE socket", e.into()))?;
        // Best effort: a smaller buffer only makes an overrun (then a full scan) likelier.
        let _ = setsockopt(&sock, sockopt::RcvBuf, &RCVBUF);
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))
            .map_err(|e| io("binding to RTMGRP_LINK", e.into()))?;
        let (stop_rx, stop_tx) = stop_pipe()?;
        let thread = std::thread::Builder::new()
            .name("shunt-links".into())
            .spawn(move || run(sock, stop_rx, &links, &sel))
            .map_err(|e| io("starting the link watcher", e))?;
        Ok(Watcher {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// The pipe whose write end the Watcher drops to stop its thread. Close-on-exec: a child
/// spawned meanwhile (ip, iptables, a test's client) must not inherit the write end, or
/// dropping the Watcher would not close the pipe, and the thread would see the stop only
/// once that child exits (a map growth once waited 60 s on a test's client that way).
fn stop_pipe() -> Result<(OwnedFd, OwnedFd), DataplaneError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io("creating the stop pipe", e.into()))
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Closing the write end makes the read end readable (EOF): the thread returns.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wanted(sel: &Interfaces, name: &str) -> bool {
    match sel {
        Interfaces::All => true,
        Interfaces::Named(v) => v.iter().any(|n| n == name),
    }
}

fn run(sock: OwnedFd, stop: OwnedFd, links: &Mutex<TcLinks>, sel: &Interfaces) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("link watcher: poll failed, new interfaces wait for the next sync: {e}");
                return;
            }
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        for _ in 0..MAX_BATCH {
            match recv(
                sock.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => handle(&parse(&buf[..n]), links, sel),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ENOBUFS) => {
                    info!("link watcher: netlink overrun, re-scanning every interface");
                    let res = lock(links).scan(sel);
                    if let Err(e) = res {
                        warn!("link watcher: re-scan after an overrun: {e}");
                    }
                }
                Err(e) => {
                    warn!("link watcher: recv failed, new interfaces wait for the next sync: {e}");
                    return;
                }
            }
        }
    }
}

fn lock(links: &Mutex<TcLinks>) -> std::sync::MutexGuard<'_, TcLinks> {
    // A panic while holding the lock left at worst a stale `attached` set, which the next
    // scan corrects.
    links.lock().unwrap_or_else(|p| p.into_inner())
}

fn handle(events: &[LinkEvent], links: &Mutex<TcLinks>, sel: &Interfaces) {
    for ev in events {
        match ev {
            LinkEvent::New { ifindex, name } if wanted(sel, name) => {
                let mut l = lock(links);
                if l.attached.contains(ifindex) {
                    continue;
                }
                match l.attach(name, *ifindex) {
                    Ok(()) => info!(interface = %name, ifindex, "attached to a new interface"),
                    // Deleted again before we got here (its RTM_DELLINK follows), or a
                    // transient failure the next sync's scan retries.
                    Err(e) => warn!(interface = %name, "attaching to a new interface: {e}"),
                }
            }
            LinkEvent::New { .. } => {}
            LinkEvent::Del { ifindex } => lock(links).forget(*ifindex),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, ifindex: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        for (t, v) in attrs {
            let len = 4 + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize(align4(body.len()), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn stop_pipe_is_not_inherited_by_children() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let (rx, tx) = stop_pipe().unwrap();
        for fd in [&rx, &tx] {
            let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
            assert!(flags.contains(FdFlag::FD_CLOEXEC));
        }
    }

    #[test]
    fn parses_new_and_del_links_and_skips_the_rest() {
        let mut dgram = msg(
            RTM_NEWLINK,
            7,
            &[(4, &1500u32.to_ne_bytes()), (IFLA_IFNAME, b"veth1\0")],
        );
        dgram.extend(msg(RTM_DELLINK, 9, &[]));
        // RTM_NEWADDR (20): not a link message.
        dgram.extend(msg(20, 3, &[(IFLA_IFNAME, b"x\0")]));
        // A link message without a name yields nothing.
        dgram.extend(msg(RTM_NEWLINK, 11, &[(4, &1500u32.to_ne_bytes())]));
        assert_eq!(
            parse(&dgram),
            vec![
                LinkEvent::New {
                    ifindex: 7,
                    name: "veth1".into()
                },
                LinkEvent::Del { ifindex: 9 },
            ]
        );
    }

    #[test]
    fn truncated_datagrams_stop_parsing() {
        let m = msg(RTM_NEWLINK, 7, &[(IFLA_IFNAME, b"veth1\0")]);
        assert!(parse(&m[..m.len() - 1]).is_empty());
        // An attribute claiming more than the message holds.
        let mut bad = msg(RTM_NEWLINK, 7, &[(IFLA_IFNAME, b"veth1\0")]);
        let at = NLMSG_HDRLEN + IFINFOMSG_LEN;
        bad[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse(&bad).is_empty());
        // A header length below the header size.
        assert!(parse(&[4, 0, 0, 0, 16, 0]).is_empty());
    }
}
