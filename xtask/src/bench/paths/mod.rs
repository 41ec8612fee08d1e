//! The paths under test, one file each, behind one trait. Only one path owns
//! the advertised port at a time: the proxies listen on it, nftables rewrites
//! it, and redirector's sk_lookup program would steal it from a proxy, so
//! each is started right before its slot and stopped right after, and reports
//! proof that it carried the traffic (its own counters, access log or stats).

mod direct;
mod envoy;
mod haproxy;
mod nftables;
mod nginx;
pub mod redirector;
mod tokio_proxy;
mod traefik;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{atomic::AtomicU64, Arc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    bpf::ProgCost,
    topology::{Topology, ADVERTISE_PORT},
};

pub use direct::Direct;
pub use nginx::Nginx;
pub use redirector::Redirector;

/// Every path, in the report's order; direct first, as the baseline.
pub const ALL: [&dyn PathUnderTest; 8] = [
    &Direct,
    &Redirector,
    &nftables::Nftables,
    &Nginx,
    &haproxy::Haproxy,
    &tokio_proxy::TokioProxy,
    &envoy::Envoy,
    &traefik::Traefik,
];

/// Path names the report compares by: the baseline, the subject, and the
/// kernel alternative (the userspace proxies are [`PathUnderTest::proxy`]).
pub const DIRECT: &str = direct::NAME;
pub const REDIRECTOR: &str = redirector::NAME;
pub const NFTABLES: &str = nftables::NAME;

/// Names of the userspace proxies, the "best proxy" targets' candidates.
pub fn proxies() -> impl Iterator<Item = &'static str> {
    ALL.iter().filter(|p| p.proxy()).map(|p| p.name())
}

/// One way of getting a querier's connection on the advertised port to the
/// live-store.
pub trait PathUnderTest: Sync {
    /// Its name in the report and on `--paths`.
    fn name(&self) -> &'static str;

    /// One line for the report's path table.
    fn what(&self) -> String;

    /// Whether this machine can run it; `Err` says why not.
    fn available(&self, agent: &Path) -> std::result::Result<(), String>;

    /// Sets it up in `env`'s live-store namespace; the handle's `stop` tears
    /// it down again.
    fn start(&self, env: &Env) -> Result<Box<dyn Running>>;

    /// The port a querier dials on this path.
    fn port(&self) -> u16 {
        ADVERTISE_PORT
    }

    /// A userspace proxy (a sidecar), compared as "best proxy".
    fn proxy(&self) -> bool {
        false
    }

    /// Whether its proof comes from a counter it keeps: without one (Envoy,
    /// Traefik) a smoke run cannot ask it for handled connections.
    fn counts(&self) -> bool {
        true
    }

    /// Whether a smoke run of every path must measure it: it needs nothing
    /// beyond what the harness installs or builds.
    fn required(&self) -> bool {
        false
    }
}

/// A started path.
pub trait Running {
    /// Stops the path and returns its proof of the traffic since `start`.
    fn stop(self: Box<Self>) -> Result<Proof>;

    /// The path's own in-kernel cost, measured while it runs (redirector's
    /// sk_lookup program); `None` for paths without such a program.
    fn program_cost(&self, _env: &Env, _repeat: u32) -> Option<Result<Vec<ProgCost>>> {
        None
    }
}

/// What a path is started with.
pub struct Env<'a> {
    pub topo: &'a Topology,
    /// The agent binary.
    pub agent: &'a Path,
    /// Scratch directory for configs, logs and the flow log.
    pub work: &'a Path,
    /// Connections the live-store stand-in accepted so far (direct's proof).
    pub live_store_accepts: Arc<AtomicU64>,
}

/// Evidence that a path carried the slot's traffic.
#[derive(Clone, Debug, Serialize)]
pub struct Proof {
    pub path: String,
    /// Connections (or redirects, packets) the path itself counted.
    pub handled: u64,
    pub evidence: String,
}

impl Proof {
    fn new(path: &str, handled: u64, evidence: String) -> Self {
        Self {
            path: path.into(),
            handled,
            evidence,
        }
    }
}

fn on_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// `Ok` if `bin` is installed, else `Err(why)`.
fn need(bin: &str, why: &str) -> std::result::Result<(), String> {
    if on_path(bin).is_some() {
        Ok(())
    } else {
        Err(why.to_owned())
    }
}

/// A child process killed (SIGTERM, then SIGKILL) by pid on drop.
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A proxy's directory under the work directory, with its config (which may
/// name the directory: logs, pid file, stats socket) written there as `file`.
fn proxy_dir(
    env: &Env,
    name: &str,
    file: &str,
    config: impl FnOnce(&Path) -> String,
) -> Result<(PathBuf, PathBuf)> {
    let dir = env.work.join(name);
    fs::create_dir_all(&dir)?;
    let conf = dir.join(file);
    fs::write(&conf, config(&dir))?;
    Ok((dir, conf))
}

/// Starts a proxy `cmd` (built with `Netns::command`, so inside the
/// live-store namespace) with its output in `dir`.
fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<ChildGuard> {
    let log =
        |file: &str| fs::File::create(dir.join(file)).with_context(|| format!("create {file}"));
    cmd.stdin(Stdio::null())
        .stdout(log("stdout.log")?)
        .stderr(log("stderr.log")?);
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok(ChildGuard { child })
}

/// A proxy whose traffic the harness cannot count (no counter read).
struct Unverified {
    name: &'static str,
    _child: ChildGuard,
}

impl Running for Unverified {
    fn stop(self: Box<Self>) -> Result<Proof> {
        Ok(Proof::new(
            self.name,
            0,
            "no counter read (unverified)".into(),
        ))
    }
}
