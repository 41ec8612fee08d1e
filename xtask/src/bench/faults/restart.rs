//! `restart`: the live-store restarts under a back-to-back load, by closing
//! its listener and listening again and by being killed and started again;
//! behind redirector and behind the nginx sidecar. How many connections fail
//! and how soon the new listener is served.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{
    load::{live_store_program, Attempt, Listener, LiveStoreProcess, Load},
    median_max, Scenario,
};
use crate::bench::{
    paths::{Env, Nginx, PathUnderTest, Redirector},
    topology::{live_store_cpu, Topology, ADVERTISE_PORT, QUERIER_CPU},
};

/// Restarts per kind and path; figures are medians over them.
const RESTARTS: usize = 5;
/// Time the live-store serves between restarts.
const UP: Duration = Duration::from_millis(300);

/// How the live-store goes away and comes back.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// close() the listening socket, listen() on a new one at once.
    Relisten,
    /// kill -9 the process, start it again.
    Kill,
}

/// One restart: when the live-store went away and when it listened again.
struct Cycle {
    down: Instant,
    listened: Instant,
}

pub fn run(
    root: &Path,
    topo: &Topology,
    bin: &Path,
    work: &Path,
    notes: &mut Vec<String>,
) -> Result<Scenario> {
    let mut s = Scenario::new(
        "restart",
        &format!(
            "The live-store restarts {RESTARTS} times under a back-to-back load (one client on CPU {QUERIER_CPU}, live-store on CPU {}): its listening socket closed and a new one opened at once, then the process killed with SIGKILL and started again (the Go live-store of tests/go). Once through redirector, once through the nginx sidecar. Medians over the restarts, max in brackets. 'listen() to first connection' runs from listen() returning (for the process: from reading its `listening` line, so it can be negative) to the end of the first connection the live-store answered.",
            live_store_cpu()
        ),
    );
    let program = live_store_program(root, notes);
    let mut kinds = vec![Restart::Relisten];
    if program.is_some() {
        kinds.push(Restart::Kill);
    }
    let mut paths: Vec<&dyn PathUnderTest> = vec![&Redirector];
    match Nginx.available(bin) {
        Ok(()) => paths.push(&Nginx),
        Err(why) => notes.push(format!("restart behind nginx not measured: {why}")),
    }
    let target = Topology::live_store_addr(ADVERTISE_PORT);
    for path in paths {
        let dir = work.join(format!("restart-{}", path.name()));
        fs::create_dir_all(&dir)?;
        let env = Env {
            topo,
            agent: bin,
            work: &dir,
            // Only direct's proof reads it, and direct is not restarted.
            live_store_accepts: Arc::default(),
        };
        // Either path owns the advertised port for the whole scenario.
        let running = path.start(&env)?;
        for &kind in &kinds {
            let case = format!(
                "{}, {}",
                path.name(),
                match kind {
                    Restart::Relisten => "close + listen again",
                    Restart::Kill => "kill -9 + start again",
                }
            );
            let (cycles, attempts) = match kind {
                Restart::Relisten => relisten_cycles(topo, target)?,
                Restart::Kill => {
                    let program = program.as_deref().context("no live-store program")?;
                    kill_cycles(topo, target, program)?
                }
            };
            figures(&mut s, &case, &cycles, &attempts);
        }
        let proof = running.stop()?;
        notes.push(format!("restart over {}: {}", path.name(), proof.evidence));
    }
    Ok(s)
}

fn relisten_cycles(topo: &Topology, target: SocketAddr) -> Result<(Vec<Cycle>, Vec<Attempt>)> {
    let mut server = Listener::start(&topo.l)?;
    let load = Load::start(&topo.q, target, None, Some(QUERIER_CPU));
    let mut cycles = Vec::new();
    for _ in 0..RESTARTS {
        thread::sleep(UP);
        let down = Instant::now();
        server.stop();
        server = Listener::start(&topo.l)?;
        cycles.push(Cycle {
            down,
            listened: server.listened,
        });
    }
    thread::sleep(UP);
    let attempts = load.stop()?;
    server.stop();
    Ok((cycles, attempts))
}

fn kill_cycles(
    topo: &Topology,
    target: SocketAddr,
    program: &Path,
) -> Result<(Vec<Cycle>, Vec<Attempt>)> {
    let (mut process, _) = LiveStoreProcess::start(&topo.l, program)?;
    let load = Load::start(&topo.q, target, None, Some(QUERIER_CPU));
    let mut cycles = Vec::new();
    for _ in 0..RESTARTS {
        thread::sleep(UP);
        let down = Instant::now();
        process.kill();
        let (next, listened) = LiveStoreProcess::start(&topo.l, program)?;
        process = next;
        cycles.push(Cycle { down, listened });
    }
    thread::sleep(UP);
    let attempts = load.stop()?;
    drop(process);
    Ok((cycles, attempts))
}

fn figures(s: &mut Scenario, case: &str, cycles: &[Cycle], attempts: &[Attempt]) {
    let mut failed = Vec::new();
    let mut gap = Vec::new();
    let mut first = Vec::new();
    let mut outage = Vec::new();
    let mut late = 0u64;
    for (i, c) in cycles.iter().enumerate() {
        let next = cycles.get(i + 1).map(|n| n.down);
        let mine: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.end >= c.down && next.is_none_or(|n| a.end < n))
            .collect();
        let first_ok = mine.iter().find(|a| a.ok && a.end >= c.listened);
        failed.push(mine.iter().filter(|a| !a.ok).count() as f64);
        gap.push(c.listened.duration_since(c.down).as_secs_f64() * 1e3);
        if let Some(a) = first_ok {
            let us = |t: Instant| t.duration_since(c.listened).as_secs_f64() * 1e6;
            // Signed: a connection may be answered before the harness read
            // the process's `listening` line.
            let v = if a.end >= c.listened {
                us(a.end)
            } else {
                -(c.listened.duration_since(a.end).as_secs_f64() * 1e6)
            };
            first.push(v);
            outage.push(a.end.duration_since(c.down).as_secs_f64() * 1e3);
            // Failures that started once the new listener was there.
            late += mine
                .iter()
                .filter(|x| !x.ok && x.start >= c.listened && x.end <= a.end)
                .count() as u64;
        }
    }
    let total = attempts.len() as f64;
    let ok = attempts.iter().filter(|a| a.ok).count() as f64;
    s.add(
        case,
        "connections (answered)",
        format!("{total:.0} ({ok:.0})"),
        Some(total),
    );
    // Every attempt in a gap fails on any path, so failures per restart
    // scale with how fast the client dials: the rate says how fast.
    if let (Some(a), Some(b)) = (attempts.first(), attempts.last()) {
        s.num(
            case,
            "connections per second (one client, back to back)",
            total / b.end.duration_since(a.start).as_secs_f64(),
            "",
        );
    }
    let (v, raw) = median_max(&failed, "");
    s.add(case, "failed connections per restart", v, raw);
    let (v, raw) = median_max(&gap, " ms");
    s.add(case, "gap: gone to listen() returned", v, raw);
    let (v, raw) = median_max(&first, " µs");
    s.add(case, "listen() to first connection answered", v, raw);
    let (v, raw) = median_max(&outage, " ms");
    s.add(case, "gone to first connection answered", v, raw);
    s.num(
        case,
        "failed connections that started after listen()",
        late as f64,
        "",
    );
}
