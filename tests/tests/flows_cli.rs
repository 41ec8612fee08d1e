//! `redirector flows` against the real agent: it prints exactly the records
//! that match its filters, in the agent's own line formats, replays what the
//! agent kept with --last, and a subscriber that reads too slowly is told how
//! many records it missed (never silently). Also the CLI conventions that need
//! no agent: the error without one, shell completions and the manual.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use redirector_tests::*;

/// A `redirector flows ...` child whose output is collected line by line;
/// killed on drop if it is still running.
struct Flows {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

/// What a finished `redirector flows` printed.
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            into.lock().expect("lock").push(line);
        }
    })
}

impl Flows {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(agent_bin())
            .arg("flows")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start redirector flows");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), stdout.clone()),
            collect(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Self {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Waits for it to exit by itself (it does when the agent stops, or after
    /// --last without --follow) and returns everything it printed.
    fn finish(mut self, within: Duration) -> Finished {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "redirector flows still running after {within:?}; stderr: {:?}",
                self.stderr.lock().expect("lock")
            );
            thread::sleep(Duration::from_millis(10));
        };
        // The pipes are closed now: the readers have every line once they end.
        for r in self.readers.drain(..) {
            r.join().expect("reader thread");
        }
        Finished {
            status,
            stdout: self.stdout.lock().expect("lock").clone(),
            stderr: self.stderr.lock().expect("lock").clone(),
        }
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A socket path of this test's own (the default is the node's).
fn socket_of(s: &FlowSetup) -> PathBuf {
    std::env::temp_dir().join(format!("{}.sock", s.l.name))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Waits until the agent counts `n` connected subscribers.
fn wait_subscribers(agent: &Agent, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(&agent.metrics_url("/metrics"));
        if metric(&body, "redirector_flow_subscribers") == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never had {n} subscriber(s):\n{body}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn log_lines(s: &FlowSetup) -> Vec<String> {
    std::fs::read_to_string(&s.log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The flow log's lines once it stops growing: the agent drains its ring every
/// 100 ms, so five quiet drains in a row mean everything is written.
fn settled_log(s: &FlowSetup) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = log_lines(s);
    let mut quiet_since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(50));
        let now = log_lines(s);
        if now.len() != last.len() {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(500) {
            return now;
        }
        assert!(Instant::now() < deadline, "the flow log never settled");
    }
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[test]
fn flows_prints_exactly_the_matching_records_with_exact_bytes() {
    let s = FlowSetup::new();
    let socket = socket_of(&s);
    let live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let agent = s.agent(&["--flow-format", "json", "--flows-socket", path_str(&socket)]);
    let announced = format!(
        "flow records for `redirector flows` on {}",
        socket.display()
    );
    assert!(agent.status().contains(&announced), "{:?}", agent.status());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "queriers' addresses are root's");

    let flows = Flows::start(&[
        "--flows-socket",
        path_str(&socket),
        "--event",
        "close",
        "--client",
        &QUERIER_V4.to_string(),
        "--output",
        "json",
    ]);
    wait_subscribers(&agent, 1);

    let v4 = request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), &[b'a'; 1000])
        .expect("redirected over IPv4");
    request(
        &s.q,
        &format!("[{LIVE_STORE_V6}]:{ADVERTISE}"),
        &[b'b'; 333],
    )
    .expect("redirected over IPv6");
    live_store.stop();
    request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"x")
        .expect_err("no live-store listener: refused");
    agent.stop().expect("agent stops");
    // The agent handed its last records to the subscriber, then hung up.
    let done = flows.finish(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(1), "{:?}", done.stderr);
    assert_eq!(done.stderr.len(), 1, "{:?}", done.stderr);
    assert!(
        done.stderr[0].contains("the agent closed") && done.stderr[0].contains(path_str(&socket)),
        "{:?}",
        done.stderr
    );

    let log = log_lines(&s);
    let kinds: Vec<String> = log
        .iter()
        .map(|l| json(l)["event"].as_str().expect("event").to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["open", "close", "open", "close", "refused"],
        "what the filters had to choose from: {log:#?}"
    );
    // The agent's own JSON lines, byte for byte: only the IPv4 close.
    let expected: Vec<String> = log
        .iter()
        .filter(|l| json(l)["event"] == "close" && json(l)["client_addr"] == QUERIER_V4.to_string())
        .cloned()
        .collect();
    assert_eq!(done.stdout, expected);
    assert_eq!(done.stdout.len(), 1, "{:#?}", done.stdout);
    let close = json(&done.stdout[0]);
    assert_eq!(close["client_port"], v4.local_addr.port());
    assert_eq!(close["bytes_received"], 1000, "payload from the querier");
    let header = format!("live-store {}\n", v4.peer_seen);
    assert_eq!(
        close["bytes_sent"],
        (header.len() + v4.echo.len()) as u64,
        "payload to the querier"
    );
    assert_eq!(close["end"], "fin");
    assert!(!socket.exists(), "the agent removes its socket on exit");
}

#[test]
fn text_output_is_the_agents_own_log_line() {
    let s = FlowSetup::new();
    let socket = socket_of(&s);
    let live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let agent = s.agent(&["--flow-format", "text", "--flows-socket", path_str(&socket)]);
    let flows = Flows::start(&["--flows-socket", path_str(&socket)]);
    wait_subscribers(&agent, 1);
    request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"hello").expect("redirected");
    request(&s.q, &format!("[{LIVE_STORE_V6}]:{ADVERTISE}"), b"hi").expect("redirected");
    live_store.stop();
    request(&s.q, &format!("[{LIVE_STORE_V6}]:{ADVERTISE}"), b"x").expect_err("refused");
    agent.stop().expect("agent stops");
    let done = flows.finish(Duration::from_secs(10));
    let log = log_lines(&s);
    assert_eq!(log.len(), 5, "{log:#?}");
    assert_eq!(
        done.stdout, log,
        "text is the default, as the agent writes it"
    );
    assert!(
        log[1].contains(" close ") && log[1].contains("rx=5B"),
        "{log:#?}"
    );
}

