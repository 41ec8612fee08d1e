//! Flow records and metrics against the real kernel: every redirected
//! connection yields an open and a close record with the kernel's own byte
//! counts; nothing is lost without being counted.

use std::{
    collections::HashMap,
    io::Read,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use redirector_tests::{FlowSetup as Setup, *};

#[test]
fn open_and_close_records_carry_exact_bytes_and_addresses() {
    let s = Setup::new();
    let _live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let agent = s.agent(&["--flow-format", "json"]);
    let mut expected = Vec::new();
    for (addr, n) in [
        (format!("{LIVE_STORE_V4}:{ADVERTISE}"), 10_000usize),
        (format!("[{LIVE_STORE_V6}]:{ADVERTISE}"), 777),
    ] {
        let payload = vec![b'x'; n];
        let reply = request(&s.q, &addr, &payload).expect("redirected request");
        // What the querier received: the header line plus the echo.
        let header = format!("live-store {}\n", reply.peer_seen);
        expected.push((
            reply.local_addr,
            n as u64,
            (header.len() + reply.echo.len()) as u64,
        ));
    }
    let stopped = agent.stop().expect("agent stops");
    let records = s.json_records();
    assert_eq!(
        records.len(),
        4,
        "one open and one close per connection: {records:?}"
    );
    for (client, received, sent) in expected {
        let for_client: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| {
                r["client_port"] == client.port()
                    && same_ip(
                        &SocketAddr::new(
                            r["client_addr"]
                                .as_str()
                                .expect("addr")
                                .parse()
                                .expect("ip"),
                            0,
                        ),
                        client.ip(),
                    )
            })
            .collect();
        assert_eq!(
            for_client.len(),
            2,
            "open + close for {client}: {records:?}"
        );
        let (open, close) = (for_client[0], for_client[1]);
        assert_eq!(open["event"], "open");
        assert_eq!(close["event"], "close");
        for r in [open, close] {
            assert_eq!(r["advertise_port"], ADVERTISE);
            assert_eq!(r["listen_port"], LISTEN);
            assert_eq!(r["netns"], s.l.path().display().to_string());
        }
        assert_eq!(
            close["bytes_received"], received,
            "payload bytes from the querier, exactly"
        );
        assert_eq!(
            close["bytes_sent"], sent,
            "payload bytes to the querier, exactly"
        );
        assert!(close["duration_ms"].as_f64().expect("duration") > 0.0);
        assert_eq!(close["end"], "fin");
        // The listener belongs to this test process: the record names it.
        assert_eq!(open["listener_pid"], std::process::id(), "{open}");
    }
    assert_eq!(stopped.counter("flows_opened"), 2);
    assert_eq!(stopped.counter("flows_closed"), 2);
    assert_eq!(stopped.counter("records_dropped"), 0);
}

#[test]
fn reset_by_the_server_is_reported_as_rst() {
    let s = Setup::new();
    let listener =
        s.l.run(|| std::net::TcpListener::bind(format!("[::]:{LISTEN}")))
            .expect("live-store listens");
    let agent = s.agent(&["--flow-format", "json"]);
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        // close() sends a RST instead of a FIN.
        reset_on_close(&conn).expect("SO_LINGER");
        drop(conn);
    });
    let err = request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"x")
        .expect_err("the server resets");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    server.join().expect("server thread");
    agent.stop().expect("agent stops");
    let records = s.json_records();
    let close = records
        .iter()
        .find(|r| r["event"] == "close")
        .expect("a close record");
    assert_eq!(close["end"], "rst", "{records:?}");
}

