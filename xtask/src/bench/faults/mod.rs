//! `cargo xtask bench --faults`: the failure modes, each with its figures, on
//! the harness's topology, agent launcher, CPU pinning and BPF run-time stats:
//!
//! - `synflood`: as many connection attempts as one core can send for 10 s
//!   to the advertised port of a namespace with no live-store listening,
//!   while a healthy namespace is served by the same agent;
//! - `restart`: the live-store closes its listener and listens again, and is
//!   killed with SIGKILL and started again, under load; redirector against the
//!   nginx sidecar;
//! - `agent-kill`: the agent killed with SIGKILL under load, pinned and not.
//!
//! Each scenario is a few seconds; the whole mode runs in about a minute and
//! writes `results.md` and `results.json` to `target/bench/faults/`. One file
//! per scenario; `load` holds what they share (the live-store stand-ins, the
//! querier's loads).

mod agent_kill;
mod load;
mod restart;
mod synflood;

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::{bail, Context, Result};
use redirector_tests::Stopped;
use serde::Serialize;

use super::{
    agent,
    cpu::{self, CpuTimes},
    packages,
    report::{self, Machine},
    stats::spread,
    topology::{self, Netns},
    BenchArgs, WorkDir,
};

pub const SCENARIOS: [&str; 3] = ["synflood", "restart", "agent-kill"];

/// One figure of a scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub case: String,
    pub figure: String,
    pub value: String,
    /// The number behind `value`, for scripts.
    pub raw: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub what: String,
    pub secs: f64,
    /// Other tenants' CPU during the scenario, in cores: whole-machine busy
    /// time (/proc/stat) less the bench's own cgroup.
    pub foreign_cpu_cores: Option<f64>,
    pub figures: Vec<Figure>,
}

#[derive(Debug, Serialize)]
pub struct FaultResults {
    pub machine: Machine,
    pub command: String,
    pub scenarios: Vec<Scenario>,
    pub notes: Vec<String>,
    pub elapsed_secs: f64,
}

impl Scenario {
    fn new(name: &str, what: &str) -> Self {
        Self {
            name: name.into(),
            what: what.into(),
            secs: 0.0,
            foreign_cpu_cores: None,
            figures: Vec::new(),
        }
    }

    fn add(&mut self, case: &str, figure: &str, value: String, raw: Option<f64>) {
        self.figures.push(Figure {
            case: case.into(),
            figure: figure.into(),
            value,
            raw,
        });
    }

