//! Results: the raw JSON, the summary (median over repeats with spread, ratio
//! to direct), the targets' outcomes, and the Markdown report.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    bpf::ProgCost,
    bystander::Bystander,
    metric::Metric,
    paths::{self, Proof},
    profile::ProgProfile,
    stats::{ratio, spread, Spread},
    targets::{self, Outcome},
    workloads::Workload,
    Plan,
};

#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub path: String,
    pub workload: String,
    pub repeat: usize,
    pub ops: u64,
    pub secs: f64,
    pub metrics: BTreeMap<Metric, f64>,
}

/// Everything the rounds and the profile collected, for [`Results::new`].
#[derive(Debug, Default)]
pub struct Collected {
    pub measurements: Vec<Measurement>,
    pub proofs: Vec<Proof>,
    pub sk_lookup_cost: Vec<ProgCost>,
    pub profile: Vec<ProgProfile>,
    /// What the agent costs namespaces it does not serve.
    pub bystander: Option<Bystander>,
    /// Latency CDF points per (workload, path), all rounds merged.
    pub cdfs: BTreeMap<(String, String), Vec<(f64, f64)>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PathStatus {
    pub name: String,
    pub what: String,
    pub measured: bool,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub date: String,
    pub commit: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SummaryRow {
    pub workload: String,
    pub metric: Metric,
    pub path: String,
    #[serde(flatten)]
    pub stat: Spread,
    pub ratio_to_direct: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub plan: Plan,
    pub paths: Vec<PathStatus>,
    pub workloads: Vec<Workload>,
    pub summary: Vec<SummaryRow>,
    pub targets: Vec<Outcome>,
    pub sk_lookup_cost: Vec<ProgCost>,
    /// Redirector's per-connection cost by component (kernel run-time stats).
    pub profile: Vec<ProgProfile>,
    /// The bystander workload: agent stopped vs running, pods it does not serve.
    pub bystander: Option<Bystander>,
    pub proofs: Vec<Proof>,
    pub notes: Vec<String>,
    pub elapsed_secs: f64,
    pub measurements: Vec<Measurement>,
    /// Latency CDF points (µs, fraction) per workload and path, all repeats merged.
    pub cdfs: BTreeMap<String, BTreeMap<String, Vec<(f64, f64)>>>,
}

impl Results {
    pub fn new(
        plan: &Plan,
        paths: Vec<PathStatus>,
        workloads: &[Workload],
        collected: Collected,
        notes: Vec<String>,
        elapsed_secs: f64,
    ) -> Self {
        let Collected {
            measurements,
            proofs,
            sk_lookup_cost,
            profile,
            bystander,
            cdfs,
        } = collected;
        let summary = summarize(&measurements);
        let targets = targets::check_all(&summary, workloads);
        let mut by_workload: BTreeMap<String, BTreeMap<String, Vec<(f64, f64)>>> = BTreeMap::new();
        for ((w, p), c) in cdfs {
            by_workload.entry(w).or_default().insert(p, c);
        }
        Self {
            machine: machine(),
            plan: plan.clone(),
            paths,
            workloads: workloads.to_vec(),
            summary,
            targets,
            sk_lookup_cost,
            profile,
            bystander,
            proofs,
            notes,
            elapsed_secs,
            measurements,
            cdfs: by_workload,
        }
    }

    pub fn median(&self, path: &str, workload: &str, metric: Metric) -> Option<f64> {
        find(&self.summary, path, workload, metric).map(|r| r.stat.median)
    }

    pub fn measured_paths(&self) -> Vec<&str> {
        self.paths
            .iter()
            .filter(|p| p.measured)
            .map(|p| p.name.as_str())
            .collect()
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory,
        date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: first_line("git", &["rev-parse", "--short", "HEAD"]),
    }
}

/// Median and spread per (workload, metric, path), with the ratio to direct.
pub fn summarize(ms: &[Measurement]) -> Vec<SummaryRow> {
    let mut groups: BTreeMap<(String, Metric, String), Vec<f64>> = BTreeMap::new();
    for m in ms {
        for (k, v) in &m.metrics {
            groups
                .entry((m.workload.clone(), *k, m.path.clone()))
                .or_default()
                .push(*v);
        }
    }
    let mut rows: Vec<SummaryRow> = groups
        .into_iter()
        .filter_map(|((workload, metric, path), v)| {
            Some(SummaryRow {
                workload,
                metric,
                path,
                stat: spread(&v)?,
                ratio_to_direct: None,
            })
        })
        .collect();
    let direct: BTreeMap<(String, Metric), f64> = rows
        .iter()
        .filter(|r| r.path == paths::DIRECT)
        .map(|r| ((r.workload.clone(), r.metric), r.stat.median))
        .collect();
    for r in &mut rows {
        r.ratio_to_direct = direct
            .get(&(r.workload.clone(), r.metric))
            .and_then(|d| ratio(r.stat.median, *d));
    }
    rows
}

pub fn find<'a>(
    rows: &'a [SummaryRow],
    path: &str,
    workload: &str,
    metric: Metric,
) -> Option<&'a SummaryRow> {
    rows.iter()
        .find(|r| r.path == path && r.workload == workload && r.metric == metric)
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let paths = r.measured_paths();
    let _ = writeln!(s, "# redirector benchmark ({} run)\n", r.plan.mode);
    let _ = writeln!(
        s,
        "Machine: {} ({} cores, {}), kernel {}; {}; commit {}. {} interleaved round(s), {:.1} s per workload slot; run took {:.0} s.\n",
        m.cpu, m.cores, m.memory, m.kernel, m.date, m.commit, r.plan.repeats, r.plan.slot_secs, r.elapsed_secs
    );
    let foreign: Vec<f64> = r
        .measurements
        .iter()
        .filter_map(|m| m.metrics.get(&Metric::ForeignCpuCores).copied())
        .collect();
    if let Some(f) = spread(&foreign) {
        let max = foreign.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "Other tenants' CPU during the slots (/proc/stat minus the bench's cgroup): median {:.2} cores, max {:.2} cores of {}.\n",
            f.median, max, m.cores
        );
    }
    let _ = writeln!(s, "## Paths\n\n| path | what | measured |\n|---|---|---|");
    for p in &r.paths {
        let status = if p.measured {
            "yes".to_owned()
        } else {
            format!("no: {}", p.note)
        };
        let _ = writeln!(s, "| {} | {} | {} |", p.name, p.what, status);
    }
    let _ = writeln!(
        s,
        "\n## Ratio to direct\n\nMedian over rounds divided by direct's median; `±` is the half-range over rounds relative to the median. Latencies and CPU: lower is better; rates: higher is better. The `direct` column is absolute (µs, req/s, conn/s, MiB/s, CPU µs per request, CPU s per GiB). `cpu_*` is whole-machine CPU from /proc/stat (all cores, every process and softirq; the machine is shared, so it includes other tenants' load); `own_cpu_*` is the bench's own cgroup (load generator, live-store stand-in, proxy, agent, and the kernel work done in their context).\n"
    );
    let _ = write!(s, "| workload | metric | direct |");
    for p in paths.iter().filter(|p| **p != paths::DIRECT) {
        let _ = write!(s, " {p} |");
    }
    let _ = write!(s, "\n|---|---|---|");
    for _ in paths.iter().filter(|p| **p != paths::DIRECT) {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for w in &r.workloads {
        for &metric in w.kind.shown() {
            let Some(d) = find(&r.summary, paths::DIRECT, &w.name, metric) else {
                continue;
            };
            let _ = write!(
                s,
                "| {} | {} | {} ±{:.0}% |",
                w.name,
                metric,
                num(d.stat.median),
                d.stat.spread * 100.0
            );
            for p in paths.iter().filter(|p| **p != paths::DIRECT) {
                match find(&r.summary, p, &w.name, metric) {
                    Some(row) => match row.ratio_to_direct {
                        Some(q) => {
                            let _ = write!(s, " {q:.2}x ±{:.0}% |", row.stat.spread * 100.0);
                        }
                        None => {
                            let _ = write!(s, " {} |", num(row.stat.median));
                        }
                    },
                    None => s.push_str(" - |"),
                }
            }
            s.push('\n');
        }
    }
    let _ = writeln!(s, "\n## Absolute medians\n");
    let _ = write!(s, "| workload | metric |");
    for p in &paths {
        let _ = write!(s, " {p} |");
    }
    let _ = write!(s, "\n|---|---|");
    for _ in &paths {
        s.push_str("---|");
    }
    s.push('\n');
    for w in &r.workloads {
        for &metric in w.kind.shown() {
            let _ = write!(s, "| {} | {} |", w.name, metric);
            for p in &paths {
                match find(&r.summary, p, &w.name, metric) {
                    Some(row) => {
                        let _ = write!(s, " {} |", num(row.stat.median));
                    }
                    None => s.push_str(" - |"),
                }
            }
            s.push('\n');
        }
    }
    let _ = writeln!(
        s,
        "\n## Targets\n\n| target | goal | measured | met | |\n|---|---|---|---|---|"
    );
    for t in &r.targets {
        let v = t
            .value
            .map(|v| format!("{v:.3}x"))
            .unwrap_or_else(|| "n/a".into());
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            t.target, t.goal, v, met, t.detail
        );
    }
    if !r.sk_lookup_cost.is_empty() {
        let _ = writeln!(
            s,
            "\n## sk_lookup program cost (BPF_PROG_TEST_RUN)\n\n| case | ns per run | retval | repeat |\n|---|---|---|---|"
        );
        for c in &r.sk_lookup_cost {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} | {} |",
                c.case, c.ns_per_run, c.retval, c.repeat
            );
        }
    }
    if !r.profile.is_empty() {
        let _ = writeln!(
            s,
            "\n## Profile: redirector's cost per operation (kernel BPF run-time stats, agent CPU)\n\n| workload | component | runs per op | ns per run | ns per op |\n|---|---|---|---|---|"
        );
        for p in &r.profile {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.0} | {:.0} |",
                p.workload, p.program, p.runs_per_op, p.ns_per_run, p.ns_per_op
            );
        }
    }
    if let Some(b) = &r.bystander {
        bystander(&mut s, b);
    }
    let _ = writeln!(s, "\n## Workloads\n");
    for w in &r.workloads {
        let _ = writeln!(s, "- `{}`: {}", w.name, w.what);
    }
    let _ = writeln!(s, "\n## Proof each path carried the traffic (per round)\n\n| path | handled | evidence |\n|---|---|---|");
    for p in &r.proofs {
        let _ = writeln!(s, "| {} | {} | {} |", p.path, p.handled, p.evidence);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// The bystander workload's section: conn/s per agent state, then the
/// issue's two goals with what was measured.
fn bystander(s: &mut String, b: &Bystander) {
    let rounds = |running: bool| {
        b.rounds
            .iter()
            .filter(|r| r.agent_running == running)
            .count()
    };
    let _ = writeln!(
        s,
        "\n## Bystanders: pods the agent does not serve\n\n{}; {} round(s) per state of {:.1} s each. The kernel's BPF run-time statistics are on in both states (they cost only when a program runs). Runs count every program named `redir_*` the running agent loaded, over its rounds, divided by the bystander connections in them ({}, warm-ups included); sock_ops attached to the cgroup root also counts any other TCP activity on the machine meanwhile.\n",
        b.what,
        rounds(false),
        b.slot_secs,
        b.connections
    );
    let _ = writeln!(
        s,
        "| agent | rounds | conn/s (median) | ± |\n|---|---|---|---|"
    );
    for (name, st) in [("stopped", &b.stopped), ("running", &b.running)] {
        match st {
            Some(st) => {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {:.1}% |",
                    st.n,
                    num(st.median),
                    st.spread * 100.0
                );
            }
            None => {
                let _ = writeln!(s, "| {name} | 0 | - | - |");
            }
        }
    }
    let met = |m: Option<bool>| match m {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "n/a",
    };
    let noise = b.stopped.map_or(0.0, |st| st.spread);
    let _ = writeln!(
        s,
        "\n| figure | measured | goal | met |\n|---|---|---|---|\n| bystander conn/s: agent running / stopped | {} | 1.00x within noise (±{:.1}%: the stopped rounds' half-range) | {} |\n| `redir_*` program runs per bystander connection | {:.2} | 0 | {} |\n| `redir_*` program ns per bystander connection | {:.0} | 0 | {} |",
        b.ratio.map_or("n/a".to_owned(), |q| format!("{q:.3}x")),
        noise * 100.0,
        met(b.within_noise),
        b.runs_per_conn,
        met(Some(b.runs_per_conn == 0.0)),
        b.ns_per_conn,
        met(Some(b.ns_per_conn == 0.0)),
    );
    if !b.programs.is_empty() {
        let _ = writeln!(
            s,
            "\n| program | runs | runs per bystander conn | ns per run | ns per bystander conn |\n|---|---|---|---|---|"
        );
        for p in &b.programs {
            let per_run = if p.runs > 0 {
                p.run_ns as f64 / p.runs as f64
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.0} | {:.0} |",
                p.program, p.runs, p.runs_per_conn, per_run, p.ns_per_conn
            );
        }
    }
    let foreign: u64 = b
        .rounds
        .iter()
        .filter(|r| !r.agent_running)
        .map(|r| r.redir_runs)
        .sum();
    if foreign > 0 {
        let _ = writeln!(
            s,
            "\n{foreign} runs of `redir_*` programs while this agent was stopped: another agent's programs are loaded on the machine."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workloads::{Kind, Spec};

    fn meas(path: &str, workload: &str, repeat: usize, metric: Metric, v: f64) -> Measurement {
        Measurement {
            path: path.into(),
            workload: workload.into(),
            repeat,
            ops: 1,
            secs: 1.0,
            metrics: [(metric, v)].into_iter().collect(),
        }
    }

    #[test]
    fn summary_medians_and_ratios() {
        let ms = vec![
            meas("direct", "crr", 0, Metric::ConnPerS, 100.0),
            meas("direct", "crr", 1, Metric::ConnPerS, 110.0),
            meas("direct", "crr", 2, Metric::ConnPerS, 90.0),
            meas("redirector", "crr", 0, Metric::ConnPerS, 99.0),
            meas("redirector", "crr", 1, Metric::ConnPerS, 95.0),
            meas("redirector", "crr", 2, Metric::ConnPerS, 97.0),
            meas("nftables", "crr", 0, Metric::ConnPerS, 80.0),
            meas("haproxy", "crr", 0, Metric::ConnPerS, 50.0),
            meas("nginx", "crr", 0, Metric::ConnPerS, 60.0),
        ];
        let rows = summarize(&ms);
        let red = find(&rows, "redirector", "crr", Metric::ConnPerS).expect("row");
        assert_eq!(red.stat.median, 97.0);
        assert_eq!(red.ratio_to_direct, Some(0.97));
        let wl = vec![Workload {
            name: "crr".into(),
            kind: Kind::Crr,
            what: String::new(),
            spec: Spec::Crr,
        }];
        let t = targets::check_all(&rows, &wl);
        let get = |name: &str| t.iter().find(|x| x.target == name).expect(name);
        assert_eq!(get("CRR conn/s: redirector vs direct").met, Some(true));
        assert_eq!(
            get("CRR conn/s: redirector vs nftables redirect").met,
            Some(true)
        );
        let best = get("CRR conn/s: redirector / best proxy");
        assert_eq!(best.detail, "best proxy: nginx");
        assert!((best.value.expect("value") - 97.0 / 60.0).abs() < 1e-9);
        assert_eq!(best.met, Some(false));
    }

    #[test]
    fn markdown_has_tables() {
        let ms = vec![
            meas("direct", "crr", 0, Metric::ConnPerS, 100.0),
            meas("redirector", "crr", 0, Metric::ConnPerS, 98.0),
        ];
        let wl = vec![Workload {
            name: "crr".into(),
            kind: Kind::Crr,
            what: "connect".into(),
            spec: Spec::Crr,
        }];
        let plan = Plan {
            mode: "smoke",
            repeats: 1,
            slot_secs: 0.1,
            open_loop_rates: vec![],
            saturation_inflight: 1,
            bpf_repeat: 1,
            bystander_rounds: 1,
            bystander_slot_secs: 0.1,
        };
        let paths = ["direct", "redirector"]
            .iter()
            .map(|p| PathStatus {
                name: (*p).into(),
                what: String::new(),
                measured: true,
                note: String::new(),
            })
            .collect();
        let collected = Collected {
            measurements: ms,
            ..Collected::default()
        };
        let r = Results::new(&plan, paths, &wl, collected, vec![], 1.0);
        let md = markdown(&r);
        assert!(
            md.contains("| workload | metric | direct | redirector |"),
            "{md}"
        );
        assert!(
            md.contains("| crr | conn_per_s | 100.0 ±0% | 0.98x ±0% |"),
            "{md}"
        );
        assert!(md.contains("CRR conn/s: redirector vs direct"), "{md}");
    }
}
