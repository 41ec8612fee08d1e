//! The ring-aware check against a stand-in Tempo: a small HTTP server that
//! serves dskit's ring status page as JSON, with live-stores whose addresses
//! are on namespaces of this machine (served and well configured, the ring
//! advertising the listen port, a listener that cannot be registered, a
//! namespace nobody serves) and one on another node. `redirector check
//! --tempo-ring` judges them from the pinned state, `redirector run
//! --tempo-ring` from its own and exports the result as metrics.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use redirector_tests::*;

/// Addresses given to the test namespaces (on `lo`): RFC 2544's range, a
/// subnet no other test uses, so the check finds each in exactly one namespace.
const OK_IP: &str = "198.18.77.1";
const WRONG_PORT_IP: &str = "198.18.77.2";
const NO_LISTENER_IP: &str = "198.18.77.3";
const NOT_SERVED_IP: &str = "198.18.77.4";
/// A live-store on another node: TEST-NET-3, on no interface here. Nothing is
/// ever sent to it; the check only compares addresses.
const ELSEWHERE_IP: &str = "203.0.113.7";

/// One shard of the ring page, as dskit's `ingesterDesc` renders it.
fn shard(id: &str, address: &str, zone: &str) -> String {
    format!(
        r#"{{"id":"{id}","state":"ACTIVE","address":"{address}","timestamp":"2026-11-30T08:00:00Z","registered_timestamp":"2026-11-30T07:00:00Z","read_only":false,"read_only_updated_timestamp":"0001-01-01T00:00:00Z","zone":"{zone}","tokens":[12,345,6789]}}"#
    )
}

fn page(shards: &[String]) -> String {
    format!(
        "{{\"shards\":[{}],\"now\":\"2026-11-30T08:00:01.123456789Z\"}}\n",
        shards.join(",")
    )
}