#[test]
fn last_replays_what_the_agent_kept_then_exits() {
    let s = FlowSetup::new();
    let socket = socket_of(&s);
    let _live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let agent = s.agent(&["--flow-format", "json", "--flows-socket", path_str(&socket)]);
    request(&s.q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"one").expect("redirected");
    request(&s.q, &format!("[{LIVE_STORE_V6}]:{ADVERTISE}"), b"two").expect("redirected");
    let log = settled_log(&s);
    assert_eq!(log.len(), 4, "{log:#?}");

    let last_open = Flows::start(&[
        "--flows-socket",
        path_str(&socket),
        "--last",
        "1",
        "--event",
        "open",
        "--output",
        "json",
    ])
    .finish(Duration::from_secs(10));
    assert!(last_open.status.success(), "{:?}", last_open.stderr);
    assert_eq!(last_open.stdout, [log[2].clone()], "the IPv6 open");

    let v6 = Flows::start(&[
        "--flows-socket",
        path_str(&socket),
        "--last",
        "10",
        "--client",
        "fd00:5eed::/64",
        "--output",
        "json",
    ])
    .finish(Duration::from_secs(10));
    assert!(v6.status.success(), "{:?}", v6.stderr);
    assert_eq!(v6.stdout, log[2..4], "open and close of the IPv6 querier");
    drop(agent);
}

/// A subscriber that stops reading while a burst is written: the agent goes
/// on (its flow log has every record), and the subscriber, once it reads
/// again, gets `{"lost":N}` lines whose N add up, with what it did receive, to
/// exactly what the log holds: every record it missed is in a gap of the size
/// it was told. The agent counts the same N in its metric.
#[test]
fn a_subscriber_that_does_not_read_is_told_how_many_records_it_missed() {
    const CONNECTIONS: usize = 2500;
    let s = FlowSetup::new();
    let socket = socket_of(&s);
    let _live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    // A 16 KiB ring: the subscriber channel holds 256 records, so the burst
    // (5000 records) overruns it and whatever the socket buffers.
    let agent = s.agent(&[
        "--flow-format",
        "json",
        "--flow-ring-bytes",
        "16384",
        "--flows-socket",
        path_str(&socket),
    ]);
    let mut conn = UnixStream::connect(&socket).expect("connect to the flow socket");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"{\"last\":0}\n").expect("request");
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("first line");
    assert_eq!(line, "{\"live\":true}\n", "subscribed, nothing replayed");

    let addr: SocketAddr = format!("{LIVE_STORE_V4}:{ADVERTISE}")
        .parse()
        .expect("addr");
    s.q.run(|| {
        for _ in 0..CONNECTIONS {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
            c.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut sink = Vec::new();
            c.read_to_end(&mut sink).expect("reply");
        }
    });
    let log = settled_log(&s);
    assert!(log.len() > 2000, "{} records", log.len());

    let mut next = 0;
    let mut lost = 0u64;
    let mut received = 0;
    while next < log.len() {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read after {received} records and {lost} lost: {e}"));
        assert!(
            n > 0,
            "the agent hung up after {received} records and {lost} lost"
        );
        let v = json(&line);
        if let Some(n) = v.get("lost") {
            let n = n.as_u64().expect("a count");
            assert!(n > 0);
            lost += n;
            next += n as usize;
        } else {
            assert_eq!(line.trim_end(), log[next], "record {next} of the log");
            next += 1;
            received += 1;
        }
    }
    assert_eq!(next, log.len(), "told exactly what it missed");
    assert!(lost > 0, "the burst overran the subscriber");
    assert!(received > 0);
    let (_, body) = http_get(&agent.metrics_url("/metrics"));
    assert_eq!(
        metric(&body, "redirector_flow_subscriber_records_lost_total"),
        lost
    );
    eprintln!(
        "{} records: {received} received, {lost} missed and counted",
        log.len()
    );
    drop(agent);
}