    fn num(&mut self, case: &str, figure: &str, v: f64, unit: &str) {
        let value = if v.is_finite() {
            format!("{}{unit}", fmt_num(v))
        } else {
            "n/a".into()
        };
        self.add(case, figure, value, v.is_finite().then_some(v));
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let chosen: Vec<&str> = if args.scenario.is_empty() {
        SCENARIOS.to_vec()
    } else {
        for s in &args.scenario {
            if !SCENARIOS.contains(&s.as_str()) {
                bail!(
                    "unknown scenario {s:?}: choose from {}",
                    SCENARIOS.join(", ")
                );
            }
        }
        SCENARIOS
            .into_iter()
            .filter(|s| args.scenario.iter().any(|a| a == s))
            .collect()
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/faults"));
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let work = WorkDir::create(root)?;
    let bin = agent::bin(root);
    if !bin.exists() {
        bail!("{} not built (run without --no-build)", bin.display());
    }
    let mut notes = packages::ensure();
    let cgroup = match cpu::BenchCgroup::enter() {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!("no bench cgroup, so no noise figure: {e:#}"));
            None
        }
    };
    let topo = topology::create()?;
    let mut scenarios = Vec::new();
    for name in chosen {
        eprintln!("bench: faults: {name}");
        let t0 = CpuTimes::now()?;
        let start = Instant::now();
        let mut s = match name {
            "synflood" => synflood::run(&topo, &bin, work.path())?,
            "restart" => restart::run(root, &topo, &bin, work.path(), &mut notes)?,
            _ => agent_kill::run(&topo, &bin, work.path())?,
        };
        let t1 = CpuTimes::now()?;
        s.secs = start.elapsed().as_secs_f64();
        let foreign = (t0.busy_secs_until(&t1) - t0.own_secs_until(&t1)) / s.secs;
        s.foreign_cpu_cores = foreign.is_finite().then_some(foreign.max(0.0));
        scenarios.push(s);
    }
    drop(topo);
    drop(cgroup);
    let results = FaultResults {
        machine: report::machine(),
        command: std::iter::once("cargo xtask bench".to_owned())
            .chain(std::env::args().skip(2))
            .collect::<Vec<_>>()
            .join(" "),
        scenarios,
        notes,
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    super::write_results(&out, &results, &markdown(&results), started)?;
    work.done();
    Ok(())
}

fn markdown(r: &FaultResults) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Failure modes: `{}`\n", r.command);
    let _ = writeln!(
        md,
        "{} ({} cores, {}), kernel {}, {}, commit {}; {:.0} s in all.\n",
        m.cpu, m.cores, m.memory, m.kernel, m.date, m.commit, r.elapsed_secs
    );
    for s in &r.scenarios {
        let _ = writeln!(md, "## {}\n\n{}\n", s.name, s.what);
        let _ = writeln!(
            md,
            "{:.1} s; other tenants used {} cores on average meanwhile.\n",
            s.secs,
            s.foreign_cpu_cores
                .map_or("an unknown number of".to_owned(), |c| format!("{c:.2}"))
        );
        let _ = writeln!(md, "| case | figure | value |\n|---|---|---|");
        for f in &s.figures {
            let _ = writeln!(md, "| {} | {} | {} |", f.case, f.figure, f.value);
        }
        md.push('\n');
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "Notes:\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md
}

/// Flow records of a JSON flow log: (event, netns) -> count, and lines that
/// are not JSON (a record cut short by a SIGKILL in the middle of a write).
fn read_flow_log(path: &Path) -> (BTreeMap<(String, String), u64>, u64) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut counts = BTreeMap::new();
    let mut broken = 0;
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                let key = (
                    v["event"].as_str().unwrap_or_default().to_owned(),
                    v["netns"].as_str().unwrap_or_default().to_owned(),
                );
                *counts.entry(key).or_insert(0) += 1;
            }
            Err(_) => broken += 1,
        }
    }
    (counts, broken)
}

fn records(counts: &BTreeMap<(String, String), u64>, event: &str, ns: &Netns) -> u64 {
    counts
        .get(&(event.to_owned(), ns.path().display().to_string()))
        .copied()
        .unwrap_or(0)
}

/// A counter from a stopped agent's exit summary.
fn count(stopped: &Stopped, name: &str) -> Result<u64> {
    let line = stopped.counters().unwrap_or_default();
    redirector_tests::counter_in(line, name)
        .with_context(|| format!("no {name}= in the agent's summary: {line}"))
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "**no**" }.to_owned()
}

/// Median and max of `v` as "median (max)".
fn median_max(v: &[f64], unit: &str) -> (String, Option<f64>) {
    match spread(v) {
        Some(sp) => {
            let max = v.iter().copied().fold(f64::MIN, f64::max);
            (
                format!("{}{unit} ({}{unit})", fmt_num(sp.median), fmt_num(max)),
                Some(sp.median),
            )
        }
        None => ("n/a".into(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_log_counts_events_per_namespace_and_broken_lines() {
        let dir = std::env::temp_dir().join(format!("rdb-faults-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("flows.json");
        fs::write(
            &log,
            "{\"event\":\"open\",\"netns\":\"/a\"}\n{\"event\":\"close\",\"netns\":\"/a\"}\n{\"event\":\"op\n{\"event\":\"open\",\"netns\":\"/b\"}\n",
        )
        .expect("write");
        let (counts, broken) = read_flow_log(&log);
        assert_eq!(broken, 1);
        assert_eq!(counts.get(&("open".into(), "/a".into())), Some(&1));
        assert_eq!(counts.get(&("open".into(), "/b".into())), Some(&1));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(1234.5), "1234");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(3.0), "3");
        let (v, m) = median_max(&[1.0, 3.0, 2.0], " ms");
        assert_eq!(v, "2 ms (3 ms)");
        assert_eq!(m, Some(2.0));
    }
}
