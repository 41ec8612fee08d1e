//! Failure modes, as functional outcomes (the timings are `cargo xtask bench
//! --faults`): a SYN flood on the advertised port with no live-store, a
//! live-store that restarts under load, the agent killed with SIGKILL (pinned
//! and not), and the pinned state changed behind a running agent's back
//! (pins deleted, foreign entries, bpffs unmounted and mounted again).

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use redirector_tests::*;

use redirector::bpf::pins::{BPFFS, PIN_ROOT};

/// The shared querier and live-store namespaces.
fn pair() -> (Netns, Netns) {
    let Topology { q, l } = Topology::new();
    (q, l)
}

fn path_of(ns: &Netns) -> String {
    ns.path().display().to_string()
}

/// A live-store stand-in process living inside a namespace, killed (SIGKILL)
/// on drop.
fn stand_in(ns: &Netns, name: &str) -> Process {
    Process::start(
        ns,
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[&format!("[::]:{LISTEN}"), name],
        &[],
    )
    .expect("start the stand-in")
}

/// One connection attempt of a load: when it started and ended, and whether
/// "live-store" answered it.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// Runs `during` while a querier in `q` dials `target` back to back (a few ms
/// apart), and returns what `during` returned with every attempt.
fn under_load<T: Send>(
    q: &Netns,
    target: &str,
    during: impl FnOnce() -> T + Send,
) -> (T, Vec<Attempt>) {
    let stop = AtomicBool::new(false);
    let attempts = Mutex::new(Vec::new());
    let result = thread::scope(|scope| {
        scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let start = Instant::now();
                let ok = matches!(request(q, target, b"x"), Ok(r) if r.server == "live-store");
                let end = Instant::now();
                attempts
                    .lock()
                    .expect("lock")
                    .push(Attempt { start, end, ok });
                thread::sleep(Duration::from_millis(3));
            }
        });
        thread::sleep(Duration::from_millis(300));
        let result = during();
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        result
    });
    let attempts = attempts.into_inner().expect("lock");
    let failed = attempts.iter().filter(|a| !a.ok).count();
    eprintln!(
        "under load: {} connections succeeded, {failed} failed",
        attempts.len() - failed
    );
    (result, attempts)
}

/// The JSON records of a flow log; a line that is not JSON (a record cut
/// short by a SIGKILL in the middle of a write) is counted apart.
fn flow_records(log: &Path) -> (Vec<serde_json::Value>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut records = Vec::new();
    let mut broken = 0;
    for line in text.lines() {
        match serde_json::from_str(line) {
            Ok(v) => records.push(v),
            Err(_) => broken += 1,
        }
    }
    (records, broken)
}

fn count(records: &[serde_json::Value], event: &str, cookie: u64) -> usize {
    records
        .iter()
        .filter(|r| r["event"] == event && r["netns_cookie"] == cookie)
        .count()
}

fn temp_log(tag: &str) -> PathBuf {
    let log = std::env::temp_dir().join(format!("rdt-faults-{}-{tag}.flows", std::process::id()));
    let _ = std::fs::remove_file(&log);
    log
}

/// Sends as many connection attempts to `target` as one thread pinned to CPU
/// 0 can for `secs`: non-blocking connect(), then close at once (the SYN is
/// already out). Returns the number of attempts.
fn syn_flood(ns: &Netns, target: SocketAddr, secs: f64) -> u64 {
    use socket2::{Domain, Socket, Type};
    ns.run(|| {
        // SAFETY: a zeroed cpu_set_t is valid; this thread's own mask.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut attempts = 0u64;
        while Instant::now() < deadline {
            let Ok(s) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
                continue;
            };
            let _ = s.set_nonblocking(true);
            let _ = s.connect(&target.into());
            attempts += 1;
        }
        attempts
    })
}

