//! The proof a namespace is served: from inside it, a connection to
//! 127.0.0.1 on the advertised port (where nothing listens) answered by the
//! pod's own process. Before the agent attaches, the connect is refused at
//! once, so probing is cheap.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    interrupted,
    pods::{Pod, PodNetns},
};
use crate::bench::topology::ADVERTISE_PORT;

/// What one attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Refused, timed out, or closed without an answer: not served (yet).
    Nothing,
    /// The pod itself answered through the advertised port.
    Served,
    /// Another process answered: a redirect to the wrong listener.
    Wrong,
}

/// One attempt from the calling thread's namespace (which the caller has
/// entered) for the pod named `expect`.
pub fn attempt(expect: &str) -> Seen {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ADVERTISE_PORT));
    let Ok(conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return Seen::Nothing;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    match BufReader::new(conn).read_line(&mut line) {
        Ok(n) if n > 0 && line.trim_end() == expect => Seen::Served,
        Ok(n) if n > 0 => Seen::Wrong,
        _ => Seen::Nothing,
    }
}

/// Whether `pod` is served now: one attempt, on a thread of its own.
pub fn served_now(pod: &Pod) -> Result<Seen> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Seen> {
            pod.netns.enter()?;
            Ok(attempt(&pod.name))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    })
}

/// When each of `pods` was first served, sweeping over the ones not served
/// yet (one thread: probes stay a small load next to the agent) until all
/// are or `limit` passes. `started` is set once the sweeps run. Returns the
/// first-served instants (None: never) and the longest sweep, the
/// resolution of the instants.
pub fn first_served(
    pods: &[Pod],
    limit: Duration,
    started: &AtomicBool,
) -> Result<(Vec<Option<Instant>>, Duration)> {
    let mut when: Vec<Option<Instant>> = vec![None; pods.len()];
    let mut pending: Vec<usize> = (0..pods.len()).collect();
    let deadline = Instant::now() + limit;
    let mut longest = Duration::ZERO;
    started.store(true, Ordering::SeqCst);
    while !pending.is_empty() && Instant::now() < deadline {
        if interrupted() {
            bail!("interrupted");
        }
        let sweep = Instant::now();
        let mut left = Vec::with_capacity(pending.len());
        for i in pending {
            let pod = &pods[i];
            pod.netns.enter()?;
            match attempt(&pod.name) {
                Seen::Served => when[i] = Some(Instant::now()),
                Seen::Wrong => bail!("pod {}: another process answered", pod.name),
                Seen::Nothing => left.push(i),
            }
        }
        pending = left;
        longest = longest.max(sweep.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((when, longest))
}

/// From `listened` on, an attempt every millisecond in `netns` until the
/// pod `name` answers (or `limit`): the time it took. Enters `netns` on the
/// calling thread, so run it on a thread of its own.
pub fn until_served(
    netns: &PodNetns,
    name: &str,
    listened: Instant,
    limit: Duration,
) -> Result<Option<Duration>> {
    netns.enter()?;
    while listened.elapsed() < limit && !interrupted() {
        match attempt(name) {
            Seen::Served => return Ok(Some(listened.elapsed())),
            Seen::Wrong => bail!("pod {name}: another process answered"),
            Seen::Nothing => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    Ok(None)
}
