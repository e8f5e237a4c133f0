//! Client load: TCP requests (connect, greeting, one echo, close) at a steady rate from
//! threads that joined a source namespace, every request counted, every failure kept with its
//! time and reason; and the TCP helpers the restart scenario's long-lived connections share.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::agent::Answer;
use crate::lab::netns;

pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn read_line(r: &mut BufReader<TcpStream>) -> Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed by peer");
    }
    Ok(line)
}

/// Connects and reads the server's greeting (who answered).
pub fn open(dst: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, Answer)> {
    let c = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut r = BufReader::new(c.try_clone()?);
    let hello = read_line(&mut r)?;
    let a = Answer::parse(&hello).with_context(|| format!("bad greeting {hello:?}"))?;
    Ok((c, r, a))
}

/// One line out, the same line back.
pub fn exchange(c: &mut TcpStream, r: &mut BufReader<TcpStream>, seq: u64) -> Result<()> {
    let msg = format!("seq {seq}\n");
    c.write_all(msg.as_bytes())?;
    let back = read_line(r)?;
    if back != msg {
        bail!("echo mismatch: sent {msg:?}, got {back:?}");
    }
    Ok(())
}

/// One complete short request; the name of the endpoint that answered.
pub fn request(dst: SocketAddr, seq: u64) -> Result<String> {
    let (mut c, mut r, a) = open(dst)?;
    exchange(&mut c, &mut r, seq)?;
    Ok(a.name)
}

#[derive(Debug, Clone)]
pub struct Hit {
    /// Since the load started.
    pub at: Duration,
    pub by: String,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Duration,
    pub dst: SocketAddr,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Tally {
    pub hits: Vec<Hit>,
    pub failures: Vec<Failure>,
}

impl Tally {
    /// Requests answered per endpoint name, for hits in `[from, to)`.
    pub fn by_endpoint(&self, from: Duration, to: Duration) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for h in self.hits.iter().filter(|h| h.at >= from && h.at < to) {
            *m.entry(h.by.clone()).or_insert(0) += 1;
        }
        m
    }

    /// "N failed of M" plus the first few failures.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} failed of {} requests",
            self.failures.len(),
            self.failures.len() + self.hits.len()
        );
        for f in self.failures.iter().take(5) {
            s.push_str(&format!(
                "; at {:.2} s to {}: {}",
                f.at.as_secs_f64(),
                f.dst,
                f.error
            ));
        }
        s
    }
}

/// Running request streams; `finish` stops and joins them.
pub struct Load {
    pub start: Instant,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Load {
    /// One thread per (namespace path, destination), a request every `every`, until `finish`
    /// or `limit` (the hard bound on every stream).
    pub fn start(streams: &[(String, SocketAddr)], every: Duration, limit: Duration) -> Load {
        let start = Instant::now();
        let end = start + limit;
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = streams
            .iter()
            .map(|(ns, dst)| {
                let (ns, dst, stop, tally) = (ns.clone(), *dst, stop.clone(), tally.clone());
                std::thread::spawn(move || -> Result<()> {
                    netns::enter(&ns)?;
                    let mut seq = 0;
                    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
                        let r = request(dst, seq);
                        let at = start.elapsed();
                        let mut t = tally.lock().expect("tally");
                        match r {
                            Ok(by) => t.hits.push(Hit { at, by }),
                            Err(e) => t.failures.push(Failure {
                                at,
                                dst,
                                error: format!("{e:#}"),
                            }),
                        }
                        drop(t);
                        seq += 1;
                        std::thread::sleep(every);
                    }
                    Ok(())
                })
            })
            .collect();
        Load {
            start,
            stop,
            tally,
            threads,
        }
    }

    pub fn finish(self) -> Result<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        }
        let t = std::mem::take(&mut *self.tally.lock().expect("tally"));
        Ok(t)
    }
}