#[test]
fn a_syn_flood_without_a_live_store_is_rate_limited_and_loses_no_healthy_record() {
    let (fq, fl) = pair();
    let (hq, hl) = pair();
    let _healthy = Server::start(&hl, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let log = temp_log("flood");
    let agent = Agent::start(&[
        "--netns",
        &path_of(&fl),
        "--netns",
        &path_of(&hl),
        "--flow-log",
        log.to_str().expect("utf-8"),
        "--flow-format",
        "json",
    ])
    .expect("agent");
    let flood_secs = 2.0;
    let target: SocketAddr = format!("{LIVE_STORE_V4}:{ADVERTISE}")
        .parse()
        .expect("addr");
    let (attempts, load) = under_load(&hq, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), || {
        syn_flood(&fq, target, flood_secs)
    });
    thread::sleep(Duration::from_millis(300));
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success());
    let (no_listener, suppressed, dropped) = (
        stopped.counter("no_listener"),
        stopped.counter("refused_records_suppressed"),
        stopped.counter("records_dropped"),
    );
    let (records, broken) = flow_records(&log);
    let _ = std::fs::remove_file(&log);
    let refused = count(&records, "refused", fl.cookie());
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    eprintln!(
        "flood: {attempts} attempts, no_listener={no_listener}, refused records={refused}, suppressed={suppressed}, records_dropped={dropped}"
    );
    assert_eq!(broken, 0);
    assert!(attempts > 1000, "the flood ran: {attempts} attempts");
    assert!(
        no_listener > 0 && no_listener <= attempts,
        "each SYN counted once: {no_listener} of {attempts}"
    );
    // Each CPU's budget is 100 records per second of the kernel clock: a 2 s
    // flood spans at most 3 such seconds.
    let limit = 100 * cpus * (flood_secs as u64 + 1);
    assert!(
        refused > 0 && refused as u64 <= limit,
        "{refused} > {limit}"
    );
    assert!(suppressed > 0, "the flood exceeded the budget");
    assert_eq!(
        refused as u64 + suppressed,
        no_listener,
        "every refusal is a record or counted as suppressed"
    );
    assert_eq!(dropped, 0, "no record found the ring full");
    // The healthy namespace: every connection has both its records.
    let ok = load.iter().filter(|a| a.ok).count();
    assert_eq!(load.len(), ok, "no healthy connection failed");
    assert_eq!(count(&records, "open", hl.cookie()), ok);
    assert_eq!(count(&records, "close", hl.cookie()), ok);
    assert_eq!(stopped.counter("flows_opened"), ok as u64);
}

/// Attempts that failed although they started after a listen() returned
/// and ended before that listener was closed again.
fn failed_while_listening(attempts: &[Attempt], up: &[(Instant, Instant)]) -> Vec<String> {
    attempts
        .iter()
        .filter(|a| !a.ok)
        .filter_map(|a| {
            let (listened, _) = up
                .iter()
                .find(|(listened, closed)| a.start >= *listened && a.end <= *closed)?;
            Some(format!(
                "attempt {:?} after listen() failed",
                a.start.duration_since(*listened)
            ))
        })
        .collect()
}

#[test]
fn a_restarted_live_store_gets_the_first_connection_after_listen() {
    let (q, l) = pair();
    let mut server =
        Some(Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens"));
    let agent = Agent::start(&["--netns", &path_of(&l)]).expect("agent");
    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    // Close the listening socket and listen on a new one, three times; then
    // kill -9 the process and start it again, twice. Each gap is 100 ms; `up`
    // collects (listen() returned, about to close) of each listener.
    let (up, attempts) = under_load(&q, &target, || {
        let mut up = Vec::new();
        for _ in 0..3 {
            if let Some(s) = server.take() {
                s.stop();
            }
            thread::sleep(Duration::from_millis(100));
            server = Some(
                Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens again"),
            );
            let listened = Instant::now();
            thread::sleep(Duration::from_millis(200));
            up.push((listened, Instant::now()));
        }
        if let Some(s) = server.take() {
            s.stop();
        }
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(100));
            // The stand-in prints its line after listen().
            let process = stand_in(&l, "live-store");
            let listened = Instant::now();
            thread::sleep(Duration::from_millis(200));
            up.push((listened, Instant::now()));
            drop(process);
        }
        up
    });
    let late = failed_while_listening(&attempts, &up);
    assert!(late.is_empty(), "{late:?}");
    let ok_after_listen = up
        .iter()
        .filter(|(listened, _)| {
            attempts
                .iter()
                .find(|a| a.start >= *listened)
                .is_some_and(|a| a.ok)
        })
        .count();
    assert_eq!(
        ok_after_listen,
        up.len(),
        "the first attempt after each listen() succeeded"
    );
    let failed = attempts.iter().filter(|a| !a.ok).count();
    assert!(failed > 0, "the gaps were seen by the load");
    // Fail-open with nothing on ADVERTISE: refused at once, never a timeout.
    let slowest = attempts
        .iter()
        .filter(|a| !a.ok)
        .map(|a| a.end.duration_since(a.start))
        .max()
        .unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(1),
        "a failed attempt took {slowest:?}"
    );
    let stopped = agent.stop().expect("agent stops");
    // A connection still in the accept queue when the listener closed was
    // redirected (and counted), then reset.
    let opened = stopped.counter("flows_opened");
    assert!(
        opened >= (attempts.len() - failed) as u64 && opened <= attempts.len() as u64,
        "{opened} opened, {} attempts, {failed} failed",
        attempts.len()
    );
}