#[test]
fn a_burst_of_5000_connections_is_fully_accounted_for() {
    const N: u64 = 5000;
    let s = Setup::new();
    let _live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    // A small ring makes drops possible; whatever happens, none may go uncounted.
    let agent = s.agent(&["--flow-format", "json", "--flow-ring-bytes", "16384"]);
    let addr: SocketAddr = format!("{LIVE_STORE_V4}:{ADVERTISE}")
        .parse()
        .expect("addr");
    s.q.run(|| {
        for _ in 0..N {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
            c.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut sink = Vec::new();
            c.read_to_end(&mut sink).expect("reply");
        }
    });
    // Let the last closes happen (server side closes after replying).
    std::thread::sleep(Duration::from_millis(300));
    let stopped = agent.stop().expect("agent stops");
    let delivered = s.json_records().len() as u64;
    let dropped = stopped.counter("records_dropped");
    // `redirected` counts SYN lookups: a retransmitted SYN counts again.
    assert!(stopped.counter("redirected") >= N);
    assert_eq!(stopped.counter("flows_opened"), N);
    assert_eq!(stopped.counter("flows_closed"), N);
    assert_eq!(
        delivered + dropped,
        2 * N,
        "delivered {delivered} + dropped {dropped} == one open and one close per connection"
    );
}

#[test]
fn metrics_match_the_traffic_and_readyz_flips_when_detached() {
    let s = Setup::new();
    let agent = s.agent(&[]);
    let url = |p: &str| agent.metrics_url(p);
    assert_eq!(http_get(&url("/healthz")).0, 200);
    assert_eq!(http_get(&url("/readyz")).0, 200);

    // Two refusals (no live-store yet), then three redirected requests.
    for _ in 0..2 {
        assert!(request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"x").is_err());
    }
    let _live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    agent.wait_registered(1);
    let mut sent = 0;
    for n in [1usize, 100, 1000] {
        request(
            &s.q,
            &format!("{LIVE_STORE_V4}:{ADVERTISE}"),
            &vec![b'y'; n],
        )
        .expect("redirected");
        sent += n as u64;
    }
    std::thread::sleep(Duration::from_millis(100));
    let (status, body) = http_get(&url("/metrics"));
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "redirector_connections_refused_total"), 2);
    assert_eq!(metric(&body, "redirector_connections_redirected_total"), 3);
    assert_eq!(metric(&body, "redirector_flows_closed_total"), 3);
    assert_eq!(metric(&body, "redirector_bytes_received_total"), sent);
    assert_eq!(metric(&body, "redirector_connections_active"), 0);
    assert_eq!(metric(&body, "redirector_listeners_registered"), 1);
    assert_eq!(metric(&body, "redirector_programs_attached"), 2);
    assert_eq!(metric(&body, "redirector_flow_records_dropped_total"), 0);

    // Someone detaches our sk_lookup link behind the agent's back: seen at
    // the agent's next check (every second).
    detach_sk_lookup_of(&s.l);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let (status, body) = loop {
        let (status, body) = http_get(&url("/readyz"));
        if status != 200 || std::time::Instant::now() >= deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("1 sk_lookup attachment(s) missing"), "{body}");
    // Anyone on the node can read /readyz: it names no namespace.
    let netns = s.l.path();
    assert!(
        !body.contains(netns.to_str().expect("utf-8")) && !body.contains("/proc/"),
        "{body}"
    );
    let (_, body) = http_get(&url("/metrics"));
    assert_eq!(metric(&body, "redirector_programs_attached"), 1);
    drop(agent);
}

