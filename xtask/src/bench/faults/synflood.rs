//! `synflood`: a crash-looping live-store under query load. One core sends
//! connection attempts to a served namespace where nothing listens while
//! the same agent serves a healthy namespace; what the flood costs the
//! kernel programs and the agent, and what it does to the flow log and to
//! the healthy namespace.

use std::{path::Path, thread, time::Duration, time::Instant};

use anyhow::Result;

use super::{
    count,
    load::{flood, Listener, Load},
    read_flow_log, records, yes, Scenario,
};
use crate::bench::{
    agent::{self, process_cpu_secs},
    bpf,
    topology::{self, Topology, ADVERTISE_PORT, LIVE_STORE_V4, QUERIER_CPU},
};

/// How long the SYN flood runs (the issue asks for 10 s).
const FLOOD: Duration = Duration::from_secs(10);
/// Healthy connections per second during the flood (one paced client).
const HEALTHY_RATE: u64 = 1000;

pub fn run(topo: &Topology, bin: &Path, work: &Path) -> Result<Scenario> {
    let mut s = Scenario::new(
        "synflood",
        &format!(
            "A crash-looping live-store under query load: one thread on CPU {QUERIER_CPU} sends non-blocking connect()s to {LIVE_STORE_V4}:{ADVERTISE_PORT} of a served namespace where nothing listens, for {} s, while the same agent serves a healthy namespace at {HEALTHY_RATE} connections/s (one paced client). Kernel programs' time from the BPF run-time statistics (on during the flood only; they add two clock reads per run).",
            FLOOD.as_secs()
        ),
    );
    // The flood's own pair of namespaces, addressed like the bench's pair.
    let Topology { q: fq, l: fl } = topology::pair("fq", "fl")?;
    let healthy = Listener::start(&topo.l)?;
    let dir = work.join("synflood");
    let before = bpf::program_ids();
    let served = agent::launch(bin, &[&topo.l, &fl], &[], &dir)?;
    let ours = bpf::new_programs(&before);
    let flood_progs = redirector_tests::sk_lookup_programs(&fl);
    let target = Topology::live_store_addr(ADVERTISE_PORT);
    let stats = bpf::RunStats::enable()?;
    let s0 = bpf::run_stats();
    let cpu0 = process_cpu_secs(served.pid());
    let load = Load::start(
        &topo.q,
        target,
        Some(Duration::from_nanos(1_000_000_000 / HEALTHY_RATE)),
        None,
    );
    let started = Instant::now();
    let attempts = flood(&fq, target, FLOOD)?;
    let secs = started.elapsed().as_secs_f64();
    let healthy_attempts = load.stop()?;
    // Let the agent drain what the last moments wrote.
    thread::sleep(Duration::from_millis(300));
    let s1 = bpf::run_stats();
    let cpu1 = process_cpu_secs(served.pid());
    drop(stats);
    let stopped = served.stop()?;
    drop(healthy);
    let (counts, broken) = read_flow_log(&agent::flow_log(&dir));

    let case = "SYN flood, no listener";
    s.num(case, "connection attempts sent", attempts as f64, "");
    s.num(
        case,
        "attempts per second (one core)",
        attempts as f64 / secs,
        "",
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        s.num(
            case,
            "agent CPU (share of one core; 10 ms ticks)",
            (b - a) / secs * 100.0,
            " %",
        );
    }
    // The agent's sk_lookup instance attached to the flooded namespace.
    let flooded: Vec<u32> = ours
        .iter()
        .copied()
        .filter(|id| flood_progs.contains(id))
        .collect();
    let (lookup_ns, lookup_runs) = bpf::delta(&s0, &s1, &flooded, bpf::PROG_SK_LOOKUP);
    s.num(
        case,
        "sk_lookup runs in the flooded namespace",
        lookup_runs as f64,
        "",
    );
    s.num(
        case,
        "sk_lookup time per SYN",
        lookup_ns as f64 / lookup_runs.max(1) as f64,
        " ns",
    );
    let (sockops_ns, sockops_runs) = bpf::delta(&s0, &s1, &ours, bpf::PROG_SOCK_OPS);
    s.num(
        case,
        "sock_ops time per attempt (every socket on the node runs it, the flood's own included)",
        sockops_ns as f64 / attempts.max(1) as f64,
        &format!(
            " ns ({:.1} runs)",
            sockops_runs as f64 / attempts.max(1) as f64
        ),
    );
    let no_listener = count(&stopped, "no_listener")?;
    let suppressed = count(&stopped, "refused_records_suppressed")?;
    let dropped = count(&stopped, "records_dropped")?;
    let refused = records(&counts, "refused", &fl);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    s.num(
        case,
        "refused connections counted (no_listener)",
        no_listener as f64,
        "",
    );
    s.num(case, "refused records in the flow log", refused as f64, "");
    s.num(
        case,
        "refused records per second (limit 100 per CPU)",
        refused as f64 / secs,
        &format!(" (limit {:.0})", 100.0 * cpus),
    );
    s.num(
        case,
        "refused records suppressed (counted)",
        suppressed as f64,
        "",
    );
    s.add(
        case,
        "records + suppressed = no_listener",
        yes(refused + suppressed == no_listener),
        None,
    );
    let case = "healthy namespace, same agent";
    let ok = healthy_attempts.iter().filter(|a| a.ok).count() as u64;
    s.num(case, "connections", healthy_attempts.len() as f64, "");
    s.num(
        case,
        "failed connections",
        (healthy_attempts.len() as u64 - ok) as f64,
        "",
    );
    let (opens, closes) = (
        records(&counts, "open", &topo.l),
        records(&counts, "close", &topo.l),
    );
    s.add(
        case,
        "open / close records in the flow log",
        format!("{opens} / {closes} (of {ok})"),
        Some(opens as f64),
    );
    s.num(case, "ring drops (records_dropped)", dropped as f64, "");
    if broken > 0 {
        s.num(case, "flow log lines that are not JSON", broken as f64, "");
    }
    Ok(s)
}
