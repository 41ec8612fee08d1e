//! Where redirector's per-connection cost goes: one extra redirector slot
//! (outside the measurements: run-time stats add two clock reads per program
//! run) with the kernel's BPF run-time statistics on, plus the agent's own
//! CPU time (flow records) over the same workload.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::{
    agent::process_cpu_secs,
    bpf::{self, ProgStats},
    paths::{Env, PathUnderTest, Redirector, Running},
    topology::Topology,
    workloads::{self, Querier, Spec},
};

/// Per-program cost in real traffic: one workload with run-time stats on.
#[derive(Clone, Debug, Serialize)]
pub struct ProgProfile {
    pub program: String,
    pub workload: String,
    pub runs: u64,
    pub ns_per_run: f64,
    pub runs_per_op: f64,
    pub ns_per_op: f64,
}

pub fn measure(env: &Env, querier: &Querier, slot: Duration) -> Result<Vec<ProgProfile>> {
    let before = bpf::program_ids();
    let running = Redirector::launch(env)?;
    let result = (|| -> Result<Vec<ProgProfile>> {
        // Programs that appeared with this agent are its own.
        let ids = bpf::new_programs(&before);
        let pid = running.pid();
        let addr = Topology::live_store_addr(Redirector.port());
        workloads::wait_reachable(&env.topo.q, addr, Duration::from_secs(15))?;
        let _stats = bpf::RunStats::enable()?;
        let mut out = Vec::new();
        for (name, spec) in [("crr", Spec::Crr), ("rr-64B", Spec::Rr { size: 64 })] {
            let s0 = bpf::run_stats();
            let cpu0 = process_cpu_secs(pid);
            let sample = querier.run(spec, addr, slot)?;
            // Let the agent drain the flow records this workload produced.
            std::thread::sleep(Duration::from_millis(300));
            let s1 = bpf::run_stats();
            let cpu1 = process_cpu_secs(pid);
            out.extend(programs(&s0, &s1, &ids, name, sample.ops));
            if let (Some(a), Some(b)) = (cpu0, cpu1) {
                out.push(ProgProfile {
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
    Box::new(running).stop()?;
    result
}

/// Each program's runs and time per operation between two snapshots, for
/// the program instances in `ids`, in the order they are loaded.
fn programs(
    before: &[ProgStats],
    after: &[ProgStats],
    ids: &[u32],
    workload: &str,
    ops: u64,
) -> Vec<ProgProfile> {
    let mut names: Vec<&str> = Vec::new();
    for p in after.iter().filter(|p| ids.contains(&p.id)) {
        if !names.contains(&p.name.as_str()) {
            names.push(&p.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let (ns, runs) = bpf::delta(before, after, ids, name);
            ProgProfile {
                program: name.to_owned(),
                workload: workload.into(),
                runs,
                ns_per_run: if runs > 0 {
                    ns as f64 / runs as f64
                } else {
                    0.0
                },
                runs_per_op: runs as f64 / ops.max(1) as f64,
                ns_per_op: ns as f64 / ops.max(1) as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::bpf::{PROG_SK_LOOKUP, PROG_SOCK_OPS};

    fn stats(id: u32, name: &str, ns: u64, runs: u64) -> ProgStats {
        ProgStats {
            id,
            name: name.into(),
            run_time_ns: ns,
            run_count: runs,
        }
    }

    #[test]
    fn per_op_cost_of_own_programs() {
        let before = [
            stats(1, PROG_SOCK_OPS, 100, 10),
            stats(2, PROG_SK_LOOKUP, 0, 0),
            stats(9, PROG_SK_LOOKUP, 0, 0),
        ];
        let after = [
            stats(1, PROG_SOCK_OPS, 2100, 30),
            stats(2, PROG_SK_LOOKUP, 1000, 1),
            stats(3, PROG_SOCK_OPS, 1000, 10),
            stats(9, PROG_SK_LOOKUP, 5000, 5),
        ];
        let p = programs(&before, &after, &[1, 2, 3], "crr", 10);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].program, PROG_SOCK_OPS);
        assert_eq!(p[0].runs, 30);
        assert_eq!(p[0].ns_per_run, 100.0);
        assert_eq!(p[0].runs_per_op, 3.0);
        assert_eq!(p[0].ns_per_op, 300.0);
        assert_eq!(p[1].program, PROG_SK_LOOKUP);
        assert_eq!(p[1].runs, 1);
        assert_eq!(p[1].ns_per_op, 100.0);
    }
}
