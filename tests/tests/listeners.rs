//! The listeners real servers create: Go's default MPTCP listener (a real Go
//! program), loopback-only and address-bound listeners, SO_REUSEPORT groups of
//! worker processes, and registrations that go missing. Real kernel, real
//! processes; every assertion names the socket that answered.

use std::{
    io, thread,
    time::{Duration, Instant},
};

use redirector_tests::*;

const MPTCP_ENABLED: &str = "/proc/sys/net/mptcp/enabled";

/// The shared topology, with MPTCP allowed in the live-store's namespace:
/// what a pod gets on Debian, Ubuntu, RHEL, Amazon Linux.
fn topology() -> Topology {
    let t = Topology::new();
    t.l.sysctl("net.mptcp.enabled", "1").expect("mptcp on");
    t
}

fn v4(port: u16) -> String {
    format!("{LIVE_STORE_V4}:{port}")
}

fn v6(port: u16) -> String {
    format!("[{LIVE_STORE_V6}]:{port}")
}

/// The real Go live-store `cargo xtask test` builds (tests/go/live-store.go).
fn go_live_store(ns: &Netns, name: &str) -> Process {
    let bin = go_live_store_bin();
    Process::start(
        ns,
        bin.to_str().expect("utf-8"),
        &[&format!(":{LISTEN}"), name],
        // No GODEBUG: Go's defaults, as Tempo runs.
        &[],
    )
    .expect("the Go live-store starts")
}

fn stand_in(ns: &Netns, addr: &str, name: &str, flags: &[&str]) -> Process {
    let mut args = vec![addr, name];
    args.extend_from_slice(flags);
    Process::start(ns, env!("CARGO_BIN_EXE_live-store-standin"), &args, &[])
        .expect("the stand-in starts")
}

