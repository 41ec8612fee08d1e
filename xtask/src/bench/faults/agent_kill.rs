//! `agent-kill`: the agent killed with SIGKILL under load, unpinned and with
//! `--pin`: what stays attached, how long connections fail, and where the
//! flow records of the connections around the kill end up.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    count,
    load::{Listener, Load},
    read_flow_log, records, yes, Scenario,
};
use crate::bench::{
    agent, bpf,
    topology::{Netns, Topology, ADVERTISE_PORT, QUERIER_CPU},
};

/// Time without any agent.
const AGENTLESS: Duration = Duration::from_secs(1);

pub fn run(topo: &Topology, bin: &Path, work: &Path) -> Result<Scenario> {
    let mut s = Scenario::new(
        "agent-kill",
        &format!(
            "The agent killed with SIGKILL under a back-to-back load (one client on CPU {QUERIER_CPU}), {} s without any agent, then a new agent; unpinned and with --pin (default 1 MiB flow ring, ~9,300 records). Attachment read with BPF_PROG_QUERY on the namespace and the cgroup v2 root.",
            AGENTLESS.as_secs_f64()
        ),
    );
    for pin in [false, true] {
        if pin {
            detach(bin)?;
        }
        let result = kill_once(&mut s, topo, bin, work, pin);
        if pin {
            detach(bin)?;
        }
        result?;
    }
    Ok(s)
}

fn detach(bin: &Path) -> Result<()> {
    let out = Command::new(bin).arg("detach").output()?;
    if !out.status.success() {
        bail!(
            "redirector detach: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Ids attached to the live-store namespace (sk_lookup) and the cgroup v2
/// root (sock_ops).
fn attached(ns: &Netns) -> Vec<u32> {
    let mut ids = redirector_tests::sk_lookup_programs(ns);
    ids.extend(redirector_tests::sock_ops_programs());
    ids
}

fn kill_once(s: &mut Scenario, topo: &Topology, bin: &Path, work: &Path, pin: bool) -> Result<()> {
    let case = if pin { "--pin" } else { "unpinned" };
    let dir = work.join(format!(
        "agent-kill-{}",
        if pin { "pinned" } else { "unpinned" }
    ));
    let server = Listener::start(&topo.l)?;
    let extra: &[&str] = if pin { &["--pin"] } else { &[] };
    let before = bpf::program_ids();
    let first = agent::launch(bin, &[&topo.l], extra, &dir)?;
    let ours = bpf::new_programs(&before);
    let target = Topology::live_store_addr(ADVERTISE_PORT);
    let load = Load::start(&topo.q, target, None, Some(QUERIER_CPU));
    thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    // Returns once the agent has exited (and the kernel closed its fds).
    first.kill()?;
    // What stays attached: sampled every millisecond for 200 ms (pinned: it
    // must all stay; unpinned: when the kernel lets go).
    let mut detached = None;
    let mut unloaded = None;
    let mut stayed = true;
    while killed.elapsed() < Duration::from_millis(200) || (!pin && unloaded.is_none()) {
        let now = attached(&topo.l);
        let all = ours.iter().all(|id| now.contains(id));
        stayed &= all;
        if detached.is_none() && ours.iter().all(|id| !now.contains(id)) {
            detached = Some(killed.elapsed());
        }
        if unloaded.is_none() {
            let loaded = bpf::program_ids();
            if ours.iter().all(|id| !loaded.contains(id)) {
                unloaded = Some(killed.elapsed());
            }
        }
        if killed.elapsed() > Duration::from_secs(5) {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let left = killed + AGENTLESS;
    if let Some(wait) = left.checked_duration_since(Instant::now()) {
        thread::sleep(wait);
    }
    let restarted = Instant::now();
    let second = agent::launch(bin, &[&topo.l], extra, &dir)?;
    let ready = Instant::now();
    let adopted =
        agent::printed(&second, "adopted sock_ops") && agent::printed(&second, "adopted sk_lookup");
    thread::sleep(Duration::from_secs(1));
    let attempts = load.stop()?;
    thread::sleep(Duration::from_millis(300));
    let stopped = second.stop()?;
    drop(server);

    let ok = attempts.iter().filter(|a| a.ok).count() as u64;
    let failed = attempts.len() as u64 - ok;
    s.add(
        case,
        "connections (failed)",
        format!("{} ({failed})", attempts.len()),
        Some(failed as f64),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if pin {
        s.add(
            case,
            "everything stayed attached after SIGKILL",
            yes(stayed),
            None,
        );
        s.add(
            case,
            "the next agent adopted the pinned programs",
            yes(adopted),
            None,
        );
    } else {
        s.add(
            case,
            "detached after SIGKILL (BPF_PROG_QUERY)",
            detached.map_or("**never (5 s)**".into(), |d| format!("{:.1} ms", ms(d))),
            detached.map(ms),
        );
        s.add(
            case,
            "programs unloaded after SIGKILL",
            unloaded.map_or("**never (5 s)**".into(), |d| format!("{:.1} ms", ms(d))),
            unloaded.map(ms),
        );
    }
    s.num(
        case,
        "new agent: start to ready",
        ms(ready.duration_since(restarted)),
        " ms",
    );
    let first_ok = attempts
        .iter()
        .filter(|a| a.ok && a.start >= killed)
        .map(|a| a.end)
        .find(|&e| e >= restarted || pin);
    if !pin {
        if let Some(e) = first_ok {
            s.num(
                case,
                "SIGKILL to first connection answered again",
                ms(e.duration_since(killed)),
                " ms",
            );
        }
    }
    // Records: with --pin the counters and the ring outlive the agent, so
    // every record is delivered (the next agent drains the ring), dropped and
    // counted (ring full), or lost uncounted (read by the killed agent, not
    // yet written out). Unpinned, the ring dies with the agent: what it held
    // is lost, uncounted, and so is its records_dropped counter.
    let (counts, broken) = read_flow_log(&agent::flow_log(&dir));
    let delivered = records(&counts, "open", &topo.l) + records(&counts, "close", &topo.l);
    let dropped = count(&stopped, "records_dropped")?;
    let expected = if pin {
        count(&stopped, "flows_opened")? + count(&stopped, "flows_closed")?
    } else {
        2 * ok
    };
    if pin {
        let gap_conns = attempts
            .iter()
            .filter(|a| a.ok && a.start >= killed && a.end <= ready)
            .count() as u64;
        s.num(
            case,
            "records written while no agent ran (2 per connection)",
            (2 * gap_conns) as f64,
            "",
        );
    }
    s.num(case, "records expected in all", expected as f64, "");
    s.num(
        case,
        "records delivered to the flow log",
        delivered as f64,
        "",
    );
    s.num(
        case,
        if pin {
            "records dropped, counted (records_dropped)"
        } else {
            "records dropped, counted (the new agent's records_dropped)"
        },
        dropped as f64,
        "",
    );
    s.num(
        case,
        if pin {
            "records lost uncounted (expected - delivered - dropped)"
        } else {
            "records lost uncounted with the killed agent's ring (expected - delivered - dropped)"
        },
        expected as f64 - delivered as f64 - dropped as f64,
        "",
    );
    if broken > 0 {
        s.num(case, "flow log lines cut short", broken as f64, "");
    }
    Ok(())
}