#[test]
fn json_and_logfmt_lines_parse_and_carry_every_field() {
    for format in ["json", "logfmt"] {
        let s = Setup::new();
        let _live_store = Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store")
            .expect("live-store listens");
        let agent = s.agent(&["--flow-format", format]);
        request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"hello").expect("redirected");
        // A refused record too: a second namespace port with no listener is not
        // redirected, so refuse by closing the live-store first.
        drop(_live_store);
        assert!(request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"x").is_err());
        agent.stop().expect("agent stops");
        let text = std::fs::read_to_string(&s.log).expect("flow log");
        let records: Vec<HashMap<String, String>> = text
            .lines()
            .map(|line| match format {
                "json" => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
                    .unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"))
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            v.as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| v.to_string()),
                        )
                    })
                    .collect(),
                _ => logfmt::parse(line)
                    .into_iter()
                    .map(|p| (p.key, p.val.unwrap_or_default()))
                    .collect(),
            })
            .collect();
        let kinds: Vec<&str> = records.iter().map(|r| r["event"].as_str()).collect();
        assert_eq!(kinds, ["open", "close", "refused"], "{format}: {text}");
        let common = [
            "time",
            "netns",
            "netns_cookie",
            "client_addr",
            "client_port",
            "local_addr",
            "advertise_port",
            "listen_port",
        ];
        let close_only = [
            "duration_ms",
            "bytes_received",
            "bytes_sent",
            "srtt_us",
            "retransmits",
            "end",
        ];
        for r in &records {
            for field in common {
                assert!(
                    r.contains_key(field) && !r[field].is_empty(),
                    "{format}: {field} missing in {r:?}"
                );
            }
        }
        for field in close_only {
            assert!(
                records[1].contains_key(field),
                "{format}: close lacks {field}"
            );
        }
        assert_eq!(records[1]["bytes_received"], "5");
        assert_eq!(records[0]["client_addr"], QUERIER_V4.to_string());
        assert_eq!(records[2]["client_addr"], QUERIER_V4.to_string());
    }
}

/// Detaches the sk_lookup link of `ns` behind the agent's back, as another
/// tool or an operator with bpftool could (BPF_LINK_GET_FD_BY_ID +
/// BPF_LINK_DETACH); only this namespace's, so other agents are untouched.
fn detach_sk_lookup_of(ns: &Netns) {
    let ids = sk_lookup_programs(ns);
    let mut detached = 0;
    for link in aya::programs::loaded_links().filter_map(Result::ok) {
        if !ids.contains(&link.program_id()) {
            continue;
        }
        let fd = redirector::sys::link_get_fd_by_id(link.id()).expect("BPF_LINK_GET_FD_BY_ID");
        redirector::sys::link_detach(std::os::fd::AsFd::as_fd(&fd)).expect("BPF_LINK_DETACH");
        detached += 1;
    }
    assert!(detached > 0, "no sk_lookup link in {}", ns.name);
}

#[test]
fn a_long_lived_flow_gets_update_records_with_its_counters_so_far() {
    use std::io::Write;
    let s = Setup::new();
    // An echo server: every chunk is answered at once, as gRPC answers
    // requests on one long-lived connection (an update is written on an ACK
    // of what the live-store sent).
    let listener =
        s.l.run(|| std::net::TcpListener::bind(format!("[::]:{LISTEN}")))
            .expect("listens");
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let agent = s.agent(&["--flow-format", "json", "--flow-update-interval", "1"]);
    agent.wait_registered(1);
    const CHUNK: usize = 100;
    const CHUNKS: usize = 12;
    let addr = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    s.q.run(|| {
        let mut conn = TcpStream::connect(&addr).expect("connects");
        let mut echo = [0u8; CHUNK];
        for _ in 0..CHUNKS {
            conn.write_all(&[b'x'; CHUNK]).expect("sends");
            conn.read_exact(&mut echo).expect("echo");
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success());
    let records = s.json_records();
    let updates: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["event"] == "update").collect();
    assert!(
        updates.len() >= 2,
        "3.6 s at one update a second at most: {records:?}"
    );
    let close = records
        .iter()
        .find(|r| r["event"] == "close")
        .expect("a close record");
    let mut last = 0;
    for u in &updates {
        assert_eq!(u["flow_id"], close["flow_id"], "{u}");
        assert!(u.get("end").is_none(), "an update has no end: {u}");
        let rx = u["bytes_received"].as_u64().expect("bytes_received");
        let tx = u["bytes_sent"].as_u64().expect("bytes_sent");
        assert!(rx > last && rx % CHUNK as u64 == 0, "{u}");
        assert!(tx <= rx, "{u}");
        last = rx;
    }
    assert_eq!(close["bytes_received"], (CHUNK * CHUNKS) as u64);
    assert_eq!(close["bytes_sent"], (CHUNK * CHUNKS) as u64);
}
