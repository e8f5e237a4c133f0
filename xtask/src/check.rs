//! PURE: compares probe outcomes with a packet's expectation.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::lab::probe::Outcome;
use crate::scenario::{Expectation, Masq};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Result {
    Pass(String),
    Fail(String),
}

/// How many connections to open for an expectation: several for endpoint sets, so a wrong
/// endpoint in a random choice shows (a 50/50 wrong choice escapes 8 tries with p = 1/256);
/// one for verdicts.
pub fn attempts(e: &Expectation) -> usize {
    match e {
        Expectation::Endpoints { set, .. } => (4 * set.len()).clamp(8, 16),
        _ => 1,
    }
}

fn masq_ok(
    want: Masq,
    answer_peer: SocketAddr,
    client: SocketAddr,
    client_is_node: bool,
) -> std::result::Result<(), String> {
    // Masquerade = the server saw another source address than the probe's. For a probe sent
    // from a node address, a changed source port alone counts too: masquerade may pick the
    // very node address the probe used (LAB-NOTES). For any other source it does not: a
    // masquerade would have replaced the address, and conntrack's NAT clash resolution may
    // remap the source port of a plain DNAT (nf_nat picks a free tuple on a clash).
    let seen =
        answer_peer.ip() != client.ip() || (client_is_node && answer_peer.port() != client.port());
    match (want, seen) {
        (Masq::Any, _) | (Masq::Yes, true) | (Masq::No, false) => Ok(()),
        (Masq::Yes, false) => Err(format!(
            "not masqueraded (server saw {answer_peer} = client)"
        )),
        (Masq::No, true) => Err(format!(
            "masqueraded (client {client}, server saw {answer_peer})"
        )),
    }
}

/// Checks all outcomes (in order) against the expectation. `client_is_node`: the probe's
/// source is one of the node's own addresses.
pub fn check(
    expect: &Expectation,
    dest: SocketAddr,
    outcomes: &[Outcome],
    client_is_node: bool,
) -> Result {
    if outcomes.is_empty() {
        return Result::Fail("no probe was sent".into());
    }
    match expect {
        Expectation::Endpoints { set, masq } => {
            let mut seen = BTreeSet::new();
            for o in outcomes {
                let Outcome::Answered { answer, client } = o else {
                    return Result::Fail(format!("expected one of {}: {o}", fmt_set(set)));
                };
                if !set.contains(&answer.local) {
                    return Result::Fail(format!("expected one of {}: {o}", fmt_set(set)));
                }
                if let Err(e) = masq_ok(*masq, answer.peer, *client, client_is_node) {
                    return Result::Fail(format!("reached {} but {e}", answer.local));
                }
                seen.insert(answer.local);
            }
            let missing: Vec<_> = set.iter().filter(|e| !seen.contains(e)).collect();
            let seen_s: Vec<String> = seen.iter().map(ToString::to_string).collect();
            let mut d = format!(
                "{} connections reached {}",
                outcomes.len(),
                seen_s.join(", ")
            );
            if !missing.is_empty() {
                // Not a failure: the choice is random; upstream asserts only the candidate set.
                let m: Vec<String> = missing.iter().map(ToString::to_string).collect();
                d.push_str(&format!(" (not seen: {})", m.join(", ")));
            }
            d.push_str(&format!(", masquerade {}", masq_word(*masq)));
            Result::Pass(d)
        }
        Expectation::Drop => one(
            outcomes,
            |o| matches!(o, Outcome::Timeout),
            "drop (timeout)",
        ),
        Expectation::Reject => one(
            outcomes,
            |o| matches!(o, Outcome::Refused),
            "reject (connection refused)",
        ),
        Expectation::Passthrough { masq } => {
            let o = &outcomes[0];
            match o {
                Outcome::Answered { answer, client }
                    if (answer.name == "node" || answer.name == "sink") && answer.local == dest =>
                {
                    match masq_ok(*masq, answer.peer, *client, client_is_node) {
                        Ok(()) => Result::Pass(format!("passthrough: {o}")),
                        Err(e) => Result::Fail(format!("passthrough but {e}")),
                    }
                }
                _ => Result::Fail(format!("expected passthrough to {dest}: {o}")),
            }
        }
    }
}

fn one(outcomes: &[Outcome], ok: impl Fn(&Outcome) -> bool, what: &str) -> Result {
    let o = &outcomes[0];
    if ok(o) {
        Result::Pass(what.to_owned())
    } else {
        Result::Fail(format!("expected {what}: {o}"))
    }
}

fn masq_word(m: Masq) -> &'static str {
    match m {
        Masq::Yes => "yes",
        Masq::No => "no",
        Masq::Any => "not asserted",
    }
}

