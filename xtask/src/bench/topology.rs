//! The bench's two network namespaces (querier and live-store): the tests'
//! [`Topology`], with its addresses and veth, under a prefix of the bench's
//! own; and the ways to run code inside them pinned to a CPU. Everything
//! undoes itself on drop, so a failed or panicking run leaves no namespace
//! behind.

use anyhow::{Context, Result};
use redirector_tests::Families;

pub use redirector_tests::{netns::Netns, Topology, LIVE_STORE_V4, QUERIER_V4};
/// The agent's default ports, which the proxies and nftables use too.
pub use redirector_tests::{ADVERTISE as ADVERTISE_PORT, LISTEN as LISTEN_PORT};

/// A pod that is neither a live-store nor a querier (a web server, say): what
/// the bystander workload's server listens on, in namespaces the agent does
/// not serve.
pub const BYSTANDER_PORT: u16 = 8080;

/// Every bench namespace is `rdb-<pid>-<n>-<tag>`: a run killed with SIGKILL
/// leaves them behind, and the next run removes them by this prefix without
/// touching a test's.
const PREFIX: &str = "rdb-";

/// The bench's querier (`q`) and live-store (`ls`) namespaces, tuned for CRR.
pub fn create() -> Result<Topology> {
    redirector_tests::netns::remove_stale(PREFIX);
    let topo = pair("q", "ls")?;
    for ns in [&topo.q, &topo.l] {
        tune_for_crr(ns)?;
    }
    Ok(topo)
}

/// CRR opens tens of thousands of short connections per second; the closing
/// side keeps TIME_WAIT, so widen the port range and allow reuse (the same
/// for every path and every namespace pair that carries CRR).
pub fn tune_for_crr(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    ns.sysctl("net.core.somaxconn", "4096")
}

/// A querier-side and a live-store-side namespace (tagged `q` and `ls`)
/// joined by a veth pair with the bench's addresses, nothing else set up:
/// [`create`]'s pair, or another one addressed alike (the SYN flood's). IPv4
/// only: every path is measured over the same family.
pub fn pair(q: &str, ls: &str) -> Result<Topology> {
    Topology::create(PREFIX, (q, ls), Families::V4)
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
    ns.try_run(move || {
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
