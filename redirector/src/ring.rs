//! The ring-aware check: reads Tempo's live-store ring (dskit's ring status page,
//! as JSON) and, for every live-store whose address belongs to a network
//! namespace on this node, says whether redirector serves that namespace,
//! whether the port the ring advertises is one it redirects, and whether the
//! live-store's listener is registered; with the fix for each problem.
//!
//! `redirector check --tempo-ring URL` judges by the pinned state (what
//! `redirector status` reads); `redirector run --tempo-ring URL` judges by the
//! agent's own state, every 30 s on a thread of its own, and exports the result
//! as metrics.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use redirector_common::{
    ListenerKey, NsPort, RedirectTarget, AF_INET, AF_INET6, DEFAULT_ADVERTISE_PORT,
    DEFAULT_LISTEN_PORT, MAP_LISTENERS, MAP_REDIRECTS,
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    bpf::datapath::Datapath,
    bpf::pins::PinLayout,
    bpf::registry::{Registry, Snapshot, Unservable},
    bpf::Redirect,
    commands::Output,
    discovery::netns::Netns,
    discovery::sockdiag,
    sys,
    telemetry::Telemetry,
};

/// The largest ring page read: a ring of hundreds of live-stores with 128
/// tokens each is around a megabyte.
pub const MAX_RING_BYTES: u64 = 16 << 20;
/// Connecting to the Tempo component.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How often `run --tempo-ring` checks.
pub const DEFAULT_INTERVAL_SECS: u64 = 30;

/// A ring page URL: `http://host[:port]/path`, validated up front so a typo is
/// a usage error (exit 2), not a failure every period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingUrl(String);

impl RingUrl {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "`{s}`: https is not supported; ask a Tempo component over plain http \
                 (its http_listen_port, e.g. http://tempo-distributor:3200/live-store/ring), \
                 or through a local proxy that speaks https to it"
            ));
        }
        let Some(rest) = lower.strip_prefix("http://") else {
            return Err(format!(
                "`{s}` is not an http:// URL, e.g. http://tempo-distributor:3200/live-store/ring"
            ));
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.is_empty() || host.starts_with(':') {
            return Err(format!(
                "`{s}` has no host, e.g. http://tempo-distributor:3200/live-store/ring"
            ));
        }
        if s.chars().any(char::is_whitespace) {
            return Err(format!("`{s}` contains whitespace"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RingUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RingUrl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::parse(s)
    }
}

/// dskit's ring status page as JSON (`ring/ring_http.go`: `httpResponse` with
/// its `ingesterDesc` shards). Only what the check needs; every other field
/// (`now`, `tokens`, `timestamp`, `read_only`, `versions`, ...) is ignored.
#[derive(Debug, Deserialize)]
pub struct RingPage {
    /// Go encodes an empty ring's nil slice as `null`.
    #[serde(deserialize_with = "null_as_empty")]
    pub shards: Vec<Shard>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    /// ACTIVE, JOINING, LEAVING, PENDING, or UNHEALTHY (missed heartbeats).
    pub state: String,
    /// What queriers dial: `ip:port` (`[ip]:port` for IPv6), as the
    /// live-store registered it (`instance_addr`, `instance_port`).
    pub address: String,
    #[serde(default)]
    pub zone: String,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<Shard>, D::Error> {
    Ok(Option::<Vec<Shard>>::deserialize(d)?.unwrap_or_default())
}

/// Reads a ring page body, with an error an operator can act on.
pub fn parse_page(body: &[u8]) -> std::result::Result<RingPage, String> {
    let start = body.iter().find(|b| !b.is_ascii_whitespace());
    match start {
        Some(b'<') => {
            return Err(
                "answered HTML, not JSON: not a dskit ring page (is the path \
                        /live-store/ring?)"
                    .to_owned(),
            )
        }
        // Not even the start of a JSON object or array: say what it was.
        Some(b'{' | b'[') => {}
        _ => {
            let text = String::from_utf8_lossy(body);
            let first: String = text
                .trim()
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(80)
                .collect();
            return Err(format!("answered something that is not JSON: {first:?}"));
        }
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("answered something that is not JSON ({e})")
        } else {
            format!("answered JSON that is not a live-store ring page ({e})")
        }
    })
}

/// GETs the ring page with `Accept: application/json`, bounded in time and size.
pub fn fetch(url: &RingUrl) -> std::result::Result<RingPage, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(REQUEST_TIMEOUT))
        // Status codes are read below, with a message for each.
        .http_status_as_error(false)
        // A ring page is served where it is asked for; a redirect is reported
        // as such, not followed to wherever it points.
        .max_redirects(0)
        .user_agent(concat!("redirector/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let fail = |what: String| format!("ring {url}: {what}");
    let mut response = agent
        .get(url.as_str())
        .header("Accept", "application/json")
        .call()
        .map_err(|e| fail(request_error(&e)))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RING_BYTES)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => fail(format!(
                "the answer is larger than {} MiB: not a ring page",
                MAX_RING_BYTES >> 20
            )),
            e => fail(format!("reading the answer: {}", request_error(&e))),
        })?;
    match status {
        200..=299 => parse_page(&body).map_err(fail),
        404 => Err(fail(
            "404 Not Found: this component does not serve the live-store ring (ask a \
             distributor or querier, on its HTTP port, at /live-store/ring)"
                .to_owned(),
        )),
        code => {
            let text = String::from_utf8_lossy(&body);
            let first = text.lines().next().unwrap_or_default().trim();
            let first: String = first.chars().take(200).collect();
            Err(fail(format!("HTTP {code}: {first}")))
        }
    }
}

