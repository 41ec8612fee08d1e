//! SVG charts for the README: latency CDFs per path and throughput/CPU bars.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    metric::Metric,
    report::Results,
    workloads::{Kind, Workload},
};

const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

fn color(paths: &[&str], path: &str) -> RGBColor {
    let i = paths.iter().position(|p| *p == path).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

/// Three significant figures or so, for axis ticks and bar labels.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plotting: {err:?}")
}

pub fn write(r: &Results, out: &Path) -> Result<()> {
    for w in r
        .workloads
        .iter()
        .filter(|w| matches!(w.kind, Kind::Rr | Kind::Open))
    {
        cdf(r, &w.name, &out.join(format!("cdf-{}.svg", w.name)))?;
    }
    // The first workload of a kind (rr-64B, crr, bulk-stream), or for the
    // saturation panel the last (the most connections).
    let first = |kind: Kind| r.workloads.iter().find(|w| w.kind == kind);
    let last = |kind: Kind| r.workloads.iter().rev().find(|w| w.kind == kind);
    let panel = |w: Option<&Workload>, metric: Metric, title: &'static str| {
        w.map(|w| (w.name.clone(), metric, title))
    };
    let throughput: Vec<Panel> = [
        panel(first(Kind::Crr), Metric::ConnPerS, "CRR connections/s"),
        panel(first(Kind::Bulk), Metric::MibPerS, "bulk stream MiB/s"),
        panel(
            last(Kind::Saturation),
            Metric::ReqPerS,
            "gRPC unary req/s at saturation",
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    bars(r, &throughput, &out.join("throughput.svg"))?;
    let cpu: Vec<Panel> = [
        panel(
            first(Kind::Rr),
            Metric::CpuUsPerReq,
            "RR 64 B: CPU µs per request",
        ),
        panel(
            first(Kind::Crr),
            Metric::CpuUsPerConn,
            "CRR: CPU µs per connection",
        ),
        panel(first(Kind::Bulk), Metric::CpuSPerGib, "bulk: CPU s per GiB"),
    ]
    .into_iter()
    .flatten()
    .collect();
    bars(r, &cpu, &out.join("cpu.svg"))?;
    Ok(())
}

/// One bar chart: (workload, metric, title).
type Panel = (String, Metric, &'static str);

/// Latency CDF of one workload, every path (all rounds merged), log-scale x.
fn cdf(r: &Results, workload: &str, file: &Path) -> Result<()> {
    let Some(curves) = r.cdfs.get(workload) else {
        return Ok(());
    };
    let paths = r.measured_paths();
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for pts in curves.values() {
        for (x, _) in pts {
            lo = lo.min(*x);
            hi = hi.max(*x);
        }
    }
    if !lo.is_finite() || hi <= 0.0 {
        return Ok(());
    }
    let lo = (lo * 0.8).max(0.1);
    let hi = hi * 1.2;
    let root = SVGBackend::new(file, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{workload}: latency CDF per path ({}, kernel {})",
                r.machine.cpu, r.machine.kernel
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .x_labels(8)
        .x_label_formatter(&|x| short(*x))
        .y_desc("fraction of requests")
        .draw()
        .map_err(e)?;
    for path in &paths {
        let Some(pts) = curves.get(*path) else {
            continue;
        };
        let c = color(&paths, path);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(e)?
            .label(*path)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// One panel of bars per (workload, metric): median per path.
fn bars(r: &Results, panels: &[Panel], file: &Path) -> Result<()> {
    let paths = r.measured_paths();
    let root = SVGBackend::new(file, (460 * panels.len() as u32, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let areas = root.split_evenly((1, panels.len()));
    for ((workload, metric, title), area) in panels.iter().zip(areas.iter()) {
        let vals: Vec<(usize, &str, f64)> = paths
            .iter()
            .enumerate()
            .filter_map(|(i, p)| r.median(p, workload, *metric).map(|v| (i, *p, v)))
            .collect();
        let top = vals.iter().map(|v| v.2).fold(0.0, f64::max) * 1.15;
        if top <= 0.0 {
            continue;
        }
        let n = paths.len();
        let names: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_label_style(("sans-serif", 10))
            .y_label_formatter(&|y| short(*y))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(vals.iter().map(|(i, p, v)| {
                let x = *i as f64;
                Rectangle::new([(x + 0.15, 0.0), (x + 0.85, *v)], color(&paths, p).filled())
            }))
            .map_err(e)?;
        // The value above each bar: the chart is read for ratios.
        chart
            .draw_series(vals.iter().map(|(i, _, v)| {
                Text::new(
                    short(*v),
                    (*i as f64 + 0.5, *v + top * 0.02),
                    TextStyle::from(("sans-serif", 10).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
