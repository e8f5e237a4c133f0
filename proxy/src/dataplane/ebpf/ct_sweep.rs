//! The agent's side of ebpf conntrack timeouts: the timeouts map the programs read, and the
//! periodic sweep that deletes expired entries (the programs delete an expired entry only
//! when a packet meets it; without the sweep only LRU pressure would reclaim the rest).
//! Cilium's agent does the same with its CT garbage collector (pkg/maps/ctmap/gc).
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::HashMap;
use shunt_abi::{CtKey, CtTimeouts, CtValue, names};

use super::{map_mut, other};
use crate::config::ConntrackSettings;
use crate::dataplane::DataplaneError;
use crate::plan::ebpf::Family;

/// How often the sweep runs at most (it runs from `sync`, which happens at least every
/// --iptables-sync-period).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Entries looked at per map per sweep: bounds the work of one sweep (the CT maps hold up
/// to `limits::CT` entries; a full pass then takes a few sweeps).
pub const SWEEP_BUDGET: usize = 65_536;

/// The timeouts map's value for kube-proxy's conntrack settings: whole seconds, 0 = the
/// kernel's default (the same meaning the settings' 0 has in netfilter modes).
pub fn timeouts(s: &ConntrackSettings) -> CtTimeouts {
    let secs = |d: Duration| {
        if d.is_zero() {
            0
        } else {
            u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
        }
    };
    CtTimeouts {
        tcp_established: secs(s.tcp_established_timeout),
        tcp_close_wait: secs(s.tcp_close_wait_timeout),
        udp: secs(s.udp_timeout),
        udp_stream: secs(s.udp_stream_timeout),
    }
}