fn request_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => format!("cannot connect: {io}"),
        ureq::Error::Timeout(t) => format!("no answer in time ({t})"),
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::ConnectionFailed => "connection failed".to_owned(),
        other => other.to_string(),
    }
}

/// A network namespace on this node, with the addresses on its interfaces.
pub struct NodeNetns {
    pub netns: Netns,
    pub inode: u64,
    pub addrs: Vec<IpAddr>,
}

/// Every network namespace on this node: named ones (/var/run/netns) and those
/// of every process, once each (by inode).
pub fn node_namespaces() -> Vec<NodeNetns> {
    let mut named: Vec<PathBuf> = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    named.sort();
    let procs = sys::pids().map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for path in named.into_iter().chain(procs) {
        // Processes exit and namespaces go while we look: skip what vanished.
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok((cookie, addrs)) = sys::in_netns(file.as_fd(), || {
            Ok((sys::current_netns_cookie()?, local_addresses()?))
        }) else {
            // Not a namespace (a stale /var/run/netns file), or it vanished.
            continue;
        };
        out.push(NodeNetns {
            netns: Netns { path, file, cookie },
            inode: meta.ino(),
            addrs,
        });
    }
    out
}

/// The addresses on the interfaces of the calling thread's network namespace.
/// Not "can a socket bind it": with `net.ipv4.ip_nonlocal_bind=1` (keepalived,
/// some IPVS setups) every address binds, and every ring address would look local.
fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) (a netlink dump of this thread's namespace) fills `head`, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr at least as large as its family's.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// What redirector does in one namespace, as the check sees it.
#[derive(Debug, Default)]
pub struct NsState {
    /// How it is served (for the report), or `None`: not served.
    pub served: Option<String>,
    /// The namespace's redirects (empty when not served).
    pub redirects: Vec<Redirect>,
    /// Its `LISTENERS` entries.
    pub registered: Vec<ListenerKey>,
    /// Its live-store listeners that are not registered, and why (the
    /// registry's reconcile pass).
    pub unservable: Vec<Unservable>,
}

/// Where the check learns what redirector does: pinned state or the agent.
pub trait Source {
    fn state(&mut self, ns: &NodeNetns) -> NsState;
    /// The redirects configured on this node (for namespaces not served) and
    /// what they are, for the report.
    fn configured(&self) -> (Vec<Redirect>, String);
}

/// One result per live-store of this node: the label of `redirector_ring_live_stores`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    NotServed,
    WrongPort,
    NoListener,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::NotServed,
        Outcome::WrongPort,
        Outcome::NoListener,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotServed => "not_served",
            Outcome::WrongPort => "wrong_port",
            Outcome::NoListener => "no_listener",
        }
    }
}

/// One PASS/FAIL line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Row {
    fn pass(name: String, detail: String) -> Self {
        Self {
            name,
            ok: true,
            detail,
            fix: None,
        }
    }

    fn fail(name: String, detail: String, fix: String) -> Self {
        Self {
            name,
            ok: false,
            detail,
            fix: Some(fix),
        }
    }
}

/// A live-store of the ring that is on this node.
#[derive(Clone, Debug, Serialize)]
pub struct LiveStore {
    pub id: String,
    pub state: String,
    pub zone: String,
    pub address: String,
    pub netns: String,
    pub netns_inode: u64,
    pub netns_cookie: u64,
    pub served: bool,
    /// The port the ring advertises (what queriers dial).
    pub advertised_port: u16,
    /// The advertise ports redirected in its namespace (or on this node).
    pub advertise_ports: Vec<u16>,
    /// The listen port its listener was looked for on.
    pub listen_port: u16,
    pub listener_registered: bool,
    pub result: Outcome,
    pub checks: Vec<Row>,
}

/// The whole check: JSON of `check --tempo-ring --output json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub url: String,
    pub ok: bool,
    /// Live-stores in the ring.
    pub shards: usize,
    pub on_this_node: usize,
    /// On other nodes: counted, not checked here.
    pub elsewhere: usize,
    /// Shards whose address is not `ip:port` (a hostname): not placed.
    pub not_ip: Vec<String>,
    pub live_stores: Vec<LiveStore>,
}

impl Report {
    /// Live-stores of this node per result, every result present.
    pub fn counts(&self) -> BTreeMap<Outcome, usize> {
        let mut counts: BTreeMap<Outcome, usize> = Outcome::ALL.iter().map(|o| (*o, 0)).collect();
        for l in &self.live_stores {
            *counts.entry(l.result).or_default() += 1;
        }
        counts
    }
}

/// Judges every shard of `page` against this node's namespaces.
pub fn evaluate(
    url: &RingUrl,
    page: &RingPage,
    namespaces: &[NodeNetns],
    source: &mut dyn Source,
) -> Report {
    let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
    for (i, ns) in namespaces.iter().enumerate() {
        for a in &ns.addrs {
            by_ip.entry(a.to_canonical()).or_default().push(i);
        }
    }
    let mut states: HashMap<usize, NsState> = HashMap::new();
    let (configured, configured_what) = source.configured();
    let mut report = Report {
        url: url.to_string(),
        ok: true,
        shards: page.shards.len(),
        on_this_node: 0,
        elsewhere: 0,
        not_ip: Vec::new(),
        live_stores: Vec::new(),
    };
    for shard in &page.shards {
        let Ok(addr) = shard.address.parse::<SocketAddr>() else {
            report
                .not_ip
                .push(format!("{} ({})", shard.id, shard.address));
            continue;
        };
        let Some(candidates) = by_ip.get(&addr.ip().to_canonical()) else {
            report.elsewhere += 1;
            continue;
        };
        for &i in candidates {
            states
                .entry(i)
                .or_insert_with(|| source.state(&namespaces[i]));
        }
        // An address in several namespaces (loopback, say): the served one.
        let i = candidates
            .iter()
            .copied()
            .find(|i| states[i].served.is_some())
            .unwrap_or(candidates[0]);
        let ns = &namespaces[i];
        let state = &states[&i];
        let live = judge(shard, addr, ns, state, &configured, &configured_what);
        report.ok &= live.result == Outcome::Ok;
        report.on_this_node += 1;
        report.live_stores.push(live);
    }
    report
}

