//! Where the tests and the bench run: a querier namespace and a live-store
//! namespace joined by a veth pair, the addresses on it, and the live-store's
//! two ports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, Result};

use crate::{netns, Agent, Netns};

/// The port queriers dial (the ring's `instance_port`), which the agent
/// redirects.
pub const ADVERTISE: u16 = redirector_common::DEFAULT_ADVERTISE_PORT;
/// The port the live-store listens on (Tempo's `grpc_listen_port`).
pub const LISTEN: u16 = redirector_common::DEFAULT_LISTEN_PORT;

/// Addresses inside the test namespaces only (RFC 2544 benchmarking range and a
/// ULA prefix); the namespaces have no route anywhere else.
pub const QUERIER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LIVE_STORE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const QUERIER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5eed, 0, 0, 0, 0, 0, 1);
pub const LIVE_STORE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5eed, 0, 0, 0, 0, 0, 2);

/// The address families a [`Topology`]'s veth carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Families {
    /// IPv4 only: the bench measures every path over the same family.
    V4,
    /// IPv4 and IPv6, as a dual-stack pod has them.
    Both,
}

/// Joins a querier namespace and a live-store namespace with a veth pair that
/// carries both IPv4 and IPv6 (DAD off so v6 addresses are usable at once).
pub fn veth(querier: &Netns, live_store: &Netns) -> Result<()> {
    veth_in(querier, live_store, Families::Both)
}

fn veth_in(querier: &Netns, live_store: &Netns, families: Families) -> Result<()> {
    let mut q = vec![format!("{QUERIER_V4}/24")];
    let mut l = vec![format!("{LIVE_STORE_V4}/24")];
    if families == Families::Both {
        q.push(format!("{QUERIER_V6}/64"));
        l.push(format!("{LIVE_STORE_V6}/64"));
    }
    let q: Vec<&str> = q.iter().map(String::as_str).collect();
    let l: Vec<&str> = l.iter().map(String::as_str).collect();
    netns::veth((querier, &q), (live_store, &l))
}

/// A querier namespace `q` and a live-store namespace `l` joined by veth: the
/// topology every integration test and every bench path starts from.
pub struct Topology {
    pub q: Netns,
    pub l: Netns,
}

impl Topology {
    /// The tests' topology: test namespaces tagged `q` and `l`, both families.
    // Not `Default`: it creates namespaces, which is no default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::create(netns::TEST_PREFIX, ("q", "l"), Families::Both)
            .unwrap_or_else(|e| panic!("test topology: {e:#}"))
    }

    /// Namespaces `<prefix><pid>-<n>-<tag>` for the querier and the
    /// live-store (`tags`, in that order), joined by veth with the addresses
    /// of `families`. The bench's namespaces have a prefix of their own, so
    /// it can remove its leftovers without touching a test's.
    pub fn create(prefix: &str, tags: (&str, &str), families: Families) -> Result<Self> {
        let q = Netns::with_prefix(prefix, tags.0).context("querier netns")?;
        let l = Netns::with_prefix(prefix, tags.1).context("live-store netns")?;
        veth_in(&q, &l, families).context("veth between querier and live-store")?;
        Ok(Self { q, l })
    }

    /// Where a querier dials for `port` on the live-store, over IPv4.
    pub fn live_store_addr(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(LIVE_STORE_V4), port)
    }

    /// The agent serving `l`, with `extra` arguments.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        let path = self.l.path();
        let mut args = vec!["--netns", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Agent::start(&args).expect("agent starts")
    }
}
