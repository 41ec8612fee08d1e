//! The `bystander` workload: what the agent costs pods it does not serve.
//! CRR (the `crr` workload's load generator) between two namespaces of their
//! own, joined by a veth pair, with the agent stopped and running (serving
//! the topology's live-store namespace, not these), in interleaved rounds.
//! Reports the ratio of conn/s (running / stopped) and, from the kernel's BPF
//! run-time statistics, how often and how long every `redir_*` program ran
//! per bystander connection: the goal is 0.
//!
//! The statistics stay on in both states: they only cost anything when a
//! program runs, which is exactly what the running rounds are checked for.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    agent,
    bpf::{self, ProgStats},
    paths::Env,
    plan::Plan,
    servers::LiveStore,
    stats::{ratio, spread, Spread},
    topology::{self, Topology, BYSTANDER_PORT, LIVE_STORE_V4},
    workloads::{self, Querier, Spec, CRR_WARMUP},
};

/// The same idle gap before each slot as the paths' rounds: the agent's
/// start-up work (attaching, the first reconcile) stays out of the slot.
const SETTLE: Duration = Duration::from_millis(200);

/// One slot of bystander CRR.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub repeat: usize,
    pub agent_running: bool,
    pub ops: u64,
    pub secs: f64,
    pub conn_per_s: f64,
    /// Runs and run time of `redir_*` programs during the slot: the new
    /// agent's own while it runs, any loaded ones while it is stopped
    /// (another agent on the machine would show here).
    pub redir_runs: u64,
    pub redir_run_ns: u64,
}

/// One program's share of the running rounds.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub run_ns: u64,
    pub runs_per_conn: f64,
    pub ns_per_conn: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Bystander {
    pub what: String,
    pub slot_secs: f64,
    pub rounds: Vec<Round>,
    /// conn/s over the rounds with the agent stopped and running.
    pub stopped: Option<Spread>,
    pub running: Option<Spread>,
    /// Median running / median stopped.
    pub ratio: Option<f64>,
    /// Whether the ratio is within the stopped rounds' own relative
    /// half-range of 1.00 (the noise of identical rounds).
    pub within_noise: Option<bool>,
    /// Bystander connections made while the agent ran (warm-ups included:
    /// the statistics cover them too).
    pub connections: u64,
    pub runs_per_conn: f64,
    pub ns_per_conn: f64,
    pub programs: Vec<ProgramCost>,
}

impl Bystander {
    /// Whether both states carried bystander connections (the smoke check).
    pub fn carried_traffic(&self) -> bool {
        [false, true].into_iter().all(|running| {
            self.rounds
                .iter()
                .any(|r| r.agent_running == running && r.ops > 0)
        })
    }
}

pub fn measure(plan: &Plan, env: &Env) -> Result<Bystander> {
    // Their own pair: the agent serves the topology's live-store namespace,
    // never these.
    let Topology {
        q: client_ns,
        l: server_ns,
    } = topology::pair("bq", "bs")?;
    for ns in [&client_ns, &server_ns] {
        topology::tune_for_crr(ns)?;
    }
    let _server = LiveStore::start_on(&server_ns, BYSTANDER_PORT)?;
    let querier = Querier::new(&client_ns)?;
    let addr = SocketAddr::new(IpAddr::V4(LIVE_STORE_V4), BYSTANDER_PORT);
    workloads::wait_reachable(&client_ns, addr, Duration::from_secs(5))?;
    let slot = Duration::from_secs_f64(plan.bystander_slot_secs);
    let dir = env.work.join("bystander");
    let _stats = bpf::RunStats::enable()?;
    let mut rounds = Vec::new();
    let mut per_program: Vec<ProgramCost> = Vec::new();
    for repeat in 0..plan.bystander_rounds.max(1) {
        for running in [false, true] {
            eprintln!(
                "bench: bystander round {}/{} agent {}",
                repeat + 1,
                plan.bystander_rounds,
                if running { "running" } else { "stopped" }
            );
            let before: HashSet<u32> = bpf::run_stats().iter().map(|p| p.id).collect();
            let agent = if running {
                Some(agent::launch(env.agent, &[&env.topo.l], &[], &dir)?)
            } else {
                None
            };
            std::thread::sleep(SETTLE);
            let s0 = bpf::run_stats();
            let sample = querier.run(Spec::Crr, addr, slot);
            let s1 = bpf::run_stats();
            if let Some(a) = agent {
                a.stop()
                    .context("stopping the agent after a bystander round")?;
            }
            let sample = sample.context("bystander CRR")?;
            // Running: the new agent's programs only; stopped: any left.
            let ids: Vec<u32> = s1
                .iter()
                .map(|p| p.id)
                .filter(|id| !running || !before.contains(id))
                .collect();
            let costs = program_costs(&s0, &s1, &ids);
            if running {
                merge(&mut per_program, &costs);
            }
            rounds.push(Round {
                repeat,
                agent_running: running,
                ops: sample.ops,
                secs: sample.secs,
                conn_per_s: if sample.secs > 0.0 {
                    sample.ops as f64 / sample.secs
                } else {
                    0.0
                },
                redir_runs: costs.iter().map(|c| c.runs).sum(),
                redir_run_ns: costs.iter().map(|c| c.run_ns).sum(),
            });
        }
    }
    Ok(summarize(plan, rounds, per_program))
}

