//! The datapath against the real kernel: a querier namespace Q and a live-store
//! namespace L joined by veth, the real agent binary, real sockets.
//! Needs root; `cargo xtask test` runs these one at a time.

use std::{io, process::Command};

use redirector_tests::*;

fn v4(port: u16) -> String {
    format!("{LIVE_STORE_V4}:{port}")
}

fn v6(port: u16) -> String {
    format!("[{LIVE_STORE_V6}]:{port}")
}

fn assert_refused(result: io::Result<Reply>, what: &str) {
    match result {
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "{what}: expected a refusal, got {e}"
        ),
        Ok(r) => panic!("{what}: expected a refusal, {} answered", r.server),
    }
}

#[test]
fn redirects_ipv4_and_ipv6_to_the_listener_with_the_client_address() {
    let t = Topology::new();
    let live_store =
        Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let agent = t.agent(&[]);
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();

    let r4 =
        request(&t.q, &v4(ADVERTISE), &payload).expect("IPv4 connection to the advertised port");
    assert_eq!(r4.server, "live-store");
    assert!(
        same_ip(&r4.peer_seen, QUERIER_V4),
        "live-store saw {} for an IPv4 querier",
        r4.peer_seen
    );
    assert_eq!(
        r4.peer_seen.port(),
        r4.local_addr.port(),
        "peer port is the querier's own"
    );
    assert!(r4.echo == payload, "256 KiB echoed back intact over IPv4");

    let r6 =
        request(&t.q, &v6(ADVERTISE), &payload).expect("IPv6 connection to the advertised port");
    assert_eq!(r6.server, "live-store");
    assert_eq!(
        r6.peer_seen, r6.local_addr,
        "live-store saw the querier's IPv6 address and port"
    );
    assert!(r6.echo == payload, "256 KiB echoed back intact over IPv6");

    assert_eq!(live_store.accepted().len(), 2);
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
    assert_eq!(
        stopped.counter("redirected"),
        2,
        "exactly two connections were steered"
    );
    assert_eq!(stopped.counter("assign_error"), 0);
}

#[test]
fn ipv4_only_listener_gets_ipv4_and_ipv6_is_refused() {
    let t = Topology::new();
    let live_store = Server::start(&t.l, &format!("0.0.0.0:{LISTEN}"), "live-store-v4")
        .expect("IPv4 live-store listens");
    let agent = t.agent(&[]);
    let r4 = request(&t.q, &v4(ADVERTISE), b"x").expect("IPv4 connection");
    assert_eq!(r4.server, "live-store-v4");
    // An IPv4 socket cannot take an IPv6 connection: fail open, nothing on ADVERTISE.
    assert_refused(
        request(&t.q, &v6(ADVERTISE), b"x"),
        "IPv6 to an IPv4-only live-store",
    );
    assert_eq!(live_store.accepted().len(), 1);
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(stopped.counter("redirected"), 1);
    assert_eq!(stopped.counter("no_listener"), 1);
}

#[test]
fn grpc_unary_call_through_the_advertised_port() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };

    let t = Topology::new();
    let listener =
        t.l.run(|| std::net::TcpListener::bind(format!("[::]:{LISTEN}")))
            .expect("gRPC live-store listens");
    listener.set_nonblocking(true).expect("nonblocking");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (mut reporter, service) = tonic_health::server::health_reporter();
            // Only this server knows the service: a SERVING answer proves who answered.
            reporter
                .set_service_status("tempo.LiveStore", tonic_health::ServingStatus::Serving)
                .await;
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                )
                .await
                .expect("gRPC server runs");
        });
    });
    let agent = t.agent(&[]);

    let status = t.q.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", v4(ADVERTISE)))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("gRPC connect to the advertised port");
            let mut client = HealthClient::new(channel);
            client
                .check(HealthCheckRequest {
                    service: "tempo.LiveStore".into(),
                })
                .await
                .expect("unary Check call")
                .into_inner()
                .status
        })
    });
    assert_eq!(status, ServingStatus::Serving as i32);
    let _ = stop_tx.send(());
    server.join().expect("gRPC server thread");
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(
        stopped.counter("redirected"),
        1,
        "one HTTP/2 connection carried the call"
    );
}