fn fmt_set(set: &[SocketAddr]) -> String {
    let v: Vec<String> = set.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::agent::Answer;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ans(name: &str, local: &str, peer: &str, client: &str) -> Outcome {
        Outcome::Answered {
            answer: Answer {
                name: name.into(),
                local: sa(local),
                peer: sa(peer),
            },
            client: sa(client),
        }
    }

    fn eps(masq: Masq) -> Expectation {
        Expectation::Endpoints {
            set: vec![sa("10.180.0.1:80"), sa("10.180.2.1:80")],
            masq,
        }
    }

    const D: &str = "172.30.0.41:80";

    #[test]
    fn endpoints_in_set_unmasqueraded() {
        let o = [
            ans("ep", "10.180.0.1:80", "10.0.0.2:4000", "10.0.0.2:4000"),
            ans("ep", "10.180.2.1:80", "10.0.0.2:4001", "10.0.0.2:4001"),
        ];
        assert!(
            matches!(check(&eps(Masq::No), sa(D), &o, true), Result::Pass(d) if !d.contains("not seen"))
        );
        assert!(matches!(
            check(&eps(Masq::Yes), sa(D), &o, true),
            Result::Fail(_)
        ));
    }

    #[test]
    fn masquerade_seen_by_port_change_alone() {
        let o = [ans(
            "ep",
            "10.180.0.1:80",
            "192.168.0.2:5000",
            "192.168.0.2:4000",
        )];
        assert!(
            matches!(check(&eps(Masq::Yes), sa(D), &o, true), Result::Pass(d) if d.contains("not seen: 10.180.2.1:80"))
        );
        assert!(matches!(
            check(&eps(Masq::No), sa(D), &o, true),
            Result::Fail(_)
        ));
        assert!(matches!(
            check(&eps(Masq::Any), sa(D), &o, true),
            Result::Pass(_)
        ));
    }

    #[test]
    fn port_change_alone_is_no_masquerade_for_a_pod_source() {
        // A pod's DNATed connection whose source port conntrack remapped on a clash.
        let o = [ans("ep", "10.180.0.1:80", "10.0.0.2:5000", "10.0.0.2:4000")];
        assert!(matches!(
            check(&eps(Masq::No), sa(D), &o, false),
            Result::Pass(_)
        ));
        assert!(matches!(
            check(&eps(Masq::Yes), sa(D), &o, false),
            Result::Fail(_)
        ));
        // Another address is masquerade whatever the source.
        let o = [ans(
            "ep",
            "10.180.0.1:80",
            "192.168.0.2:5000",
            "10.0.0.2:4000",
        )];
        assert!(matches!(
            check(&eps(Masq::Yes), sa(D), &o, false),
            Result::Pass(_)
        ));
    }

    #[test]
    fn endpoint_outside_set_or_error_fails() {
        let o = [ans("ep", "10.180.0.1:80", "10.0.0.2:1", "10.0.0.2:1")];
        assert!(matches!(
            check(&eps(Masq::No), sa(D), &o, true),
            Result::Pass(_)
        ));
        let o = [
            ans("ep", "10.180.0.1:80", "10.0.0.2:1", "10.0.0.2:1"),
            ans("x", "10.9.9.9:80", "10.0.0.2:2", "10.0.0.2:2"),
        ];
        assert!(matches!(
            check(&eps(Masq::No), sa(D), &o, true),
            Result::Fail(_)
        ));
        assert!(matches!(
            check(&eps(Masq::No), sa(D), &[Outcome::Refused], true),
            Result::Fail(_)
        ));
        assert!(matches!(
            check(&eps(Masq::No), sa(D), &[], true),
            Result::Fail(_)
        ));
    }

    #[test]
    fn verdicts() {
        assert!(matches!(
            check(&Expectation::Drop, sa(D), &[Outcome::Timeout], true),
            Result::Pass(_)
        ));
        assert!(matches!(
            check(&Expectation::Drop, sa(D), &[Outcome::Refused], true),
            Result::Fail(_)
        ));
        assert!(matches!(
            check(&Expectation::Reject, sa(D), &[Outcome::Refused], true),
            Result::Pass(_)
        ));
        assert!(matches!(
            check(&Expectation::Reject, sa(D), &[Outcome::Timeout], true),
            Result::Fail(_)
        ));
        let e = Outcome::Error("No route to host".into());
        assert!(matches!(
            check(&Expectation::Reject, sa(D), &[e], true),
            Result::Fail(_)
        ));
    }

    #[test]
    fn passthrough_needs_original_destination() {
        let p = Expectation::Passthrough { masq: Masq::No };
        let d = sa("192.168.1.2:3001");
        let ok = ans(
            "node",
            "192.168.1.2:3001",
            "203.0.113.2:4000",
            "203.0.113.2:4000",
        );
        assert!(matches!(check(&p, d, &[ok], true), Result::Pass(_)));
        let dnat = ans(
            "ep-10.180.0.1",
            "10.180.0.1:80",
            "203.0.113.2:4000",
            "203.0.113.2:4000",
        );
        assert!(matches!(check(&p, d, &[dnat], true), Result::Fail(_)));
        let masq = ans(
            "node",
            "192.168.1.2:3001",
            "100.64.255.1:4000",
            "203.0.113.2:4000",
        );
        assert!(matches!(check(&p, d, &[masq], true), Result::Fail(_)));
    }
}
