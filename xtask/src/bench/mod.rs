//! `cargo xtask bench [--quick|--smoke]`: redirector against direct, nftables
//! and userspace sidecar proxies, on one machine in one run, interleaved
//! (A B C ... A B C ...) so machine noise hits every path alike.
//!
//! Layout: `topology` (namespaces, veth), `servers` (live-store stand-in),
//! `grpc` (its service), `paths` (redirector, nftables, proxies), `workloads`
//! (load generators), `cpu`, `bpf` (sk_lookup cost), `stats`, `report`,
//! `charts`, `packages` (Debian installs), `faults` (`--faults`: failure modes).

mod bpf;
mod charts;
mod cpu;
mod faults;
mod grpc;
mod packages;
mod paths;
mod report;
mod servers;
mod stats;
mod topology;
mod workloads;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use paths::{PathKind, Proof, Running};
use report::{Measurement, PathStatus, Results};
use topology::Topology;
use workloads::{Kind, Querier, Spec, Workload};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// Short run (well under a minute): fewer repeats, shorter slots.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// Seconds-long run that only proves every path carries traffic and the
    /// report is produced (run by `cargo xtask test`); no performance claims.
    #[arg(long)]
    pub smoke: bool,
    /// Output directory [default: docs/bench for a full run, target/bench/<mode> otherwise].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Repeats of the interleaved round (overrides the mode's default).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Only these paths (comma-separated names; direct is always included).
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<String>,
    /// Benchmark the agent already in target/release (skip setup and build).
    #[arg(long)]
    pub no_build: bool,
    /// Failure modes instead of paths (under a minute): SYN flood with no
    /// listener, live-store restarts (redirector and nginx), the agent killed
    /// with SIGKILL (pinned and not); writes target/bench/faults/.
    #[arg(long, conflicts_with_all = ["quick", "smoke", "repeats", "paths"])]
    pub faults: bool,
    /// With --faults: only these scenarios (synflood, restart, agent-kill).
    #[arg(long, value_delimiter = ',', requires = "faults")]
    pub scenario: Vec<String>,
}

impl BenchArgs {
    pub fn smoke() -> Self {
        Self {
            smoke: true,
            ..Self::default()
        }
    }
}

/// How long and how often: the only difference between the modes.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub repeats: usize,
    pub slot_secs: f64,
    pub open_loop_rates: Vec<u64>,
    pub saturation_inflight: usize,
    pub bpf_repeat: u32,
}

impl Plan {
    fn for_args(a: &BenchArgs) -> Self {
        let mut p = if a.smoke {
            Plan {
                mode: "smoke",
                repeats: 1,
                slot_secs: 0.1,
                open_loop_rates: vec![500],
                saturation_inflight: 8,
                bpf_repeat: 10_000,
            }
        } else if a.quick {
            Plan {
                mode: "quick",
                repeats: 2,
                slot_secs: 0.2,
                open_loop_rates: vec![2000],
                saturation_inflight: 32,
                bpf_repeat: 1_000_000,
            }
        } else {
            Plan {
                mode: "full",
                // Many short rounds rather than a few long ones: on a shared
                // machine a median over more rounds shrugs off bursts of
                // other tenants' work.
                repeats: 9,
                slot_secs: 0.8,
                open_loop_rates: vec![2000, 8000],
                saturation_inflight: 32,
                bpf_repeat: 1_000_000,
            }
        };
        if let Some(r) = a.repeats {
            p.repeats = r.max(1);
        }
        p
    }