/// The ids of redirector programs that appeared since `before`.
fn new_programs(before: &HashSet<u32>) -> HashSet<u32> {
    redirector_program_ids()
        .difference(before)
        .copied()
        .collect()
}

#[test]
fn a_pinned_agent_killed_with_sigkill_leaves_everything_attached_and_counted() {
    let _cleanup = PinCleanup::new();
    let (q, l) = pair();
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let log = temp_log("kill-pinned");
    let log_arg = log.display().to_string();
    let l_path = path_of(&l);
    // A small ring (73 records), so the records of the time without an agent
    // overflow it: they must be counted as dropped, the rest delivered.
    let args = [
        "--pin",
        "--netns",
        l_path.as_str(),
        "--flow-log",
        log_arg.as_str(),
        "--flow-format",
        "json",
        "--flow-ring-bytes",
        "8192",
    ];
    let before = redirector_program_ids();
    let first = Agent::start(&args).expect("first agent");
    // What it attached and pinned (its bind hooks are not pinned: they end
    // with it, and the next agent attaches its own).
    let ours: HashSet<u32> = sk_lookup_programs(&l)
        .into_iter()
        .chain(sock_ops_programs())
        .filter(|id| new_programs(&before).contains(id))
        .collect();
    assert_eq!(ours.len(), 2, "sk_lookup and sock_ops");
    let sk_lookup = sk_lookup_programs(&l);
    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    let (second, attempts) = under_load(&q, &target, || {
        first.kill().expect("SIGKILL");
        // Nothing detached: the pins hold the links.
        thread::sleep(Duration::from_millis(200));
        let attached: HashSet<u32> = sk_lookup_programs(&l)
            .into_iter()
            .chain(sock_ops_programs())
            .collect();
        assert!(
            ours.is_subset(&attached),
            "attached {attached:?}, the killed agent's {ours:?}"
        );
        thread::sleep(Duration::from_millis(500));
        let second = Agent::start(&args).expect("second agent");
        for what in ["adopted sock_ops", "adopted sk_lookup"] {
            assert!(
                second.status().iter().any(|l| l.starts_with(what)),
                "{what}: {:?}",
                second.status()
            );
        }
        second
    });
    let failed = attempts.iter().filter(|a| !a.ok).count();
    assert_eq!(failed, 0, "no connection failed while no agent ran");
    assert_eq!(
        sk_lookup_programs(&l),
        sk_lookup,
        "the second agent adopted the same program"
    );
    assert!(ours.is_subset(&redirector_program_ids()));
    thread::sleep(Duration::from_millis(300));
    let stopped = second.stop().expect("second agent stops");
    let (records, broken) = flow_records(&log);
    let _ = std::fs::remove_file(&log);
    let cookie = l.cookie();
    let delivered = (count(&records, "open", cookie) + count(&records, "close", cookie)) as u64;
    let (opened, closed, dropped) = (
        stopped.counter("flows_opened"),
        stopped.counter("flows_closed"),
        stopped.counter("records_dropped"),
    );
    eprintln!(
        "records: written {}, delivered {delivered}, dropped (counted) {dropped}, cut short {broken}",
        opened + closed
    );
    assert_eq!(opened, attempts.len() as u64, "the counters survived");
    assert_eq!(closed, opened);
    assert!(dropped > 0, "the ring overflowed while no agent read it");
    // Each record is delivered or counted. Only records the killed agent
    // had taken from the ring but not yet written out can be neither: a
    // SIGKILL in the middle of a drain (at this load, about 0.1% of the
    // time), which loses at most its write buffer (8 KiB, ~25 records).
    let written = opened + closed;
    let lost = written - (delivered + dropped).min(written);
    assert!(
        delivered + dropped <= written && lost <= 32,
        "{delivered} delivered + {dropped} dropped of {written} written"
    );
}