/// The three checks of one live-store of this node.
fn judge(
    shard: &Shard,
    addr: SocketAddr,
    ns: &NodeNetns,
    state: &NsState,
    configured: &[Redirect],
    configured_what: &str,
) -> LiveStore {
    let port = addr.port();
    let where_ = format!(
        "{} ({}) in {} (net:[{}])",
        shard.address,
        shard.state,
        ns.netns.path.display(),
        ns.inode
    );
    let served = state.served.is_some();
    let served_row = match &state.served {
        Some(how) => Row::pass(format!("{} served", shard.id), format!("{where_}: {how}")),
        None => Row::fail(
            format!("{} served", shard.id),
            format!("{where_}: not served by redirector (no sk_lookup program of its agent attached there)"),
            crate::bpf::pins::bpffs_hidden().unwrap_or_else(|| {
                format!(
                    "run the agent for this namespace: `redirector run --pin --netns {}`, or with \
                     --discover (it serves every namespace with a listener on a listen port)",
                    ns.netns.path.display()
                )
            }),
        ),
    };
    let (redirects, what) = if served {
        (state.redirects.clone(), "its redirects".to_owned())
    } else {
        (configured.to_vec(), configured_what.to_owned())
    };
    let (port_row, listen_port) = port_verdict(&shard.id, port, &redirects, &what);
    let (listener_row, registered) = listener_verdict(&shard.id, addr, listen_port, ns, state);
    let result = if !served {
        Outcome::NotServed
    } else if !port_row.ok {
        Outcome::WrongPort
    } else if !listener_row.ok {
        Outcome::NoListener
    } else {
        Outcome::Ok
    };
    let mut advertise_ports: Vec<u16> = redirects.iter().map(|r| r.advertise_port).collect();
    advertise_ports.sort_unstable();
    advertise_ports.dedup();
    LiveStore {
        id: shard.id.clone(),
        state: shard.state.clone(),
        zone: shard.zone.clone(),
        address: shard.address.clone(),
        netns: ns.netns.path.display().to_string(),
        netns_inode: ns.inode,
        netns_cookie: ns.netns.cookie,
        served,
        advertised_port: port,
        advertise_ports,
        listen_port,
        listener_registered: registered,
        result,
        checks: vec![served_row, port_row, listener_row],
    }
}

fn list(redirects: &[Redirect]) -> String {
    let pairs: Vec<String> = redirects
        .iter()
        .map(|r| format!("{} -> {}", r.advertise_port, r.listen_port))
        .collect();
    if pairs.is_empty() {
        "none".to_owned()
    } else {
        pairs.join(", ")
    }
}

/// Whether the ring's port is one redirector redirects, and the listen port
/// its live-store listener should be on.
fn port_verdict(id: &str, port: u16, redirects: &[Redirect], what: &str) -> (Row, u16) {
    let name = format!("{id} port");
    if let Some(r) = redirects.iter().find(|r| r.advertise_port == port) {
        let row = Row::pass(
            name,
            format!(
                "the ring advertises {port}, which redirector hands to the listener on {} \
                 ({what}: {})",
                r.listen_port,
                list(redirects)
            ),
        );
        return (row, r.listen_port);
    }
    let advertise = redirects
        .first()
        .map_or(DEFAULT_ADVERTISE_PORT, |r| r.advertise_port);
    if let Some(r) = redirects.iter().find(|r| r.listen_port == port) {
        // The classic mistake: Tempo advertises the port it listens on.
        let row = Row::fail(
            name,
            format!(
                "the ring advertises {port}, the live-store's own listen port \
                 (server.grpc_listen_port): live_store.ring.instance_port is unset, so queriers \
                 dial {port} directly and nothing is redirected ({what}: {})",
                list(redirects)
            ),
            format!(
                "set `live_store.ring.instance_port: {}` in the live-stores' Tempo config and \
                 roll them out; queriers then dial {}, which redirector hands to {port}",
                r.advertise_port, r.advertise_port
            ),
        );
        return (row, port);
    }
    let listen = redirects
        .first()
        .map_or(DEFAULT_LISTEN_PORT, |r| r.listen_port);
    let row = Row::fail(
        name,
        format!(
            "the ring advertises {port}, which redirector does not redirect ({what}: {})",
            list(redirects)
        ),
        format!(
            "set `live_store.ring.instance_port: {advertise}` in the live-stores' Tempo \
             config, or redirect {port}: `redirector run --advertise-port {port} --listen-port \
             {listen}` (or a `redirects` entry in redirector.yaml)"
        ),
    );
    (row, listen)
}

/// Whether a registered listener bound as `key` accepts connections to `ip`:
/// a wildcard of its family, a dual-stack `[::]` for IPv4, or exactly `ip`.
fn accepts(key: &ListenerKey, ip: IpAddr) -> bool {
    match (bind_ip(key), ip.to_canonical()) {
        (None, IpAddr::V4(_)) => true,
        (None, IpAddr::V6(_)) => key.family == AF_INET6,
        (Some(bound), ip) => bound == ip,
    }
}