    fn workloads(&self) -> Vec<Workload> {
        let w = |name: String, kind, what: String, spec| Workload {
            name,
            kind,
            what,
            spec,
        };
        let mut v = vec![
            w(
                "rr-64B".into(),
                Kind::Rr,
                "ping-pong 64 B on one persistent connection".into(),
                Spec::Rr { size: 64 },
            ),
            w(
                "rr-1KiB".into(),
                Kind::Rr,
                "ping-pong 1 KiB on one persistent connection".into(),
                Spec::Rr { size: 1024 },
            ),
            w(
                "crr".into(),
                Kind::Crr,
                "connect, 64 B request/response, close; one client thread".into(),
                Spec::Crr,
            ),
        ];
        for &rate in &self.open_loop_rates {
            for conns in [1, 16] {
                v.push(w(
                    format!("grpc-unary-{conns}c-{rate}rps"),
                    Kind::Open,
                    format!("gRPC unary, open loop at {rate} req/s over {conns} connection(s)"),
                    Spec::Open { conns, rate },
                ));
            }
        }
        for conns in [1, 16] {
            v.push(w(
                format!("grpc-sat-{conns}c"),
                Kind::Saturation,
                format!(
                    "gRPC unary, closed loop, {} in flight over {conns} connection(s)",
                    self.saturation_inflight
                ),
                Spec::Saturation {
                    conns,
                    inflight: self.saturation_inflight,
                },
            ));
        }
        v.push(w(
            "bulk-stream".into(),
            Kind::Bulk,
            "gRPC server-streaming, 64 x 64 KiB messages per call, one connection".into(),
            Spec::Bulk,
        ));
        v
    }
}

/// Set on the release re-run: the agent is already built.
const BUILT_ENV: &str = "RDB_BENCH_AGENT_BUILT";

