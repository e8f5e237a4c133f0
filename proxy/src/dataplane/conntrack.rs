//! IMPURE: lists the kernel's UDP conntrack entries and deletes the ones `plan::conntrack`
//! calls stale, with the `conntrack` tool (conntrack-tools), inside whatever network
//! namespace the command prefix selects.
//!
//! Use: `Conntrack::clean_stale_udp(snapshots, deleted)` after the new rules are in place (so
//! that a client's next packet is NATed by them, as upstream orders it). It lists each
//! family's UDP entries (`conntrack -L -p udp -f ipv4|ipv6`), asks
//! `plan::conntrack::stale_udp_filters` which are stale, and deletes them with one precise
//! `conntrack -D` per (service frontend, stale reply source). Only `deleted` (the UDP service
//! ports removed since the last sync, `plan::conntrack::deleted_udp_ports`) comes from an
//! earlier sync; with none (after a restart) healthy flows are never touched.
use std::process::{Command, Stdio};

use super::DataplaneError;
use crate::model::{IpFamily, Protocol, ServicePort, Snapshot};
use crate::plan::conntrack::{ConntrackEntry, ConntrackFilter, stale_udp_filters};

/// Runs the `conntrack` tool.
#[derive(Clone, Debug)]
pub struct Conntrack {
    argv: Vec<String>,
}