#[test]
fn an_unpinned_agent_killed_with_sigkill_leaves_nothing_attached() {
    let (q, l) = pair();
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let l_path = path_of(&l);
    let before = redirector_program_ids();
    let agent = Agent::start(&["--netns", &l_path]).expect("agent");
    let ours = new_programs(&before);
    let pid = agent.pid();
    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    assert_eq!(
        request(&q, &target, b"x").expect("redirected").server,
        "live-store"
    );
    agent.kill().expect("SIGKILL");
    // The kernel detaches and unloads when the last fd closes.
    let left = wait_unloaded(&ours);
    assert!(left.is_empty(), "programs still loaded: {left:?}");
    assert!(sk_lookup_programs(&l).is_empty());
    assert!(sock_ops_programs().iter().all(|id| !ours.contains(id)));
    assert!(!Path::new(BPFFS)
        .join(format!("redirector-load-{pid}"))
        .exists());
    // Fail-open: nothing listens on ADVERTISE any more.
    let refused = request(&q, &target, b"x").expect_err("no redirect");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // The one thing left: MPTCP stays off in the namespace (nothing could
    // restore it), which a live-store never notices.
    if Path::new("/proc/sys/net/mptcp/enabled").exists() {
        assert_eq!(l.sysctl_value("/proc/sys/net/mptcp/enabled"), "0");
    }
    // The next agent serves again at once.
    let again = Agent::start(&["--netns", &l_path]).expect("next agent");
    assert_eq!(
        request(&q, &target, b"x").expect("redirected again").server,
        "live-store"
    );
    drop(again.stop().expect("stops"));
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not happen within 5 s");
}

fn lines_with(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.contains(what)).count()
}

const REPAIRED: &str = "pinned again from the agent's own fds";
const FOREIGN: &str = "is not part of this agent's pinned state";

fn problems(agent: &Agent, problem: &str) -> u64 {
    let (_, body) = http_get(&agent.metrics_url("/metrics"));
    metric(
        &body,
        &format!("redirector_pinned_state_problems{{problem=\"{problem}\"}}"),
    )
}

fn repairs(agent: &Agent) -> u64 {
    let (_, body) = http_get(&agent.metrics_url("/metrics"));
    metric(&body, "redirector_pin_repairs_total")
}