/// Runs and run time of each program named in `ids` between two snapshots
/// (per connection figures are filled in by [`summarize`]).
fn program_costs(before: &[ProgStats], after: &[ProgStats], ids: &[u32]) -> Vec<ProgramCost> {
    let mut names: Vec<&str> = Vec::new();
    for p in after.iter().filter(|p| ids.contains(&p.id)) {
        if !names.contains(&p.name.as_str()) {
            names.push(&p.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let (run_ns, runs) = bpf::delta(before, after, ids, name);
            ProgramCost {
                program: name.to_owned(),
                runs,
                run_ns,
                runs_per_conn: 0.0,
                ns_per_conn: 0.0,
            }
        })
        .collect()
}

fn merge(into: &mut Vec<ProgramCost>, round: &[ProgramCost]) {
    for c in round {
        match into.iter_mut().find(|p| p.program == c.program) {
            Some(p) => {
                p.runs += c.runs;
                p.run_ns += c.run_ns;
            }
            None => into.push(c.clone()),
        }
    }
}

fn summarize(plan: &Plan, rounds: Vec<Round>, mut programs: Vec<ProgramCost>) -> Bystander {
    let rates = |running: bool| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.agent_running == running)
            .map(|r| r.conn_per_s)
            .collect()
    };
    let (stopped, running) = (spread(&rates(false)), spread(&rates(true)));
    let ratio = running
        .zip(stopped)
        .and_then(|(r, s)| ratio(r.median, s.median));
    let within_noise = ratio.zip(stopped).map(|(q, s)| (q - 1.0).abs() <= s.spread);
    let connections: u64 = rounds
        .iter()
        .filter(|r| r.agent_running)
        .map(|r| r.ops + CRR_WARMUP)
        .sum();
    let per = |v: u64| v as f64 / connections.max(1) as f64;
    for p in &mut programs {
        p.runs_per_conn = per(p.runs);
        p.ns_per_conn = per(p.run_ns);
    }
    Bystander {
        what: format!(
            "CRR (connect, 64 B request/response, close) between two namespaces the agent does not serve, server on port {BYSTANDER_PORT}; agent stopped vs running (serving the live-store namespace), interleaved"
        ),
        slot_secs: plan.bystander_slot_secs,
        ratio,
        within_noise,
        connections,
        runs_per_conn: per(programs.iter().map(|p| p.runs).sum()),
        ns_per_conn: per(programs.iter().map(|p| p.run_ns).sum()),
        stopped,
        running,
        rounds,
        programs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        bpf::{PROG_SK_LOOKUP, PROG_SOCK_OPS},
        BenchArgs,
    };

    fn round(repeat: usize, running: bool, ops: u64, runs: u64) -> Round {
        Round {
            repeat,
            agent_running: running,
            ops,
            secs: 1.0,
            conn_per_s: ops as f64,
            redir_runs: runs,
            redir_run_ns: runs * 100,
        }
    }

    fn stats(id: u32, name: &str, ns: u64, runs: u64) -> ProgStats {
        ProgStats {
            id,
            name: name.into(),
            run_time_ns: ns,
            run_count: runs,
        }
    }

    #[test]
    fn counts_every_program_of_the_agent_per_connection() {
        let before = [
            stats(1, PROG_SOCK_OPS, 0, 0),
            stats(7, "redir_listen", 0, 0),
        ];
        let after = [
            stats(1, PROG_SOCK_OPS, 1000, 10),
            stats(2, PROG_SK_LOOKUP, 0, 0),
            stats(7, "redir_listen", 300, 3),
            stats(9, PROG_SOCK_OPS, 5000, 50),
        ];
        let costs = program_costs(&before, &after, &[1, 2, 7]);
        let names: Vec<&str> = costs.iter().map(|c| c.program.as_str()).collect();
        assert_eq!(names, [PROG_SOCK_OPS, PROG_SK_LOOKUP, "redir_listen"]);
        let mut all = Vec::new();
        merge(&mut all, &costs);
        merge(&mut all, &costs);
        let plan = Plan::for_args(&BenchArgs::default());
        let ops = 1000 - CRR_WARMUP;
        let b = summarize(
            &plan,
            vec![
                round(0, false, 1000, 0),
                round(0, true, ops, 13),
                round(1, false, 1100, 0),
                round(1, true, ops, 13),
            ],
            all,
        );
        assert_eq!(b.connections, 2000);
        assert_eq!(b.runs_per_conn, 26.0 / 2000.0);
        assert_eq!(b.ns_per_conn, 2600.0 / 2000.0);
        assert_eq!(b.programs[0].runs_per_conn, 20.0 / 2000.0);
        let stopped = b.stopped.expect("stopped rounds");
        assert_eq!(stopped.median, 1050.0);
        assert_eq!(b.ratio, Some(ops as f64 / 1050.0));
        // 0.905x against a half-range of 4.8%: outside the noise.
        assert_eq!(b.within_noise, Some(false));
        assert!(b.carried_traffic());
    }
}