/// The address a `LISTENERS` key is bound to; `None` for a wildcard.
fn bind_ip(key: &ListenerKey) -> Option<IpAddr> {
    let bind = key.bind();
    if bind.is_any() {
        return None;
    }
    if key.family == AF_INET {
        // Network byte order, as the kernel stores it.
        return Some(IpAddr::V4(Ipv4Addr::from(bind.addr[0].to_ne_bytes())));
    }
    let mut octets = [0u8; 16];
    for (i, word) in bind.addr.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Some(IpAddr::V6(Ipv6Addr::from(octets)))
}

/// `address:port` a `LISTENERS` key is bound to, as `ss` shows it.
fn bound_addr(key: &ListenerKey) -> String {
    let ip = bind_ip(key).unwrap_or(if key.family == AF_INET {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    });
    SocketAddr::new(ip, key.port).to_string()
}

/// Whether a live-store listener that takes the ring address's connections is
/// registered on `listen_port`, and if not, why.
fn listener_verdict(
    id: &str,
    addr: SocketAddr,
    listen_port: u16,
    ns: &NodeNetns,
    state: &NsState,
) -> (Row, bool) {
    let name = format!("{id} listener");
    let ip = addr.ip();
    let on_port: Vec<&ListenerKey> = state
        .registered
        .iter()
        .filter(|k| k.port == listen_port)
        .collect();
    let taking: Vec<&&ListenerKey> = on_port.iter().filter(|k| accepts(k, ip)).collect();
    if !taking.is_empty() {
        let mut bound: Vec<String> = taking.iter().map(|k| bound_addr(k)).collect();
        bound.sort();
        bound.dedup();
        let row = Row::pass(
            name,
            format!(
                "live-store listener registered on {listen_port}: {} ({} socket{})",
                bound.join(", "),
                taking.len(),
                if taking.len() == 1 { "" } else { "s" }
            ),
        );
        return (row, true);
    }
    if !on_port.is_empty() {
        let mut bound: Vec<String> = on_port.iter().map(|k| bound_addr(k)).collect();
        bound.sort();
        bound.dedup();
        let row = Row::fail(
            name,
            format!(
                "the listeners registered on {listen_port} ({}) do not take connections to {ip}",
                bound.join(", ")
            ),
            format!(
                "make the live-store listen on all addresses (leave server.grpc_listen_address \
                 empty, Tempo's default) or on {ip}"
            ),
        );
        return (row, false);
    }
    let reasons: Vec<&Unservable> = state
        .unservable
        .iter()
        .filter(|u| u.port == listen_port)
        .collect();
    if !reasons.is_empty() {
        let detail: Vec<String> = reasons
            .iter()
            .map(|u| {
                let mut s = format!(
                    "listener {} (socket inode {}",
                    SocketAddr::new(u.address, u.port),
                    u.inode
                );
                if let Some(pid) = u.pid {
                    let _ = write!(s, ", pid {pid}");
                }
                let _ = write!(s, ") not registered: {}", u.reason);
                if !u.detail.is_empty() {
                    let _ = write!(s, " ({})", u.detail);
                }
                s
            })
            .collect();
        let mut fixes: Vec<&str> = reasons.iter().map(|u| u.reason.fix()).collect();
        fixes.dedup();
        let row = Row::fail(name, detail.join("; "), fixes.join("; "));
        return (row, false);
    }
    let listening = sys::in_netns(ns.netns.file.as_fd(), || {
        sockdiag::listening(&[listen_port])
    });
    let row = match listening {
        Ok(found) if found.is_empty() => Row::fail(
            name,
            format!("nothing listens on {listen_port} in this namespace"),
            format!(
                "start the live-store, and check that its server.grpc_listen_port is \
                 {listen_port}"
            ),
        ),
        Ok(_) if state.served.is_none() => Row::fail(
            name,
            format!(
                "a listener on {listen_port} is not registered: the namespace is not served"
            ),
            "serve the namespace (above); the agent registers the listener within a second"
                .to_owned(),
        ),
        Ok(_) => Row::fail(
            name,
            format!("a listener on {listen_port} is not registered yet"),
            "the agent's next pass (every second) registers it; if it stays, see \
             `redirector status`"
                .to_owned(),
        ),
        Err(e) => Row::fail(
            name,
            format!("no listener registered on {listen_port}; listing the namespace's listeners failed: {e}"),
            "run the check as root (it enters the namespace)".to_owned(),
        ),
    };
    (row, false)
}

