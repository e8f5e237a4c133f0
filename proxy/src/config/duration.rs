//! Go's `time.ParseDuration` syntax, which kube-proxy uses for every duration flag and for
//! `metav1.Duration` fields in the config file ("30s", "1m0s", "500ms", "1h2m3.5s", "0").
use std::time::Duration;

/// Parse a Go duration. Negative durations are rejected: every duration shunt reads must be
/// `>= 0` (kube-proxy's validation rejects negative sync periods, validation.go).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let orig = s;
    let mut s = s;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    // Go accepts a bare "0" (with optional sign) and nothing else without a unit.
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(format!("invalid duration {orig:?}"));
    }
    let mut total_nanos: u128 = 0;
    while !s.is_empty() {
        // Leading number: digits, optionally '.', digits. At least one digit somewhere.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(format!("invalid duration {orig:?}"));
        }
        let unit_len = s
            .bytes()
            .take_while(|b| !b.is_ascii_digit() && *b != b'.')
            .count();
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "" => return Err(format!("missing unit in duration {orig:?}")),
            other => return Err(format!("unknown unit {other:?} in duration {orig:?}")),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| format!("invalid duration {orig:?}"))?
        };
        let mut value = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| format!("invalid duration {orig:?}: overflow"))?;
        // Fraction: scale digit by digit; digits beyond nanosecond precision are dropped
        // (Go truncates the same way).
        let mut scale = unit_nanos;
        for d in frac_part.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            value += u128::from(d - b'0') * scale;
        }
        total_nanos = total_nanos
            .checked_add(value)
            .ok_or_else(|| format!("invalid duration {orig:?}: overflow"))?;
    }
    // Go's Duration is an int64 of nanoseconds.
    if total_nanos > i64::MAX as u128 {
        return Err(format!("invalid duration {orig:?}: overflow"));
    }
    if negative && total_nanos != 0 {
        return Err(format!("{orig:?} must be greater than or equal to 0"));
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

/// Format as Go's `Duration.String()` does for the values we print ("30s", "1m0s", "500ms").
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (div, unit) = if nanos < 1_000 {
            (1, "ns")
        } else if nanos < 1_000_000 {
            (1_000, "µs")
        } else {
            (1_000_000, "ms")
        };
        return format!("{}{unit}", trim_fraction(nanos, div));
    }
    let secs_total = nanos / 1_000_000_000;
    let sub = nanos % 1_000_000_000;
    let hours = secs_total / 3600;
    let minutes = (secs_total % 3600) / 60;
    let secs = secs_total % 60;
    let sec_str = trim_fraction(secs * 1_000_000_000 + sub, 1_000_000_000);
    if hours > 0 {
        format!("{hours}h{minutes}m{sec_str}s")
    } else if minutes > 0 {
        format!("{minutes}m{sec_str}s")
    } else {
        format!("{sec_str}s")
    }
}

fn trim_fraction(value: u128, div: u128) -> String {
    let int = value / div;
    let frac = value % div;
    if frac == 0 {
        return int.to_string();
    }
    let width = div.ilog10() as usize;
    let frac = format!("{frac:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        let ok = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("30s", Duration::from_secs(30)),
            ("1m0s", Duration::from_secs(60)),
            ("500ms", Duration::from_millis(500)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("2h22m", Duration::from_secs(2 * 3600 + 22 * 60)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("+5s", Duration::from_secs(5)),
            ("-0s", Duration::ZERO),
        ];
        for (input, want) in ok {
            assert_eq!(parse_go_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for input in [
            "",
            "30",
            "s",
            "1x",
            "1.s5",
            "abc",
            "1m x",
            "-1s",
            "99999999999h",
        ] {
            assert!(parse_go_duration(input).is_err(), "{input} should fail");
        }
        assert!(
            parse_go_duration("-1s")
                .unwrap_err()
                .contains("greater than or equal to 0")
        );
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(3723), "1h2m3s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_go_duration(d), want);
            assert_eq!(parse_go_duration(want), Ok(d));
        }
    }
}