fn map_id(path: &Path) -> u32 {
    aya::maps::MapInfo::from_pin(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .id()
}

#[test]
fn deleted_pins_are_made_again_and_foreign_entries_reported() {
    let _cleanup = PinCleanup::new();
    let (q, l) = pair();
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let l_path = path_of(&l);
    let args = ["--pin", "--netns", l_path.as_str()];
    let agent = Agent::start(&args).expect("agent");
    let sk_lookup_ids = sk_lookup_programs(&l);
    let root = Path::new(PIN_ROOT);
    let listeners = root.join("maps/LISTENERS");
    let ring = root.join("maps/FLOW_EVENTS");
    let sock_ops = std::fs::read_dir(root.join("links"))
        .expect("links")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sock_ops-"))
        })
        .expect("the pod cgroup's sock_ops link pin");
    let sk_lookup = root.join(format!("links/sk_lookup-{}", l.cookie()));
    let ids = (map_id(&listeners), map_id(&ring));
    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");

    let (_, attempts) = under_load(&q, &target, || {
        // Maps, then links: each is pinned again within the agent's second.
        std::fs::remove_file(&listeners).expect("rm map pin");
        std::fs::remove_file(&ring).expect("rm map pin");
        wait_until("maps pinned again", || listeners.exists() && ring.exists());
        wait_until("repair logged", || {
            lines_with(&agent.stderr(), REPAIRED) >= 1
        });
        let after_maps = lines_with(&agent.stderr(), REPAIRED);
        std::fs::remove_file(&sock_ops).expect("rm link pin");
        std::fs::remove_file(&sk_lookup).expect("rm link pin");
        wait_until("links pinned again", || {
            sock_ops.exists() && sk_lookup.exists()
        });
        wait_until("repair logged", || {
            lines_with(&agent.stderr(), REPAIRED) > after_maps
        });
        // Foreign entries: reported once each, left alone.
        std::fs::create_dir(root.join("stray-dir")).expect("mkdir");
        std::os::unix::fs::symlink("/tmp", root.join("maps/stray-link")).expect("symlink");
        wait_until("foreign entries reported", || {
            lines_with(&agent.stderr(), FOREIGN) == 2
        });
        thread::sleep(Duration::from_millis(1500));
    });
    assert!(attempts.iter().all(|a| a.ok), "no connection failed");
    let stderr = agent.stderr();
    assert_eq!(
        lines_with(&stderr, FOREIGN),
        2,
        "logged once each: {stderr:#?}"
    );
    // One line per check that repaired something: the two deletions of a
    // kind fall in one check or in two.
    let repaired = lines_with(&stderr, REPAIRED);
    assert!((2..=4).contains(&repaired), "{stderr:#?}");
    assert!(root.join("stray-dir").is_dir() && root.join("maps/stray-link").exists());
    assert_eq!((map_id(&listeners), map_id(&ring)), ids, "the same maps");
    assert_eq!(repairs(&agent), 4);
    assert_eq!(problems(&agent, "foreign_entry"), 2);
    assert_eq!(problems(&agent, "bpffs_unmounted"), 0);
    let (status, _) = http_get(&agent.metrics_url("/healthz"));
    assert_eq!(status, 200, "the agent never stopped serving");

    // One foreign entry goes: resolved, and said so.
    std::fs::remove_dir(root.join("stray-dir")).expect("rmdir");
    wait_until("resolved", || problems(&agent, "foreign_entry") == 1);
    assert!(lines_with(&agent.stderr(), "problem resolved (foreign_entry)") == 1);

    // The next agent adopts the repaired state, foreign entry and all.
    let stopped = agent.stop().expect("stops");
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
    let next = Agent::start(&args).expect("next agent");
    for what in ["adopted sock_ops", "adopted sk_lookup"] {
        assert!(
            next.status().iter().any(|l| l.starts_with(what)),
            "{what}: {:?}",
            next.status()
        );
    }
    assert_eq!(sk_lookup_programs(&l), sk_lookup_ids, "the same program");
    wait_until("the next agent reports the foreign entry", || {
        lines_with(&next.stderr(), FOREIGN) == 1
    });
    assert_eq!(
        request(&q, &target, b"x").expect("redirected").server,
        "live-store"
    );
    // detach removes the foreign entry with the rest; run while an agent
    // runs, it is the operator tearing the state down, and the agent pins
    // nothing again.
    let (code, out, err) = redirector(&["detach"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("foreign entry"), "{out}");
    thread::sleep(Duration::from_millis(1500));
    assert!(!root.exists(), "pinned again after detach");
    drop(next.stop().expect("stops"));
    assert!(!root.exists());
}

/// A process in a mount namespace of its own (private propagation) whose
/// bpffs mount the test may unmount and mount again: the agents of the test
/// run in it, and the machine's own /sys/fs/bpf (and every other agent's pins)
/// is never touched. Killed on drop, which ends the mount namespace.
struct MountNs {
    holder: Child,
}

