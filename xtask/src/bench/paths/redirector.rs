//! redirector: the agent, with flow logging on, run for its slot only: while
//! attached, its sk_lookup program would also take the advertised port away
//! from any proxy, and its sock_ops program sees every socket on the machine.
//! Its exit summary's `flows_opened` is the proof.

use std::path::Path;

use anyhow::{Context, Result};
use redirector_tests::Agent;

use super::{Env, PathUnderTest, Proof, Running};
use crate::bench::{
    agent, bpf,
    topology::{ADVERTISE_PORT, LISTEN_PORT},
};

pub const NAME: &str = "redirector";

pub struct Redirector;

impl PathUnderTest for Redirector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("sk_lookup hands {ADVERTISE_PORT} to the {LISTEN_PORT} listener (flow logging on)")
    }

    fn available(&self, agent: &Path) -> std::result::Result<(), String> {
        if agent.exists() {
            Ok(())
        } else {
            Err(format!("{} not built", agent.display()))
        }
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        Ok(Box::new(Redirector::launch(env)?))
    }

    fn required(&self) -> bool {
        true
    }
}

impl Redirector {
    /// The agent serving the live-store namespace, as its own type: the
    /// profile needs its pid.
    pub fn launch(env: &Env) -> Result<Started> {
        Ok(Started {
            agent: agent::launch(env.agent, &[&env.topo.l], &[], env.work)?,
            flow_log: agent::flow_log_args(env.work),
        })
    }
}

pub struct Started {
    agent: Agent,
    flow_log: String,
}

impl Started {
    pub fn pid(&self) -> u32 {
        self.agent.pid()
    }
}

impl Running for Started {
    fn stop(self: Box<Self>) -> Result<Proof> {
        // The agent's own CPU (userspace: flow records, metrics), read before exit.
        let agent_cpu = agent::process_cpu_secs(self.agent.pid());
        let pid = self.agent.pid();
        let stopped = self.agent.stop()?;
        let line = stopped.counters().with_context(|| {
            format!("agent (pid {pid}, {}) printed no counters", stopped.status)
        })?;
        // Handshakes completed after a redirect: BPF_PROG_TEST_RUN runs of
        // sk_lookup (the cost measurement) never get that far.
        let opened = redirector_tests::counter_in(line, "flows_opened")
            .context("no flows_opened= counter")?;
        Ok(Proof::new(
            NAME,
            opened,
            format!(
                "{}; flow logging: {}; agent process CPU {}",
                line.trim(),
                self.flow_log,
                agent_cpu
                    .map(|s| format!("{s:.2} s"))
                    .unwrap_or_else(|| "unknown".into())
            ),
        ))
    }

    fn program_cost(&self, env: &Env, repeat: u32) -> Option<Result<Vec<bpf::ProgCost>>> {
        // From inside the live-store namespace, where the lookups it fakes
        // would arrive.
        Some(env.topo.l.try_run(|| bpf::measure(repeat, 5)))
    }
}
