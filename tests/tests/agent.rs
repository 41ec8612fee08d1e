//! The agent as an operator runs it: discovery of live-store namespaces,
//! namespaces that vanish, restart with pinned state under load, `detach`,
//! `status`, `check`, and configuration errors. Real kernel, real processes.

use std::{
    io,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use redirector_tests::*;

use redirector::bpf::pins::PIN_ROOT;

/// A live-store stand-in process living inside a namespace, killed on drop.
fn stand_in(ns: &Netns, addr: &str, name: &str) -> Process {
    Process::start(
        ns,
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[addr, name, "-target=live-store"],
        &[],
    )
    .expect("start the stand-in")
}

fn wait_for(agent: &Agent, what: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if agent.status().iter().filter(|l| l.contains(what)).count() >= count {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "agent never printed {count} x {what:?}; stdout: {:#?}",
        agent.status()
    );
}

#[test]
fn discovery_follows_live_stores_as_they_come_and_go() {
    // Ports of its own, so no other namespace on the machine is discovered.
    let (listen, advertise) = ("19095", "22345");
    let l1 = Netns::new("d1").expect("netns");
    let s1 = stand_in(&l1, "[::]:19095", "live-store-1");
    let agent = Agent::start(&[
        "--discover",
        "--listen-port",
        listen,
        "--advertise-port",
        advertise,
        "--listener-grace",
        "1",
    ])
    .expect("agent with discovery");
    wait_for(&agent, "attached sk_lookup in netns", 1);
    let local = format!("127.0.0.1:{advertise}");
    assert_eq!(
        request(&l1, &local, b"x").expect("served in L1").server,
        "live-store-1"
    );
    // Named by what lasts as long as the namespace, with a process that
    // holds it now (not the /proc path of whichever process was seen first).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(l1.path()).expect("stat"));
    let (_, status, _) = redirector(&["status"]);
    assert!(
        status.contains(&format!(
            "net:[{ino}] (cookie {}), held by pid {}",
            l1.cookie(),
            s1.pid()
        )),
        "{status}"
    );

    // A live-store that starts after the agent is picked up.
    let l2 = Netns::new("d2").expect("netns");
    let s2 = stand_in(&l2, "[::]:19095", "live-store-2");
    wait_for(&agent, "attached sk_lookup in netns", 2);
    assert_eq!(
        request(&l2, &local, b"x").expect("served in L2").server,
        "live-store-2"
    );
    assert_eq!(
        request(&l1, &local, b"x").expect("L1 still served").server,
        "live-store-1"
    );

    // L2's pod goes away: its process and its namespace.
    drop(s2);
    drop(l2);
    wait_for(&agent, "detached sk_lookup from netns", 1);
    // L1's live-store stops for good: no process is left in its namespace.
    drop(s1);
    wait_for(&agent, "detached sk_lookup from netns", 2);
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success());
    assert_eq!(stopped.counter("flows_opened"), 3);
}

#[test]
fn an_explicit_namespace_that_is_deleted_is_let_go() {
    let l = Netns::new("gone").expect("netns");
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let keep = Netns::new("keep").expect("netns");
    let _kept =
        Server::start(&keep, &format!("[::]:{LISTEN}"), "live-store-keep").expect("listens");
    let agent = Agent::start(&[
        "--netns",
        l.path().to_str().expect("utf-8"),
        "--netns",
        keep.path().to_str().expect("utf-8"),
    ])
    .expect("agent");
    Command::new("ip")
        .args(["netns", "del", &l.name])
        .status()
        .expect("ip netns del");
    wait_for(&agent, "its namespace path is gone", 1);
    // The other namespace is still served by the same, still running agent.
    let reply = request(&keep, &format!("127.0.0.1:{ADVERTISE}"), b"x").expect("still served");
    assert_eq!(reply.server, "live-store-keep");
    let stopped = agent.stop().expect("agent keeps running until stopped");
    assert!(stopped.status.success());
}

