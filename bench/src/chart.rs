//! `bench chart`: charts from the JSON of earlier runs.
//!
//! `sidecar`: a latency CDF per call from `bench sidecar --json` (its
//! `cdf` points, or the five percentiles of older files), on a log latency
//! axis. `bench sidecar --json` writes this chart itself; replay and tiered
//! runs write theirs too.

use crate::svg::{push_point, Chart, Series};
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Latency CDF of each call in a `bench sidecar --json` file.
    Sidecar,
}

#[derive(Debug, clap::Args)]
pub struct ChartArgs {
    /// What the JSON file holds.
    #[arg(value_enum)]
    pub kind: Kind,
    /// The JSON file a run wrote.
    pub json: PathBuf,
    /// The SVG file to write [default: the JSON file's name, extension .svg].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Quantile of each percentile field the sidecar bench writes.
const POINTS: [(&str, f64); 5] = [
    ("p50_us", 0.5),
    ("p90_us", 0.9),
    ("p99_us", 0.99),
    ("p999_us", 0.999),
    ("max_us", 1.0),
];

/// The CDF series of every percentile object under `lookup` and `mixed`
/// (of the report's `results`).
pub fn sidecar_cdf(v: &Value) -> Chart {
    // A `--json` report holds them under `results`; older files at the top.
    let v = v.get("results").unwrap_or(v);
    let mut series: Vec<Series> = Vec::new();
    for part in ["lookup", "mixed"] {
        let Some(Value::Object(calls)) = v.get(part) else {
            continue;
        };
        // Percentile objects directly under the part, or one level down
        // (`lookup.local.*`: the same calls over the local socket).
        let mut found: Vec<(String, &Value)> = Vec::new();
        for (call, p) in calls {
            match p.as_object() {
                // The lookup part's own calls went over gRPC.
                Some(_) if p.get("p50_us").is_some() && part == "lookup" => {
                    found.push((format!("grpc {call}"), p))
                }
                Some(_) if p.get("p50_us").is_some() => found.push((format!("{part}: {call}"), p)),
                Some(inner) => found.extend(
                    inner
                        .iter()
                        .filter(|(_, q)| q.get("p50_us").is_some())
                        .map(|(sub, q)| (format!("{call} {sub}"), q)),
                ),
                None => {}
            }
        }
        for (call, p) in found {
            let name = call;
            let cdf: Vec<(f64, f64)> = p
                .get("cdf")
                .and_then(Value::as_array)
                .map(|points| {
                    points
                        .iter()
                        .filter_map(|qv| Some((qv.get(0)?.as_f64()?, qv.get(1)?.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            if cdf.is_empty() {
                for (field, q) in POINTS {
                    if let Some(us) = p.get(field).and_then(Value::as_f64) {
                        push_point(&mut series, &name, false, us, q);
                    }
                }
            } else {
                for (q, us) in cdf {
                    push_point(&mut series, &name, false, us, q);
                }
            }
        }
    }
    Chart {
        title: "Sidecar latency CDF".into(),
        x_label: "latency, microseconds".into(),
        y_label: "fraction of calls at or below".into(),
        series,
        hlines: Vec::new(),
    }
}

pub fn run(args: &ChartArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.json)
        .with_context(|| format!("reading {}", args.json.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.json.display()))?;
    let chart = match args.kind {
        Kind::Sidecar => sidecar_cdf(&v),
    };
    ensure!(
        !chart.series.is_empty(),
        "{} has no latency percentiles (lookup or mixed parts)",
        args.json.display()
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.json.with_extension("svg"));
    std::fs::write(&out, chart.render())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_percentiles_become_cdfs() {
        let p = |base: f64| {
            serde_json::json!({"samples": 10, "p50_us": base, "p90_us": base * 2.0,
                "p99_us": base * 5.0, "p999_us": base * 9.0, "max_us": base * 20.0})
        };
        let v = serde_json::json!({
            "lookup": {"prompt_tokens": 8192, "health": p(20.0), "lookup": p(40.0)},
            "load": [],
            "mixed": {"clients": 64, "lookup": p(100.0), "store": p(300.0)}
        });
        let c = sidecar_cdf(&v);
        let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "grpc health",
                "grpc lookup",
                "mixed: lookup",
                "mixed: store"
            ]
        );
        assert_eq!(c.series[1].points[0], (40.0, 0.5));
        assert_eq!(c.series[1].points[4], (800.0, 1.0));
        assert!(c.render().contains("(log scale)"));
    }

    #[test]
    fn a_runs_cdf_points_are_drawn_and_nested_calls_found() {
        // 1..=10000 us: the CDF is the identity, scaled.
        let p = crate::report::Percentiles::of((1..=10_000u64).map(|us| us * 1000).collect());
        assert_eq!(p.p50_us, 5000.0);
        assert_eq!(p.cdf.first(), Some(&[0.0, 1.0]));
        assert_eq!(p.cdf.last(), Some(&[1.0, 10_000.0]));
        assert_eq!(p.cdf.len(), crate::report::CDF_QUANTILES.len());
        assert!(p
            .cdf
            .windows(2)
            .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1]));
        // Ten samples cannot resolve the 99.9th percentile from the max.
        let few = crate::report::Percentiles::of((1..=10).collect());
        assert!(few.cdf.iter().all(|[q, _]| *q <= 0.9 || *q == 1.0));

        let json = serde_json::to_value(&p).unwrap();
        let v = serde_json::json!({
            "lookup": {"lookup": json.clone(), "local": {"lookup": json}},
        });
        let c = sidecar_cdf(&v);
        let names: Vec<&str> = c.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["local lookup", "grpc lookup"]);
        assert_eq!(c.series[1].points.len(), p.cdf.len());
        assert_eq!(c.series[0].points[11], (5000.0, 0.5));
    }
}