fn family_arg(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `conntrack -D` arguments deleting the UDP entries of one filter: original destination
/// address and port, reply source address and port (upstream's filterForIPPortNAT).
pub fn filter_delete_args(f: &ConntrackFilter) -> Vec<String> {
    args(&[
        "-D",
        "-f",
        family_arg(f.family()),
        "-p",
        "udp",
        "--orig-dst",
        &f.orig_dst.to_string(),
        "--dport",
        &f.orig_dport.to_string(),
        "--reply-src",
        &f.reply_src.to_string(),
        "--reply-port-src",
        &f.reply_sport.to_string(),
    ])
}

/// `conntrack -D` arguments deleting exactly one entry: its original tuple, plus the reply
/// source, so that a new entry for the same client that was DNATed elsewhere meanwhile is
/// not caught.
pub fn entry_delete_args(e: &ConntrackEntry) -> Vec<String> {
    let proto = match e.protocol {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        132 => "sctp".to_string(),
        n => n.to_string(),
    };
    args(&[
        "-D",
        "-f",
        family_arg(e.family),
        "-p",
        &proto,
        "--orig-src",
        &e.orig_src.to_string(),
        "--orig-dst",
        &e.orig_dst.to_string(),
        "--sport",
        &e.orig_sport.to_string(),
        "--dport",
        &e.orig_dport.to_string(),
        "--reply-src",
        &e.reply_src.to_string(),
    ])
}

/// conntrack-tools ends every -L/-D with "conntrack vX (conntrack-tools): N flow entries
/// have been deleted." (or "shown.") on stderr, and -D exits 1 when N is 0; the count is what
/// tells "nothing matched" from a failure.
fn summary_count(stderr: &str, verb: &str) -> Option<u64> {
    stderr.lines().rev().find_map(|line| {
        let (_, tail) = line.rsplit_once("): ")?;
        let (n, rest) = tail.split_once(' ')?;
        rest.strip_prefix("flow entries have been ")
            .is_some_and(|r| r.starts_with(verb))
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// One line of `conntrack -L` (default or `-o extended` output), e.g.
/// `udp 17 29 src=10.0.0.2 dst=172.30.0.42 sport=40000 dport=53 [UNREPLIED] src=10.180.0.1
/// dst=10.0.0.2 sport=53 dport=40000 mark=0 use=1`. The first src/dst/sport/dport are the
/// original tuple, the second ones the reply tuple; other keys and flags are skipped. Lines
/// without ports (ICMP), with mixed families or anything unreadable give None.
pub fn parse_entry(line: &str) -> Option<ConntrackEntry> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    // The protocol is the first "name number" pair before the tuples that is not the layer 3
    // pair `ipv4 2` / `ipv6 10` of the extended format.
    let head = tokens.iter().take_while(|t| !t.contains('='));
    let head: Vec<&&str> = head.collect();
    let protocol = head.windows(2).find_map(|w| {
        if *w[0] == "ipv4" || *w[0] == "ipv6" || !w[0].chars().all(|c| c.is_ascii_lowercase()) {
            return None;
        }
        w[1].parse::<u8>().ok()
    })?;
    let mut orig: [Option<&str>; 4] = [None; 4];
    let mut reply: [Option<&str>; 4] = [None; 4];
    for t in &tokens {
        let Some((k, v)) = t.split_once('=') else {
            continue;
        };
        let i = match k {
            "src" => 0,
            "dst" => 1,
            "sport" => 2,
            "dport" => 3,
            _ => continue,
        };
        if orig[i].is_none() {
            orig[i] = Some(v);
        } else if reply[i].is_none() {
            reply[i] = Some(v);
        }
    }
    let addr = |v: Option<&str>| v?.parse::<std::net::IpAddr>().ok();
    let port = |v: Option<&str>| v?.parse::<u16>().ok();
    let e = ConntrackEntry {
        family: IpFamily::of(&addr(orig[0])?),
        protocol,
        orig_src: addr(orig[0])?,
        orig_dst: addr(orig[1])?,
        orig_sport: port(orig[2])?,
        orig_dport: port(orig[3])?,
        reply_src: addr(reply[0])?,
        reply_sport: port(reply[2])?,
    };
    let reply_dst = addr(reply[1])?;
    let same = |a: &std::net::IpAddr| IpFamily::of(a) == e.family;
    (same(&e.orig_dst) && same(&e.reply_src) && same(&reply_dst)).then_some(e)
}

impl Conntrack {
    /// `argv` runs the tool, e.g. `["conntrack"]` or `["ip", "netns", "exec", "NS", "conntrack"]`.
    pub fn new(argv: Vec<String>) -> Conntrack {
        Conntrack { argv }
    }

    /// Runs the tool with `args`; returns (exit success, stdout, stderr).
    fn run(&self, args: &[String]) -> Result<(bool, String, String), DataplaneError> {
        let (prog, base) = self
            .argv
            .split_first()
            .ok_or_else(|| DataplaneError::Other("empty conntrack command".to_string()))?;
        let out = Command::new(prog)
            .args(base)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DataplaneError::Io {
                what: format!("running {}", self.describe(args)),
                source,
            })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn describe(&self, args: &[String]) -> String {
        format!("{} {}", self.argv.join(" "), args.join(" "))
    }

    /// The kernel's UDP entries of one family. Lines that cannot be read are skipped (the
    /// tool's summary goes to stderr).
    pub fn list_udp(&self, family: IpFamily) -> Result<Vec<ConntrackEntry>, DataplaneError> {
        let a = args(&["-L", "-p", "udp", "-f", family_arg(family)]);
        let (ok, stdout, stderr) = self.run(&a)?;
        if !ok {
            return Err(DataplaneError::Tool {
                tool: self.describe(&a),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(stdout
            .lines()
            .filter_map(parse_entry)
            .filter(|e| e.family == family && e.protocol == Protocol::Udp.number())
            .collect())
    }

    fn delete_with(&self, a: Vec<String>) -> Result<u64, DataplaneError> {
        let (_, _, stderr) = self.run(&a)?;
        summary_count(&stderr, "deleted").ok_or_else(|| DataplaneError::Tool {
            tool: self.describe(&a),
            stderr: stderr.trim().to_string(),
        })
    }

    /// Deletes exactly this entry (if it still exists); returns how many were deleted.
    pub fn delete(&self, entry: &ConntrackEntry) -> Result<u64, DataplaneError> {
        self.delete_with(entry_delete_args(entry))
    }

    /// Deletes every UDP entry the filter matches; returns how many were deleted.
    pub fn delete_filter(&self, filter: &ConntrackFilter) -> Result<u64, DataplaneError> {
        self.delete_with(filter_delete_args(filter))
    }

    /// Deletes the stale UDP entries of every family in `snapshots` (one snapshot per family,
    /// as programmed), given the UDP service ports deleted since the last sync (empty when
    /// unknown, e.g. after a restart); returns how many were deleted. A failure to list or delete does not stop
    /// the rest; the error then names every failure and how many entries were deleted anyway
    /// (a stale entry that survives only ages out, as upstream accepts).
    pub fn clean_stale_udp(
        &self,
        snapshots: &[Snapshot],
        deleted: &[ServicePort],
    ) -> Result<u64, DataplaneError> {
        let mut count = 0;
        let mut failures = Vec::new();
        for snap in snapshots {
            let family = snap.network.family;
            let entries = match self.list_udp(family) {
                Ok(e) => e,
                Err(e) => {
                    failures.push(format!("listing {}: {e}", family_arg(family)));
                    continue;
                }
            };
            for filter in stale_udp_filters(snap, deleted, &entries) {
                match self.delete_filter(&filter) {
                    Ok(n) => count += n,
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        if failures.is_empty() {
            Ok(count)
        } else {
            Err(DataplaneError::Other(format!(
                "stale UDP conntrack cleanup ({count} entries deleted): {}",
                failures.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::nft::fixtures::ip;

    #[test]
    fn count_is_read_from_the_summary_line() {
        let s = "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n";
        assert_eq!(summary_count(s, "deleted"), Some(3));
        assert_eq!(summary_count(s, "shown"), None);
        let zero = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.";
        assert_eq!(summary_count(zero, "deleted"), Some(0));
        assert_eq!(
            summary_count(
                "conntrack v1.4.7 (conntrack-tools): Operation not permitted",
                "deleted"
            ),
            None
        );
        assert_eq!(summary_count("", "deleted"), None);
    }

    #[test]
    fn default_and_extended_lines_parse() {
        let want = ConntrackEntry {
            family: IpFamily::V4,
            protocol: 17,
            orig_src: ip("10.0.0.2"),
            orig_dst: ip("172.30.0.42"),
            orig_sport: 40000,
            orig_dport: 53,
            reply_src: ip("10.180.0.1"),
            reply_sport: 53,
        };
        let line = "udp      17 29 src=10.0.0.2 dst=172.30.0.42 sport=40000 dport=53 [UNREPLIED] \
                    src=10.180.0.1 dst=10.0.0.2 sport=53 dport=40000 mark=0 use=1";
        assert_eq!(parse_entry(line), Some(want.clone()));
        let ext = format!("ipv4     2 {line}");
        assert_eq!(parse_entry(&ext), Some(want.clone()));
        // Assured entries, zones and security contexts.
        let assured = "udp      17 117 src=10.0.0.2 dst=172.30.0.42 sport=40000 dport=53 \
                       src=10.180.0.1 dst=10.0.0.2 sport=53 dport=40000 [ASSURED] mark=0 \
                       zone=3 secctx=system_u:object_r:unlabeled_t:s0 use=2";
        assert_eq!(parse_entry(assured), Some(want));
        let v6 = "udp      17 119 src=fd00::2 dst=fd00:96::1 sport=40000 dport=53 [UNREPLIED] \
                  src=fd00::2 dst=fd00::2 sport=53 dport=40000 mark=0 use=1";
        let e = parse_entry(v6).unwrap();
        assert_eq!(
            (e.family, e.orig_dst, e.reply_src),
            (IpFamily::V6, ip("fd00:96::1"), ip("fd00::2"))
        );
        let tcp = "tcp      6 431999 ESTABLISHED src=10.0.0.2 dst=10.0.0.3 sport=1 dport=2 \
                   src=10.0.0.3 dst=10.0.0.2 sport=2 dport=1 [ASSURED] mark=0 use=1";
        assert_eq!(parse_entry(tcp).map(|e| e.protocol), Some(6));
    }

    #[test]
    fn unreadable_lines_are_skipped() {
        for line in [
            "",
            "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown.",
            "icmp     1 29 src=10.0.0.2 dst=10.0.0.3 type=8 code=0 id=1 src=10.0.0.3 \
             dst=10.0.0.2 type=0 code=0 id=1 mark=0 use=1",
            // Reply tuple missing.
            "udp      17 29 src=10.0.0.2 dst=172.30.0.42 sport=40000 dport=53",
            // Garbage address, mixed families.
            "udp 17 29 src=10.0.0.x dst=172.30.0.42 sport=1 dport=2 src=1.1.1.1 dst=2.2.2.2 sport=2 dport=1",
            "udp 17 29 src=10.0.0.2 dst=fd00::1 sport=1 dport=2 src=fd00::1 dst=10.0.0.2 sport=2 dport=1",
            "src=10.0.0.2 dst=10.0.0.3 sport=1 dport=2 src=10.0.0.3 dst=10.0.0.2 sport=2 dport=1",
        ] {
            assert_eq!(parse_entry(line), None, "{line}");
        }
    }

    #[test]
    fn deletions_select_precisely() {
        let f = ConntrackFilter {
            orig_dst: ip("172.30.0.10"),
            orig_dport: 53,
            reply_src: ip("10.180.0.1"),
            reply_sport: 5353,
        };
        assert_eq!(
            filter_delete_args(&f).join(" "),
            "-D -f ipv4 -p udp --orig-dst 172.30.0.10 --dport 53 --reply-src 10.180.0.1 \
             --reply-port-src 5353"
        );
        let e = ConntrackEntry {
            family: IpFamily::V6,
            protocol: 17,
            orig_src: ip("2001:db8::9"),
            orig_dst: ip("2001:db8::1"),
            orig_sport: 40000,
            orig_dport: 30001,
            reply_src: ip("fd00:10:180::1"),
            reply_sport: 53,
        };
        assert_eq!(
            entry_delete_args(&e).join(" "),
            "-D -f ipv6 -p udp --orig-src 2001:db8::9 --orig-dst 2001:db8::1 --sport 40000 \
             --dport 30001 --reply-src fd00:10:180::1"
        );
    }
}
