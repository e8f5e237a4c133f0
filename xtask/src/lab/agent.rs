//! Servers the lab runs inside namespaces: endpoint pods, the node's node-port listener and the
//! router's sink. They run as threads of this process that joined the namespace, so they can
//! never outlive the lab (a SIGKILLed run takes them along) and stop when their guard drops.
//!
//! Every answer is one line: `shunt-lab name=NAME local=IP:PORT peer=IP:PORT` — the address the
//! connection arrived at and the peer the server saw, which is what tells the endpoint hit and
//! masquerade apart. In HTTP mode (demo) the same line is the body of an HTTP/1.0 response.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Socket, Type};

use crate::lab::netns;
use crate::scenario::Protocol;

const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Line,
    Http,
    /// Soak: the answer line on accept, then every line the client sends is echoed back until
    /// it closes; one thread per connection so long-lived connections run side by side.
    Echo,
}

pub fn answer_line(name: &str, local: SocketAddr, peer: SocketAddr) -> String {
    format!("shunt-lab name={name} local={local} peer={peer}\n")
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Answer {
    pub fn parse(text: &str) -> Option<Answer> {
        let line = text.lines().find(|l| l.starts_with("shunt-lab "))?;
        let mut name = None;
        let mut local = None;
        let mut peer = None;
        for f in line.split_whitespace().skip(1) {
            let (k, v) = f.split_once('=')?;
            match k {
                "name" => name = Some(v.to_owned()),
                "local" => local = v.parse().ok(),
                "peer" => peer = v.parse().ok(),
                _ => {}
            }
        }
        Some(Answer {
            name: name?,
            local: local?,
            peer: peer?,
        })
    }
}

/// Running listeners; dropping stops and joins them.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Servers {
    pub fn new() -> Self {
        Servers {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Starts one listener per (protocol, address) in namespace `ns_path`, answering as `name`.
    /// Returns once every socket is bound (bounded wait), or the first bind error.
    pub fn spawn(
        &mut self,
        ns_path: &str,
        name: &str,
        listen: &[(Protocol, SocketAddr)],
        mode: Mode,
    ) -> Result<()> {
        let (tx, rx) = mpsc::channel::<Result<()>>();
        let mut started = 0;
        for &(proto, addr) in listen {
            if proto == Protocol::SCTP {
                continue; // this kernel cannot create SCTP sockets
            }
            let (tx, stop, ns, name) = (
                tx.clone(),
                self.stop.clone(),
                ns_path.to_owned(),
                name.to_owned(),
            );
            started += 1;
            self.threads.push(std::thread::spawn(move || {
                let bound = netns::enter(&ns).and_then(|()| bind(proto, addr));
                match bound {
                    Err(e) => {
                        let _ = tx.send(Err(
                            e.context(format!("{name}: listening on {proto:?} {addr}"))
                        ));
                    }
                    Ok(sock) => {
                        let _ = tx.send(Ok(()));
                        match proto {
                            Protocol::TCP if mode == Mode::Echo => {
                                serve_echo(sock.into(), &name, &stop)
                            }
                            Protocol::TCP => serve_tcp(sock.into(), &name, mode, &stop),
                            _ => serve_udp(sock.into(), &name, &stop),
                        }
                    }
                }
            }));
        }
        for _ in 0..started {
            rx.recv_timeout(Duration::from_secs(10))
                .map_err(|_| anyhow!("listener did not start within 10 s"))??;
        }
        Ok(())
    }
}

fn bind(proto: Protocol, addr: SocketAddr) -> Result<Socket> {
    let ty = if proto == Protocol::TCP {
        Type::STREAM
    } else {
        Type::DGRAM
    };
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    s.set_reuse_address(true)?;
    // The sink binds VIPs that are "local" only through the router's iif policy table, not the
    // local table. Binding them needs freebind, and *answering* from them needs a transparent
    // socket: the reply's output route lookup otherwise rejects the non-local source
    // (ip_route_output_key_hash_rcu; IP_TRANSPARENT sets FLOWI_FLAG_ANYSRC), which shows up as
    // IpOutNoRoutes and a timeout at the client. Harmless for ordinary local addresses.
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    }
    s.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    if proto == Protocol::TCP {
        s.listen(128)?;
    }
    // Bounded blocking: accept/recv honour SO_RCVTIMEO on Linux, so the loop polls `stop`.
    s.set_read_timeout(Some(POLL))?;
    Ok(s)
}

fn serve_tcp(l: TcpListener, name: &str, mode: Mode, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((mut c, peer)) = l.accept() else {
            continue;
        };
        let local = c.local_addr().unwrap_or(peer);
        let line = answer_line(name, local, peer);
        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
        match mode {
            Mode::Line | Mode::Echo => {
                let _ = c.write_all(line.as_bytes());
            }
            Mode::Http => {
                // Read the request head (bounded) so the client never gets a reset for unread data.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}",
                    line.len()
                );
                let _ = c.write_all(resp.as_bytes());
            }
        }
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
}

/// Echo server: a thread per connection, all joined before returning (they poll `stop` with
/// the same bounded read timeout as the listener), so none outlives the lab.
fn serve_echo(l: TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        conns.retain(|t| !t.is_finished());
        let Ok((mut c, peer)) = l.accept() else {
            continue;
        };
        let local = c.local_addr().unwrap_or(peer);
        let line = answer_line(name, local, peer);
        let stop = stop.clone();
        conns.push(std::thread::spawn(move || {
            let _ = c.set_read_timeout(Some(POLL));
            let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
            if c.write_all(line.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    for t in conns {
        let _ = t.join();
    }
}

fn serve_udp(s: UdpSocket, name: &str, stop: &AtomicBool) {
    let local = s.local_addr().ok();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let Ok((_, peer)) = s.recv_from(&mut buf) else {
            continue;
        };
        let Some(local) = local else { continue };
        let _ = s.send_to(answer_line(name, local, peer).as_bytes(), peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_roundtrip_v4_and_v6() {
        let l: SocketAddr = "10.180.0.1:80".parse().unwrap();
        let p: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let a = Answer::parse(&answer_line("pod-1", l, p)).unwrap();
        assert_eq!(
            a,
            Answer {
                name: "pod-1".into(),
                local: l,
                peer: p
            }
        );
        let http = format!("HTTP/1.0 200 OK\r\n\r\n{}", answer_line("x", l, p));
        assert_eq!(Answer::parse(&http).unwrap().name, "x");
        assert!(Answer::parse("garbage").is_none());
        assert!(Answer::parse("shunt-lab name=x local=nope peer=1.2.3.4:5").is_none());
    }
}