/// Whether `ns` has an MPTCP socket listening on `port` (`ss --mptcp`).
fn mptcp_listening(ns: &Netns, port: u16) -> bool {
    let out = ns
        .command("ss")
        .args(["-Hln", "--mptcp"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(&format!(":{port} ")))
}

fn assert_refused(result: io::Result<Reply>, what: &str) {
    match result {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("{what}: expected connection refused, got {other:?}"),
    }
}

/// Polls `f` every 50 ms until it returns true or `limit` passes; returns
/// how long it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

fn metric(agent: &Agent, line_start: &str) -> f64 {
    let (status, body) = http_get(&agent.metrics_url("/metrics"));
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{body}"))
}

#[test]
fn a_go_live_store_started_after_the_agent_listens_with_tcp_and_is_served() {
    let t = topology();
    let agent = t.agent(&[]);
    assert_eq!(
        t.l.sysctl_value(MPTCP_ENABLED),
        "0",
        "the agent turns MPTCP off in the namespace it serves"
    );
    let _go = go_live_store(&t.l, "go-live-store");
    assert!(
        !mptcp_listening(&t.l, LISTEN),
        "Go fell back to plain TCP in a namespace that refuses MPTCP"
    );
    for addr in [v4(ADVERTISE), v6(ADVERTISE)] {
        let reply = request(&t.q, &addr, b"hello go").expect("redirected to the Go live-store");
        assert_eq!(reply.server, "go-live-store", "{addr}");
        assert!(
            same_ip(&reply.peer_seen, reply.local_addr.ip()),
            "Go saw the querier's own address: {reply:?}"
        );
        assert_eq!(reply.echo, b"hello go");
    }
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(stopped.counter("flows_opened"), 2);
    assert_eq!(
        t.l.sysctl_value(MPTCP_ENABLED),
        "1",
        "the agent gives the namespace its MPTCP setting back"
    );
}

#[test]
fn a_go_live_store_already_listening_with_mptcp_is_reported_then_served_after_its_restart() {
    let t = topology();
    let go = go_live_store(&t.l, "go-mptcp");
    assert!(
        mptcp_listening(&t.l, LISTEN),
        "Go >= 1.24 listens with MPTCP where the namespace allows it"
    );
    let agent = t.agent(&[]);
    assert!(
        agent
            .status()
            .iter()
            .any(|l| l.contains("0 listener(s) registered, 1 NOT registered")),
        "{:?}",
        agent.status()
    );
    // The live-store's problem, not the agent's: still ready, and the reason
    // with its fix goes to the metrics and the agent's log.
    let (status, body) = http_get(&agent.metrics_url("/readyz"));
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(
        metric(&agent, "redirector_listeners_unservable{reason=\"mptcp\"}"),
        1.0
    );
    assert!(
        agent
            .status()
            .iter()
            .any(|l| l.contains("not registered: mptcp") && l.contains("GODEBUG=multipathtcp=0")),
        "{:?}",
        agent.status()
    );
    // Not served, and never a hot loop: the agent keeps running.
    assert_refused(request(&t.q, &v4(ADVERTISE), b"x"), "MPTCP listener");

    // The documented recovery: restart the live-store. MPTCP is off in its
    // namespace now, so Go listens with TCP and sock_ops registers it.
    drop(go);
    let _go = go_live_store(&t.l, "go-restarted");
    assert!(!mptcp_listening(&t.l, LISTEN));
    for addr in [v4(ADVERTISE), v6(ADVERTISE)] {
        let reply = request(&t.q, &addr, b"x").expect("served after the restart");
        assert_eq!(reply.server, "go-restarted", "{addr}");
    }
    within(Duration::from_secs(3), || {
        metric(&agent, "redirector_listeners_unservable{reason=\"mptcp\"}") == 0.0
    })
    .expect("no longer reported once the listener is registered");
    assert_eq!(http_get(&agent.metrics_url("/readyz")).0, 200);
    let stopped = agent.stop().expect("agent stops");
    let warnings = stopped
        .stderr
        .iter()
        .filter(|l| l.contains("not registered: mptcp"))
        .count();
    assert_eq!(
        warnings, 1,
        "logged once, not every pass: {:?}",
        stopped.stderr
    );
}

#[test]
fn an_ipv4_mptcp_listener_is_reported_and_a_restart_with_tcp_is_served() {
    let t = topology();
    let mptcp = stand_in(&t.l, &format!("0.0.0.0:{LISTEN}"), "v4-mptcp", &["--mptcp"]);
    assert!(mptcp.ready.contains("with mptcp"), "{}", mptcp.ready);
    let agent = t.agent(&[]);
    let (status, body) = http_get(&agent.metrics_url("/readyz"));
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(&format!("0.0.0.0:{LISTEN}")), "{body}");
    assert_eq!(
        metric(&agent, "redirector_listeners_unservable{reason=\"mptcp\"}"),
        1.0
    );
    assert!(
        agent.status().iter().any(
            |l| l.contains(&format!("0.0.0.0:{LISTEN}")) && l.contains("not registered: mptcp")
        ),
        "{:?}",
        agent.status()
    );
    assert_refused(request(&t.q, &v4(ADVERTISE), b"x"), "MPTCP listener");
    drop(mptcp);
    // The same program asks for MPTCP again and gets TCP, as Go would.
    let tcp = stand_in(&t.l, &format!("0.0.0.0:{LISTEN}"), "v4-tcp", &["--mptcp"]);
    assert!(tcp.ready.contains("with tcp"), "{}", tcp.ready);
    let reply = request(&t.q, &v4(ADVERTISE), b"x").expect("served");
    assert_eq!(reply.server, "v4-tcp");
    agent.stop().expect("agent stops");
}

#[test]
fn keep_mptcp_leaves_the_namespace_alone_and_reports_what_it_cannot_serve() {
    let t = topology();
    let agent = t.agent(&["--keep-mptcp"]);
    assert_eq!(t.l.sysctl_value(MPTCP_ENABLED), "1");
    let _go = go_live_store(&t.l, "go-mptcp");
    assert!(mptcp_listening(&t.l, LISTEN));
    within(Duration::from_secs(3), || {
        metric(&agent, "redirector_listeners_unservable{reason=\"mptcp\"}") == 1.0
    })
    .expect("the next reconcile pass reports the MPTCP listener");
    assert_eq!(http_get(&agent.metrics_url("/readyz")).0, 200);
    assert_refused(request(&t.q, &v4(ADVERTISE), b"x"), "MPTCP listener");
    agent.stop().expect("agent stops");
    assert_eq!(t.l.sysctl_value(MPTCP_ENABLED), "1");
}

