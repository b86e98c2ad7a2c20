//! Line charts as hand-written SVG (no plotting dependency): axes with
//! ticks, one polyline with point markers per series, horizontal reference
//! lines, a legend. The x axis is logarithmic when the data spans more
//! than a factor of eight.

use std::fmt::Write;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// A chart: series over a shared x axis, y from 0 up.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Horizontal reference lines: (name, y).
    pub hlines: Vec<(String, f64)>,
}

/// Adds `(x, y)` to the series called `name`, creating it if needed.
pub fn push_point(series: &mut Vec<Series>, name: &str, dashed: bool, x: f64, y: f64) {
    match series.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push((x, y)),
        None => series.push(Series {
            name: name.to_string(),
            points: vec![(x, y)],
            dashed,
        }),
    }
}

/// `1500000` as `1.5M`.
pub fn si(v: f64) -> String {
    let a = v.abs();
    let (d, suffix) = if a >= 1e12 {
        (1e12, "T")
    } else if a >= 1e9 {
        (1e9, "G")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let x = v / d;
    let s = if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round())
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{suffix}")
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 760.0;
const H: f64 = 460.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Round tick values covering `[lo, hi]` (about `n` of them).
fn linear_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// 1, 2, 5 × powers of ten within `[lo, hi]` (only powers of ten when
/// that is already plenty).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let mults: &[f64] = if b - a > 4 { &[1.0] } else { &[1.0, 2.0, 5.0] };
    let mut out = Vec::new();
    for e in a..=b {
        for m in mults {
            let v = m * 10f64.powi(e);
            if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                out.push(v);
            }
        }
    }
    out
}

impl Chart {
    pub fn render(&self) -> String {
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|x| x.is_finite())
            .collect();
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(self.hlines.iter().map(|h| h.1))
            .filter(|y| y.is_finite());
        let (mut x_lo, mut x_hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        if !x_lo.is_finite() {
            (x_lo, x_hi) = (1.0, 10.0);
        }
        let log = x_lo > 0.0 && x_hi / x_lo >= 8.0;
        if log {
            x_lo /= 1.25;
            x_hi *= 1.25;
        } else if x_hi - x_lo <= f64::EPSILON * x_hi.abs().max(1.0) {
            let pad = (x_lo.abs() * 0.5).max(1.0);
            (x_lo, x_hi) = (x_lo - pad, x_hi + pad);
        } else {
            let pad = (x_hi - x_lo) * 0.05;
            (x_lo, x_hi) = (x_lo - pad, x_hi + pad);
        }
        let y_max = ys.fold(0.0f64, f64::max);
        let y_hi = if y_max <= 1.0 {
            (y_max * 1.1).clamp(0.1, 1.0)
        } else {
            y_max * 1.1
        };
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let px = |x: f64| {
            let f = if log {
                (x.ln() - x_lo.ln()) / (x_hi.ln() - x_lo.ln())
            } else {
                (x - x_lo) / (x_hi - x_lo)
            };
            LEFT + f * pw
        };
        let py = |y: f64| TOP + ph - (y / y_hi).clamp(0.0, 1.05) * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        // Grid and ticks.
        let x_ticks = if log {
            log_ticks(x_lo, x_hi)
        } else {
            linear_ticks(x_lo, x_hi, 6)
        };
        for t in x_ticks {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                si(t)
            );
        }
        for t in linear_ticks(0.0, y_hi, 5) {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                if y_hi <= 1.0 {
                    format!("{t:.2}")
                } else {
                    si(t)
                }
            );
        }
        // Axes and their labels.
        let _ = writeln!(
            s,
            r##"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="#333"/>"##,
            TOP + ph,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}{}</text>"#,
            LEFT + pw / 2.0,
            H - 16.0,
            esc(&self.x_label),
            if log { " (log scale)" } else { "" }
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Reference lines, then series, then the legend.
        let mut legend: Vec<(String, String, bool, bool)> = Vec::new();
        for (i, (name, y)) in self.hlines.iter().enumerate() {
            let color = if i == 0 { "#555" } else { "#999" };
            let _ = writeln!(
                s,
                r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="1.5" stroke-dasharray="2,3"/>"#,
                LEFT + pw,
                y = py(*y)
            );
            legend.push((format!("{name} ({y:.3})"), color.into(), true, false));
        }
        for (i, series) in self.series.iter().enumerate() {
            let color = if series.dashed {
                "#000"
            } else {
                COLORS[i % COLORS.len()]
            };
            let mut pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> = pts
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{}/>"#,
                path.join(" "),
                if series.dashed {
                    r#" stroke-dasharray="6,4""#
                } else {
                    ""
                }
            );
            for &(x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{}: {} -> {y:.3}</title></circle>"#,
                    px(x),
                    py(y),
                    esc(&series.name),
                    si(x)
                );
            }
            legend.push((series.name.clone(), color.into(), series.dashed, true));
        }
        let lx = LEFT + pw + 16.0;
        for (i, (name, color, dashed, marker)) in legend.iter().enumerate() {
            let y = TOP + 10.0 + i as f64 * 20.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{}/>"#,
                lx + 24.0,
                if *dashed {
                    r#" stroke-dasharray="5,3""#
                } else {
                    ""
                }
            );
            if *marker {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{}" cy="{y}" r="3" fill="{color}"/>"#,
                    lx + 12.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">{}</text>"#,
                lx + 30.0,
                y + 4.0,
                esc(name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_wellformed_chart() {
        let mut series = Vec::new();
        for (x, y) in [(1e6, 0.14), (3e6, 0.31), (1e7, 0.57)] {
            push_point(&mut series, "lru", false, x, y);
            push_point(&mut series, "belady <bound>", true, x, y + 0.1);
        }
        let c = Chart {
            title: "t & t".into(),
            x_label: "capacity".into(),
            y_label: "hit rate".into(),
            series,
            hlines: vec![("ceiling".into(), 0.64)],
        };
        let svg = c.render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("belady &lt;bound&gt;") && svg.contains("t &amp; t"));
        assert!(svg.contains(">1M</text>") && svg.contains(">10M</text>"));
        assert!(svg.contains("(log scale)"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // One point, no series at all: still drawable.
        let one = Chart {
            series: vec![Series {
                name: "x".into(),
                points: vec![(5.0, 2.0)],
                dashed: false,
            }],
            hlines: vec![],
            ..c.clone()
        };
        assert!(!one.render().contains("NaN"));
        let none = Chart {
            series: vec![],
            ..c
        };
        assert!(!none.render().contains("NaN"));
    }

    #[test]
    fn si_labels() {
        assert_eq!(si(1_000_000.0), "1M");
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(250.0), "250");
        assert_eq!(si(0.25), "0.25");
        assert_eq!(si(131_072.0), "131k");
    }
}