#[test]
fn direct_and_other_ports_are_untouched() {
    let t = Topology::new();
    let _live_store =
        Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let _other = Server::start(&t.l, "[::]:8080", "other").expect("another service listens");
    let agent = t.agent(&[]);

    let direct =
        request(&t.q, &v4(LISTEN), b"direct").expect("direct connection to the listen port");
    assert_eq!(direct.server, "live-store");
    assert!(same_ip(&direct.peer_seen, QUERIER_V4));
    assert_eq!(direct.echo, b"direct");
    let other = request(&t.q, &v6(8080), b"other").expect("connection to another port");
    assert_eq!(other.server, "other");
    assert_refused(
        request(&t.q, &v4(ADVERTISE + 1), b"x"),
        "a port nobody listens on",
    );

    let stopped = agent.stop().expect("agent stops");
    assert_eq!(
        stopped.counter("redirected"),
        0,
        "none of these went through the redirect"
    );
    assert_eq!(stopped.counter("no_listener"), 0);
}

#[test]
fn no_listener_is_refused_then_served_and_the_old_sidecar_hands_over() {
    let t = Topology::new();
    let agent = t.agent(&[]);

    // Nothing anywhere: refused, like a sidecar whose upstream is down.
    assert_refused(
        request(&t.q, &v4(ADVERTISE), b"x"),
        "no live-store, no sidecar",
    );

    // The live-store appears: served with no agent restart (the agent
    // registered it from its bind event).
    let live_store =
        Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    agent.wait_registered(1);
    assert_eq!(
        request(&t.q, &v4(ADVERTISE), b"x")
            .expect("after listen")
            .server,
        "live-store"
    );
    live_store.stop();

    // Migration: the old sidecar still listens on ADVERTISE and serves while the
    // live-store is down...
    let sidecar = Server::start(&t.l, &format!("[::]:{ADVERTISE}"), "sidecar")
        .expect("sidecar listens on the advertised port");
    assert_eq!(
        request(&t.q, &v4(ADVERTISE), b"x")
            .expect("sidecar serves")
            .server,
        "sidecar"
    );
    assert_eq!(
        request(&t.q, &v6(ADVERTISE), b"x")
            .expect("sidecar serves v6")
            .server,
        "sidecar"
    );
    // ...and gets no new connection once the live-store listens again.
    let live_store = Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store-2")
        .expect("live-store listens again");
    for _ in 0..5 {
        assert_eq!(
            request(&t.q, &v4(ADVERTISE), b"x")
                .expect("redirected")
                .server,
            "live-store-2"
        );
    }
    assert_eq!(
        sidecar.accepted().len(),
        2,
        "the sidecar got only the connections made while LISTEN was down"
    );
    assert_eq!(live_store.accepted().len(), 5);

    let stopped = agent.stop().expect("agent stops");
    assert_eq!(stopped.counter("redirected"), 6);
    assert_eq!(stopped.counter("no_listener"), 3);
}

#[test]
fn live_store_restart_resumes_the_redirect() {
    let t = Topology::new();
    let agent = t.agent(&[]);
    for generation in 1..=3 {
        let name = format!("live-store-{generation}");
        let live_store =
            Server::start(&t.l, &format!("[::]:{LISTEN}"), &name).expect("live-store listens");
        if generation == 1 {
            agent.wait_registered(1);
        }
        let reply = request(&t.q, &v6(ADVERTISE), b"x").expect("redirected to the new socket");
        assert_eq!(reply.server, name);
        live_store.stop();
        // The closed listener left the map by itself.
        assert_refused(request(&t.q, &v6(ADVERTISE), b"x"), "between restarts");
    }
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(stopped.counter("redirected"), 3);
    // The first by the agent (its cgroup had no sock_ops yet), the restarts by
    // sock_ops in the kernel at listen(): served with no wait at all. The count
    // has both, as /metrics has.
    assert_eq!(stopped.counter("listener_registered"), 3);
}

#[test]
fn listener_that_existed_before_the_agent_is_used() {
    let t = Topology::new();
    let live_store = Server::start(&t.l, &format!("[::]:{LISTEN}"), "early-live-store")
        .expect("live-store listens");
    let agent = t.agent(&[]);
    assert!(
        agent
            .status()
            .iter()
            .any(|l| l.contains(", 1 listener(s) registered")),
        "agent output: {:?}",
        agent.status()
    );
    let reply =
        request(&t.q, &v4(ADVERTISE), b"early").expect("redirected to the pre-existing listener");
    assert_eq!(reply.server, "early-live-store");
    assert_eq!(live_store.accepted().len(), 1);
    let stopped = agent.stop().expect("agent stops");
    assert_eq!(
        stopped.counter("listener_registered"),
        1,
        "registered by the agent (not by sock_ops), and counted"
    );
    assert_eq!(stopped.counter("redirected"), 1);
}

