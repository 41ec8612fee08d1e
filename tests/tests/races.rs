//! What the kernel lets happen between the agent's steps: a listener that
//! starts between the reconcile pass's sock_diag dump and its map read, a
//! reuseport member shut down in place, a bind kind lost to a concurrent
//! write, more members than slots, a socket whose inode was reused. Each test
//! makes the interleaving happen on purpose (a dump taken early, a value
//! written as the lost write leaves it), on real kernel maps and sockets.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    thread,
    time::{Duration, Instant},
};

use aya::maps::MapData;
use redirector::{
    bpf::{registry::Registry, Redirect},
    sys::{netns::Netns as AgentNetns, sockdiag},
};
use redirector_common::{
    ListenerKey, NsPort, RedirectTarget, BIND_V6_ANY, MAP_LISTENERS, MAP_REDIRECTS,
};
use redirector_tests::*;

const REDIRECT: Redirect = Redirect {
    advertise_port: ADVERTISE,
    listen_port: LISTEN,
};

fn v4(port: u16) -> String {
    format!("{LIVE_STORE_V4}:{port}")
}

/// The running agent's map named `name` (tests run one agent at a time).
fn agent_map(name: &str) -> MapData {
    let info = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(name))
        .max_by_key(|m| m.id())
        .unwrap_or_else(|| panic!("no loaded map {name}"));
    MapData::from_id(info.id()).expect("open the agent's map")
}

/// `LISTENERS` entries of namespace `cookie`: (key, socket cookie).
fn registrations(cookie: u64) -> Vec<(ListenerKey, u64)> {
    let map = agent_map(MAP_LISTENERS);
    let fd = map.fd().as_fd();
    redirector::sys::map_keys::<ListenerKey>(fd)
        .expect("list LISTENERS")
        .into_iter()
        .filter(|k| k.netns_cookie == cookie)
        .filter_map(|k| {
            redirector::sys::map_lookup(fd, &k)
                .ok()
                .flatten()
                .map(|c| (k, c))
        })
        .collect()
}

/// A registry over the running agent's maps, as the agent's own.
fn registry() -> Registry {
    Registry::new(agent_map(MAP_LISTENERS), agent_map(MAP_REDIRECTS)).expect("registry")
}

fn reuseport_listener(t: &Topology, v6only: bool) -> std::net::TcpListener {
    use socket2::{Domain, Protocol, Socket, Type};
    t.l.run(|| -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(v6only)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        let addr: SocketAddr = format!("[::]:{LISTEN}").parse().expect("address");
        s.bind(&addr.into())?;
        s.listen(128)?;
        Ok(s.into())
    })
    .expect("listen on every address with SO_REUSEPORT")
}

/// A live-store stand-in process listening on `[::]:LISTEN` in `t.l`.
fn stand_in(t_l: &Netns, name: &str) -> Process {
    Process::start(
        t_l,
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[&format!("[::]:{LISTEN}"), name],
        &[],
    )
    .expect("the stand-in starts")
}

fn answers(t: &Topology, n: usize) -> Vec<String> {
    answered_by(&t.q, &v4(ADVERTISE), n)
}

#[test]
fn a_listener_that_starts_between_the_dump_and_the_map_read_keeps_its_registration() {
    let t = Topology::new();
    let agent = t.agent(&[]);
    let netns = AgentNetns::open(&t.l.path()).expect("open the namespace");
    let dump = || {
        t.l.run(|| sockdiag::listening(&[LISTEN]))
            .expect("sock_diag dump")
    };
    // A pass over the live-store as it first runs: the registry remembers
    // its slot, as the agent's does between passes.
    let mut registry = registry();
    let first = stand_in(&t.l, "first");
    agent.wait_registered(1);
    registry
        .reconcile(&netns, &[REDIRECT], &dump(), &[], true)
        .expect("reconcile");
    drop(first);
    // The next pass's dump, taken while nothing listens...
    let found = dump();
    assert!(found.is_empty(), "{found:?}");
    // ...then the live-store restarts in place (sock_ops registers it in the
    // kernel at listen(), in the same slot), before the pass reads the map.
    let _restarted = stand_in(&t.l, "restarted");
    let before = registrations(t.l.cookie());
    assert_eq!(before.len(), 1, "sock_ops registered the restart");
    let report = registry
        .reconcile(&netns, &[REDIRECT], &found, &[], true)
        .expect("reconcile");
    assert!(
        report.repaired.is_empty(),
        "the pass removed a live registration: {:?}",
        report.repaired
    );
    assert_eq!(registrations(t.l.cookie()), before);
    assert_eq!(answers(&t, 1), vec!["restarted".to_owned()]);
    agent.stop().expect("agent stops");
}

#[test]
fn a_copied_socket_is_the_one_sock_diag_named_by_cookie_not_by_inode() {
    let t = Topology::new();
    // Another process holds it, as a live-store does (the registry copies
    // from other processes only).
    let _live_store = stand_in(&t.l, "live-store");
    let agent = t.agent(&[]);
    agent.wait_registered(1);
    assert_eq!(delete_registrations(t.l.cookie()), 1);
    // What a reused inode looks like: sock_diag named a socket with this
    // inode, but another one (its cookie differs) holds it now.
    let mut found =
        t.l.run(|| sockdiag::listening(&[LISTEN]))
            .expect("sock_diag dump");
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].cookie ^= 1 << 40;
    let netns = AgentNetns::open(&t.l.path()).expect("open the namespace");
    let report = registry()
        .reconcile(&netns, &[REDIRECT], &found, &[], true)
        .expect("reconcile");
    assert!(
        !report.repaired.iter().any(|r| r.starts_with("registered")),
        "a socket other than the one sock_diag named was registered: {:?}",
        report.repaired
    );
    assert!(
        report.unservable.is_empty(),
        "the copy was made and judged, not refused: {:?}",
        report.unservable
    );
    agent.stop().expect("agent stops");
}