/// Runs `during` while a querier in `q` dials new connections to `target`
/// back to back (each must be answered by "live-store"); returns what `during`
/// returned and how many connections (succeeded, failed).
fn under_load<T: Send>(
    q: &Netns,
    target: &str,
    during: impl FnOnce() -> T + Send,
) -> (T, u64, u64) {
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = thread::scope(|scope| {
        scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match request(q, target, b"x") {
                    Ok(r) if r.server == "live-store" => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                thread::sleep(Duration::from_millis(5));
            }
        });
        thread::sleep(Duration::from_millis(300));
        let result = during();
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        result
    });
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("under load: {ok} connections succeeded, {failed} failed");
    (result, ok, failed)
}

/// A querier and a live-store namespace over veth, a live-store listening on
/// `LISTEN`, and no pinned state before or after.
fn pinned_setup() -> (PinCleanup, Netns, Netns, Server) {
    let cleanup = PinCleanup::new();
    let Topology { q, l } = Topology::new();
    let live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    (cleanup, q, l, live_store)
}

#[test]
fn a_pinned_agent_restarts_under_load_without_a_failed_connection() {
    let (_cleanup, q, l, _live_store) = pinned_setup();
    let l_path = l.path().display().to_string();
    let args = ["--pin", "--netns", l_path.as_str()];
    let before = redirector_program_ids();
    let first = Agent::start(&args).expect("first agent");

    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    let (second, ok, failed) = under_load(&q, &target, || {
        let stopped = first.stop().expect("first agent stops");
        assert!(
            stopped
                .stderr
                .iter()
                .any(|l| l.contains("left programs attached and pinned")),
            "{:?}",
            stopped.stderr
        );
        // No agent at all for a while: the pinned programs carry on.
        thread::sleep(Duration::from_millis(500));
        let second = Agent::start(&args).expect("second agent");
        assert!(
            second
                .status()
                .iter()
                .any(|l| l.starts_with("adopted sock_ops")),
            "{:?}",
            second.status()
        );
        assert!(
            second
                .status()
                .iter()
                .any(|l| l.starts_with("adopted sk_lookup")),
            "{:?}",
            second.status()
        );
        second
    });
    assert_eq!(
        failed, 0,
        "failed connections through the restart ({ok} succeeded)"
    );
    assert!(
        ok > 20,
        "the load ran through the restart: {ok} connections"
    );

    // status reads the pinned state, while the agent runs and after it stopped.
    let (code, table, _) = redirector(&["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&ADVERTISE.to_string())
            && table.contains(&LISTEN.to_string())
            && table.contains("ipv6"),
        "{table}"
    );
    drop(second.stop().expect("second agent stops"));
    let (code, json, _) = redirector(&["status", "--output", "json"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&json).expect("status JSON");
    assert_eq!(status["pinned"], true);
    assert_eq!(status["sock_ops_attached"], 1);
    assert_eq!(status["namespaces"][0]["attached"], true);
    assert_eq!(
        status["namespaces"][0]["redirects"][0]["advertise_port"],
        ADVERTISE
    );
    assert_eq!(
        status["namespaces"][0]["redirects"][0]["listener_registered"],
        true
    );
    assert_eq!(
        status["counters"]["flows_opened"], ok,
        "every connection, across both agents, counted once"
    );
    // Still redirecting with no agent running.
    assert_eq!(
        request(&q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"x")
            .expect("pinned redirect")
            .server,
        "live-store"
    );

    // detach removes everything and says so.
    let (code, out, err) = redirector(&["detach"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("removed link") && out.contains("sock_ops") && out.contains("sk_lookup-"),
        "{out}"
    );
    assert_all_detached(&l, &q, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), &before);
    let (_, out, _) = redirector(&["status"]);
    assert!(out.contains("no pinned state"), "{out}");
}

#[test]
fn check_passes_here_and_names_the_fix_on_a_broken_node() {
    let (code, out, _) = redirector(&["check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().all(|l| l.starts_with("PASS")), "{out}");
    let (code, json, _) = redirector(&["check", "--output", "json"]);
    assert_eq!(code, 0);
    let checks: serde_json::Value = serde_json::from_str(&json).expect("check JSON");
    assert!(
        checks
            .as_array()
            .expect("array")
            .iter()
            .all(|c| c["ok"] == true),
        "{json}"
    );

    // A node without bpffs: a private mount namespace where it is unmounted.
    let bin = agent_bin();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/fs/bpf && exec {} check",
            bin.display()
        ))
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    let bpffs = text
        .lines()
        .find(|l| l.contains("bpffs"))
        .expect("a bpffs line");
    assert!(
        bpffs.starts_with("FAIL") && bpffs.contains("mount -t bpf"),
        "{bpffs}"
    );
    // And the agent refuses to start there, saying why.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount /sys/fs/bpf && exec {} run --metrics-addr 127.0.0.1:0",
            bin.display()
        ))
        .output()
        .expect("unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("bpffs is not mounted") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn bad_configuration_is_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("rdt-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write config");
        p.display().to_string()
    };
    let unknown = write(
        "unknown.yaml",
        &format!("redirects:\n  - advertise_port: {ADVERTISE}\n    listen_prot: {LISTEN}\n"),
    );
    let bad_port = write(
        "port.yaml",
        &format!("redirects:\n  - advertise_port: 70000\n    listen_port: {LISTEN}\n"),
    );
    let tempo = write(
        "tempo.yaml",
        &format!("server:\n  grpc_listen_port: {LISTEN}\ndistributor: {{}}\n"),
    );
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--config", &unknown], "unknown field `listen_prot`"),
        (vec!["--config", &bad_port], "unknown.yaml"),
        (
            vec!["--tempo-config", &tempo],
            "live_store.ring.instance_port",
        ),
        (
            vec!["--config", "/nonexistent/redirector.yaml"],
            "/nonexistent/redirector.yaml",
        ),
    ];
    for (i, (args, needle)) in cases.into_iter().enumerate() {
        let mut full = vec!["run"];
        full.extend(args.iter().copied());
        let (code, _, err) = redirector(&full);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        // The port case names its own file and position, not the other one.
        if i == 1 {
            assert!(
                err.contains("port.yaml:2:") && err.contains("70000"),
                "{err}"
            );
        } else {
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        if i == 0 {
            assert!(err.contains("unknown.yaml:3:"), "line and column: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_input_is_refused_at_once_and_flags_that_need_each_other_are_refused_apart() {
    let cases: [(&[&str], &str); 6] = [
        // Unbounded files: refused before they can take the node's memory.
        (&["--config", "/dev/zero"], "larger than 4 MiB"),
        (&["--tempo-config", "/dev/zero"], "larger than 4 MiB"),
        (&["--tempo-config", "/dev/urandom"], "/dev/urandom"),
        (
            &["--cgroup-pattern", "kubepods"],
            "only applies with --discover",
        ),
        (&["--listener-grace", "5"], "only applies with --discover"),
        (
            &["--tempo-config", "/etc/hostname", "--listen-port", "9096"],
            "cannot be used with",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let (code, _, err) = redirector(&full);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The largest resident set of any child this test waited for (the agents
    // above): refused after at most 4 MiB of input, not after the node's memory.
    // SAFETY: getrusage(2) into a zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let rss_kb = usage.ru_maxrss;
    assert!(
        rss_kb < 64 * 1024,
        "peak RSS of the refused runs: {rss_kb} KiB"
    );
}

#[test]
fn a_new_pinned_agent_removes_what_it_no_longer_serves() {
    let _cleanup = PinCleanup::new();
    let keep = Netns::new("keep").expect("netns");
    let drop_me = Netns::new("drop").expect("netns");
    let _a = Server::start(&keep, &format!("[::]:{LISTEN}"), "kept").expect("listens");
    let _b = Server::start(&drop_me, &format!("[::]:{LISTEN}"), "dropped").expect("listens");
    let (keep_path, drop_path) = (
        keep.path().display().to_string(),
        drop_me.path().display().to_string(),
    );
    let first = Agent::start(&["--pin", "--netns", &keep_path, "--netns", &drop_path])
        .expect("first agent");
    first.stop().expect("first agent stops");
    assert_eq!(
        request(&drop_me, &format!("127.0.0.1:{ADVERTISE}"), b"x")
            .expect("pinned")
            .server,
        "dropped"
    );

    // The operator no longer lists `drop_me`.
    let second = Agent::start(&["--pin", "--netns", &keep_path]).expect("second agent");
    assert!(
        second
            .status()
            .iter()
            .any(|l| l.starts_with("removed stale pinned link")),
        "{:?}",
        second.status()
    );
    assert_eq!(
        request(&keep, &format!("127.0.0.1:{ADVERTISE}"), b"x")
            .expect("still served")
            .server,
        "kept"
    );
    let refused = request(&drop_me, &format!("127.0.0.1:{ADVERTISE}"), b"x")
        .expect_err("no longer redirected");
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    drop(second);
}

#[test]
fn discovery_can_be_limited_to_matching_cgroups() {
    let (listen, advertise) = ("19096", "22346");
    let l = Netns::new("cg").expect("netns");
    let _s = stand_in(&l, "[::]:19096", "live-store");
    let base = [
        "--discover",
        "--listen-port",
        listen,
        "--advertise-port",
        advertise,
    ];

    let mut args = base.to_vec();
    args.extend(["--cgroup-pattern", "*no-such-tempo-pod*"]);
    let agent = Agent::start(&args).expect("agent");
    thread::sleep(Duration::from_millis(2500));
    assert!(
        !agent
            .status()
            .iter()
            .any(|l| l.contains("attached sk_lookup")),
        "a namespace outside the pattern was served: {:?}",
        agent.status()
    );
    drop(agent);

    // The stand-in's own cgroup path matches.
    let cgroup =
        std::fs::read_to_string(format!("/proc/{}/cgroup", std::process::id())).expect("cgroup");
    let own = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line")
        .to_owned();
    let mut args = base.to_vec();
    args.extend(["--cgroup-pattern", own.as_str()]);
    let agent = Agent::start(&args).expect("agent");
    wait_for(&agent, "attached sk_lookup in netns", 1);
    assert_eq!(
        request(&l, &format!("127.0.0.1:{advertise}"), b"x")
            .expect("served")
            .server,
        "live-store"
    );
}

#[test]
fn an_upgrade_to_another_build_replaces_pinned_programs_without_a_gap() {
    let (_cleanup, q, l, _live_store) = pinned_setup();
    let l_path = l.path().display().to_string();
    let args = ["--pin", "--netns", l_path.as_str()];
    Agent::start(&args)
        .expect("old agent")
        .stop()
        .expect("old agent stops");
    // Make the pinned state look like another build's (other programs/maps).
    let marker = std::fs::read_dir(PIN_ROOT)
        .expect("pin root")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("build-"))
        .expect("build marker");
    let ours = marker.file_name().to_string_lossy().into_owned();
    std::fs::rename(marker.path(), format!("{PIN_ROOT}/build-0000000000000000"))
        .expect("rename marker");

    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    let (new, ok, failed) = under_load(&q, &target, || Agent::start(&args).expect("new agent"));
    assert!(
        new.status()
            .iter()
            .any(|l| l.starts_with("replaced the pinned state of build 0000000000000000")),
        "{:?}",
        new.status()
    );
    assert_eq!(
        failed, 0,
        "failed connections through the upgrade ({ok} succeeded)"
    );
    assert!(ok > 20, "{ok}");
    new.stop().expect("new agent stops");
    let (_, json, _) = redirector(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&json).expect("status JSON");
    assert_eq!(
        format!("build-{}", status["build"].as_str().expect("build")),
        ours
    );
    assert_eq!(status["namespaces"][0]["attached"], true);
    assert_eq!(
        request(&q, &target, b"x")
            .expect("pinned by the new build")
            .server,
        "live-store"
    );
}

#[test]
fn detach_stops_a_running_pinned_agents_redirects_at_once() {
    let _cleanup = PinCleanup::new();
    let l = Netns::new("l").expect("netns");
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let agent =
        Agent::start(&["--pin", "--netns", l.path().to_str().expect("utf-8")]).expect("agent");
    assert_eq!(
        request(&l, &format!("127.0.0.1:{ADVERTISE}"), b"x")
            .expect("redirected")
            .server,
        "live-store"
    );
    assert_eq!(http_get(&agent.metrics_url("/readyz")).0, 200);

    let (code, out, err) = redirector(&["detach"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed link"), "{out}");
    // The running agent still holds the links' fds: detach must not rely on
    // dropping the pins alone.
    assert!(
        sk_lookup_programs(&l).is_empty(),
        "sk_lookup still attached to L"
    );
    let refused =
        request(&l, &format!("127.0.0.1:{ADVERTISE}"), b"x").expect_err("no redirect after detach");
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    // Seen at the agent's next check (every second).
    let deadline = Instant::now() + Duration::from_secs(3);
    let (status, body) = loop {
        let (status, body) = http_get(&agent.metrics_url("/readyz"));
        if status != 200 || Instant::now() >= deadline {
            break (status, body);
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("attachment(s) missing"), "{body}");
    // Anyone on the node can read /readyz: no namespace, cgroup or process.
    for private in [
        l.path().to_str().expect("utf-8"),
        "/proc/",
        "/sys/fs/cgroup",
    ] {
        assert!(!body.contains(private), "{private} in {body}");
    }
    assert!(agent.stop().expect("agent stops").status.success());
}

#[test]
fn status_says_which_listener_is_not_registered_and_why() {
    let _pins = PinCleanup::new();
    let l = Netns::new("st").expect("netns");
    l.sysctl("net.mptcp.enabled", "1").expect("mptcp on");
    let _mptcp = Process::start(
        &l,
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[&format!("[::]:{LISTEN}"), "mptcp", "--mptcp"],
        &[],
    )
    .expect("an MPTCP listener");
    let agent =
        Agent::start(&["--pin", "--netns", l.path().to_str().expect("utf-8")]).expect("agent");
    let (code, table, _) = redirector(&["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&format!("listener [::]:{LISTEN}"))
            && table.contains("not registered: mptcp"),
        "{table}"
    );
    let (_, json, _) = redirector(&["status", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("status JSON");
    let unservable = &v["namespaces"][0]["unservable"][0];
    assert_eq!(unservable["reason"], "mptcp", "{json}");
    assert_eq!(unservable["port"], LISTEN);
    // The live-store's problem, not the agent's: reported, and still ready.
    let (_, metrics) = http_get(&agent.metrics_url("/metrics"));
    assert_eq!(
        metric(
            &metrics,
            "redirector_listeners_unservable{reason=\"mptcp\"}"
        ),
        1
    );
    assert_eq!(http_get(&agent.metrics_url("/readyz")).0, 200);
    agent.stop().expect("agent stops");
}

#[test]
fn a_realistic_tempo_config_gives_the_ring_port_and_the_grpc_port() {
    // Embedded, so the test also runs where the source tree is not (the VMs).
    let tempo = std::env::temp_dir().join(format!("rdt-tempo-{}.yaml", std::process::id()));
    std::fs::write(&tempo, include_str!("../testdata/tempo-live-store.yaml")).expect("write");
    let path = tempo.to_str().expect("utf-8");
    let (code, out, err) = redirector(&["run", "--tempo-config", path, "--dry-run"]);
    let _ = std::fs::remove_file(&tempo);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("--dry-run prints JSON");
    assert_eq!(
        v["redirects"],
        serde_json::json!([{"advertise_port": ADVERTISE, "listen_port": LISTEN}])
    );
}

/// The uninstall step (deploy/uninstall.yaml runs `redirector detach --wait`
/// on every node): a pinned agent's programs, links and maps are gone, the
/// redirect with them, and the command stays up until SIGTERM, as a
/// DaemonSet's pod must.
#[test]
fn detach_wait_removes_a_pinned_agent_and_stays_up_until_sigterm() {
    let (_cleanup, q, l, _live_store) = pinned_setup();
    let l_path = l.path().display().to_string();
    let before = redirector_program_ids();
    let agent = Agent::start(&["--pin", "--netns", l_path.as_str()]).expect("agent");
    agent.wait_registered(1);
    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    agent.stop().expect("agent stops");
    // The DaemonSet deleted: still redirecting, from the pins.
    assert_eq!(
        request(&q, &target, b"x").expect("pinned redirect").server,
        "live-store"
    );

    let mut detach = std::process::Command::new(agent_bin())
        .args(["detach", "--wait"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("detach --wait");
    let stdout = detach.stdout.take().expect("stdout");
    let lines: Vec<String> = io::BufRead::lines(io::BufReader::new(stdout))
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("detached; waiting"))
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("removed link")),
        "{lines:?}"
    );
    assert_all_detached(&l, &q, &target, &before);
    // Still up, as a DaemonSet's container must be; SIGTERM ends it cleanly.
    thread::sleep(Duration::from_millis(200));
    assert!(detach.try_wait().expect("try_wait").is_none(), "exited");
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(detach.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = detach.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// What `detach` must leave: no pin, no sk_lookup on `l`, no program loaded
/// since `before`, and no redirect to `target` from `q`.
fn assert_all_detached(
    l: &Netns,
    q: &Netns,
    target: &str,
    before: &std::collections::HashSet<u32>,
) {
    assert!(!std::path::Path::new(PIN_ROOT).exists());
    assert!(
        sk_lookup_programs(l).is_empty(),
        "nothing attached to L after detach"
    );
    let left = wait_unloaded(
        &redirector_program_ids()
            .difference(before)
            .copied()
            .collect(),
    );
    assert!(left.is_empty(), "programs left: {left:?}");
    assert_eq!(
        request(q, target, b"x")
            .expect_err("no redirect after detach")
            .kind(),
        io::ErrorKind::ConnectionRefused
    );
}

#[test]
fn detach_gives_back_the_mptcp_setting_a_pinned_agent_changed_even_after_a_restart() {
    const MPTCP_ENABLED: &str = "/proc/sys/net/mptcp/enabled";
    let _cleanup = PinCleanup::new();
    let l = Netns::new("mp").expect("netns");
    l.sysctl("net.mptcp.enabled", "1").expect("mptcp on");
    let path = l.path();
    let args = ["--pin", "--netns", path.to_str().expect("utf-8")];
    let first = Agent::start(&args).expect("agent");
    assert_eq!(l.sysctl_value(MPTCP_ENABLED), "0", "served: MPTCP off");
    first.stop().expect("agent stops");
    assert_eq!(
        l.sysctl_value(MPTCP_ENABLED),
        "0",
        "a pinned agent leaves it off for the programs it leaves attached"
    );
    // The next agent adopts the namespace, where it finds 0: what it must
    // give back is the 1 the first one found.
    let second = Agent::start(&args).expect("agent");
    second.stop().expect("agent stops");
    // Under `ip netns exec` (a fresh /sys) the pinned agent cannot be seen:
    // status says why instead of "nothing pinned".
    let out = l
        .command(agent_bin().to_str().expect("utf-8"))
        .arg("status")
        .output()
        .expect("status under ip netns exec");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("bpffs is not mounted at /sys/fs/bpf"),
        "{text}"
    );
    let (code, out, err) = redirector(&["detach"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("restored net.mptcp.enabled=1 in net:["),
        "{out}"
    );
    assert_eq!(l.sysctl_value(MPTCP_ENABLED), "1");
}

#[test]
fn sighup_is_logged_and_ignored() {
    let l = Netns::new("hup").expect("netns");
    let agent = Agent::start(&["--netns", l.path().to_str().expect("utf-8")]).expect("agent");
    // SAFETY: kill(2) on the agent this test started, by its pid.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !agent
        .status()
        .iter()
        .any(|l| l.contains("SIGHUP ignored: restart to apply config changes"))
    {
        assert!(Instant::now() < deadline, "{:?}", agent.status());
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        http_get(&agent.metrics_url("/healthz")).0,
        200,
        "still running"
    );
    assert!(agent.stop().expect("agent stops").status.success());
}