/// A stand-in Tempo component serving `/live-store/ring` as dskit does: JSON
/// when asked with `Accept: application/json` (chunked, as Go sends a large
/// answer), HTML otherwise; Go's `404 page not found` for unknown paths.
struct Tempo {
    addr: String,
    /// `Accept` header of every request.
    accepts: Arc<Mutex<Vec<String>>>,
    /// `/flaky/live-store/ring` answers 404 until this is set.
    flaky_up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Tempo {
    fn start(routes: Vec<(&'static str, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the Tempo stand-in");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let flaky_up = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (accepts, flaky_up, stop) = (accepts.clone(), flaky_up.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let routes = routes.clone();
                            let (accepts, flaky_up) = (accepts.clone(), flaky_up.clone());
                            thread::spawn(move || answer(conn, &routes, &accepts, &flaky_up));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            addr,
            accepts,
            flaky_up,
            stop,
            handle: Some(handle),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Tempo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn answer(
    mut conn: TcpStream,
    routes: &[(&'static str, String)],
    accepts: &Mutex<Vec<String>>,
    flaky_up: &AtomicBool,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let mut accept = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("accept") {
                accept = value.trim().to_owned();
            }
        }
    }
    accepts.lock().expect("lock").push(accept.clone());
    let wants_json = accept.contains("application/json");
    let route = routes.iter().find(|(p, _)| *p == path).map(|(_, b)| b);
    let (status, content_type, body) = match (path.as_str(), route) {
        ("/flaky/live-store/ring", _) if !flaky_up.load(Ordering::SeqCst) => (
            "404 Not Found",
            "text/plain",
            "404 page not found\n".to_owned(),
        ),
        ("/flaky/live-store/ring", _) => ("200 OK", "application/json", page(&[])),
        ("/html", _) => (
            "200 OK",
            "text/html",
            "<!DOCTYPE html>\n<html><body>Ring status</body></html>\n".to_owned(),
        ),
        ("/text", _) => ("200 OK", "text/plain", "ring is fine\n".to_owned()),
        ("/huge", _) => ("200 OK", "application/json", " ".repeat(17 << 20)),
        (_, Some(body)) if wants_json => ("200 OK", "application/json", body.clone()),
        (_, Some(_)) => (
            "200 OK",
            "text/html",
            "<html><body>Ring status</body></html>\n".to_owned(),
        ),
        (_, None) => (
            "404 Not Found",
            "text/plain",
            "404 page not found\n".to_owned(),
        ),
    };
    let mut out =
        format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nConnection: close\r\n");
    if content_type == "application/json" && body.len() < 1 << 20 {
        // Go's net/http streams a large handler output in chunks.
        out.push_str("Transfer-Encoding: chunked\r\n\r\n");
        for chunk in body.as_bytes().chunks(100) {
            out.push_str(&format!("{:x}\r\n", chunk.len()));
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push_str("\r\n");
        }
        out.push_str("0\r\n\r\n");
    } else {
        out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    }
    // The client may hang up early (a body over its limit).
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.flush();
    let mut rest = Vec::new();
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = reader.read_to_end(&mut rest);
}

/// A namespace whose `lo` also carries `ip` (what a pod IP is to the check).
fn netns_with(tag: &str, ip: &str) -> Netns {
    let ns = Netns::new(tag).expect("netns");
    netns::ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        &format!("{ip}/32"),
        "dev",
        "lo",
    ])
    .expect("address on lo");
    ns
}

fn path(ns: &Netns) -> String {
    ns.path().display().to_string()
}

/// The sample `name{labels}` of a Prometheus text body, if present.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{out}"))
}

#[test]
fn check_and_agent_judge_every_live_store_of_this_node() {
    let _pins = PinCleanup::new();
    let ok = netns_with("ring-ok", OK_IP);
    let wrong = netns_with("ring-port", WRONG_PORT_IP);
    let nol = netns_with("ring-nol", NO_LISTENER_IP);
    let unserved = netns_with("ring-uns", NOT_SERVED_IP);
    let _ok_server = Server::start(&ok, &format!("[::]:{LISTEN}"), "ok").expect("listens");
    let _wrong_server = Server::start(&wrong, &format!("[::]:{LISTEN}"), "wrong").expect("listens");
    let _unserved_server =
        Server::start(&unserved, &format!("[::]:{LISTEN}"), "unserved").expect("listens");
    // Already listening with MPTCP when the agent arrives: a listener the
    // kernel cannot be handed, which the registry reports (reason `mptcp`).
    let mptcp = Process::start(
        &nol,
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[&format!("[::]:{LISTEN}"), "mptcp", "--mptcp"],
        &[],
    )
    .expect("MPTCP stand-in");
    assert!(mptcp.ready.contains("with mptcp"), "{}", mptcp.ready);

    let ring = page(&[
        shard(
            "live-store-zone-a-0",
            &format!("{OK_IP}:{ADVERTISE}"),
            "zone-a",
        ),
        // instance_port unset: the ring says the listen port.
        shard(
            "live-store-zone-a-1",
            &format!("{WRONG_PORT_IP}:{LISTEN}"),
            "zone-a",
        ),
        shard(
            "live-store-zone-b-0",
            &format!("{NO_LISTENER_IP}:{ADVERTISE}"),
            "zone-b",
        ),
        shard(
            "live-store-zone-b-1",
            &format!("{NOT_SERVED_IP}:{ADVERTISE}"),
            "zone-b",
        ),
        shard(
            "live-store-zone-c-0",
            &format!("{ELSEWHERE_IP}:{ADVERTISE}"),
            "zone-c",
        ),
    ]);
    let pair = page(&[
        shard(
            "live-store-zone-a-0",
            &format!("{OK_IP}:{ADVERTISE}"),
            "zone-a",
        ),
        shard(
            "live-store-zone-a-1",
            &format!("{WRONG_PORT_IP}:{LISTEN}"),
            "zone-a",
        ),
    ]);
    let tempo = Tempo::start(vec![
        ("/live-store/ring", ring),
        ("/pair/live-store/ring", pair),
    ]);
    let url = tempo.url("/live-store/ring");

    let agent = Agent::start(&[
        "--pin",
        "--netns",
        &path(&ok),
        "--netns",
        &path(&wrong),
        "--netns",
        &path(&nol),
        "--tempo-ring",
        &url,
        "--tempo-ring-interval",
        "1",
    ])
    .expect("agent");

    // The CLI, from the pinned state.
    let (code, out, err) = redirector(&["check", "--tempo-ring", &url]);
    println!("$ redirector check --tempo-ring {url}\n{out}{err}exit {code}");
    assert_eq!(code, 3, "a FAIL exits 3; stderr: {err}");
    assert_eq!(
        err.trim(),
        "redirector: error: some live-stores of this node are not redirected (see above)"
    );
    assert!(
        line(&out, "PASS  ring").contains(
            "5 live-store(s) in the ring, 4 on this node, 1 on other nodes (not checked here)"
        ),
        "{out}"
    );
    assert!(
        !out.contains(ELSEWHERE_IP),
        "other nodes are counted, not listed:\n{out}"
    );
    // Three lines per live-store of this node, after the summary.
    assert_eq!(out.lines().count(), 1 + 4 * 3, "{out}");
    let served = line(&out, "PASS  live-store-zone-a-0 served");
    assert!(
        served.contains(&format!("{OK_IP}:{ADVERTISE} (ACTIVE) in {}", path(&ok))),
        "{served}"
    );
    assert!(served.contains("pinned sk_lookup link"), "{served}");
    line(&out, "PASS  live-store-zone-a-0 port");
    assert!(
        line(&out, "PASS  live-store-zone-a-0 listener").contains(&format!(
            "live-store listener registered on {LISTEN}: [::]:{LISTEN} (1 socket)"
        )),
        "{out}"
    );

    line(&out, "PASS  live-store-zone-a-1 served");
    let port = line(&out, "FAIL  live-store-zone-a-1 port");
    assert!(
        port.contains(&format!(
            "the ring advertises {LISTEN}, the live-store's own listen port (server.grpc_listen_port): \
             live_store.ring.instance_port is unset, so queriers dial {LISTEN} directly and nothing is redirected"
        )),
        "{port}"
    );
    assert!(
        port.contains(&format!(
            "; fix: set `live_store.ring.instance_port: {ADVERTISE}`"
        )),
        "{port}"
    );
    line(&out, "PASS  live-store-zone-a-1 listener");

    line(&out, "PASS  live-store-zone-b-0 served");
    line(&out, "PASS  live-store-zone-b-0 port");
    let listener = line(&out, "FAIL  live-store-zone-b-0 listener");
    assert!(listener.contains("not registered: mptcp"), "{listener}");
    assert!(
        listener.contains(&format!("pid {}", mptcp.pid())),
        "{listener}"
    );
    assert!(
        listener.contains("; fix: the live-store listens with MPTCP"),
        "{listener}"
    );

    let not_served = line(&out, "FAIL  live-store-zone-b-1 served");
    assert!(
        not_served.contains("not served by redirector"),
        "{not_served}"
    );
    assert!(
        not_served.contains(&format!(
            "fix: run the agent for this namespace: `redirector run --pin --netns {}`",
            path(&unserved)
        )),
        "{not_served}"
    );
    // Checked against the node's pinned redirects, and nothing registers a
    // listener in a namespace nobody serves.
    line(&out, "PASS  live-store-zone-b-1 port");
    assert!(
        line(&out, "FAIL  live-store-zone-b-1 listener").contains(&format!(
            "a listener on {LISTEN} is not registered: the namespace is not served"
        )),
        "{out}"
    );
    assert!(
        tempo
            .accepts
            .lock()
            .expect("lock")
            .iter()
            .all(|a| a == "application/json"),
        "the check asks for JSON"
    );

    // The same as JSON.
    let (code, json, _) = redirector(&["check", "--tempo-ring", &url, "--output", "json"]);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["ok"], false);
    assert_eq!(v["url"], url.as_str());
    assert_eq!(
        (
            v["shards"].as_u64(),
            v["on_this_node"].as_u64(),
            v["elsewhere"].as_u64()
        ),
        (Some(5), Some(4), Some(1))
    );
    let stores = v["live_stores"].as_array().expect("live_stores");
    let result = |id: &str| {
        let s = stores
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {json}"));
        s["result"].as_str().expect("result").to_owned()
    };
    assert_eq!(result("live-store-zone-a-0"), "ok");
    assert_eq!(result("live-store-zone-a-1"), "wrong_port");
    assert_eq!(result("live-store-zone-b-0"), "no_listener");
    assert_eq!(result("live-store-zone-b-1"), "not_served");
    let a1 = stores
        .iter()
        .find(|s| s["id"] == "live-store-zone-a-1")
        .expect("a-1");
    assert_eq!(a1["advertised_port"], LISTEN);
    assert_eq!(a1["advertise_ports"], serde_json::json!([ADVERTISE]));
    assert_eq!(a1["served"], true);
    assert_eq!(a1["zone"], "zone-a");
    assert_eq!(a1["netns"], path(&wrong).as_str());
    assert_eq!(a1["netns_cookie"], wrong.cookie());
    assert_eq!(a1["checks"][1]["name"], "live-store-zone-a-1 port");
    assert_eq!(a1["checks"][1]["ok"], false);
    assert!(a1["checks"][1]["fix"]
        .as_str()
        .expect("fix")
        .contains(&format!("instance_port: {ADVERTISE}")));

