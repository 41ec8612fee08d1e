//! The bench's two network namespaces (querier and live-store) joined by a veth
//! pair, and the ways to run code or commands inside them. Everything undoes
//! itself on drop, so a failed or panicking run leaves no namespace behind.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};

/// RFC 2544 benchmarking addresses, used only inside the bench's namespaces
/// (which have no route anywhere else).
pub const QUERIER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LIVE_STORE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The agent's default ports, which the proxies and nftables use too.
pub const ADVERTISE_PORT: u16 = redirector_tests::ADVERTISE;
pub const LISTEN_PORT: u16 = redirector_tests::LISTEN;
/// A pod that is neither a live-store nor a querier (a web server, say): what
/// the bystander workload's server listens on, in namespaces the agent does
/// not serve.
pub const BYSTANDER_PORT: u16 = 8080;

/// Every bench namespace is `rdb-<pid>-<n>-<tag>`.
const PREFIX: &str = "rdb-";

pub use redirector_tests::netns::Netns;

/// Querier and live-store namespaces joined by `vq <-> vl` (IPv4 only: every
/// path is measured over the same family).
pub struct Topology {
    pub querier: Netns,
    pub live_store: Netns,
}

impl Topology {
    pub fn create() -> Result<Self> {
        redirector_tests::netns::remove_stale(PREFIX);
        let (querier, live_store) = pair("q", "ls")?;
        for ns in [&querier, &live_store] {
            tune_for_crr(ns)?;
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
/// [`Topology`]'s pair, or another one addressed alike (the SYN flood's).
pub fn pair(q: &str, ls: &str) -> Result<(Netns, Netns)> {
    let querier = Netns::with_prefix(PREFIX, q)?;
    let live_store = Netns::with_prefix(PREFIX, ls)?;
    let (q4, l4) = (format!("{QUERIER_V4}/24"), format!("{LIVE_STORE_V4}/24"));
    redirector_tests::netns::veth((&querier, &[&q4]), (&live_store, &[&l4]))?;
    Ok((querier, live_store))
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
