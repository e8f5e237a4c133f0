//! Client side: one new connection from a bound source address, classified into an [`Outcome`].
//!
//! Reject vs drop is told by errno: a TCP RST or an ICMP port-unreachable surfaces as
//! ECONNREFUSED (for UDP only on a *connected* socket, RFC 1122 4.1.3.3 / Linux `ip_icmp_error`),
//! a silently dropped packet as a timeout.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Result;
use socket2::{Domain, Socket, Type};

use crate::lab::agent::Answer;
use crate::scenario::Protocol;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A lab server answered; `client` is the probe's own address:port.
    Answered { answer: Answer, client: SocketAddr },
    /// ECONNREFUSED (RST or ICMP unreachable).
    Refused,
    /// Nothing came back within the timeout.
    Timeout,
    /// Any other error (EHOSTUNREACH, ENETUNREACH, garbage answer, ...).
    Error(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answered { answer, client } => {
                write!(
                    f,
                    "answered by {} at {} (peer seen {}, client {})",
                    answer.name, answer.local, answer.peer, client
                )
            }
            Outcome::Refused => write!(f, "connection refused"),
            Outcome::Timeout => write!(f, "timeout"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

impl Outcome {
    /// One-line form used between `xtask lab-agent probe` and the lab.
    pub fn encode(&self) -> String {
        match self {
            Outcome::Answered { answer, client } => {
                format!(
                    "answered {} {} {} {client}",
                    answer.name, answer.local, answer.peer
                )
            }
            Outcome::Refused => "refused".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Error(e) => format!("error {}", e.replace('\n', " ")),
        }
    }

    pub fn decode(line: &str) -> Option<Outcome> {
        let line = line.trim();
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "refused" => Some(Outcome::Refused),
            "timeout" => Some(Outcome::Timeout),
            "error" => Some(Outcome::Error(rest.to_owned())),
            "answered" => {
                let f: Vec<&str> = rest.split(' ').collect();
                let [name, local, peer, client] = f[..] else {
                    return None;
                };
                let answer = Answer {
                    name: name.to_owned(),
                    local: local.parse().ok()?,
                    peer: peer.parse().ok()?,
                };
                Some(Outcome::Answered {
                    answer,
                    client: client.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// How many probes, in all, a refusal may take before a timeout counts.
pub const REFUSAL_TRIES: usize = 3;

/// Runs `probe` until it gives anything but a timeout, at most `REFUSAL_TRIES` times, for
/// probes that expect a refusal. A reject answers with an ICMP error (or RST) that the kernel
/// may rate-limit (net.ipv4.icmp_msgs_per_sec, icmp_ratelimit) or lose, and a node-originated
/// UDP probe never retransmits; a drop never answers. So a reject shows on some try, while a
/// drop still times out on every one: retrying cannot turn a drop into a pass.
pub fn retry_refusal(mut probe: impl FnMut() -> Result<Outcome>) -> Result<Outcome> {
    let mut o = probe()?;
    for _ in 1..REFUSAL_TRIES {
        if o != Outcome::Timeout {
            break;
        }
        o = probe()?;
    }
    Ok(o)
}

/// Sends one new connection from `src` (port chosen by the kernel) to `dst`. Must be called on
/// a thread inside the source's network namespace.
pub fn probe(proto: Protocol, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<Outcome> {
    match proto {
        Protocol::TCP => probe_tcp(src, dst, timeout),
        Protocol::UDP => probe_udp(src, dst, timeout),
        Protocol::SCTP => anyhow::bail!("SCTP sockets are not available on this kernel"),
    }
}

fn socket(src: IpAddr, ty: Type) -> Result<Socket> {
    let s = Socket::new(Domain::for_address(SocketAddr::new(src, 0)), ty, None)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    Ok(s)
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        _ => Outcome::Error(e.to_string()),
    }
}

fn probe_tcp(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<Outcome> {
    let s = socket(src, Type::STREAM)?;
    if let Err(e) = s.connect_timeout(&dst.into(), timeout) {
        return Ok(classify(&e));
    }
    let client = s
        .local_addr()?
        .as_socket()
        .unwrap_or(SocketAddr::new(src, 0));
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(timeout))?;
    let mut buf = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 512];
    while Instant::now() < deadline && !buf.contains(&b'\n') {
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Ok(classify(&e)),
        }
    }
    Ok(parse(&buf, client))
}

fn probe_udp(src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<Outcome> {
    let s: UdpSocket = socket(src, Type::DGRAM)?.into();
    s.connect(dst)?;
    let client = s.local_addr()?;
    let deadline = Instant::now() + timeout;
    if let Err(e) = s.send(b"shunt-lab probe\n") {
        // A node-originated datagram hitting a reject (or drop) rule in the output path fails
        // with EPERM (NF_DROP -> -EPERM in nf_hook_slow); for reject the ICMP error is delivered
        // right after, so keep waiting for it instead of deciding here.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Ok(classify(&e));
        }
    }
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Outcome::Timeout);
        }
        s.set_read_timeout(Some(left))?;
        match s.recv(&mut buf) {
            Ok(n) => return Ok(parse(&buf[..n], client)),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Ok(classify(&e)),
        }
    }
}

fn parse(buf: &[u8], client: SocketAddr) -> Outcome {
    let text = String::from_utf8_lossy(buf);
    match Answer::parse(&text) {
        Some(answer) => Outcome::Answered { answer, client },
        None => Outcome::Error(format!("unexpected answer {:?}", text.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_retries_are_bounded_and_cannot_turn_a_drop_into_a_reject() {
        let run = |seq: Vec<Outcome>| {
            let mut it = seq.into_iter();
            let mut calls = 0;
            let o = retry_refusal(|| {
                calls += 1;
                Ok(it.next().unwrap_or(Outcome::Timeout))
            })
            .unwrap();
            (o, calls)
        };
        // A lost ICMP error, then the refusal: refused.
        assert_eq!(
            run(vec![Outcome::Timeout, Outcome::Refused]),
            (Outcome::Refused, 2)
        );
        // A drop: timeout on every try, and no more than REFUSAL_TRIES tries.
        assert_eq!(run(vec![]), (Outcome::Timeout, REFUSAL_TRIES));
        // Anything but a timeout decides at once.
        assert_eq!(run(vec![Outcome::Refused]), (Outcome::Refused, 1));
    }

    #[test]
    fn outcome_encoding_roundtrips() {
        let a = Answer {
            name: "ep-10.0.0.1".into(),
            local: "10.0.0.1:80".parse().unwrap(),
            peer: "[::1]:5".parse().unwrap(),
        };
        for o in [
            Outcome::Answered {
                answer: a,
                client: "10.0.0.2:7".parse().unwrap(),
            },
            Outcome::Refused,
            Outcome::Timeout,
            Outcome::Error("No route to host (os error 113)".into()),
        ] {
            assert_eq!(Outcome::decode(&o.encode()), Some(o));
        }
        assert_eq!(Outcome::decode("answered x 1.2.3.4:1"), None);
        assert_eq!(Outcome::decode("bogus"), None);
    }
}
