//! The bench's two network namespaces (querier and live-store) joined by a veth
//! pair, and the ways to run code or commands inside them. Everything undoes
//! itself on drop, so a failed or panicking run leaves no namespace behind.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
    thread,
};

use anyhow::{bail, Context, Result};

/// RFC 2544 benchmarking addresses, used only inside the bench's namespaces
/// (which have no route anywhere else).
pub const QUERIER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LIVE_STORE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ADVERTISE_PORT: u16 = 12345;
pub const LISTEN_PORT: u16 = 9095;

const PREFIX: &str = "rdb-";

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace `rdb-<pid>-<role>`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(role: &str) -> Result<Self> {
        let name = format!("{PREFIX}{}-{role}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Moves the calling thread into this namespace. Threads it creates later
    /// (tokio workers, for instance) inherit it; other threads are unaffected.
    pub fn enter(&self) -> Result<()> {
        let file = File::open(self.path()).with_context(|| format!("open {}", self.name))?;
        // SAFETY: setns(2) on the calling thread with a valid, open netns fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!(
                "setns into {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Runs `f` to completion on a fresh thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread inside {} panicked", self.name))?
        })
    }

    /// `ip netns exec <ns> program`: a command that runs inside this namespace.
    /// It gets SIGTERM if the bench dies, so no proxy outlives it.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("{key}={value}"))
            .output()
            .context("running sysctl")?;
        if !out.status.success() {
            bail!(
                "sysctl {key}={value} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Querier and live-store namespaces joined by `vq <-> vl` (IPv4 only: every
/// path is measured over the same family).
pub struct Topology {
    pub querier: Netns,
    pub live_store: Netns,
}

impl Topology {
    pub fn create() -> Result<Self> {
        remove_stale();
        let querier = Netns::create("q")?;
        let live_store = Netns::create("ls")?;
        ip(&[
            "-n",
            &querier.name,
            "link",
            "add",
            "vq",
            "type",
            "veth",
            "peer",
            "name",
            "vl",
            "netns",
            &live_store.name,
        ])?;
        for (ns, dev, addr) in [
            (&querier, "vq", QUERIER_V4),
            (&live_store, "vl", LIVE_STORE_V4),
        ] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
            // CRR opens tens of thousands of short connections per second; the
            // closing side keeps TIME_WAIT, so widen the port range and allow reuse
            // (the same for every path).
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            ns.sysctl("net.core.somaxconn", "4096")?;
        }
        Ok(Self {
            querier,
            live_store,
        })
    }

    /// Where a querier dials for `port` on the live-store.
    pub fn live_store_addr(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(LIVE_STORE_V4), port)
    }
}

/// Deletes `rdb-<pid>-*` namespaces left by bench runs whose process is gone
/// (killed with SIGKILL, where no destructor runs).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// A multi-threaded tokio runtime whose worker threads live in `ns`: sockets
/// created by tasks spawned on it belong to that namespace. Only ever await
/// such work through `spawn`, never directly in `block_on` (that polls on the
/// caller's thread, in the caller's namespace).
///
/// `cpu` pins the workers: see [`QUERIER_CPU`].
pub fn runtime_in(
    ns: &Netns,
    workers: usize,
    name: &str,
    cpu: Option<usize>,
) -> Result<tokio::runtime::Runtime> {
    let name = name.to_owned();
    ns.run(move || {
        if let Some(c) = cpu {
            // Threads inherit the creator's affinity; pinning here covers the
            // workers and any blocking-pool thread they start.
            pin_current_thread(c);
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .enable_all()
            .build()
            .context("building tokio runtime")
    })
}

/// The querier (load generators) runs on CPU 0 and the live-store stand-in
/// on the last CPU. Unpinned, a ping-pong's latency depends on whether the
/// scheduler happened to put both ends on one CPU or two, which differs from
/// connection to connection and swamps the differences between paths. Proxies
/// and the agent are left free, as a sidecar would be.
pub const QUERIER_CPU: usize = 0;

pub fn live_store_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(0)
}

/// Best effort: a failure leaves the thread unpinned (noisier, still correct).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity(0, ..)
    // act on this thread's own mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