#[test]
fn one_unservable_namespace_never_stops_the_others() {
    let bad = topology();
    let good = topology();
    let _mptcp = go_live_store(&bad.l, "go-mptcp");
    let _tcp = Server::start(&good.l, &format!("[::]:{LISTEN}"), "good").expect("listens");
    let (bad_path, good_path) = (bad.l.path(), good.l.path());
    let (bad_path, good_path) = (
        bad_path.to_str().expect("utf-8"),
        good_path.to_str().expect("utf-8"),
    );
    let agent = Agent::start(&["--netns", bad_path, "--netns", good_path])
        .expect("the agent starts although one listener cannot be registered");
    let reply = request(&good.q, &v4(ADVERTISE), b"x").expect("the other namespace is served");
    assert_eq!(reply.server, "good");
    // Ready (the agent's own programs are all attached), and /readyz, which
    // every pod on the node can read, names no namespace.
    let (status, body) = http_get(&agent.metrics_url("/readyz"));
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains(bad_path) && !body.contains(good_path),
        "{body}"
    );
    assert_eq!(
        metric(&agent, "redirector_listeners_unservable{reason=\"mptcp\"}"),
        1.0
    );
    // The agent's own log names the namespace with the problem, only it.
    let reported: Vec<String> = agent
        .status()
        .into_iter()
        .filter(|l| l.contains("not registered: mptcp"))
        .collect();
    assert!(
        reported.iter().any(|l| l.contains(bad_path))
            && !reported.iter().any(|l| l.contains(good_path)),
        "{reported:?}"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn a_loopback_only_live_store_never_gets_traffic_from_the_network() {
    let t = topology();
    // The live-store only listens on loopback; an auth sidecar owns ADVERTISE.
    let _lo4 =
        Server::start(&t.l, &format!("127.0.0.1:{LISTEN}"), "live-store-lo4").expect("listens");
    let _lo6 = Server::start(&t.l, &format!("[::1]:{LISTEN}"), "live-store-lo6").expect("listens");
    let sidecar =
        Server::start(&t.l, &format!("[::]:{ADVERTISE}"), "sidecar").expect("sidecar listens");
    let agent = t.agent(&[]);
    for addr in [v4(ADVERTISE), v6(ADVERTISE)] {
        let reply = request(&t.q, &addr, b"x").expect("answered");
        assert_eq!(
            reply.server, "sidecar",
            "{addr}: the sidecar is not bypassed"
        );
    }
    // From inside the pod, loopback to loopback: what LISTEN itself would get.
    let reply = request(&t.l, &format!("127.0.0.1:{ADVERTISE}"), b"x").expect("answered");
    assert_eq!(reply.server, "live-store-lo4");
    let reply = request(&t.l, &format!("[::1]:{ADVERTISE}"), b"x").expect("answered");
    assert_eq!(reply.server, "live-store-lo6");
    // Without the sidecar, network clients are refused, never exposed.
    sidecar.stop();
    assert_refused(request(&t.q, &v4(ADVERTISE), b"x"), "v4 from the network");
    assert_refused(request(&t.q, &v6(ADVERTISE), b"x"), "v6 from the network");
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(
        stopped.counter("flows_opened"),
        2,
        "only the loopback clients"
    );
}

#[test]
fn a_listener_bound_to_one_address_only_gets_connections_to_that_address() {
    let t = topology();
    const SECOND: &str = "198.18.0.3";
    netns::ip(&[
        "-n",
        &t.l.name,
        "addr",
        "add",
        &format!("{SECOND}/24"),
        "dev",
        "vl",
    ])
    .expect("second address");
    let _first = Server::start(&t.l, &v4(LISTEN), "bound-to-first").expect("listens");
    let agent = t.agent(&[]);
    let reply = request(&t.q, &v4(ADVERTISE), b"x").expect("answered");
    assert_eq!(reply.server, "bound-to-first");
    let second = format!("{SECOND}:{ADVERTISE}");
    assert_refused(
        request(&t.q, &second, b"x"),
        "no listener for the second address",
    );
    assert_refused(
        request(&t.l, &format!("127.0.0.1:{ADVERTISE}"), b"x"),
        "no listener for loopback",
    );
    // A listener for the second address gets exactly its own connections.
    let _second =
        Server::start(&t.l, &format!("{SECOND}:{LISTEN}"), "bound-to-second").expect("listens");
    assert_eq!(
        request(&t.q, &second, b"x").expect("answered").server,
        "bound-to-second"
    );
    assert_eq!(
        request(&t.q, &v4(ADVERTISE), b"x")
            .expect("answered")
            .server,
        "bound-to-first"
    );
    agent.stop().expect("agent stops");
}

#[test]
fn every_member_of_a_reuseport_group_is_used_and_the_redirect_holds_while_one_listens() {
    let t = topology();
    let mut members: Vec<Process> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| stand_in(&t.l, &format!("[::]:{LISTEN}"), n, &["--reuseport"]))
        .collect();
    let agent = t.agent(&[]);
    let answered_by = |n: usize| answered_by(&t.q, &v4(ADVERTISE), n);
    let first = answered_by(60);
    for w in ["w1", "w2", "w3"] {
        assert!(
            first.iter().any(|s| s == w),
            "{w} got none of 60 connections: {first:?}"
        );
    }
    // Members go, the last one to register first (a registration that only
    // remembers the newest member loses the redirect here): every connection
    // is still answered while one listens.
    members.remove(2);
    let after_one = answered_by(30);
    assert!(
        after_one.iter().all(|s| s == "w1" || s == "w2"),
        "{after_one:?}"
    );
    members.remove(0);
    assert!(answered_by(20).iter().all(|s| s == "w2"));
    // Members come back while the last one listens, then it goes.
    members.push(stand_in(
        &t.l,
        &format!("[::]:{LISTEN}"),
        "w4",
        &["--reuseport"],
    ));
    members.remove(0);
    assert!(answered_by(20).iter().all(|s| s == "w4"));
    members.clear();
    assert_refused(request(&t.q, &v4(ADVERTISE), b"x"), "no member left");
    let _w5 = stand_in(&t.l, &format!("[::]:{LISTEN}"), "w5", &["--reuseport"]);
    assert_eq!(answered_by(1), vec!["w5".to_owned()]);
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(stopped.counter("flows_opened"), 60 + 30 + 20 + 20 + 1);
}

