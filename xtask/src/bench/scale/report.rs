//! The scale mode's report: two Markdown tables (time, resources), the
//! issue's targets at the largest N, `results.json`, and one SVG chart per
//! quantity against N (log x).

use std::{fmt::Write as _, path::Path};

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde::Serialize;

use super::{Point, ScalePlan};
use crate::bench::report::{machine, Machine};

/// The targets, at N=1000 (or the largest N run).
pub const ALL_SERVED_SECS: f64 = 5.0;
pub const LISTEN_TO_SERVED_P99_MS: f64 = 100.0;
pub const IDLE_CPU_PCT: f64 = 0.5;
pub const TARGET_N: usize = 1000;

#[derive(Debug, Serialize)]
pub struct ScaleResults {
    pub machine: Machine,
    pub command: String,
    pub plan: ScalePlan,
    /// N=0 (the agent alone) first.
    pub points: Vec<Point>,
    pub notes: Vec<String>,
    pub elapsed_secs: f64,
}

impl ScaleResults {
    pub fn new(plan: ScalePlan, points: Vec<Point>, notes: Vec<String>, elapsed_secs: f64) -> Self {
        Self {
            machine: machine(),
            command: std::iter::once("cargo xtask bench".to_owned())
                .chain(std::env::args().skip(2))
                .collect::<Vec<_>>()
                .join(" "),
            plan,
            points,
            notes,
            elapsed_secs,
        }
    }

    /// The point the targets are judged at: N=1000, else the largest.
    fn judged(&self) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.namespaces == TARGET_N)
            .or_else(|| self.points.iter().rfind(|p| p.namespaces > 0))
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub fn markdown(r: &ScaleResults) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# redirector at scale: `{}`\n", r.command);
    let _ = writeln!(
        s,
        "{} ({} cores, {}), kernel {}, {}, commit {}; {:.0} s in all. The agent runs with `--discover --cgroup-pattern {}` (the pattern keeps it to the bench's own pods on this shared machine). Each N from scratch: N live-store pods and N/10 (at least 2) querier pods, each a network namespace with a process listening on 0.0.0.0:{} (`-target=live-store` or `-target=querier` on its command line) in its own cgroup `pod<uid>/ctr` (named as kubelet names pod cgroups, so the agent attaches sock_ops to the pod); then the agent starts. \"Served\" means a connection from inside the namespace to 127.0.0.1:{} was answered by that namespace's pod. N=0 is the agent alone, the baseline of the per-namespace figures.\n",
        m.cpu,
        m.cores,
        m.memory,
        m.kernel,
        m.date,
        m.commit,
        r.elapsed_secs,
        super::pods::CGROUP_DIR,
        crate::bench::topology::LISTEN_PORT,
        crate::bench::topology::ADVERTISE_PORT,
    );
    let _ = writeln!(
        s,
        "## Time\n\n`all served`: agent start until the last live-store namespace answered (resolution: one probe sweep). `listen → served`: a new live-store's listen(2) (its `listening` line read) until its first answered connection, probed every ms; {} started {} ms apart after all N were served.\n",
        r.plan.new_starts, r.plan.new_start_spacing_ms
    );
    let _ = writeln!(
        s,
        "| N | setup s | agent ready s | all served s | served | sweep ms | listen → served p50 ms | p99 ms | max ms | new served | querier namespaces served | agent stop s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &r.points {
        let l = p.listen_to_served_ms;
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.2} | {} | {}/{} | {:.0} | {} | {} | {} | {}/{} | {}/{} | {:.2} |",
            p.namespaces,
            p.setup_secs,
            p.agent_ready_secs,
            opt(p.all_served_secs, 2),
            p.served,
            p.namespaces,
            p.sweep_ms,
            opt(l.map(|l| l.p50), 0),
            opt(l.map(|l| l.p99), 0),
            opt(l.map(|l| l.max), 0),
            p.new_served,
            p.new_starts,
            p.queriers_served,
            p.queriers,
            p.agent_stop_secs,
        );
    }
    let _ = writeln!(
        s,
        "\n## Resources\n\nIdle CPU: the agent's utime+stime over {:.0} s once everything is served, % of one core. Memory: the agent's VmRSS, and `memlock` of the BPF maps it holds fds for and of the programs it holds by fd or through its links (/proc/PID/fdinfo, the kernel's program list; links themselves report none). Per namespace: (figure − the N=0 figure) / namespaces served at that moment (live-stores + new starts + querier namespaces served).\n",
        r.plan.idle_secs
    );
    let _ = writeln!(
        s,
        "| N | served namespaces | idle CPU % | agent RSS MiB | RSS per ns KiB | BPF memlock MiB | memlock per ns KiB | progs | maps | links | pod RSS KiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &r.points {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {:.0} |",
            p.namespaces,
            p.served_total,
            opt(p.idle_cpu_pct, 2),
            mib(p.memory.rss_kib),
            opt(p.rss_per_ns_kib, 1),
            p.memory.bpf_memlock_bytes() as f64 / (1u64 << 20) as f64,
            opt(p.bpf_memlock_per_ns_bytes.map(|b| b / 1024.0), 1),
            p.memory.progs,
            p.memory.maps,
            p.memory.links,
            p.pod_rss_kib,
        );
    }
    if let Some(p) = r.judged() {
        let met = |v: Option<f64>, limit: f64| match v {
            Some(v) if v < limit => "yes",
            Some(_) => "**no**",
            None => "**no** (not measured)",
        };
        let all = p.all_served_secs;
        let p99 = p.listen_to_served_ms.map(|l| l.p99);
        let _ = writeln!(
            s,
            "\n## Targets (N={})\n\n| target | goal | measured | met |\n|---|---|---|---|\n| all N served after agent start | < {ALL_SERVED_SECS} s | {} s | {} |\n| new live-store: listen → served, p99 | < {LISTEN_TO_SERVED_P99_MS} ms | {} ms | {} |\n| agent idle CPU | < {IDLE_CPU_PCT}% of a core | {}% | {} |\n| querier namespaces served | 0 | {} | {} |",
            p.namespaces,
            opt(all, 2),
            met(all, ALL_SERVED_SECS),
            opt(p99, 0),
            met(p99, LISTEN_TO_SERVED_P99_MS),
            opt(p.idle_cpu_pct, 2),
            met(p.idle_cpu_pct, IDLE_CPU_PCT),
            p.queriers_served,
            if p.queriers_served == 0 { "yes" } else { "**no**" },
        );
    }
    let stops: Vec<String> = r
        .points
        .iter()
        .filter_map(|p| {
            let e = p.agent_stop_error.as_ref()?;
            Some(format!(
                "N={}: the agent's exit after SIGTERM: {e}",
                p.namespaces
            ))
        })
        .collect();
    if !r.notes.is_empty() || !stops.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in r.notes.iter().chain(&stops) {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plotting: {err:?}")
}

