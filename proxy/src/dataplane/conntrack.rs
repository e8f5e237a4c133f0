//! IMPURE: deletes conntrack entries chosen by `plan::conntrack` with the `conntrack` tool
//! (conntrack-tools), inside whatever network namespace the command prefix selects.
use std::process::{Command, Stdio};

use super::DataplaneError;
use crate::model::IpFamily;
use crate::plan::conntrack::ConntrackFilter;

/// Runs `conntrack -D` for one filter at a time.
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

/// The `conntrack -D` arguments selecting the UDP entries of one filter.
pub fn delete_args(filter: &ConntrackFilter) -> Vec<String> {
    let mut a: Vec<String> = vec!["-D".into()];
    let mut push = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    match filter {
        ConntrackFilter::OrigDst(ip) => {
            push("-f", family_arg(IpFamily::of(ip)).into());
            push("-p", "udp".into());
            push("--orig-dst", ip.to_string());
        }
        ConntrackFilter::OrigDstPort(f, port) => {
            push("-f", family_arg(*f).into());
            push("-p", "udp".into());
            push("--orig-port-dst", port.to_string());
        }
        ConntrackFilter::Nat {
            orig_dst,
            reply_src,
        } => {
            push("-f", family_arg(IpFamily::of(orig_dst)).into());
            push("-p", "udp".into());
            push("--orig-dst", orig_dst.to_string());
            push("--reply-src", reply_src.to_string());
        }
        ConntrackFilter::PortNat {
            family,
            port,
            reply_src,
        } => {
            push("-f", family_arg(*family).into());
            push("-p", "udp".into());
            push("--orig-port-dst", port.to_string());
            push("--reply-src", reply_src.to_string());
        }
    }
    a
}

/// conntrack-tools ends every -D with "conntrack vX (conntrack-tools): N flow entries have
/// been deleted." on stderr, and exits 1 when N is 0; the count is what tells "nothing
/// matched" from a failure.
fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().rev().find_map(|line| {
        let (_, tail) = line.rsplit_once("): ")?;
        let (n, rest) = tail.split_once(' ')?;
        rest.starts_with("flow entries have been deleted")
            .then(|| n.parse().ok())
            .flatten()
    })
}

impl Conntrack {
    /// `argv` runs the tool, e.g. `["conntrack"]` or `["ip", "netns", "exec", "NS", "conntrack"]`.
    pub fn new(argv: Vec<String>) -> Conntrack {
        Conntrack { argv }
    }

    /// Deletes the entries of one filter; returns how many were deleted.
    pub fn delete(&self, filter: &ConntrackFilter) -> Result<u64, DataplaneError> {
        let (prog, base) = self
            .argv
            .split_first()
            .ok_or_else(|| DataplaneError::Other("empty conntrack command".to_string()))?;
        let args = delete_args(filter);
        let what = format!("{} {}", self.argv.join(" "), args.join(" "));
        let out = Command::new(prog)
            .args(base)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DataplaneError::Io {
                what: format!("running {what}"),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match deleted_count(&stderr) {
            Some(n) => Ok(n),
            None => Err(DataplaneError::Tool {
                tool: what,
                stderr: stderr.trim().to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_read_from_the_summary_line() {
        let s = "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n";
        assert_eq!(deleted_count(s), Some(3));
        let zero = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.";
        assert_eq!(deleted_count(zero), Some(0));
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): Operation not permitted"),
            None
        );
        assert_eq!(deleted_count(""), None);
    }

    #[test]
    fn nat_filter_selects_original_destination_and_reply_source() {
        let f = ConntrackFilter::Nat {
            orig_dst: "172.30.0.10".parse().unwrap(),
            reply_src: "10.180.0.1".parse().unwrap(),
        };
        assert_eq!(
            delete_args(&f).join(" "),
            "-D -f ipv4 -p udp --orig-dst 172.30.0.10 --reply-src 10.180.0.1"
        );
        let p = ConntrackFilter::PortNat {
            family: IpFamily::V6,
            port: 3001,
            reply_src: "fd00:10:180::1".parse().unwrap(),
        };
        assert_eq!(
            delete_args(&p).join(" "),
            "-D -f ipv6 -p udp --orig-port-dst 3001 --reply-src fd00:10:180::1"
        );
    }
}