#[test]
fn a_registration_deleted_behind_the_agents_back_is_back_within_2_s() {
    let t = topology();
    let _live_store =
        Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let agent = t.agent(&[]);
    assert_eq!(
        request(&t.q, &v4(ADVERTISE), b"x").expect("served").server,
        "live-store"
    );
    assert_eq!(delete_registrations(t.l.cookie()), 1);
    assert_refused(
        request(&t.q, &v4(ADVERTISE), b"x"),
        "right after the deletion",
    );
    let took = within(Duration::from_secs(2), || {
        request(&t.q, &v4(ADVERTISE), b"x").is_ok()
    })
    .expect("the reconcile pass registers the listener again within 2 s");
    println!("registration repaired after {took:?}");
    let stopped = agent.stop().expect("agent stops");
    assert!(
        stopped
            .stderr
            .iter()
            .any(|l| l.contains(&format!("registered listener [::]:{LISTEN}"))),
        "the repair is logged: {:?}",
        stopped.stderr
    );
}

#[test]
fn the_agents_copy_of_an_existing_listener_never_keeps_the_port_bound() {
    let t = topology();
    let live_store = Server::start(&t.l, &format!("[::]:{LISTEN}"), "early").expect("listens");
    let agent = t.agent(&[]);
    assert_eq!(
        request(&t.q, &v4(ADVERTISE), b"x").expect("served").server,
        "early"
    );
    // Registered by the agent, not by sock_ops: counted all the same.
    assert_eq!(
        metric(&agent, "redirector_listener_registrations_total"),
        1.0
    );
    live_store.stop();
    // Had the agent kept its copy, the port would still be listening here.
    let again =
        t.l.run(|| std::net::TcpListener::bind(format!("[::]:{LISTEN}")))
            .expect("the port is free once the live-store closed it");
    drop(again);
    assert_refused(request(&t.q, &v4(ADVERTISE), b"x"), "nothing listens");
    // The agent registered the first listener, sock_ops the test's own.
    let counted = metric(&agent, "redirector_listener_registrations_total");
    assert_eq!(counted, 2.0);
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(
        stopped.counter("listener_registered") as f64,
        counted,
        "the exit summary says what /metrics said"
    );
}
