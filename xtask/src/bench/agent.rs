//! The agent as the bench runs it, on `redirector-tests`' launcher (the one
//! the integration tests use): the bench's ports, a JSON flow log and a
//! `redirector flows` socket of its own in the slot's directory, logs kept
//! there, and no agent outliving the harness.

use std::path::{Path, PathBuf};

use anyhow::Result;
use redirector_tests::{Agent, AgentOptions};

use super::topology::{Netns, ADVERTISE_PORT, LISTEN_PORT};

/// The agent binary the bench measures: the release artifact.
pub fn bin(root: &Path) -> PathBuf {
    crate::agent_artifact(root)
}

/// Where an agent launched with `dir` writes its flow records.
pub fn flow_log(dir: &Path) -> PathBuf {
    dir.join("flows.json")
}

/// How the flow log is configured, for the proofs.
pub fn flow_log_args(dir: &Path) -> String {
    format!("--flow-log {} --flow-format json", flow_log(dir).display())
}

/// The agent `bin` serving `namespaces`, with `extra` arguments (`--pin`);
/// returns once it is ready. Its flow log, `redirector flows` socket (never
/// the default one another agent on the machine may use) and stdout/stderr
/// copies go to `dir`.
pub fn launch(bin: &Path, namespaces: &[&Netns], extra: &[&str], dir: &Path) -> Result<Agent> {
    Agent::launch(&options(bin, namespaces, extra, dir)?)
}

/// How [`launch`] runs the agent, for a caller that changes a setting first.
pub fn options(
    bin: &Path,
    namespaces: &[&Netns],
    extra: &[&str],
    dir: &Path,
) -> Result<AgentOptions> {
    std::fs::create_dir_all(dir)?;
    let path = |p: PathBuf| p.display().to_string();
    let mut args: Vec<String> = [
        "--advertise-port".to_owned(),
        ADVERTISE_PORT.to_string(),
        "--listen-port".to_owned(),
        LISTEN_PORT.to_string(),
        "--flow-log".to_owned(),
        path(flow_log(dir)),
        "--flow-format".to_owned(),
        "json".to_owned(),
        "--flows-socket".to_owned(),
        path(dir.join("flows.sock")),
    ]
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(AgentOptions {
        bin: Some(bin.to_owned()),
        args,
        netns: namespaces.iter().map(|ns| ns.path()).collect(),
        log_dir: Some(dir.to_owned()),
        die_with_parent: true,
        ..AgentOptions::default()
    })
}

/// Whether the agent printed a line starting with `prefix` (`adopted ...`).
pub fn printed(agent: &Agent, prefix: &str) -> bool {
    agent.status().iter().any(|l| l.starts_with(prefix))
}

/// utime + stime of a live process, in seconds (/proc/PID/stat fields 14, 15).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) / hz)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_agent_counters() {
        let l = "counters: redirected=42 no_listener=0 assign_error=1 listener_registered=2 listener_register_error=0";
        let counter = redirector_tests::counter_in;
        assert_eq!(counter(l, "redirected"), Some(42));
        assert_eq!(counter(l, "listener_registered"), Some(2));
        assert_eq!(counter(l, "listener"), None);
    }
}