/// Table for people: the ring's summary, then three lines per live-store of
/// this node (`PASS name  detail`, `FAIL name  detail; fix: ...`).
pub fn render_table(report: &Report) -> String {
    let mut rows = vec![summary_row(report)];
    for l in &report.live_stores {
        rows.extend(l.checks.iter().cloned());
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in &rows {
        let status = if r.ok { "PASS" } else { "FAIL" };
        let _ = write!(out, "{status}  {:<width$}  {}", r.name, r.detail);
        if let (false, Some(fix)) = (r.ok, &r.fix) {
            let _ = write!(out, "; fix: {fix}");
        }
        out.push('\n');
    }
    out
}

fn summary_row(report: &Report) -> Row {
    let mut detail = format!(
        "{}: {} live-store(s) in the ring, {} on this node, {} on other nodes (not checked here)",
        report.url, report.shards, report.on_this_node, report.elsewhere
    );
    if !report.not_ip.is_empty() {
        let _ = write!(
            detail,
            "; {} with a hostname instead of an IP, not placed: {}",
            report.not_ip.len(),
            report.not_ip.join(", ")
        );
    }
    Row::pass("ring".to_owned(), detail)
}

pub fn render_json(report: &Report) -> String {
    // Plain strings, numbers and bools: serializing cannot fail.
    serde_json::to_string_pretty(report).unwrap_or_else(|_| "{}".into())
}

/// The pinned state, read like `redirector status` reads it.
struct Pinned {
    /// Pinned sk_lookup links still attached, by netns cookie: (link id, program id).
    links: HashMap<u64, (u32, u32)>,
    redirects: Vec<(u64, Redirect)>,
    registry: Option<(Registry, Snapshot)>,
}

impl Pinned {
    fn read(layout: &PinLayout) -> Result<Self> {
        let mut pinned = Self {
            links: HashMap::new(),
            redirects: Vec::new(),
            registry: None,
        };
        if !layout.exists() {
            return Ok(pinned);
        }
        for p in layout.pinned_netns() {
            if let Some(info) = p.info.filter(|i| i.netns_ino != 0) {
                pinned.links.insert(p.cookie, (info.id, info.prog_id));
            }
        }
        let open = |name: &str| {
            MapData::from_pin(layout.map(name))
                .with_context(|| format!("opening pinned map {name}"))
        };
        let redirects: BpfHashMap<MapData, NsPort, RedirectTarget> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(open(MAP_REDIRECTS)?))
                .context("REDIRECTS map")?;
        pinned.redirects = redirects
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, t)| {
                (
                    k.netns_cookie,
                    Redirect {
                        advertise_port: k.port,
                        listen_port: t.listen_port,
                    },
                )
            })
            .collect();
        pinned
            .redirects
            .sort_by_key(|(c, r)| (*c, r.advertise_port));
        let registry = Registry::new(open(MAP_LISTENERS)?, open(MAP_REDIRECTS)?)?;
        let snapshot = registry.snapshot()?;
        pinned.registry = Some((registry, snapshot));
        Ok(pinned)
    }
}

impl Source for Pinned {
    fn state(&mut self, ns: &NodeNetns) -> NsState {
        let cookie = ns.netns.cookie;
        let Some((link, prog)) = self.links.get(&cookie).copied() else {
            return NsState::default();
        };
        let redirects: Vec<Redirect> = self
            .redirects
            .iter()
            .filter(|(c, _)| *c == cookie)
            .map(|(_, r)| *r)
            .collect();
        let mut state = NsState {
            served: Some(format!(
                "served (pinned sk_lookup link id {link}, program id {prog})"
            )),
            redirects,
            ..NsState::default()
        };
        if let Some((registry, snapshot)) = &mut self.registry {
            state.registered = snapshot.in_netns(cookie).map(|(k, _)| *k).collect();
            // Read-only: the checks the agent's reconcile pass makes, for the reasons.
            state.unservable = registry
                .inspect(&ns.netns, &state.redirects)
                .map(|r| r.unservable)
                .unwrap_or_default();
        }
        state
    }

    fn configured(&self) -> (Vec<Redirect>, String) {
        let mut all: Vec<Redirect> = self.redirects.iter().map(|(_, r)| *r).collect();
        all.sort_by_key(|r| (r.advertise_port, r.listen_port));
        all.dedup();
        if all.is_empty() {
            (
                vec![Redirect {
                    advertise_port: DEFAULT_ADVERTISE_PORT,
                    listen_port: DEFAULT_LISTEN_PORT,
                }],
                "no pinned redirects; redirector's defaults".to_owned(),
            )
        } else {
            (all, "the node's pinned redirects".to_owned())
        }
    }
}

/// `redirector check --tempo-ring URL`: the report, or why the ring could not be read.
pub fn check(url: &RingUrl) -> Result<Report> {
    let page = fetch(url).map_err(anyhow::Error::msg)?;
    let mut pinned = Pinned::read(&PinLayout::default())?;
    let namespaces = node_namespaces();
    Ok(evaluate(url, &page, &namespaces, &mut pinned))
}

pub fn render(report: &Report, output: Output) -> String {
    match output {
        Output::Table => render_table(report),
        Output::Json => render_json(report) + "\n",
    }
}

/// What the agent serves, as the ring check running beside it sees it:
/// refreshed by the main loop, read by the check's thread.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    redirects: Vec<Redirect>,
    /// By netns cookie: its redirects, and its listeners the last reconcile
    /// pass could not register.
    served: HashMap<u64, (Vec<Redirect>, Vec<Unservable>)>,
}

impl AgentView {
    pub fn of(datapath: &Datapath, redirects: &[Redirect]) -> Self {
        Self {
            redirects: redirects.to_vec(),
            served: datapath
                .served
                .iter()
                .map(|s| {
                    (
                        s.netns.cookie,
                        (s.redirects.clone(), s.report.unservable.clone()),
                    )
                })
                .collect(),
        }
    }
}

struct AgentSource {
    view: AgentView,
    /// `LISTENERS` keys, read once per pass.
    registered: Vec<ListenerKey>,
}

impl Source for AgentSource {
    fn state(&mut self, ns: &NodeNetns) -> NsState {
        let cookie = ns.netns.cookie;
        let Some((redirects, unservable)) = self.view.served.get(&cookie) else {
            return NsState::default();
        };
        NsState {
            served: Some("served by this agent".to_owned()),
            redirects: redirects.clone(),
            registered: self
                .registered
                .iter()
                .filter(|k| k.netns_cookie == cookie)
                .copied()
                .collect(),
            unservable: unservable.clone(),
        }
    }

    fn configured(&self) -> (Vec<Redirect>, String) {
        (
            self.view.redirects.clone(),
            "the agent's redirects".to_owned(),
        )
    }
}

