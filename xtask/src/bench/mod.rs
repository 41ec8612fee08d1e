//! `cargo xtask bench [--quick|--smoke]`: redirector against direct, nftables
//! and userspace sidecar proxies, on one machine in one run, interleaved
//! (A B C ... A B C ...) so machine noise hits every path alike.
//!
//! Layout: `plan` (modes, workloads), `rounds` (the interleaved loop, path
//! selection, the smoke check), `paths/` (one file per path behind the
//! `PathUnderTest` trait), `agent` (the agent as the bench runs it, on
//! redirector-tests' launcher), `topology` (namespaces, veth), `servers`
//! (live-store stand-in), `grpc` (its service), `workloads` (load
//! generators), `metric` (every figure, named once), `targets` (the issue's
//! goals, each defined once), `cpu`, `bpf` (sk_lookup cost, run-time stats),
//! `profile` (where redirector's per-connection cost goes), `bystander` (what
//! the agent costs pods it does not serve), `stats`, `report`,
//! `charts`, `packages` (Debian installs), `faults/` (`--faults`: failure
//! modes), `scale/` (`--scale`: the agent with `--discover` among many pods).

mod agent;
mod bpf;
mod bystander;
mod charts;
pub mod cpu;
mod faults;
mod grpc;
mod metric;
mod packages;
mod paths;
mod plan;
mod profile;
mod report;
mod rounds;
pub mod scale;
mod servers;
mod stats;
mod targets;
mod topology;
mod workloads;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};

use paths::Env;
use plan::Plan;
use report::Results;
use workloads::Querier;

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
    /// Benchmark the agent `cargo xtask build` already built (skip setup and build).
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
    /// The agent with --discover among many pods instead of paths: for each
    /// comma-separated count of live-store namespaces, time until all are
    /// served, listen-to-served of 100 new ones, idle CPU, memory; writes
    /// target/bench/scale/. With --quick: a shorter idle window, 20 new starts.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N,N,...",
        conflicts_with_all = ["smoke", "repeats", "paths", "faults"]
    )]
    pub scale: Vec<usize>,
}

impl BenchArgs {
    pub fn smoke() -> Self {
        Self {
            smoke: true,
            ..Self::default()
        }
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

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    if args.faults {
        return faults::run(root, &args);
    }
    if !args.scale.is_empty() {
        return scale::run(root, &args);
    }
    let started = Instant::now();
    let plan = Plan::for_args(&args);
    let out = plan.out_dir(root, &args);
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let work = WorkDir::create(root)?;
    let agent = agent::bin(root);

    let mut notes = packages::ensure();
    let (statuses, chosen) = rounds::select(&args, &agent);
    // Before any thread or child starts, so all of them are accounted.
    let cgroup = match cpu::BenchCgroup::enter() {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!("no bench cgroup, own_cpu_* figures missing: {e:#}"));
            None
        }
    };
    let topo = topology::create()?;
    let live_store = servers::LiveStore::start(&topo.l)?;
    let querier = Querier::new(&topo.q)?;
    let workloads = plan.workloads();
    let env = Env {
        topo: &topo,
        agent: &agent,
        work: work.path(),
        live_store_accepts: live_store.accepts(),
    };
    let mut collected = rounds::measure(&plan, &chosen, &workloads, &env, &querier, &mut notes)?;
    if chosen.iter().any(|p| p.name() == paths::REDIRECTOR) {
        let slot = std::time::Duration::from_secs_f64(plan.slot_secs);
        match profile::measure(&env, &querier, slot) {
            Ok(p) => collected.profile = p,
            Err(e) => notes.push(format!("profile: {e:#}")),
        }
        match bystander::measure(&plan, &env) {
            Ok(b) => collected.bystander = Some(b),
            Err(e) => notes.push(format!("bystander: {e:#}")),
        }
    }
    drop(querier);
    drop(live_store);
    drop(topo);
    drop(cgroup);

    let results = Results::new(
        &plan,
        statuses,
        &workloads,
        collected,
        notes,
        started.elapsed().as_secs_f64(),
    );
    write_results(&out, &results, &report::markdown(&results), started)?;
    charts::write(&results, &out).context("charts")?;
    work.done();
    if args.smoke {
        rounds::smoke_check(&results, args.paths.is_empty())?;
    }
    Ok(())
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

/// Writes a mode's `results.json` and `results.md` to `out` and prints the
/// markdown (charts, where a mode has them, go next to them).
fn write_results(
    out: &Path,
    results: &impl serde::Serialize,
    md: &str,
    started: std::time::Instant,
) -> Result<()> {
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    std::fs::write(out.join("results.md"), md)?;
    println!("{md}");
    eprintln!(
        "bench: wrote {}/results.{{md,json}} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