#[test]
fn a_listener_in_another_namespace_never_gets_this_namespaces_traffic() {
    let t = Topology::new();
    let third = Netns::new("t").expect("third netns");
    let in_l = Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store-L").expect("L listens");
    let in_t = Server::start(&third, &format!("[::]:{LISTEN}"), "live-store-T").expect("T listens");
    let agent = Agent::start(&[
        "--netns",
        t.l.path().to_str().expect("utf-8"),
        "--netns",
        third.path().to_str().expect("utf-8"),
    ])
    .expect("agent serves L and T");

    for _ in 0..3 {
        assert_eq!(
            request(&t.q, &v4(ADVERTISE), b"x")
                .expect("L served")
                .server,
            "live-store-L"
        );
    }
    // T is served too, by its own listener.
    assert_eq!(
        request(&third, &format!("127.0.0.1:{ADVERTISE}"), b"x")
            .expect("T served")
            .server,
        "live-store-T"
    );
    in_l.stop();
    assert_refused(
        request(&t.q, &v4(ADVERTISE), b"x"),
        "L without its live-store",
    );
    assert_eq!(
        in_t.accepted().len(),
        1,
        "T's listener got only T's own connection"
    );
    drop(agent);
}

#[test]
fn sigterm_detaches_everything() {
    let t = Topology::new();
    let _live_store =
        Server::start(&t.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let before = redirector_program_ids();
    let agent = t.agent(&[]);
    assert_eq!(
        request(&t.q, &v4(ADVERTISE), b"x")
            .expect("redirected")
            .server,
        "live-store"
    );
    let ours: std::collections::HashSet<u32> = redirector_program_ids()
        .difference(&before)
        .copied()
        .collect();
    assert_eq!(
        ours.len(),
        4,
        "sk_lookup, sock_ops and the two bind hooks loaded while running"
    );
    assert_eq!(
        sk_lookup_programs(&t.l).len(),
        1,
        "one sk_lookup program attached to L"
    );

    let stopped = agent.stop().expect("agent stops");
    assert!(
        stopped.status.success(),
        "clean exit on SIGTERM: {}",
        stopped.status
    );
    assert_refused(
        request(&t.q, &v4(ADVERTISE), b"x"),
        "after the agent stopped",
    );
    assert!(sk_lookup_programs(&t.l).is_empty(), "nothing attached to L");
    let left = wait_unloaded(&ours);
    assert!(left.is_empty(), "programs left loaded: {left:?}");
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .expect("bpffs")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("redirector"))
        .collect();
    assert!(pins.is_empty(), "pins left: {pins:?}");
}

/// Drops root: an unprivileged user with no capabilities at all.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// Runs `redirector run ARGS` (as nobody if asked) expecting a quick failure;
/// returns (exit code, stderr).
fn run_bad(args: &[&str], as_nobody: bool) -> (i32, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new(AS_NOBODY[0]);
        c.args(&AS_NOBODY[1..]).arg(agent_bin());
        c
    } else {
        Command::new(agent_bin())
    };
    let out = cmd
        .arg("run")
        .args(args)
        .output()
        .expect("run the agent binary");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    (out.status.code().expect("exited, not killed"), stderr)
}

#[test]
fn bad_input_gets_a_one_line_error_and_nothing_attached() {
    let ns = Netns::new("bad").expect("netns");
    let ns_path = ns.path();
    let ns_arg = ns_path.to_str().expect("utf-8");
    let listen = LISTEN.to_string();
    // (arguments, run as nobody, exit code, what the message must name)
    let cases = [
        (
            vec!["--advertise-port", "0"],
            false,
            2,
            "port 0 is out of range",
        ),
        (
            vec!["--listen-port", "65536"],
            false,
            2,
            "port 65536 is out of range",
        ),
        (
            vec!["--advertise-port", &listen, "--listen-port", &listen],
            false,
            2,
            "must differ",
        ),
        (
            vec!["--netns", "/var/run/netns/redirector-no-such-ns"],
            false,
            2,
            "does not exist",
        ),
        (
            vec!["--netns", "/etc/hostname"],
            false,
            2,
            "not a network namespace",
        ),
        (vec!["--netns", ns_arg], true, 3, "CAP_BPF"),
    ];
    for (args, as_nobody, code, needle) in cases {
        let before = redirector_program_ids();
        let (got, stderr) = run_bad(&args, as_nobody);
        assert_eq!(got, code, "exit code for {args:?}; stderr: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "one line for {args:?}: {stderr:?}"
        );
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should mention {needle:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(
            wait_unloaded(
                &redirector_program_ids()
                    .difference(&before)
                    .copied()
                    .collect()
            )
            .is_empty(),
            "{args:?} left programs loaded"
        );
        assert!(
            sk_lookup_programs(&ns).is_empty(),
            "{args:?} left sk_lookup attached"
        );
    }
    let (_, stderr) = run_bad(&["--netns", ns_arg], true);
    assert!(
        stderr.contains("CAP_NET_ADMIN"),
        "names every missing capability: {stderr}"
    );
}