/// The ring metrics the agent exports.
#[derive(Clone)]
struct RingMetrics {
    live_stores: Family<Vec<(String, String)>, Gauge>,
    errors: Counter,
    last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// `run --tempo-ring`: the check on a thread of its own, so a slow or
/// unreachable Tempo never holds up the agent's main loop.
pub struct Monitor {
    view: Arc<Mutex<AgentView>>,
}

impl Monitor {
    pub fn start(
        url: RingUrl,
        every: Duration,
        listeners: MapData,
        telemetry: &Telemetry,
        view: AgentView,
    ) -> Result<Self> {
        let metrics = RingMetrics {
            live_stores: Family::default(),
            errors: Counter::default(),
            last_success: Gauge::default(),
        };
        telemetry.register(|r| {
            r.register(
                "ring_live_stores",
                "Live-stores of the Tempo live-store ring on this node, by result of the ring check (ok, not_served, wrong_port, no_listener)",
                metrics.live_stores.clone(),
            );
            r.register(
                "ring_check_errors",
                "Ring checks that could not read the live-store ring (unreachable, not found, not JSON)",
                metrics.errors.clone(),
            );
            r.register(
                "ring_last_success_timestamp_seconds",
                "Unix time of the last ring check that read the live-store ring",
                metrics.last_success.clone(),
            );
        });
        for o in Outcome::ALL {
            metrics.live_stores.get_or_create(&label(o)).set(0);
        }
        let view = Arc::new(Mutex::new(view));
        let shared = view.clone();
        std::thread::Builder::new()
            .name("ring-check".to_owned())
            .spawn(move || {
                let mut log = LogState::default();
                loop {
                    pass(&url, &shared, &listeners, &metrics, &mut log);
                    std::thread::sleep(every);
                }
            })
            .context("starting the ring check thread")?;
        Ok(Self { view })
    }

