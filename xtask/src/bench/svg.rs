//! PURE: a small SVG line chart (x = Service count on a log axis, one line per mode), so the
//! report needs no plotting dependency.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" upper bound (1, 2 or 5 × 10^k) at or above `v`.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * p)
}

/// `series`: (name, value per x); a missing value breaks the line (did not converge, not run).
pub fn line_chart(
    title: &str,
    y_label: &str,
    xs: &[usize],
    series: &[(String, Vec<Option<f64>>)],
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten())
            .fold(0.0f64, |a, b| a.max(*b)),
    );
    let (lo, hi) = (
        xs.iter().copied().min().unwrap_or(1).max(1) as f64,
        xs.iter().copied().max().unwrap_or(1).max(1) as f64,
    );
    let xpos = |x: usize| {
        if hi <= lo {
            LEFT + pw / 2.0
        } else {
            LEFT + pw * ((x.max(1) as f64).log10() - lo.log10()) / (hi.log10() - lo.log10())
        }
    };
    let ypos = |y: f64| TOP + ph * (1.0 - y / ymax);
    // Axes, grid, ticks.
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let y = ypos(v);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    for &x in xs {
        let px = xpos(x);
        let _ = write!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{x}</text>"##,
            TOP + ph,
            TOP + ph + 16.0
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">Services (log scale)</text><text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"##,
        LEFT + pw / 2.0,
        H - 12.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, (name, vals)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        // Consecutive present points form one polyline; a gap starts a new one.
        let mut seg: Vec<(f64, f64)> = Vec::new();
        let flush = |seg: &mut Vec<(f64, f64)>, s: &mut String| {
            if seg.len() > 1 {
                let pts: Vec<String> = seg.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let _ = write!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                    pts.join(" ")
                );
            }
            seg.clear();
        };
        for (x, v) in xs.iter().zip(vals) {
            match v {
                Some(v) => {
                    let p = (xpos(*x), ypos(*v));
                    let _ = write!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"><title>{} {x}: {}</title></circle>"#,
                        p.0,
                        p.1,
                        esc(name),
                        fmt_tick(*v)
                    );
                    seg.push(p);
                }
                None => flush(&mut seg, &mut s),
            }
        }
        flush(&mut seg, &mut s);
        let ly = TOP + 14.0 + 20.0 * i as f64;
        let lx = LEFT + pw + 12.0;
        let _ = write!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_bounds() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.2), 5.0);
        assert_eq!(nice_max(10.0), 10.0);
        assert_eq!(nice_max(0.012), 0.02);
        assert_eq!(nice_max(730.0), 1000.0);
    }

    #[test]
    fn chart_has_points_gaps_and_legend() {
        let svg = line_chart(
            "cold <sync>",
            "s",
            &[100, 1000, 10000],
            &[
                ("a".into(), vec![Some(1.0), Some(2.0), None]),
                ("b".into(), vec![None, Some(4.0), Some(8.0)]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("cold &lt;sync&gt;"));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(svg.matches("<polyline").count(), 2);
        // y axis up to 10 (nice bound of 8): the top grid label.
        assert!(svg.contains(">10.0</text>"));
    }
}
