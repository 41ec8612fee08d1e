//! The verdicts: each live-store of the ring that is on this node, judged
//! against what redirector does in its namespace (served? its port
//! redirected? its listener registered?), with the fix for each failure.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
};

use redirector_common::{
    ListenerKey, AF_INET, AF_INET6, DEFAULT_ADVERTISE_PORT, DEFAULT_LISTEN_PORT,
};
use serde::Serialize;

use super::{
    fetch::{RingPage, RingUrl, Shard},
    local::NodeNetns,
    source::{NsState, Source},
};
use crate::{
    bpf::{registry::Unservable, Redirect},
    sys,
    sys::sockdiag,
};

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

/// Which of the three checks of a live-store a finding answers; the first
/// that fails, in this order, is the live-store's `Outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aspect {
    Served,
    Port,
    Listener,
}

impl Aspect {
    pub fn label(self) -> &'static str {
        match self {
            Aspect::Served => "served",
            Aspect::Port => "port",
            Aspect::Listener => "listener",
        }
    }
}

/// What one check of a live-store found, and on a failure what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub aspect: Aspect,
    pub ok: bool,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    fn pass(aspect: Aspect, detail: String) -> Self {
        Self {
            aspect,
            ok: true,
            detail,
            fix: None,
        }
    }

    fn fail(aspect: Aspect, detail: String, fix: String) -> Self {
        Self {
            aspect,
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
    /// Served, port, listener, in that order. Left out of the JSON here: the
    /// command names each check after its live-store (`ls-0 port`), in the
    /// table and the JSON alike.
    #[serde(skip)]
    pub checks: Vec<Finding>,
}

/// The whole check. Its JSON is the top of `check --tempo-ring --output json`;
/// the command adds `live_stores`, with their checks named.
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
    /// Serialized by the command, with the checks (see `LiveStore::checks`).
    #[serde(skip)]
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
        Some(how) => Finding::pass(Aspect::Served, format!("{where_}: {how}")),
        None => Finding::fail(
            Aspect::Served,
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
    let (port_row, listen_port) = port_verdict(port, &redirects, &what);
    let (listener_row, registered) = listener_verdict(addr, listen_port, ns, state);
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
fn port_verdict(port: u16, redirects: &[Redirect], what: &str) -> (Finding, u16) {
    let aspect = Aspect::Port;
    if let Some(r) = redirects.iter().find(|r| r.advertise_port == port) {
        let row = Finding::pass(
            aspect,
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
        let row = Finding::fail(
            aspect,
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
    let row = Finding::fail(
        aspect,
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
    addr: SocketAddr,
    listen_port: u16,
    ns: &NodeNetns,
    state: &NsState,
) -> (Finding, bool) {
    let aspect = Aspect::Listener;
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
        let row = Finding::pass(
            aspect,
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
        let row = Finding::fail(
            aspect,
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
        let row = Finding::fail(aspect, detail.join("; "), fixes.join("; "));
        return (row, false);
    }
    let listening = sys::in_netns(ns.netns.file.as_fd(), || {
        sockdiag::listening(&[listen_port])
    });
    let row = match listening {
        Ok(found) if found.is_empty() => Finding::fail(
            aspect,
            format!("nothing listens on {listen_port} in this namespace"),
            format!(
                "start the live-store, and check that its server.grpc_listen_port is \
                 {listen_port}"
            ),
        ),
        Ok(_) if state.served.is_none() => Finding::fail(
            aspect,
            format!(
                "a listener on {listen_port} is not registered: the namespace is not served"
            ),
            "serve the namespace (above); the agent registers the listener within a second"
                .to_owned(),
        ),
        Ok(_) => Finding::fail(
            aspect,
            format!("a listener on {listen_port} is not registered yet"),
            "the agent's next pass (every second) registers it; if it stays, see \
             `redirector status`"
                .to_owned(),
        ),
        Err(e) => Finding::fail(
            aspect,
            format!("no listener registered on {listen_port}; listing the namespace's listeners failed: {e}"),
            "run the check as root (it enters the namespace)".to_owned(),
        ),
    };
    (row, false)
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::sys::netns::Netns;

    fn r(advertise_port: u16, listen_port: u16) -> Redirect {
        Redirect {
            advertise_port,
            listen_port,
        }
    }

    #[test]
    fn unset_instance_port_is_named_with_its_fix() {
        let (row, listen) = port_verdict(9095, &[r(12345, 9095)], "its redirects");
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

        let (row, listen) = port_verdict(12345, &[r(12345, 9095)], "x");
        assert!(row.ok, "{row:?}");
        assert_eq!(listen, 9095);

        let (row, listen) = port_verdict(4000, &[r(12345, 9095)], "x");
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
        let (row, listen) = port_verdict(12346, &[r(12345, 9095), r(12346, 9096)], "x");
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
        let (row, ok) = listener_verdict(addr, 9095, &here, &served(vec![lo], vec![]));
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
        let (row, ok) = listener_verdict(addr, 9095, &here, &served(vec![], vec![mptcp]));
        assert!(!ok);
        assert_eq!(
            row.detail,
            "listener [::]:9095 (socket inode 42, pid 7) not registered: mptcp (socket protocol IPPROTO_MPTCP)"
        );
        assert!(row.fix.unwrap().contains("GODEBUG=multipathtcp=0"));
    }
}
