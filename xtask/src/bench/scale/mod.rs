//! `cargo xtask bench --scale 10,100,1000`: the agent with `--discover` on a
//! node with many pods. For each count N, from scratch: N live-store pods
//! (a network namespace, a cgroup `pod-K/ctr`, a process listening on the
//! listen port with `-target=live-store`) and N/10 (at least 2) querier pods
//! listening on the same port with `-target=querier`; then the agent starts
//! and we measure how long until every live-store namespace is served (a
//! real connection to the advertised port answered by its pod), the time
//! from listen(2) to served for 100 more live-stores started one by one, the
//! agent's idle CPU, its memory and the kernel memory of its BPF objects,
//! and how many querier namespaces it served (none should be). N=0 (the
//! agent alone) is the baseline of the per-namespace figures. Writes
//! target/bench/scale/.
//!
//! Layout: `pods` (namespaces, cgroups, the pods' process), `probe` (the
//! served-or-not connection), `usage` (the agent's memory from /proc),
//! `report` (tables, JSON, charts).

mod pods;
mod probe;
mod report;
mod usage;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub use pods::{pod_main, POD_COMMAND};
use pods::{Cgroups, Pod, PodNetns, Pods, Role};
use redirector_tests::{Agent, AgentOptions};
use usage::Memory;

use super::{agent, packages, BenchArgs, WorkDir};

/// How long and how much: `--quick` shortens the idle window and the
/// series of new starts.
#[derive(Clone, Debug, Serialize)]
pub struct ScalePlan {
    pub counts: Vec<usize>,
    /// Live-stores started one by one once all N are served.
    pub new_starts: usize,
    pub new_start_spacing_ms: u64,
    /// Window of the agent's idle CPU, after a settling pause.
    pub idle_secs: f64,
    /// Give up waiting for all N to be served after this long.
    pub served_limit_secs: f64,
}

impl ScalePlan {
    fn for_args(a: &BenchArgs) -> Self {
        let mut counts = a.scale.clone();
        counts.sort_unstable();
        counts.dedup();
        counts.retain(|&n| n > 0);
        Self {
            counts,
            new_starts: if a.quick { 20 } else { 100 },
            new_start_spacing_ms: 75,
            idle_secs: if a.quick { 5.0 } else { 20.0 },
            // At 1000 the agent took 113 s to say ready (this machine, 2 cores).
            served_limit_secs: 300.0,
        }
    }
}

/// The figures at one N.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Point {
    pub namespaces: usize,
    pub queriers: usize,
    /// Creating the namespaces, cgroups and pods (before the agent starts).
    pub setup_secs: f64,
    /// Mean VmRSS of a few pods' processes.
    pub pod_rss_kib: f64,
    /// Agent start until it printed `ready`.
    pub agent_ready_secs: f64,
    /// Agent start until the last of the N answered through the advertised
    /// port (None: not all within the limit).
    pub all_served_secs: Option<f64>,
    pub served: usize,
    /// The longest probe sweep over the namespaces not served yet: the
    /// resolution of `all_served_secs`.
    pub sweep_ms: f64,
    pub new_starts: usize,
    pub new_served: usize,
    /// listen(2) to first answered connection, new starts.
    pub listen_to_served_ms: Option<Percentiles>,
    pub idle_secs: f64,
    /// Agent utime+stime over the idle window, % of one core.
    pub idle_cpu_pct: Option<f64>,
    pub memory: Memory,
    /// Namespaces the agent served when `memory` was read (live-stores,
    /// new starts and queriers that answered).
    pub served_total: usize,
    /// (figure - the N=0 figure) / served_total.
    pub rss_per_ns_kib: Option<f64>,
    pub bpf_memlock_per_ns_bytes: Option<f64>,
    pub queriers_served: usize,
    /// SIGTERM to exit (detaching from every namespace).
    pub agent_stop_secs: f64,
    /// Why the agent did not exit cleanly, if it did not.
    pub agent_stop_error: Option<String>,
    pub secs: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

/// Nearest-rank percentiles of `v` (milliseconds).
fn percentiles(v: &[f64]) -> Option<Percentiles> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Percentiles {
        p50: rank(0.50),
        p99: rank(0.99),
        max: v[v.len() - 1],
        n: v.len(),
    })
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag the long loops check, so they return an
/// error and the guards (pods, cgroups, agent) clean up on the way out.
fn catch_signals() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A sleep that ends early, with an error, on Ctrl-C.
fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    catch_signals();
    let plan = ScalePlan::for_args(args);
    if plan.counts.is_empty() {
        bail!("--scale needs namespace counts above 0, e.g. --scale 10,100,1000");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/scale"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let work = WorkDir::create(root)?;
    let bin = agent::bin(root);
    if !bin.exists() {
        bail!("{} not built (run without --no-build)", bin.display());
    }
    let program = std::env::current_exe().context("own executable")?;
    let mut notes = packages::ensure();
    notes.extend(limits(&plan));
    let ctx = Ctx {
        bin: &bin,
        program: &program,
        work: work.path(),
        plan: &plan,
    };
    eprintln!("bench: scale: baseline (the agent alone)");
    let baseline = measure(&ctx, 0, None)?;
    let mut points = vec![baseline.clone()];
    for &n in &plan.counts {
        eprintln!("bench: scale: {n} namespaces");
        points.push(measure(&ctx, n, Some(&baseline.memory))?);
    }
    let results = report::ScaleResults::new(plan, points, notes, started.elapsed().as_secs_f64());
    super::write_results(&out, &results, &report::markdown(&results), started)?;
    report::charts(&results, &out).context("charts")?;
    work.done();
    Ok(())
}