/// One series of a chart: its name and (N, value) points.
type Series = (&'static str, Vec<(f64, f64)>);

/// One chart: file, title, unit, its series, the target line.
type Chart = (
    &'static str,
    &'static str,
    &'static str,
    Vec<Series>,
    Option<f64>,
);

pub fn charts(r: &ScaleResults, out: &Path) -> Result<()> {
    let pts = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        r.points
            .iter()
            .filter(|p| p.namespaces > 0)
            .filter_map(|p| f(p).map(|v| (p.namespaces as f64, v)))
            .collect()
    };
    let charts: [Chart; 5] = [
        (
            "all-served.svg",
            "agent start to all N namespaces served",
            "seconds",
            vec![("all served", pts(&|p| p.all_served_secs))],
            Some(ALL_SERVED_SECS),
        ),
        (
            "listen-to-served.svg",
            "new live-store: listen() to served",
            "milliseconds",
            vec![
                ("p50", pts(&|p| p.listen_to_served_ms.map(|l| l.p50))),
                ("p99", pts(&|p| p.listen_to_served_ms.map(|l| l.p99))),
            ],
            Some(LISTEN_TO_SERVED_P99_MS),
        ),
        (
            "idle-cpu.svg",
            "agent idle CPU, all served",
            "% of one core",
            vec![("idle CPU", pts(&|p| p.idle_cpu_pct))],
            Some(IDLE_CPU_PCT),
        ),
        (
            "agent-rss.svg",
            "agent resident memory",
            "MiB",
            vec![("VmRSS", pts(&|p| Some(p.memory.rss_kib as f64 / 1024.0)))],
            None,
        ),
        (
            "bpf-memlock.svg",
            "kernel memory of the agent's BPF maps and programs",
            "MiB",
            vec![
                (
                    "maps",
                    pts(&|p| Some(p.memory.map_memlock_bytes as f64 / (1u64 << 20) as f64)),
                ),
                (
                    "programs",
                    pts(&|p| Some(p.memory.prog_memlock_bytes as f64 / (1u64 << 20) as f64)),
                ),
            ],
            None,
        ),
    ];
    for (file, title, unit, series, target) in charts {
        line_chart(r, &out.join(file), title, unit, &series, target)?;
    }
    Ok(())
}

const COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(214, 39, 40), BLACK];

/// Values against N on a log x axis, with the target as a dashed line.
fn line_chart(
    r: &ScaleResults,
    file: &Path,
    title: &str,
    unit: &str,
    series: &[Series],
    target: Option<f64>,
) -> Result<()> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        return Ok(());
    }
    let x_lo = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.5;
    let x_hi = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.5;
    let y_hi = all
        .iter()
        .map(|p| p.1)
        .chain(target)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let root = SVGBackend::new(file, (760, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{title} ({} cores, kernel {})",
                r.machine.cores, r.machine.kernel
            ),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0f64..y_hi)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("live-store namespaces N (log scale)")
        .y_desc(unit)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(e)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(e)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(e)?;
    }
    if let Some(t) = target {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(DashedLineSeries::new(
                [(x_lo, t), (x_hi, t)],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(e)?
            .label(format!("target at N={TARGET_N}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