/// The same through the CLI: `redirector flows` whose stdout nobody reads
/// blocks, stops reading the socket, and falls behind; once its output is read
/// again, what it printed plus the misses it reported on stderr is exactly the
/// agent's log.
#[test]
fn flows_reports_the_records_it_missed_on_stderr() {
    const CONNECTIONS: usize = 2500;
    let s = FlowSetup::new();
    let socket = socket_of(&s);
    let _live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    let agent = s.agent(&[
        "--flow-format",
        "json",
        "--flow-ring-bytes",
        "16384",
        "--flows-socket",
        path_str(&socket),
    ]);
    let mut child = Command::new(agent_bin())
        .args([
            "flows",
            "--output",
            "json",
            "--flows-socket",
            path_str(&socket),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start redirector flows");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let stderr_reader = collect(child.stderr.take().expect("stderr"), stderr.clone());
    // Nobody reads its stdout yet: the pipe fills, then the CLI blocks.
    let paused = child.stdout.take().expect("stdout");
    wait_subscribers(&agent, 1);
    let addr: SocketAddr = format!("{LIVE_STORE_V4}:{ADVERTISE}")
        .parse()
        .expect("addr");
    s.q.run(|| {
        for _ in 0..CONNECTIONS {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
            c.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut sink = Vec::new();
            c.read_to_end(&mut sink).expect("reply");
        }
    });
    let log = settled_log(&s);
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stdout_reader = collect(paused, stdout.clone());
    let missed = || -> u64 {
        stderr
            .lock()
            .expect("lock")
            .iter()
            .map(|l| {
                l.strip_prefix("redirector: missed ")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("unexpected stderr line {l:?}"))
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while stdout.lock().expect("lock").len() as u64 + missed() < log.len() as u64 {
        assert!(Instant::now() < deadline, "the CLI never caught up");
        thread::sleep(Duration::from_millis(20));
    }
    agent.stop().expect("agent stops");
    let _ = child.wait();
    stdout_reader.join().expect("stdout reader");
    stderr_reader.join().expect("stderr reader");
    let printed = stdout.lock().expect("lock").clone();
    let stderr = stderr.lock().expect("lock").clone();
    // The last stderr line says the agent stopped; the others count misses.
    let (closing, misses) = stderr.split_last().expect("stderr lines");
    assert!(closing.contains("the agent closed"), "{closing}");
    let missed: u64 = misses
        .iter()
        .map(|l| {
            l.strip_prefix("redirector: missed ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("unexpected stderr line {l:?}"))
        })
        .sum();
    assert!(missed > 0, "the burst overran the blocked CLI");
    assert_eq!(printed.len() as u64 + missed, log.len() as u64);
    // What it printed is the log with gaps: in order, nothing invented.
    let mut at = 0;
    for line in &printed {
        at += log[at..]
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("printed a line not in the log (in order): {line}"))
            + 1;
    }
}

#[test]
fn flows_without_an_agent_says_how_to_start_one() {
    let dir = std::env::temp_dir().join(format!("rdt-{}-no-agent", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let missing = dir.join("missing.sock");
    // A socket file no one listens on any more, as a killed agent leaves it.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    for socket in [&missing, &stale] {
        let done =
            Flows::start(&["--flows-socket", path_str(socket)]).finish(Duration::from_secs(5));
        assert_eq!(done.status.code(), Some(1));
        assert!(done.stdout.is_empty());
        assert_eq!(
            done.stderr,
            [format!(
                "redirector: error: no agent is serving flow records on {}: start one with `redirector run` \
                 (or point --flows-socket / REDIRECTOR_FLOWS_SOCKET at the socket of the agent that runs)",
                socket.display()
            )]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(agent_bin())
            .args(["completions", shell])
            .output()
            .expect("run redirector completions");
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).expect("utf-8");
        for word in ["flows", "flows-socket", "advertise-port", "completions"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        if shell == "bash" {
            let mut check = Command::new("bash")
                .arg("-n")
                .stdin(Stdio::piped())
                .spawn()
                .expect("bash");
            check
                .stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())
                .expect("script");
            assert!(
                check.wait().expect("bash -n").success(),
                "bash -n rejects it"
            );
        }
    }
    let out = Command::new(agent_bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn the_man_page_renders_and_lists_every_subcommand() {
    let dir = std::env::temp_dir().join(format!("rdt-{}-man", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(agent_bin())
        .args(["man", "--out-dir"])
        .arg(&dir)
        .output()
        .expect("run redirector man");
    assert!(out.status.success(), "{out:?}");
    let subcommands = ["run", "status", "detach", "check", "flows", "completions"];
    for sub in subcommands {
        assert!(
            dir.join(format!("redirector-{sub}.1")).exists(),
            "no page for {sub}"
        );
    }
    // `redirector man` alone prints the same top page.
    let stdout = Command::new(agent_bin())
        .arg("man")
        .output()
        .expect("run redirector man");
    let page = std::fs::read(dir.join("redirector.1")).expect("redirector.1");
    assert_eq!(stdout.stdout, page);

    let rendered = render(&dir.join("redirector.1"));
    for section in ["NAME", "SYNOPSIS", "SUBCOMMANDS", "EXIT STATUS", "FILES"] {
        assert!(
            rendered.lines().any(|l| l.trim() == section),
            "no {section} section in\n{rendered}"
        );
    }
    for sub in subcommands {
        assert!(
            rendered.contains(&format!("redirector-{sub}(1)")),
            "{sub} missing from\n{rendered}"
        );
    }
    let flows = render(&dir.join("redirector-flows.1"));
    for flag in [
        "--flows-socket",
        "--netns",
        "--client",
        "--event",
        "--output",
        "--last",
        "--follow",
    ] {
        assert!(flows.contains(flag), "{flag} missing from\n{flows}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The page as a reader sees it: `man -l`, else groff, else the roff source's
/// section names (checked for structure instead).
fn render(page: &Path) -> String {
    let plain = |out: std::process::Output| {
        assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
        // Whatever the renderer did with hyphens, compare plain ASCII.
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .replace(['\u{2212}', '\u{2010}'], "-")
    };
    if let Ok(out) = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "250")
        .env("MANPAGER", "cat")
        .output()
    {
        return plain(out);
    }
    if let Ok(out) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-rLL=250n", "-P-cbou"])
        .arg(page)
        .output()
    {
        return plain(out);
    }
    let roff = std::fs::read_to_string(page).expect("page");
    assert!(roff.contains(".TH redirector 1") || roff.contains(".TH redirector-"));
    roff.lines()
        .map(|l| {
            l.trim_start_matches(".SH ")
                .trim_matches('"')
                .replace("\\-", "-")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Boolean settings from the environment take the spellings people use
/// (the README's `REDIRECTOR_KEEP_MPTCP=1` used to exit 2), and anything
/// else is one clear usage error.
#[test]
fn boolean_environment_variables_take_the_usual_spellings() {
    let dry_run = |var: &str, value: &str| {
        std::process::Command::new(agent_bin())
            .args(["run", "--dry-run"])
            .env(var, value)
            .output()
            .expect("run --dry-run")
    };
    for (value, want) in [
        ("1", true),
        ("true", true),
        ("yes", true),
        ("on", true),
        ("0", false),
        ("false", false),
        ("no", false),
        ("off", false),
    ] {
        for (var, key) in [
            ("REDIRECTOR_KEEP_MPTCP", "keep_mptcp"),
            ("REDIRECTOR_PIN", "pin"),
            ("REDIRECTOR_DISCOVER", "discover"),
        ] {
            let out = dry_run(var, value);
            assert!(
                out.status.success(),
                "{var}={value}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let settings: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("--dry-run prints JSON");
            assert_eq!(settings[key], want, "{var}={value}");
        }
    }
    let out = dry_run("REDIRECTOR_KEEP_MPTCP", "maybe");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'maybe'") && err.contains("--keep-mptcp"),
        "{err}"
    );
}