struct Ctx<'a> {
    bin: &'a Path,
    program: &'a Path,
    work: &'a Path,
    plan: &'a ScalePlan,
}

/// What the largest N needs from the machine, said up front.
fn limits(plan: &ScalePlan) -> Vec<String> {
    let n = plan.counts.iter().max().copied().unwrap_or(0);
    let pods = n + (n / 10).max(2) + plan.new_starts;
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap_or_default();
    let note = format!(
        "largest step: {pods} pods (namespaces and processes); open files limit {}, pid_max {}",
        rl.rlim_cur,
        pid_max.trim()
    );
    eprintln!("bench: scale: {note}");
    vec![note]
}

/// One N from scratch.
fn measure(ctx: &Ctx, n: usize, baseline: Option<&Memory>) -> Result<Point> {
    let step = Instant::now();
    let queriers = if n == 0 { 0 } else { (n / 10).max(2) };
    let new_starts = if n == 0 { 0 } else { ctx.plan.new_starts };
    let mut p = Point {
        namespaces: n,
        queriers,
        new_starts,
        idle_secs: ctx.plan.idle_secs,
        ..Point::default()
    };
    // Declared before the pods: dropped after them, once their processes
    // are gone.
    let mut cgroups = Cgroups::create()?;
    let mut netns = create_netns(n + queriers + new_starts)?;
    let fresh = netns.split_off(n + queriers);
    let mut pods = Pods::default();
    for (k, ns) in netns.into_iter().enumerate() {
        let (name, role) = if k < n {
            (format!("ls-{k}"), Role::LiveStore)
        } else {
            (format!("q-{}", k - n), Role::Querier)
        };
        let ctr = cgroups.container(&format!("pod-{name}"))?;
        pods.0.push(Pod::spawn(ctx.program, name, role, ns, &ctr)?);
    }
    for pod in &mut pods.0 {
        if interrupted() {
            bail!("interrupted");
        }
        pod.wait_listening()?;
    }
    let fresh_ctrs = (0..new_starts)
        .map(|k| cgroups.container(&format!("pod-new-{k}")))
        .collect::<Result<Vec<PathBuf>>>()?;
    p.setup_secs = step.elapsed().as_secs_f64();
    let sample: Vec<u64> = pods
        .0
        .iter()
        .take(20)
        .map(|pod| usage::memory(pod.pid()).rss_kib)
        .collect();
    p.pod_rss_kib = sample.iter().sum::<u64>() as f64 / sample.len().max(1) as f64;
    eprintln!(
        "bench: scale: {} pods listening after {:.1} s (pod RSS {:.0} KiB)",
        pods.0.len(),
        p.setup_secs,
        p.pod_rss_kib
    );

    // The agent, and the sweeps that see each namespace become served.
    let dir = ctx.work.join(format!("scale-{n}"));
    let args = ["--discover", "--cgroup-pattern", pods::CGROUP_DIR];
    let live: &[Pod] = &pods.0[..n];
    let limit = Duration::from_secs_f64(ctx.plan.served_limit_secs);
    let sweeping = AtomicBool::new(false);
    let (agent, t0, when, sweep) = std::thread::scope(|s| -> Result<_> {
        let sweeper = (n > 0).then(|| s.spawn(|| probe::first_served(live, limit, &sweeping)));
        while sweeper.is_some() && !sweeping.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let t0 = Instant::now();
        let agent = agent::options(ctx.bin, &[], &args, &dir).and_then(|o| {
            // Today the agent serves what it discovers at start before it
            // says ready: about 50 ms a namespace.
            Agent::launch(&AgentOptions {
                ready_within: Some(limit),
                ..o
            })
        });
        p.agent_ready_secs = t0.elapsed().as_secs_f64();
        let agent = match agent {
            Ok(a) => a,
            Err(e) => {
                // The sweeper stops at the flag rather than at its limit.
                INTERRUPTED.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        let (when, sweep) = match sweeper {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("sweeper panicked"))??,
            None => (Vec::new(), Duration::ZERO),
        };
        Ok((agent, t0, when, sweep))
    })?;
    p.served = when.iter().flatten().count();
    p.sweep_ms = sweep.as_secs_f64() * 1e3;
    p.all_served_secs = (n > 0 && p.served == n)
        .then(|| when.iter().flatten().max().map(|t| (*t - t0).as_secs_f64()))
        .flatten();
    eprintln!(
        "bench: scale: agent ready after {:.2} s; {}/{n} served, all after {}",
        p.agent_ready_secs,
        p.served,
        p.all_served_secs
            .map_or("-".to_owned(), |s| format!("{s:.2} s"))
    );

    // New live-stores, one at a time: listen(2) to served.
    let spacing = Duration::from_millis(ctx.plan.new_start_spacing_ms);
    let mut probes = Vec::new();
    for (k, (ns, ctr)) in fresh.into_iter().zip(&fresh_ctrs).enumerate() {
        let tick = Instant::now();
        let probe_ns = ns.try_clone()?;
        // From this (the main) thread: a pod gets SIGTERM when the thread
        // that started it exits.
        let (pod, listened) =
            Pod::start(ctx.program, format!("new-{k}"), Role::LiveStore, ns, ctr)?;
        let name = pod.name.clone();
        pods.0.push(pod);
        probes.push(std::thread::spawn(move || {
            probe::until_served(&probe_ns, &name, listened, Duration::from_secs(30))
        }));
        nap(spacing.saturating_sub(tick.elapsed()))?;
    }
    let mut took = Vec::new();
    for h in probes {
        if let Some(d) = h.join().map_err(|_| anyhow::anyhow!("probe panicked"))?? {
            took.push(d.as_secs_f64() * 1e3);
        }
    }
    p.new_served = took.len();
    p.listen_to_served_ms = percentiles(&took);
    if let Some(l) = &p.listen_to_served_ms {
        eprintln!(
            "bench: scale: {}/{new_starts} new starts served, listen to served p50 {:.0} ms p99 {:.0} ms",
            p.new_served, l.p50, l.p99
        );
    }

    // Idle: everything served, nothing changing.
    nap(Duration::from_secs(2))?;
    let pid = agent.pid();
    let cpu0 = agent::process_cpu_secs(pid);
    let idle = Instant::now();
    nap(Duration::from_secs_f64(ctx.plan.idle_secs))?;
    let cpu1 = agent::process_cpu_secs(pid);
    let secs = idle.elapsed().as_secs_f64();
    p.idle_cpu_pct = cpu0.zip(cpu1).map(|(a, b)| (b - a) / secs * 100.0);
    p.memory = usage::memory(pid);

    // Querier pods: served is a mistake (once discovery filters by role).
    for pod in pods.0.iter().filter(|p| p.role == Role::Querier) {
        if probe::served_now(pod)? == probe::Seen::Served {
            p.queriers_served += 1;
        }
    }
    p.served_total = p.served + p.new_served + p.queriers_served;
    if let (Some(b), true) = (baseline, p.served_total > 0) {
        let per = |now: u64, base: u64| (now as f64 - base as f64) / p.served_total as f64;
        p.rss_per_ns_kib = Some(per(p.memory.rss_kib, b.rss_kib));
        p.bpf_memlock_per_ns_bytes = Some(per(p.memory.bpf_memlock_bytes(), b.bpf_memlock_bytes()));
    }
    eprintln!(
        "bench: scale: idle CPU {}; RSS {} KiB; {} progs, {} maps, {} links, BPF memlock {} KiB; {}/{queriers} querier namespaces served",
        p.idle_cpu_pct.map_or("-".into(), |c| format!("{c:.2}%")),
        p.memory.rss_kib,
        p.memory.progs,
        p.memory.maps,
        p.memory.links,
        p.memory.bpf_memlock_bytes() / 1024,
        p.queriers_served
    );
    let stop = Instant::now();
    // A figure, not a failure: at a thousand namespaces the agent takes
    // longer than the launcher's 10 s grace to detach, and is killed.
    if let Err(e) = agent.stop() {
        p.agent_stop_error = Some(format!("{e:#}"));
    }
    p.agent_stop_secs = stop.elapsed().as_secs_f64();
    drop(pods);
    drop(cgroups);
    p.secs = step.elapsed().as_secs_f64();
    Ok(p)
}

/// `count` namespaces, made on two threads (unshare and loopback up cost
/// about a millisecond each, mostly in the kernel).
fn create_netns(count: usize) -> Result<Vec<PodNetns>> {
    let half = count.div_ceil(2);
    std::thread::scope(|s| {
        let workers: Vec<_> = [half, count - half]
            .into_iter()
            .map(|k| {
                s.spawn(move || -> Result<Vec<PodNetns>> {
                    (0..k)
                        .map(|_| {
                            if interrupted() {
                                bail!("interrupted");
                            }
                            PodNetns::create()
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(count);
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| anyhow::anyhow!("netns worker panicked"))??,
            );
        }
        Ok(all)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v).expect("values");
        assert_eq!((p.p50, p.p99, p.max, p.n), (50.0, 99.0, 100.0, 100));
        let p = percentiles(&[3.0, 1.0]).expect("values");
        assert_eq!((p.p50, p.p99), (1.0, 3.0));
        assert!(percentiles(&[]).is_none());
    }
}