/// `cargo xtask bench`: builds the agent (unless `--no-build`), then runs the
/// bench from a release build of xtask. The `xtask` alias builds a debug
/// binary, and an unoptimised load generator, live-store stand-in and tokio
/// proxy would measure the harness, not the paths; so a debug build re-runs
/// itself as the release build with the same arguments.
pub fn main(root: &Path, args: BenchArgs) -> Result<()> {
    if !args.no_build && std::env::var_os(BUILT_ENV).is_none() {
        crate::setup::ensure()?;
        crate::build(root)?;
    }
    if !cfg!(debug_assertions) {
        return run(root, args);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::cmd(std::process::Command::new(cargo).current_dir(root).args([
        "build",
        "--release",
        "-p",
        "xtask",
    ]))?;
    crate::cmd(
        std::process::Command::new(root.join("target/release/xtask"))
            .current_dir(root)
            .args(std::env::args_os().skip(1))
            .env(BUILT_ENV, "1"),
    )
}

const SETTLE: Duration = Duration::from_millis(100);

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    if args.faults {
        return faults::run(root, &args);
    }
    let started = Instant::now();
    let plan = Plan::for_args(&args);
    let out = args.out.clone().unwrap_or_else(|| {
        if plan.mode == "full" {
            root.join("docs/bench")
        } else {
            root.join("target/bench").join(plan.mode)
        }
    });
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let work = WorkDir::create(root)?;
    let agent = root.join("target/release/redirector");

    let mut notes = packages::ensure();
    let mut statuses = Vec::new();
    let mut chosen = Vec::new();
    for kind in paths::ALL {
        let wanted = kind == PathKind::Direct
            || args.paths.is_empty()
            || args.paths.iter().any(|p| p == kind.name());
        let status = match kind.available(&agent) {
            Ok(()) if wanted => {
                chosen.push(kind);
                None
            }
            Ok(()) => Some("not selected".to_owned()),
            Err(why) => Some(why),
        };
        statuses.push(PathStatus {
            name: kind.name().into(),
            what: kind.describe().into(),
            measured: status.is_none(),
            note: status.unwrap_or_default(),
        });
    }
    for s in statuses.iter().filter(|s| !s.measured) {
        eprintln!("bench: skipping {}: {}", s.name, s.note);
    }

    // Before any thread or child starts, so all of them are accounted.
    let cgroup = match cpu::BenchCgroup::enter() {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!("no bench cgroup, own_cpu_* figures missing: {e:#}"));
            None
        }
    };
    let topo = Topology::create()?;
    let live_store = servers::LiveStore::start(&topo.live_store)?;
    let querier = Querier::new(&topo.querier)?;
    let workloads = plan.workloads();
    let slot = Duration::from_secs_f64(plan.slot_secs);

    let mut measurements = Vec::new();
    let mut proofs: Vec<Proof> = Vec::new();
    let mut sk_lookup_cost = Vec::new();
    let mut merged: BTreeMap<(String, String), Histogram<u64>> = BTreeMap::new();
    for repeat in 0..plan.repeats {
        // Each round starts one path later (A B C, B C A, C A B, ...): a
        // fixed order would give every path the same neighbour and the same
        // position after setup, and that bias would never average out.
        let mut order = chosen.clone();
        order.rotate_left(repeat % chosen.len().max(1));
        for &kind in &order {
            eprintln!(
                "bench: round {}/{} path {}",
                repeat + 1,
                plan.repeats,
                kind.name()
            );
            let accepts_before = live_store.accepted();
            let running = Running::start(kind, &topo, &agent, work.path())
                .with_context(|| format!("starting path {}", kind.name()))?;
            let addr = Topology::live_store_addr(kind.port());
            let result = (|| -> Result<()> {
                workloads::wait_reachable(&topo.querier, addr, Duration::from_secs(15))?;
                for w in &workloads {
                    // A short idle gap, the same for every path, so deferred
                    // work of one workload (TIME_WAIT reaping, flow records
                    // still being written) does not land in the next one.
                    std::thread::sleep(SETTLE);
                    let s = querier
                        .run(w.spec, addr, slot)
                        .with_context(|| format!("{} over {}", w.name, kind.name()))?;
                    if s.ops == 0 {
                        bail!("{} over {}: no operation completed", w.name, kind.name());
                    }
                    let metrics = s.metrics(w.kind);
                    let entry = merged
                        .entry((w.name.clone(), kind.name().to_owned()))
                        .or_insert_with(stats::new_histogram);
                    entry.add(&s.hist).context("merge histogram")?;
                    measurements.push(Measurement {
                        path: kind.name().into(),
                        workload: w.name.clone(),
                        repeat,
                        ops: s.ops,
                        secs: s.secs,
                        metrics,
                    });
                }
                if kind == PathKind::Redirector && repeat == 0 {
                    match topo.live_store.try_run(|| bpf::measure(plan.bpf_repeat, 5)) {
                        Ok(c) => sk_lookup_cost = c,
                        Err(e) => notes.push(format!("BPF_PROG_TEST_RUN: {e:#}")),
                    }
                }
                Ok(())
            })();
            let proof = running.stop(live_store.accepted() - accepts_before);
            result?;
            proofs.push(proof.with_context(|| format!("stopping path {}", kind.name()))?);
        }
    }
    let mut profile = Vec::new();
    if chosen.contains(&PathKind::Redirector) {
        match profile_redirector(&topo, &querier, &agent, work.path(), slot) {
            Ok(p) => profile = p,
            Err(e) => notes.push(format!("profile: {e:#}")),
        }
    }
    drop(querier);
    drop(live_store);
    drop(topo);
    drop(cgroup);

    let cdfs = merged
        .iter()
        .map(|((w, p), h)| ((w.clone(), p.clone()), stats::cdf(h)))
        .collect();
    let results = Results::new(
        &plan,
        statuses,
        &workloads,
        measurements,
        proofs,
        sk_lookup_cost,
        profile,
        cdfs,
        notes,
        started.elapsed().as_secs_f64(),
    );
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = report::markdown(&results);
    std::fs::write(out.join("results.md"), &md)?;
    charts::write(&results, &out).context("charts")?;
    println!("{md}");
    eprintln!(
        "bench: wrote {}/results.{{md,json}} and charts in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    work.done();
    if args.smoke {
        smoke_check(&results, args.paths.is_empty())?;
    }
    Ok(())
}