#[test]
fn a_member_shut_down_in_place_does_not_hide_the_members_after_it() {
    let t = Topology::new();
    let agent = t.agent(&[]);
    let first = reuseport_listener(&t, false);
    agent.wait_registered(1);
    let second = reuseport_listener(&t, false);
    agent.wait_registered(2);
    let _second = Server::serve(second, "second");
    // How HAProxy pauses a listener: it stays open, out of its group.
    // SAFETY: shutdown(2) on a socket this test owns.
    assert_eq!(
        unsafe { libc::shutdown(first.as_raw_fd(), libc::SHUT_RD) },
        0,
        "shutdown(SHUT_RD)"
    );
    let answers = answers(&t, 20);
    assert!(answers.iter().all(|s| s == "second"), "{answers:?}");
    // The agent heard of the stop and removed the entry the kernel kept.
    let deadline = Instant::now() + latency_bound(Duration::from_secs(1));
    while registrations(t.l.cookie()).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the shut-down listener is still registered: {:?}",
            registrations(t.l.cookie())
        );
        thread::sleep(Duration::from_millis(10));
    }
    drop(first);
    agent.stop().expect("agent stops");
}

#[test]
fn an_ipv6_only_member_does_not_hide_a_dual_stack_one_from_ipv4_clients() {
    let t = Topology::new();
    let agent = t.agent(&[]);
    let v6only = reuseport_listener(&t, true);
    agent.wait_registered(1);
    let dual = reuseport_listener(&t, false);
    agent.wait_registered(2);
    let _v6only = Server::serve(v6only, "v6only");
    let _dual = Server::serve(dual, "dual-stack");
    let answers = answers(&t, 10);
    assert!(answers.iter().all(|s| s == "dual-stack"), "{answers:?}");
    agent.stop().expect("agent stops");
}

#[test]
fn members_beyond_the_slots_are_registered_as_soon_as_the_registered_ones_close() {
    let t = Topology::new();
    // Nine more served namespaces: the resync checks one a second, so without
    // being told the agent would come back to this one in up to 10 s.
    let others: Vec<Netns> = (0..9)
        .map(|i| Netns::new(&format!("o{i}")).expect("netns"))
        .collect();
    let paths: Vec<String> = others
        .iter()
        .map(|n| n.path().display().to_string())
        .collect();
    let mut extra: Vec<&str> = Vec::new();
    for p in &paths {
        extra.extend(["--netns", p.as_str()]);
    }
    let agent = t.agent(&extra);
    let mut members = Vec::new();
    for i in 1..=6u64 {
        let name = format!("w{i}");
        members.push(
            Process::start(
                &t.l,
                env!("CARGO_BIN_EXE_live-store-standin"),
                &[&format!("[::]:{LISTEN}"), &name, "--reuseport"],
                &[],
            )
            .expect("the stand-in starts"),
        );
        agent.wait_registered(i.min(4));
    }
    // The four with a slot go; the two without one are all that listens.
    members.drain(..4);
    let start = Instant::now();
    let deadline = start + latency_bound(Duration::from_secs(1));
    loop {
        if let Ok(reply) = request(&t.q, &v4(ADVERTISE), b"x") {
            assert!(reply.server == "w5" || reply.server == "w6", "{reply:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "w5/w6 not served {:?} after the registered members closed",
            start.elapsed()
        );
        thread::sleep(Duration::from_millis(10));
    }
    println!(
        "members beyond the slots served {:?} after",
        start.elapsed()
    );
    let answers = answers(&t, 20);
    assert!(
        answers.iter().all(|s| s == "w5" || s == "w6"),
        "{answers:?}"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn a_bind_kind_lost_to_a_concurrent_write_costs_no_connection() {
    let t = Topology::new();
    let _live_store =
        Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let agent = t.agent(&[]);
    agent.wait_registered(1);
    let mut redirects: aya::maps::HashMap<MapData, NsPort, RedirectTarget> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(agent_map(MAP_REDIRECTS)))
            .expect("REDIRECTS");
    let key = NsPort::new(t.l.cookie(), ADVERTISE);
    let target = redirects.get(&key, 0).expect("the redirect");
    assert_eq!(target.binds[BIND_V6_ANY], 1, "{target:?}");
    // What the reconcile pass's whole-value write leaves when sock_ops
    // marked the kind between its read and its write.
    redirects
        .insert(key, RedirectTarget::new(LISTEN), 0)
        .expect("write the value back without the kind");
    assert_eq!(answers(&t, 3), vec!["live-store".to_owned(); 3]);
    let relearned = redirects.get(&key, 0).expect("the redirect");
    assert_eq!(
        relearned.binds[BIND_V6_ANY], 1,
        "sk_lookup marks the kind that took the connection: {relearned:?}"
    );
    agent.stop().expect("agent stops");
}
