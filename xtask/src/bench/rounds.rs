//! The measurement proper: which paths run, then the interleaved rounds in
//! which each path is started, carries every workload for one slot, and is
//! stopped with its proof.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use super::{
    paths::{self, Env, PathUnderTest},
    plan::Plan,
    report::{Collected, Measurement, PathStatus},
    stats,
    topology::Topology,
    workloads::{self, Querier, Workload},
    BenchArgs,
};

/// A short idle gap before each workload, the same for every path, so
/// deferred work of one workload (TIME_WAIT reaping, flow records still
/// being written) does not land in the next one.
const SETTLE: Duration = Duration::from_millis(100);

/// Every path's status for the report, and the paths to measure (direct
/// always, the others if `--paths` names them or is empty, and the machine
/// can run them).
pub fn select(
    args: &BenchArgs,
    agent: &std::path::Path,
) -> (Vec<PathStatus>, Vec<&'static dyn PathUnderTest>) {
    let mut statuses = Vec::new();
    let mut chosen = Vec::new();
    for path in paths::ALL {
        let wanted = path.name() == paths::DIRECT
            || args.paths.is_empty()
            || args.paths.iter().any(|p| p == path.name());
        let status = match path.available(agent) {
            Ok(()) if wanted => {
                chosen.push(path);
                None
            }
            Ok(()) => Some("not selected".to_owned()),
            Err(why) => Some(why),
        };
        statuses.push(PathStatus {
            name: path.name().into(),
            what: path.what(),
            measured: status.is_none(),
            note: status.unwrap_or_default(),
        });
    }
    for s in statuses.iter().filter(|s| !s.measured) {
        eprintln!("bench: skipping {}: {}", s.name, s.note);
    }
    (statuses, chosen)
}

/// `plan.repeats` rounds over `chosen`, each round starting one path later
/// (A B C, B C A, C A B, ...): a fixed order would give every path the same
/// neighbour and the same position after setup, and that bias would never
/// average out.
pub fn measure(
    plan: &Plan,
    chosen: &[&dyn PathUnderTest],
    workloads: &[Workload],
    env: &Env,
    querier: &Querier,
    notes: &mut Vec<String>,
) -> Result<Collected> {
    let slot = Duration::from_secs_f64(plan.slot_secs);
    let mut out = Collected::default();
    let mut merged: BTreeMap<(String, String), Histogram<u64>> = BTreeMap::new();
    for repeat in 0..plan.repeats {
        let mut order = chosen.to_vec();
        order.rotate_left(repeat % chosen.len().max(1));
        for path in order {
            eprintln!(
                "bench: round {}/{} path {}",
                repeat + 1,
                plan.repeats,
                path.name()
            );
            let running = path
                .start(env)
                .with_context(|| format!("starting path {}", path.name()))?;
            let result = (|| -> Result<()> {
                let addr = Topology::live_store_addr(path.port());
                workloads::wait_reachable(&env.topo.q, addr, Duration::from_secs(15))?;
                for w in workloads {
                    std::thread::sleep(SETTLE);
                    let m = slot_of(querier, w, path.name(), repeat, addr, slot, &mut merged)?;
                    out.measurements.push(m);
                }
                // Once is enough: the program is the same in every round.
                if repeat == 0 {
                    match running.program_cost(env, plan.bpf_repeat) {
                        Some(Ok(c)) => out.sk_lookup_cost = c,
                        Some(Err(e)) => notes.push(format!("BPF_PROG_TEST_RUN: {e:#}")),
                        None => {}
                    }
                }
                Ok(())
            })();
            // Stopped even when a workload failed: the next path needs the port.
            let proof = running.stop();
            result?;
            out.proofs
                .push(proof.with_context(|| format!("stopping path {}", path.name()))?);
        }
    }
    out.cdfs = merged
        .iter()
        .map(|((w, p), h)| ((w.clone(), p.clone()), stats::cdf(h)))
        .collect();
    Ok(out)
}

/// One workload over one path for one slot; its latencies are merged into
/// `merged` (the CDFs over all rounds).
fn slot_of(
    querier: &Querier,
    w: &Workload,
    path: &str,
    repeat: usize,
    addr: std::net::SocketAddr,
    slot: Duration,
    merged: &mut BTreeMap<(String, String), Histogram<u64>>,
) -> Result<Measurement> {
    let s = querier
        .run(w.spec, addr, slot)
        .with_context(|| format!("{} over {path}", w.name))?;
    if s.ops == 0 {
        bail!("{} over {path}: no operation completed", w.name);
    }
    merged
        .entry((w.name.clone(), path.to_owned()))
        .or_insert_with(stats::new_histogram)
        .add(&s.hist)
        .context("merge histogram")?;
    Ok(Measurement {
        path: path.into(),
        workload: w.name.clone(),
        repeat,
        ops: s.ops,
        secs: s.secs,
        metrics: s.metrics(w.kind),
    })
}

/// Smoke mode's assertions: every measured path carried traffic by its own
/// account, and the paths that need nothing from the machine were measured
/// (when all were asked for). No performance assertions.
pub fn smoke_check(r: &super::report::Results, all_paths: bool) -> Result<()> {
    let mut failed = Vec::new();
    for path in paths::ALL {
        let measured = r.paths.iter().any(|s| s.name == path.name() && s.measured);
        let handled: u64 = r
            .proofs
            .iter()
            .filter(|p| p.path == path.name())
            .map(|p| p.handled)
            .sum();
        if measured && handled == 0 && path.counts() {
            failed.push(format!("{} shows no handled connections", path.name()));
        }
        let required = path.name() == paths::DIRECT || (all_paths && path.required());
        if required && !measured {
            failed.push(format!("{} was not measured", path.name()));
        }
    }
    // The bystander workload only has to run: its ratio is noise at smoke
    // lengths and its runs per connection are the agent's business.
    let redirector = r
        .paths
        .iter()
        .any(|s| s.name == paths::REDIRECTOR && s.measured);
    if redirector && !r.bystander.as_ref().is_some_and(|b| b.carried_traffic()) {
        failed.push("the bystander workload carried no traffic in some agent state".into());
    }
    if failed.is_empty() {
        eprintln!("bench: smoke OK: every path carried traffic (see proofs in the report)");
        Ok(())
    } else {
        bail!("smoke bench: {}", failed.join("; "))
    }
}