impl MountNs {
    fn new() -> Self {
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare --mount");
        let ns = Self { holder };
        // Wait until the holder is inside its namespace.
        let own = std::fs::read_link("/proc/self/ns/mnt").expect("own mount ns");
        wait_until("the holder's mount namespace", || {
            std::fs::read_link(format!("/proc/{}/ns/mnt", ns.holder.id())).is_ok_and(|m| m != own)
        });
        ns
    }

    fn enter(&self) -> Vec<String> {
        ["nsenter", "-t", &self.holder.id().to_string(), "-m", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Runs a command in the namespace: (success, stdout + stderr).
    fn run(&self, args: &[&str]) -> (bool, String) {
        let enter = self.enter();
        let out = Command::new(&enter[0])
            .args(&enter[1..])
            .args(args)
            .output()
            .expect("nsenter");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        // The pins of the bpffs mounted in this namespace die with it; detach
        // what they held first.
        let bin = agent_bin();
        self.run(&[bin.to_str().unwrap_or("redirector"), "detach"]);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // Never needed (only the holder's namespace was changed), but a test
        // must never leave the machine without bpffs.
        if !is_bpffs(Path::new(BPFFS)) {
            let _ = Command::new("mount")
                .args(["-t", "bpf", "bpf", BPFFS])
                .status();
        }
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-buffer; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe_4a11 }
}

#[test]
fn bpffs_unmounted_and_mounted_again_under_a_pinned_agent() {
    let _cleanup = PinCleanup::new();
    // Namespaces first: the holder's mount namespace gets a copy of their
    // /var/run/netns mounts.
    let (q, l) = pair();
    let _live_store = Server::start(&l, &format!("[::]:{LISTEN}"), "live-store").expect("listens");
    let mnt = MountNs::new();
    let enter = mnt.enter();
    let enter: Vec<&str> = enter.iter().map(String::as_str).collect();
    let l_path = path_of(&l);
    let args = ["--pin", "--netns", l_path.as_str()];
    let agent = Agent::start_wrapped(&enter, &args).expect("agent in the mount namespace");
    let target = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    let links = format!("{PIN_ROOT}/links");

    let (_, attempts) = under_load(&q, &target, || {
        let (ok, out) = mnt.run(&["umount", BPFFS]);
        assert!(ok, "umount: {out}");
        wait_until("the unmount reported", || {
            lines_with(&agent.stderr(), "bpffs is no longer mounted") == 1
        });
        assert_eq!(problems(&agent, "bpffs_unmounted"), 1);
        // Redirects go on; the report is not repeated every second.
        thread::sleep(Duration::from_millis(1500));
        assert_eq!(lines_with(&agent.stderr(), "bpffs is no longer mounted"), 1);
        // A fresh, empty bpffs: everything is pinned again.
        let (ok, out) = mnt.run(&["mount", "-t", "bpf", "bpf", BPFFS]);
        assert!(ok, "mount: {out}");
        wait_until("pinned again in the new bpffs", || {
            let (_, ls) = mnt.run(&["ls", &links]);
            ls.contains("sock_ops") && ls.contains("sk_lookup-")
        });
    });
    assert!(attempts.iter().all(|a| a.ok), "no connection failed");
    wait_until("resolved", || problems(&agent, "bpffs_unmounted") == 0);
    assert!(repairs(&agent) >= 3 + 9 + 2, "directories, maps and links");
    let stderr = agent.stderr();
    assert!(
        lines_with(&stderr, "problem resolved (bpffs_unmounted)") == 1,
        "{stderr:#?}"
    );
    let stopped = agent.stop().expect("stops");
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
    // The next agent adopts what was pinned in the new bpffs.
    let next = Agent::start_wrapped(&enter, &args).expect("next agent");
    for what in ["adopted sock_ops", "adopted sk_lookup"] {
        assert!(
            next.status().iter().any(|l| l.starts_with(what)),
            "{what}: {:?}",
            next.status()
        );
    }
    assert_eq!(
        request(&q, &target, b"x").expect("redirected").server,
        "live-store"
    );
    drop(next.stop().expect("stops"));
    assert!(is_bpffs(Path::new(BPFFS)), "the machine's bpffs untouched");
}