    // One good and one misconfigured live-store.
    let pair_url = tempo.url("/pair/live-store/ring");
    let (code, out, err) = redirector(&["check", "--tempo-ring", &pair_url]);
    println!("$ redirector check --tempo-ring {pair_url}\n{out}{err}exit {code}");
    assert_eq!(code, 3);
    assert_eq!(out.lines().count(), 1 + 2 * 3, "{out}");

    // The agent's own check, after a period or two.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, body) = http_get(&agent.metrics_url("/metrics"));
        if sample(&body, "redirector_ring_last_success_timestamp_seconds").unwrap_or(0.0) > 0.0 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no successful ring check:\n{body}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    let gauge = |result: &str| {
        sample(
            &metrics,
            &format!("redirector_ring_live_stores{{result=\"{result}\"}}"),
        )
        .unwrap_or_else(|| panic!("no ring gauge for {result}:\n{metrics}"))
    };
    assert_eq!(gauge("ok"), 1.0, "{metrics}");
    assert_eq!(gauge("wrong_port"), 1.0, "{metrics}");
    assert_eq!(gauge("no_listener"), 1.0, "{metrics}");
    assert_eq!(gauge("not_served"), 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "redirector_ring_check_errors_total"),
        Some(0.0),
        "{metrics}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last = sample(&metrics, "redirector_ring_last_success_timestamp_seconds").expect("last");
    assert!((now - last).abs() < 30.0, "last success {last}, now {now}");