/// Write the timeouts map (one entry).
pub fn write_timeouts(ebpf: &mut Ebpf, t: CtTimeouts) -> Result<(), DataplaneError> {
    aya::maps::Array::<_, CtTimeouts>::try_from(map_mut(ebpf, names::CT_TIMEOUTS)?)
        .map_err(|e| other(names::CT_TIMEOUTS, e))?
        .set(0, t, 0)
        .map_err(|e| other(names::CT_TIMEOUTS, e))
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The keys among `entries` that have expired at `now` (PURE).
pub fn expired<A: Copy>(
    entries: impl IntoIterator<Item = (CtKey<A>, CtValue<A>)>,
    t: &CtTimeouts,
    now: u64,
) -> Vec<CtKey<A>> {
    entries
        .into_iter()
        .filter(|(k, v)| t.left_ns(k.proto, v.pad2, v.last_seen_ns, now).is_none())
        .map(|(k, _)| k)
        .collect()
}

/// Delete up to `SWEEP_BUDGET` entries' worth of expired entries from one family's map;
/// returns how many were deleted.
pub fn sweep_family<F: Family>(
    ebpf: &mut Ebpf,
    t: &CtTimeouts,
    now: u64,
) -> Result<usize, DataplaneError> {
    let name = F::MAPS.ct;
    let mut map: HashMap<_, CtKey<F::Wire>, CtValue<F::Wire>> =
        HashMap::try_from(map_mut(ebpf, name)?).map_err(|e| other(name, e))?;
    // An entry that vanishes during the walk (the program deleted it, LRU eviction) ends
    // the walk's chain for that key only; errors are skipped, not fatal.
    let seen: Vec<_> = map
        .iter()
        .take(SWEEP_BUDGET)
        .filter_map(Result::ok)
        .collect();
    let dead = expired(seen, t, now);
    let mut n = 0;
    for k in &dead {
        if map.remove(k).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// When the last sweep ran.
#[derive(Debug, Default)]
pub struct Sweeper {
    last: Option<Instant>,
}

impl Sweeper {
    /// Sweep both families if `SWEEP_INTERVAL` has passed since the last sweep.
    pub fn maybe_sweep<F4: Family, F6: Family>(
        &mut self,
        ebpf: &mut Ebpf,
        t: &CtTimeouts,
    ) -> Result<usize, DataplaneError> {
        if self.last.is_some_and(|l| l.elapsed() < SWEEP_INTERVAL) {
            return Ok(0);
        }
        self.last = Some(Instant::now());
        let now = now_ns();
        Ok(sweep_family::<F4>(ebpf, t, now)? + sweep_family::<F6>(ebpf, t, now)?)
    }
}

#[cfg(test)]
mod tests {
    use shunt_abi::{ct_dir, ct_state as s};

    use super::*;

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    const F: u8 = ct_dir::FORWARD;
    const R: u8 = ct_dir::REPLY;

    #[test]
    fn state_transitions_table() {
        let st = |v: u8| u32::from(v);
        // (state before, direction, proto, flags, state after)
        let cases = [
            (s::initial(TCP, SYN), F, TCP, SYN, st(s::TCP_SYN_SENT)),
            (
                st(s::TCP_SYN_SENT),
                R,
                TCP,
                SYN | ACK,
                st(s::TCP_ESTABLISHED),
            ),
            (st(s::TCP_ESTABLISHED), F, TCP, ACK, st(s::TCP_ESTABLISHED)),
            (
                st(s::TCP_ESTABLISHED),
                F,
                TCP,
                FIN | ACK,
                st(s::TCP_CLOSE_WAIT) | s::FIN_FORWARD,
            ),
            (
                st(s::TCP_CLOSE_WAIT) | s::FIN_FORWARD,
                R,
                TCP,
                FIN | ACK,
                st(s::TCP_TIME_WAIT) | s::FIN_FORWARD | s::FIN_REPLY,
            ),
            (
                st(s::TCP_CLOSE_WAIT) | s::FIN_REPLY,
                R,
                TCP,
                ACK,
                st(s::TCP_CLOSE_WAIT) | s::FIN_REPLY,
            ),
            (st(s::TCP_ESTABLISHED), R, TCP, RST, st(s::TCP_CLOSE)),
            (st(s::TCP_CLOSE), F, TCP, ACK, st(s::TCP_CLOSE)),
            (st(s::NONE), F, TCP, ACK, st(s::TCP_ESTABLISHED)),
            (s::initial(TCP, ACK), F, TCP, ACK, st(s::TCP_ESTABLISHED)),
            (s::initial(UDP, 0), F, UDP, 0, st(s::UDP_UNREPLIED)),
            (st(s::UDP_UNREPLIED), R, UDP, 0, st(s::UDP_REPLIED)),
            (st(s::UDP_REPLIED), F, UDP, 0, st(s::UDP_REPLIED)),
            (st(s::NONE), F, UDP, 0, st(s::UDP_REPLIED)),
        ];
        for (i, (before, dir, proto, flags, after)) in cases.into_iter().enumerate() {
            assert_eq!(
                s::next(before, dir, proto, flags),
                after,
                "case {i}: {} + {flags:#x}",
                s::name(before)
            );
        }
        assert!(s::reopens(st(s::TCP_TIME_WAIT), SYN));
        assert!(s::reopens(st(s::TCP_CLOSE), SYN));
        assert!(!s::reopens(st(s::TCP_ESTABLISHED), SYN));
        assert!(!s::reopens(st(s::TCP_TIME_WAIT), SYN | ACK));
    }

    #[test]
    fn timeouts_from_settings_and_defaults() {
        let d = ConntrackSettings::default();
        let t = timeouts(&d);
        assert_eq!(
            t,
            CtTimeouts {
                tcp_established: 86400,
                tcp_close_wait: 3600,
                udp: 0,
                udp_stream: 0
            }
        );
        let st = |v: u8| u32::from(v);
        assert_eq!(t.secs(TCP, st(s::TCP_ESTABLISHED)), 86400);
        assert_eq!(t.secs(TCP, st(s::TCP_CLOSE_WAIT) | s::FIN_FORWARD), 3600);
        assert_eq!(t.secs(TCP, st(s::TCP_SYN_SENT)), 120);
        assert_eq!(t.secs(TCP, st(s::TCP_TIME_WAIT)), 120);
        assert_eq!(t.secs(TCP, st(s::TCP_CLOSE)), 10);
        assert_eq!(t.secs(UDP, st(s::UDP_UNREPLIED)), 30, "0 = kernel default");
        assert_eq!(t.secs(UDP, st(s::UDP_REPLIED)), 120);
        assert_eq!(
            t.secs(TCP, st(s::NONE)),
            86400,
            "adopted entry: established"
        );
        let z = timeouts(&ConntrackSettings {
            tcp_established_timeout: Duration::ZERO,
            udp_timeout: Duration::from_millis(10),
            udp_stream_timeout: Duration::from_secs(45),
            ..d
        });
        assert_eq!(
            z.secs(TCP, st(s::TCP_ESTABLISHED)),
            432_000,
            "0 = kernel's 5 days"
        );
        assert_eq!(z.secs(UDP, st(s::UDP_UNREPLIED)), 1, "sub-second rounds up");
        assert_eq!(z.secs(UDP, st(s::UDP_REPLIED)), 45);
    }

    #[test]
    fn expired_picks_only_idle_entries() {
        let t = CtTimeouts::default();
        let sec = 1_000_000_000u64;
        let now = 1000 * sec;
        let e = |sport: u16, proto: u8, pad: u8, idle: u64| {
            (
                CtKey::<u32> {
                    sport,
                    proto,
                    ..Default::default()
                },
                CtValue::<u32> {
                    pad2: u32::from(pad),
                    last_seen_ns: now - idle * sec,
                    ..Default::default()
                },
            )
        };
        let got = expired(
            [
                e(1, UDP, s::UDP_UNREPLIED, 29),
                e(2, UDP, s::UDP_UNREPLIED, 31),
                e(3, UDP, s::UDP_REPLIED, 31),
                e(4, TCP, s::TCP_CLOSE, 11),
                e(5, TCP, s::TCP_SYN_SENT, 100),
            ],
            &t,
            now,
        );
        assert_eq!(got.iter().map(|k| k.sport).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(
            t.left_ns(UDP, u32::from(s::UDP_UNREPLIED), now - 29 * sec, now),
            Some(sec)
        );
    }
}