/// Where redirector's per-connection cost goes: one extra redirector slot
/// (outside the measurements: run-time stats add two clock reads per program
/// run) with the kernel's BPF run-time statistics on, plus the agent's own
/// CPU time (flow records) over the same workload.
fn profile_redirector(
    topo: &Topology,
    querier: &Querier,
    agent: &Path,
    dir: &Path,
    slot: Duration,
) -> Result<Vec<bpf::ProgProfile>> {
    let before: Vec<u32> = bpf::run_stats().iter().map(|s| s.0).collect();
    let running = Running::start(PathKind::Redirector, topo, agent, dir)?;
    let result = (|| -> Result<Vec<bpf::ProgProfile>> {
        // Programs that appeared with this agent are its own.
        let ids: Vec<u32> = bpf::run_stats()
            .iter()
            .map(|s| s.0)
            .filter(|id| !before.contains(id))
            .collect();
        let pid = running.agent_pid().context("no agent pid")?;
        let addr = Topology::live_store_addr(PathKind::Redirector.port());
        workloads::wait_reachable(&topo.querier, addr, Duration::from_secs(15))?;
        let _stats = bpf::RunStats::enable()?;
        let mut out = Vec::new();
        for (name, spec) in [("crr", Spec::Crr), ("rr-64B", Spec::Rr { size: 64 })] {
            let s0 = bpf::run_stats();
            let cpu0 = paths::process_cpu_secs(pid);
            let sample = querier.run(spec, addr, slot)?;
            // Let the agent drain the flow records this workload produced.
            std::thread::sleep(Duration::from_millis(300));
            let s1 = bpf::run_stats();
            let cpu1 = paths::process_cpu_secs(pid);
            out.extend(bpf::profile(&s0, &s1, &ids, name, sample.ops));
            if let (Some(a), Some(b)) = (cpu0, cpu1) {
                out.push(bpf::ProgProfile {
                    program: "agent process (userspace: flow records, metrics)".into(),
                    workload: name.into(),
                    runs: 0,
                    ns_per_run: 0.0,
                    runs_per_op: 0.0,
                    ns_per_op: (b - a) * 1e9 / sample.ops.max(1) as f64,
                });
            }
        }
        Ok(out)
    })();
    running.stop(0)?;
    result
}

/// Smoke mode's assertions: every measured path carried traffic by its own
/// account, and the report exists. No performance assertions.
fn smoke_check(r: &Results, all_paths: bool) -> Result<()> {
    let mut failed = Vec::new();
    for s in r.paths.iter().filter(|s| s.measured) {
        let handled: u64 = r
            .proofs
            .iter()
            .filter(|p| p.path == s.name)
            .map(|p| p.handled)
            .sum();
        let unverifiable = matches!(s.name.as_str(), "envoy" | "traefik");
        if handled == 0 && !unverifiable {
            failed.push(format!("{} shows no handled connections", s.name));
        }
    }
    // These need nothing from the machine, so they must always be there.
    let required: &[&str] = if all_paths {
        &["direct", "redirector", "nftables", "tokio-proxy"]
    } else {
        &["direct"]
    };
    for m in required {
        if !r.paths.iter().any(|s| s.name == *m && s.measured) {
            failed.push(format!("{m} was not measured"));
        }
    }
    if failed.is_empty() {
        eprintln!("bench: smoke OK: every path carried traffic (see proofs in the report)");
        Ok(())
    } else {
        bail!("smoke bench: {}", failed.join("; "))
    }
}

/// Scratch directory for proxy configs, logs and the flow log: removed after
/// a successful run, kept (and named) after a failed one for diagnosis.
struct WorkDir {
    path: PathBuf,
    done: bool,
}

impl WorkDir {
    fn create(root: &Path) -> Result<Self> {
        let path = root
            .join("target/bench")
            .join(format!("work-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path, done: false })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("bench: logs and configs kept in {}", self.path.display());
        }
    }
}