    // Findings are logged once, not every period.
    thread::sleep(Duration::from_millis(2500));
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
    assert!(
        stopped
            .stderr
            .iter()
            .any(|l| log_message(l) == format!("checking the live-store ring {url} every 1s")),
        "{:?}",
        stopped.stderr
    );
    let warned = |id: &str| {
        stopped
            .stderr
            .iter()
            .filter(|l| l.contains(&format!("ring check: live-store {id} ")))
            .count()
    };
    assert_eq!(warned("live-store-zone-a-1"), 1, "{:#?}", stopped.stderr);
    assert_eq!(warned("live-store-zone-b-0"), 1, "{:#?}", stopped.stderr);
    assert_eq!(warned("live-store-zone-b-1"), 1, "{:#?}", stopped.stderr);
    assert_eq!(warned("live-store-zone-a-0"), 0, "{:#?}", stopped.stderr);
    let wrong_port_line = stopped
        .stderr
        .iter()
        .find(|l| l.contains("ring check: live-store live-store-zone-a-1 "))
        .expect("logged");
    assert!(wrong_port_line.contains("wrong_port"), "{wrong_port_line}");
    assert!(
        wrong_port_line.contains(&format!(
            "fix: set `live_store.ring.instance_port: {ADVERTISE}`"
        )),
        "{wrong_port_line}"
    );
}