    /// Shares the agent's current state with the check (each main-loop tick).
    pub fn update(&self, view: AgentView) {
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }
}

fn label(o: Outcome) -> Vec<(String, String)> {
    vec![("result".to_owned(), o.label().to_owned())]
}

fn pass(
    url: &RingUrl,
    view: &Mutex<AgentView>,
    listeners: &MapData,
    metrics: &RingMetrics,
    log: &mut LogState,
) {
    let page = match fetch(url) {
        Ok(page) => page,
        Err(e) => {
            metrics.errors.inc();
            log.error(e);
            return;
        }
    };
    let view = view.lock().map(|v| v.clone()).unwrap_or_default();
    let registered = sys::map_keys::<ListenerKey>(listeners.fd().as_fd()).unwrap_or_default();
    let mut source = AgentSource { view, registered };
    let report = evaluate(url, &page, &node_namespaces(), &mut source);
    for (o, n) in report.counts() {
        metrics.live_stores.get_or_create(&label(o)).set(n as i64);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.last_success.set(now);
    log.success(url, &report);
}

/// Logs what changed only: the same error or finding every 30 s is noise.
#[derive(Default)]
struct LogState {
    error: Option<String>,
    /// Per live-store (id, address): its result and what was said.
    findings: HashMap<(String, String), (Outcome, String)>,
    summary: String,
}

impl LogState {
    fn error(&mut self, e: String) {
        if self.error.as_ref() != Some(&e) {
            tracing::warn!("ring check: {e}");
            self.error = Some(e);
        }
    }

    fn success(&mut self, url: &RingUrl, report: &Report) {
        if self.error.take().is_some() {
            tracing::info!("ring check: {url} answers again");
        }
        let counts: Vec<String> = report
            .counts()
            .iter()
            .map(|(o, n)| format!("{}={n}", o.label()))
            .collect();
        let summary = format!(
            "ring check: {} live-store(s) in the ring, {} on this node ({}), {} elsewhere",
            report.shards,
            report.on_this_node,
            counts.join(" "),
            report.elsewhere
        );
        if summary != self.summary {
            tracing::info!("{summary}");
            self.summary = summary;
        }
        let mut now = HashMap::new();
        for l in &report.live_stores {
            let failed: Vec<String> = l
                .checks
                .iter()
                .filter(|r| !r.ok)
                .map(|r| {
                    format!(
                        "{}; fix: {}",
                        r.detail,
                        r.fix.as_deref().unwrap_or_default()
                    )
                })
                .collect();
            let said = failed.join(" | ");
            let key = (l.id.clone(), l.address.clone());
            let known = self.findings.get(&key);
            if known.map(|(o, s)| (*o, s.as_str())) != Some((l.result, said.as_str())) {
                if l.result == Outcome::Ok {
                    if known.is_some() {
                        tracing::info!(
                            "ring check: live-store {} ({}) in {}: ok",
                            l.id,
                            l.address,
                            l.netns
                        );
                    }
                } else {
                    tracing::warn!(
                        "ring check: live-store {} ({}) in {}: {}: {said}",
                        l.id,
                        l.address,
                        l.netns,
                        l.result.label()
                    );
                }
            }
            now.insert(key, (l.result, said));
        }
        for ((id, address), (result, _)) in &self.findings {
            if *result != Outcome::Ok && !now.contains_key(&(id.clone(), address.clone())) {
                tracing::info!(
                    "ring check: live-store {id} ({address}) is no longer in the ring on this node"
                );
            }
        }
        self.findings = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring page as dskit renders it (`json.NewEncoder(w).Encode(httpResponse)`),
    /// with fields this check ignores and one no dskit version has.
    const PAGE: &str = r#"{"shards":[
        {"id":"live-store-zone-a-0","state":"ACTIVE","address":"10.0.1.5:12345",
         "timestamp":"2026-11-30T08:00:00Z","registered_timestamp":"2026-11-30T07:00:00Z",
         "read_only":false,"read_only_updated_timestamp":"0001-01-01T00:00:00Z",
         "zone":"zone-a","tokens":[1,2,3],"versions":{"1":2}},
        {"id":"live-store-zone-b-0","state":"UNHEALTHY","address":"[fd00::5]:9095",
         "timestamp":"2026-11-30T08:00:00Z","registered_timestamp":"0001-01-01T00:00:00Z",
         "zone":"","tokens":null,"something_new":{"nested":[1]}}
      ],"now":"2026-11-30T08:00:01.5Z","showTokens":false}"#;

    #[test]
    fn dskit_ring_page_parses_with_extra_fields() {
        let page = parse_page(PAGE.as_bytes()).unwrap();
        assert_eq!(
            page.shards,
            [
                Shard {
                    id: "live-store-zone-a-0".into(),
                    state: "ACTIVE".into(),
                    address: "10.0.1.5:12345".into(),
                    zone: "zone-a".into(),
                },
                Shard {
                    id: "live-store-zone-b-0".into(),
                    state: "UNHEALTHY".into(),
                    address: "[fd00::5]:9095".into(),
                    zone: "".into(),
                },
            ]
        );
        let v6: SocketAddr = page.shards[1].address.parse().unwrap();
        assert_eq!(v6.port(), 9095);
    }

    #[test]
    fn empty_rings_parse() {
        // Go renders an empty ring's nil slice as null.
        assert!(parse_page(br#"{"shards":null,"now":"x"}"#)
            .unwrap()
            .shards
            .is_empty());
        assert!(parse_page(b"{\"shards\":[]}\n").unwrap().shards.is_empty());
        // No zone (older dskit versions): empty.
        let p = parse_page(br#"{"shards":[{"id":"a","state":"ACTIVE","address":"1.2.3.4:5"}]}"#)
            .unwrap();
        assert_eq!(p.shards[0].zone, "");
    }

    #[test]
    fn missing_fields_are_named() {
        let e = parse_page(br#"{"now":"x"}"#).unwrap_err();
        assert!(e.contains("missing field `shards`"), "{e}");
        assert!(
            e.starts_with("answered JSON that is not a live-store ring page"),
            "{e}"
        );
        let e = parse_page(br#"{"shards":[{"id":"a","state":"ACTIVE"}]}"#).unwrap_err();
        assert!(e.contains("missing field `address`"), "{e}");
        let e =
            parse_page(br#"{"shards":[{"state":"ACTIVE","address":"1.2.3.4:5"}]}"#).unwrap_err();
        assert!(e.contains("missing field `id`"), "{e}");
        let e = parse_page(br#"{"shards":[{"id":"a","address":"1.2.3.4:5"}]}"#).unwrap_err();
        assert!(e.contains("missing field `state`"), "{e}");
        let e = parse_page(br#"{"shards":{"a":1}}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_page(br#"[]"#).unwrap_err();
        assert!(e.contains("not a live-store ring page"), "{e}");
    }

    #[test]
    fn non_json_answers_say_so() {
        let e = parse_page(b"\n<!DOCTYPE html><html>ring</html>").unwrap_err();
        assert!(e.starts_with("answered HTML, not JSON"), "{e}");
        let e = parse_page(b"404 page not found\n").unwrap_err();
        assert!(e.starts_with("answered something that is not JSON"), "{e}");
        let e = parse_page(b"").unwrap_err();
        assert!(e.starts_with("answered something that is not JSON"), "{e}");
        let e = parse_page(br#"{"shards":[{"id":"a""#).unwrap_err();
        assert!(e.starts_with("answered something that is not JSON"), "{e}");
    }

    #[test]
    fn urls() {
        for ok in [
            "http://tempo-distributor:3200/live-store/ring",
            "http://127.0.0.1:3200/live-store/ring",
            "HTTP://[::1]:3200/live-store/ring",
            "http://tempo/live-store/ring?x=1",
        ] {
            assert_eq!(RingUrl::parse(ok).unwrap().as_str(), ok);
        }
        let e = RingUrl::parse("https://tempo:3200/live-store/ring").unwrap_err();
        assert!(e.contains("https is not supported"), "{e}");
        let e = RingUrl::parse("tempo:3200/live-store/ring").unwrap_err();
        assert!(e.contains("not an http:// URL"), "{e}");
        assert!(RingUrl::parse("http:///live-store/ring")
            .unwrap_err()
            .contains("no host"));
        assert!(RingUrl::parse("http://:3200/x")
            .unwrap_err()
            .contains("no host"));
        assert!(RingUrl::parse("http://a b/x")
            .unwrap_err()
            .contains("whitespace"));
    }

    fn r(advertise_port: u16, listen_port: u16) -> Redirect {
        Redirect {
            advertise_port,
            listen_port,
        }
    }

    #[test]
    fn unset_instance_port_is_named_with_its_fix() {
        let (row, listen) = port_verdict("ls-0", 9095, &[r(12345, 9095)], "its redirects");
        assert!(!row.ok);
        assert_eq!(listen, 9095);
        assert!(
            row.detail
                .contains("live_store.ring.instance_port is unset"),
            "{row:?}"
        );
        assert!(
            row.detail.contains("its redirects: 12345 -> 9095"),
            "{row:?}"
        );
        assert!(
            row.fix
                .as_deref()
                .unwrap()
                .starts_with("set `live_store.ring.instance_port: 12345`"),
            "{row:?}"
        );

        let (row, listen) = port_verdict("ls-0", 12345, &[r(12345, 9095)], "x");
        assert!(row.ok, "{row:?}");
        assert_eq!(listen, 9095);

        let (row, listen) = port_verdict("ls-0", 4000, &[r(12345, 9095)], "x");
        assert!(!row.ok);
        assert_eq!(listen, 9095);
        assert!(row.detail.contains("does not redirect"), "{row:?}");
        assert!(
            row.fix
                .as_deref()
                .unwrap()
                .contains("--advertise-port 4000 --listen-port 9095"),
            "{row:?}"
        );
        // Several redirects: the one for the advertised port decides.
        let (row, listen) = port_verdict("ls-0", 12346, &[r(12345, 9095), r(12346, 9096)], "x");
        assert!(row.ok);
        assert_eq!(listen, 9096);
    }

    fn key(addr: Option<IpAddr>, family: u16) -> ListenerKey {
        let bind = match addr {
            None => redirector_common::Bind::any(family),
            Some(a) => crate::bpf::registry::bind_of(a),
        };
        ListenerKey::new(1, 9095, bind, 0)
    }

    #[test]
    fn registered_listeners_take_the_ring_address_by_bind() {
        let v4: IpAddr = "10.0.1.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        let any4 = key(None, AF_INET);
        let any6 = key(None, AF_INET6);
        assert!(accepts(&any4, v4));
        assert!(!accepts(&any4, v6));
        // Go's ":9095" is a dual-stack [::] socket.
        assert!(accepts(&any6, v4));
        assert!(accepts(&any6, v6));
        let lo = key(Some("127.0.0.1".parse().unwrap()), AF_INET);
        assert!(!accepts(&lo, v4));
        assert_eq!(bind_ip(&lo), Some("127.0.0.1".parse().unwrap()));
        let exact = key(Some(v4), AF_INET);
        assert!(accepts(&exact, v4));
        assert!(accepts(&exact, "::ffff:10.0.1.5".parse().unwrap()));
        let exact6 = key(Some(v6), AF_INET6);
        assert_eq!(bind_ip(&exact6), Some(v6));
        assert!(accepts(&exact6, v6));
        assert_eq!(bind_ip(&any6), None);
    }

    #[test]
    fn listener_verdicts_say_why() {
        let here = NodeNetns {
            netns: Netns {
                path: "/proc/self/ns/net".into(),
                file: File::open("/proc/self/ns/net").unwrap(),
                cookie: 1,
            },
            inode: 4026531840,
            addrs: vec!["10.0.1.5".parse().unwrap()],
        };
        let addr: SocketAddr = "10.0.1.5:12345".parse().unwrap();
        let served = |registered, unservable| NsState {
            served: Some("served".into()),
            redirects: vec![r(12345, 9095)],
            registered,
            unservable,
        };
        let (row, ok) = listener_verdict(
            "ls",
            addr,
            9095,
            &here,
            &served(vec![key(None, AF_INET6), key(None, AF_INET)], vec![]),
        );
        assert!(ok && row.ok, "{row:?}");
        assert_eq!(
            row.detail,
            "live-store listener registered on 9095: 0.0.0.0:9095, [::]:9095 (2 sockets)"
        );

        let lo = key(Some("127.0.0.1".parse().unwrap()), AF_INET);
        let (row, ok) = listener_verdict("ls", addr, 9095, &here, &served(vec![lo], vec![]));
        assert!(!ok && !row.ok);
        assert_eq!(
            row.detail,
            "the listeners registered on 9095 (127.0.0.1:9095) do not take connections to 10.0.1.5"
        );
        assert!(row.fix.unwrap().contains("listen on all addresses"));

        let mptcp = Unservable {
            port: 9095,
            address: "::".parse().unwrap(),
            inode: 42,
            pid: Some(7),
            reason: crate::bpf::registry::Reason::Mptcp,
            detail: "socket protocol IPPROTO_MPTCP".into(),
        };
        let (row, ok) = listener_verdict("ls", addr, 9095, &here, &served(vec![], vec![mptcp]));
        assert!(!ok);
        assert_eq!(
            row.detail,
            "listener [::]:9095 (socket inode 42, pid 7) not registered: mptcp (socket protocol IPPROTO_MPTCP)"
        );
        assert!(row.fix.unwrap().contains("GODEBUG=multipathtcp=0"));
    }

    fn sample() -> Report {
        let row = |name: &str, ok: bool, fix: Option<&str>| Row {
            name: name.into(),
            ok,
            detail: format!("{name} detail"),
            fix: fix.map(str::to_owned),
        };
        Report {
            url: "http://tempo:3200/live-store/ring".into(),
            ok: false,
            shards: 3,
            on_this_node: 1,
            elsewhere: 2,
            not_ip: Vec::new(),
            live_stores: vec![LiveStore {
                id: "ls-0".into(),
                state: "ACTIVE".into(),
                zone: String::new(),
                address: "10.0.1.5:9095".into(),
                netns: "/proc/7/ns/net".into(),
                netns_inode: 4026532000,
                netns_cookie: 4099,
                served: true,
                advertised_port: 9095,
                advertise_ports: vec![12345],
                listen_port: 9095,
                listener_registered: true,
                result: Outcome::WrongPort,
                checks: vec![
                    row("ls-0 served", true, None),
                    row("ls-0 port", false, Some("set it")),
                    row("ls-0 listener", true, None),
                ],
            }],
        }
    }

    #[test]
    fn table_and_json() {
        let table = render_table(&sample());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "PASS  ring           http://tempo:3200/live-store/ring: 3 live-store(s) in the ring, 1 on this node, 2 on other nodes (not checked here)",
                "PASS  ls-0 served    ls-0 served detail",
                "FAIL  ls-0 port      ls-0 port detail; fix: set it",
                "PASS  ls-0 listener  ls-0 listener detail",
            ]
        );
        let v: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["elsewhere"], 2);
        assert_eq!(v["live_stores"][0]["result"], "wrong_port");
        assert_eq!(v["live_stores"][0]["checks"][1]["fix"], "set it");
        assert!(v["live_stores"][0]["checks"][0].get("fix").is_none());
        let counts = sample().counts();
        assert_eq!(counts.len(), 4);
        assert_eq!(counts[&Outcome::WrongPort], 1);
        assert_eq!(counts[&Outcome::Ok], 0);
    }
}