#[test]
fn a_ring_that_cannot_be_read_gets_one_line() {
    let tempo = Tempo::start(vec![]);
    // A port nothing listens on (bound, then closed).
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cases = [
        (
            tempo.url("/live-store/ring"),
            1,
            "404 Not Found: this component does not serve the live-store ring",
        ),
        (
            tempo.url("/text"),
            1,
            "answered something that is not JSON: \"ring is fine\"",
        ),
        (tempo.url("/html"), 1, "answered HTML, not JSON"),
        (tempo.url("/huge"), 1, "the answer is larger than 16 MiB"),
        (
            format!("http://127.0.0.1:{closed}/live-store/ring"),
            1,
            "cannot connect",
        ),
        (
            format!("https://{}/live-store/ring", tempo.addr),
            2,
            "https is not supported",
        ),
        (
            "tempo-distributor:3200".to_owned(),
            2,
            "is not an http:// URL",
        ),
    ];
    for (url, want_code, want) in cases {
        let (code, out, err) = redirector(&["check", "--tempo-ring", &url]);
        assert_eq!(code, want_code, "{url}: {err}");
        assert_eq!(out, "", "{url}");
        assert_eq!(err.lines().count(), 1, "{url}: one line: {err}");
        assert!(err.starts_with("redirector: "), "{url}: {err}");
        assert!(err.contains(want), "{url}: {err}");
    }

    // An empty ring (Go renders it as `"shards":null`) is no failure.
    let empty = Tempo::start(vec![(
        "/live-store/ring",
        "{\"shards\":null,\"now\":\"2026-11-30T08:00:00Z\"}\n".to_owned(),
    )]);
    let (code, out, err) = redirector(&["check", "--tempo-ring", &empty.url("/live-store/ring")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("PASS  ring  ")
            && out.contains("0 live-store(s) in the ring, 0 on this node"),
        "{out}"
    );
}

#[test]
fn the_agent_logs_a_ring_error_once_and_counts_each() {
    let l = Netns::new("ring-err").expect("netns");
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let tempo = Tempo::start(vec![]);
    let url = tempo.url("/flaky/live-store/ring");
    let agent = Agent::start(&[
        "--netns",
        &path(&l),
        "--tempo-ring",
        &url,
        "--tempo-ring-interval",
        "1",
    ])
    .expect("agent");
    let metrics = || http_get(&agent.metrics_url("/metrics")).1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&metrics(), "redirector_ring_check_errors_total").unwrap_or(0.0) < 3.0 {
        assert!(
            Instant::now() < deadline,
            "errors not counted:\n{}",
            metrics()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let body = metrics();
    assert_eq!(
        sample(&body, "redirector_ring_last_success_timestamp_seconds"),
        Some(0.0),
        "{body}"
    );
    // The agent kept serving meanwhile.
    assert_eq!(
        request(&l, &format!("127.0.0.1:{ADVERTISE}"), b"x")
            .expect("served")
            .server,
        "live-store"
    );

    tempo.flaky_up.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&metrics(), "redirector_ring_last_success_timestamp_seconds").unwrap_or(0.0) == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "no success after recovery:\n{}",
            metrics()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success());
    let errors: Vec<&String> = stopped
        .stderr
        .iter()
        .filter(|l| l.contains("ring check: ring ") && l.contains("404 Not Found"))
        .collect();
    assert_eq!(errors.len(), 1, "logged once: {:#?}", stopped.stderr);
    assert_eq!(
        stopped
            .stderr
            .iter()
            .filter(|l| l.contains(&format!("ring check: {url} answers again")))
            .count(),
        1,
        "{:#?}",
        stopped.stderr
    );
}
