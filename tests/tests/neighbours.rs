//! Untrusted neighbours: what another pod on the node does must not stall,
//! fool or starve the agent. Each test runs one attack beside a discovering
//! agent, then checks what the issue asks of every attack: a live-store pod
//! started during the attack is served within 1 s, `/healthz` answers within
//! 100 ms, the agent's peak RSS stays under 128 MiB, SIGTERM ends it within
//! 2 s, and the attack shows by name in the metrics and `redirector status`.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{
    enter_test_cgroup, http_get, latency_bound, redirector, request, wait_until, Agent, Cgroup,
    Netns, Process,
};

/// Ports of their own, so nothing else on the machine is discovered.
const LISTEN: &str = "19295";
const ADVERTISE: &str = "22545";

/// A pod: its cgroup tree (kubelet's naming), container cgroup and network
/// namespace, all removed on drop.
struct Pod {
    ns: Netns,
    ctr: PathBuf,
    _tree: Cgroup,
}

fn pod(tag: &str) -> Pod {
    let uid = format!("5e1f0000-0000-4000-8000-{:012x}", std::process::id());
    let tree = Cgroup::new(&format!("redirector-test-nb-{tag}")).expect("cgroup tree");
    let ctr = tree.path.join(format!("pod{uid}")).join("ctr");
    std::fs::create_dir_all(&ctr).expect("pod and container cgroups");
    Pod {
        ns: Netns::new(&format!("nb-{tag}")).expect("netns"),
        ctr,
        _tree: tree,
    }
}

fn standin() -> &'static str {
    env!("CARGO_BIN_EXE_live-store-standin")
}

/// A process in `pod` listening on the listen port: `args` after the address
/// and name (e.g. `-target=live-store`).
fn start(pod: &Pod, name: &str, args: &[&str]) -> Process {
    start_at(pod, &format!("[::]:{LISTEN}"), name, args)
}

fn start_at(pod: &Pod, addr: &str, name: &str, args: &[&str]) -> Process {
    let mut all = vec![addr, name];
    all.extend_from_slice(args);
    Process::start_in(&pod.ns, Some(&pod.ctr), standin(), &all, &[]).expect("process starts")
}

fn discovering() -> Agent {
    Agent::start(&[
        "--discover",
        "--listen-port",
        LISTEN,
        "--advertise-port",
        ADVERTISE,
    ])
    .expect("agent with discovery")
}

/// Which server answers on the advertised port inside `ns`, if any.
fn served(ns: &Netns) -> Option<String> {
    request(ns, &format!("127.0.0.1:{ADVERTISE}"), b"x")
        .ok()
        .map(|r| r.server)
}

fn metrics(agent: &Agent) -> String {
    http_get(&agent.metrics_url("/metrics")).1
}

/// The value of a sample, labels included in `name`; 0 if absent.
fn sample(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits up to `within` for sample `name` to reach `at_least`; fails with the
/// metrics the agent serves then.
fn await_sample(agent: &Agent, name: &str, at_least: u64, within: Duration) {
    assert!(
        wait_until(within, || sample(&metrics(agent), name) >= at_least),
        "{name} below {at_least} after {within:?}:\n{}",
        metrics(agent)
    );
}

/// Waits up to `within` for `redirector status` to say `text`.
fn await_status(agent: &Agent, text: &str, within: Duration) {
    assert!(
        wait_until(within, || status(agent).contains(text)),
        "status does not say {text:?} after {within:?}:\n{}",
        status(agent)
    );
}

/// `redirector status` of the running agent (its state file).
fn status(agent: &Agent) -> String {
    let _ = agent;
    let (code, out, err) = redirector(&["status"]);
    assert_eq!(code, 0, "status: {err}");
    out
}

/// Peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// What every attack must leave intact; consumes the agent (SIGTERM).
fn assert_unharmed(agent: Agent, tag: &str) {
    // /healthz from a fresh connection, three times.
    for _ in 0..3 {
        let t = Instant::now();
        let (code, _) = http_get(&agent.metrics_url("/healthz"));
        let took = t.elapsed();
        assert_eq!(code, 200);
        assert!(
            took < latency_bound(Duration::from_millis(100)),
            "/healthz took {took:?}"
        );
    }
    // A live-store pod started now is served within a second of listening.
    let live = pod(&format!("{tag}-ls"));
    let _live_store = start(&live, "live-store", &["-target=live-store"]);
    let listening = Instant::now();
    let ok = wait_until(latency_bound(Duration::from_secs(1)), || {
        served(&live.ns).as_deref() == Some("live-store")
    });
    assert!(
        ok,
        "live-store not served within 1 s of listening ({:?}); agent: {:#?}",
        listening.elapsed(),
        agent.stderr()
    );
    println!(
        "{tag}: a live-store pod started now served {:?} after it listened",
        listening.elapsed()
    );
    let rss = peak_rss(agent.pid());
    assert!(rss < 128 << 20, "agent peak RSS {} MiB", rss >> 20);
    let t = Instant::now();
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
    assert!(
        t.elapsed() < latency_bound(Duration::from_secs(2)),
        "SIGTERM took {:?}",
        t.elapsed()
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rdt-nb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process whose `-config.file` is a FIFO, there before the agent starts
/// (its startup scan) and another after (a bind): opening a FIFO for reading
/// blocks until a writer comes, which never does.
#[test]
fn a_fifo_for_a_config_file_stalls_nothing() {
    enter_test_cgroup();
    let dir = Scratch::new("fifo");
    let fifo = dir.0.join("tempo.yaml");
    mkfifo(&fifo);
    let flag = format!("-config.file={}", fifo.display());
    let before = pod("fifo-a");
    let _early = start(&before, "neighbour", &[&flag]);
    let agent = discovering();
    let after = pod("fifo-b");
    let _late = start(&after, "neighbour", &[&flag]);
    let refused = r#"redirector_pod_files_refused_total{reason="not_regular"}"#;
    await_sample(&agent, refused, 2, Duration::from_secs(5));
    await_status(
        &agent,
        "2 not regular (FIFO, device)",
        Duration::from_secs(3),
    );
    assert_eq!(served(&before.ns), None, "not a live-store: not served");
    assert_unharmed(agent, "fifo");
}

/// A chrooted process whose config file is an absolute symlink to a path
/// that exists on the host (saying `target: live-store`) but not in its root:
/// resolved in its root, the link leads nowhere, and the pod is not served.
#[test]
fn a_symlink_never_leads_out_of_the_pod_root() {
    enter_test_cgroup();
    let dir = Scratch::new("symlink");
    let host_only = dir.0.join("host-only.yaml");
    std::fs::write(&host_only, "target: live-store\n").expect("host file");
    let root = dir.0.join("root");
    std::fs::create_dir_all(&root).expect("root");
    std::os::unix::fs::symlink(&host_only, root.join("conf.yaml")).expect("the escape");

    let agent = discovering();
    let neighbour = pod("symlink");
    let _chrooted = start(
        &neighbour,
        "neighbour",
        &[
            &format!("--chroot={}", root.display()),
            "-config.file=/conf.yaml",
        ],
    );
    // The agent looked at /conf.yaml in the pod's root, and found nothing there.
    let unreadable = r#"redirector_pod_files_refused_total{reason="unreadable"}"#;
    await_sample(&agent, unreadable, 1, Duration::from_secs(5));
    assert_eq!(
        served(&neighbour.ns),
        None,
        "served on the host file's word"
    );
    assert!(
        !agent.status().iter().any(|l| l.contains("conf.yaml")),
        "{:?}",
        agent.status()
    );
    assert_unharmed(agent, "symlink");
}

/// Config files built to exhaust a YAML parser's memory: a flow sequence of
/// two million elements (4 MiB, refused by size) and one just under the cap
/// with `target: live-store` after it (found by the line scan, served).
#[test]
fn a_yaml_event_bomb_costs_no_memory() {
    enter_test_cgroup();
    let dir = Scratch::new("yaml");
    let bomb = |path: &Path, bytes: usize| {
        let mut text = String::with_capacity(bytes + 32);
        text.push_str("x: [");
        while text.len() < bytes {
            text.push_str("1,");
        }
        text.push_str("1]\ntarget: live-store\n");
        std::fs::write(path, text).expect("write");
    };
    let (big, at_cap) = (dir.0.join("big.yaml"), dir.0.join("cap.yaml"));
    bomb(&big, 4 << 20);
    bomb(&at_cap, 250 << 10);
    let agent = discovering();
    let too_large = pod("yaml-big");
    let _big = start(
        &too_large,
        "neighbour",
        &[&format!("-config.file={}", big.display())],
    );
    let refused = r#"redirector_pod_files_refused_total{reason="too_large"}"#;
    await_sample(&agent, refused, 1, Duration::from_secs(5));
    assert_eq!(served(&too_large.ns), None);
    let capped = pod("yaml-cap");
    let _capped = start(
        &capped,
        "capped",
        &[&format!("-config.file={}", at_cap.display())],
    );
    assert!(
        wait_until(Duration::from_secs(1), || served(&capped.ns).as_deref()
            == Some("capped")),
        "{:?}",
        agent.status()
    );
    await_status(&agent, "1 too large", Duration::from_secs(3));
    assert_unharmed(agent, "yaml");
}

/// A wrapper (`sh -c '...; exec tempo -target=live-store'`) that the agent's
/// startup scan saw as a shell: once it has exec'd the live-store, its bind
/// is looked at afresh and it is served.
#[test]
fn a_wrapper_is_served_once_it_execs_the_live_store() {
    enter_test_cgroup();
    let dir = Scratch::new("wrapper");
    let go = dir.0.join("go");
    let wrapped = pod("wrapper");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.02; done; exec {} [::]:{LISTEN} wrapped -target=live-store",
        standin(),
        go = go.display(),
    );
    thread::scope(|scope| {
        // Process::start_in returns once the wrapped live-store listens.
        let wrapper = scope.spawn(|| {
            Process::start_in(&wrapped.ns, Some(&wrapped.ctr), "sh", &["-c", &script], &[])
                .expect("wrapper starts")
        });
        thread::sleep(Duration::from_millis(100));
        // Its startup scan sees a shell in the pod.
        let agent = discovering();
        std::fs::write(&go, b"").expect("let the wrapper exec");
        let _process = wrapper.join().expect("wrapper thread");
        assert!(
            wait_until(Duration::from_secs(1), || served(&wrapped.ns).as_deref()
                == Some("wrapped")),
            "the exec'd live-store was not served: {:?}",
            agent.status()
        );
        assert_unharmed(agent, "wrapper");
    });
}

/// A pod that claims to be a live-store (`-target=live-store`) and binds the
/// listen port on 20,000 loopback addresses (two processes of 10,000: a
/// process may hold 20,000 files here): the kernel registers
/// `LISTENERS_PER_NETNS` of them and refuses the rest, each counted, so the
/// node-wide listener map keeps room for every other namespace.
#[test]
fn a_claimed_live_store_binding_20000_addresses_gets_its_quota_only() {
    enter_test_cgroup();
    const HALF: u64 = 10_000;
    let quota = redirector_common::LISTENERS_PER_NETNS;
    let agent = discovering();
    let hostile = pod("quota");
    let bind = |addr: &str, from: u64| {
        start_at(
            &hostile,
            &format!("{addr}:{LISTEN}"),
            "hostile",
            &[
                "-target=live-store",
                &format!("--bind-many={HALF}"),
                &format!("--bind-from={from}"),
            ],
        )
    };
    let exceeded = "redirector_listener_quota_exceeded_total";
    // The first process's first listener is registered by the agent, from
    // its bind event (before sock_ops is on the pod); every other one of the
    // 20,001 meets the kernel's quota.
    let _first = bind("127.0.0.1", 0);
    await_sample(&agent, exceeded, HALF - quota, Duration::from_secs(10));
    let _second = bind("127.0.0.2", HALF);
    let refused = 2 * HALF + 1 - quota;
    await_sample(&agent, exceeded, refused, Duration::from_secs(10));
    let body = metrics(&agent);
    assert_eq!(sample(&body, exceeded), refused, "{body}");
    assert!(
        wait_until(Duration::from_secs(3), || sample(
            &metrics(&agent),
            "redirector_listeners_registered"
        ) == quota + 1),
        "{}",
        metrics(&agent)
    );
    await_status(
        &agent,
        &format!("listener quota reached: {quota} of {quota}"),
        Duration::from_secs(3),
    );
    assert_unharmed(agent, "quota");
}

/// 500 clients that send half a request header and wait: each is dropped
/// at the header timeout, and meanwhile the kubelet's probes are answered.
#[test]
fn five_hundred_slow_http_clients_do_not_starve_the_probes() {
    enter_test_cgroup();
    let agent = discovering();
    let url = agent.metrics_url("/healthz");
    let addr = url.split('/').next().expect("address").to_owned();
    let slow: Vec<std::net::TcpStream> = (0..500)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).expect("connect");
            std::io::Write::write_all(&mut c, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("half a header");
            c
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let body = metrics(&agent);
    assert_eq!(
        sample(
            &body,
            r#"redirector_http_connections_rejected_total{reason="limit"}"#
        ),
        0,
        "{body}"
    );
    // The header timeout ends them all.
    let timeouts = r#"redirector_http_connections_rejected_total{reason="header_timeout"}"#;
    await_sample(&agent, timeouts, 500, Duration::from_secs(8));
    drop(slow);
    assert_unharmed(agent, "slow-http");
}

/// A pod that makes network namespaces of its own (`unshare -n`, as any pod
/// may where user namespaces are allowed) and claims a live-store in each:
/// its first `NAMESPACES_PER_POD` are served, the rest are refused, counted,
/// and cost no program load.
#[test]
fn a_pod_with_many_namespaces_gets_its_share_only() {
    enter_test_cgroup();
    const MADE: usize = 5;
    let per_pod = redirector::agent::NAMESPACES_PER_POD;
    let agent = discovering();
    let hostile = pod("many-ns");
    let extra: Vec<Netns> = (1..MADE)
        .map(|i| Netns::new(&format!("nb-many-{i}")).expect("netns"))
        .collect();
    let namespaces: Vec<&Netns> = std::iter::once(&hostile.ns).chain(extra.iter()).collect();
    let _claims: Vec<Process> = namespaces
        .iter()
        .map(|ns| {
            Process::start_in(
                ns,
                Some(&hostile.ctr),
                standin(),
                &[&format!("[::]:{LISTEN}"), "claim", "-target=live-store"],
                &[],
            )
            .expect("claim starts")
        })
        .collect();
    let refused = "redirector_namespaces_refused_per_pod_total";
    let expected = (MADE - per_pod) as u64;
    await_sample(&agent, refused, expected, Duration::from_secs(5));
    // Exactly: the rest were served.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(sample(&metrics(&agent), refused), expected);
    let served_now = namespaces
        .iter()
        .filter(|ns| served(ns).as_deref() == Some("claim"))
        .count();
    assert_eq!(served_now, per_pod, "{:?}", agent.status());
    await_status(
        &agent,
        &format!(
            "{expected} network namespace(s) not served: their pod has {per_pod} served already"
        ),
        Duration::from_secs(3),
    );
    assert_unharmed(agent, "many-ns");
}

/// A served pod whose clients hold more connections than its share of the
/// node's flow table: the ones over the share are still redirected but
/// tracked no further (counted, an open record only), so another pod's
/// flows keep their open and close records.
#[test]
fn held_connections_fill_only_their_share_of_the_flow_table() {
    enter_test_cgroup();
    let share = redirector_common::flow_share(2);
    const OVER: u64 = 4;
    let agent = discovering();
    let hostile = pod("flows");
    let _claim = start(&hostile, "claim", &["-target=live-store"]);
    assert!(
        wait_until(Duration::from_secs(3), || served(&hostile.ns).as_deref()
            == Some("claim")),
        "{:?}",
        agent.status()
    );
    let before = metrics(&agent);
    redirector_tests::raise_open_files(share + OVER + 256);
    let held: Vec<std::net::TcpStream> = hostile.ns.run(|| {
        (0..share + OVER)
            .map(|_| {
                std::net::TcpStream::connect(format!("127.0.0.1:{ADVERTISE}"))
                    .expect("held connection")
            })
            .collect()
    });
    let exceeded = "redirector_flow_quota_exceeded_total";
    await_sample(
        &agent,
        exceeded,
        sample(&before, exceeded) + OVER,
        Duration::from_secs(5),
    );
    let during = metrics(&agent);
    assert_eq!(
        sample(&during, exceeded) - sample(&before, exceeded),
        OVER,
        "{during}"
    );
    assert_eq!(sample(&during, "redirector_flow_table_full_total"), 0);
    // Another pod's flow, meanwhile: an open and a close record.
    let other = pod("flows-other");
    let _live_store = start(&other, "live-store", &["-target=live-store"]);
    assert!(
        wait_until(Duration::from_secs(3), || served(&other.ns).as_deref()
            == Some("live-store")),
        "{:?}",
        agent.status()
    );
    // The requests above have closed and been recorded by now.
    thread::sleep(Duration::from_millis(500));
    let closed = "redirector_flows_closed_total";
    let closed_before = sample(&metrics(&agent), closed);
    assert_eq!(served(&other.ns).as_deref(), Some("live-store"));
    assert!(
        wait_until(Duration::from_secs(3), || sample(&metrics(&agent), closed)
            == closed_before + 1),
        "{}",
        metrics(&agent)
    );
    assert_eq!(
        sample(&metrics(&agent), exceeded),
        sample(&during, exceeded)
    );
    // While the connections are held: the attack is still on.
    assert_unharmed(agent, "flows");
    drop(held);
}

/// A pod (not a live-store) that binds and closes the listen port in a loop:
/// its bind events are cut off at the source once it has reported its share
/// for the second, so the event ring keeps room and a live-store that
/// starts meanwhile is served from its own bind at once.
#[test]
fn a_bind_close_storm_leaves_room_for_other_pods_events() {
    enter_test_cgroup();
    let agent = discovering();
    let stormy = pod("storm");
    let _storm = start_at(
        &stormy,
        "127.0.0.1:1",
        "storm",
        &["-target=querier", &format!("--bind-storm={LISTEN}")],
    );
    let limited = "redirector_listen_events_limited_total";
    await_sample(&agent, limited, 10_000, Duration::from_secs(3));
    assert_eq!(served(&stormy.ns), None);
    // The storm goes on while the live-store starts.
    assert_unharmed(agent, "storm");
}

/// Entries in the node's maps that hold per-connection or per-namespace
/// state (`PENDING` is the pending-handshake table older builds had).
fn state_entries() -> usize {
    const STATEFUL: [&str; 5] = ["PENDING", "FLOWS", "REDIRECTS", "NS_QUOTAS", "LISTEN_PORTS"];
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str().is_some_and(|n| STATEFUL.contains(&n)))
        .map(|m| {
            let map = aya::maps::MapData::from_id(m.id()).expect("open map by id");
            // A key buffer larger than any of these keys: the kernel reads
            // and writes key_size bytes of it.
            redirector::sys::map_keys::<[u64; 8]>(std::os::fd::AsFd::as_fd(map.fd()))
                .expect("map keys")
                .len()
        })
        .sum()
}

/// Bare ACKs from `count` client ports at `port` on 127.0.0.1, as fast as
/// a raw socket sends them: what a scanner, or a client whose connection the
/// server forgot, sends. Returns how many were sent.
fn stray_acks(port: u16, count: u32) -> u32 {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).expect("raw socket");
    let to = SockAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut sent = 0;
    for i in 0..count {
        let sport = 20_000 + (i % 40_000) as u16;
        let mut seg = [0u8; 20];
        seg[0..2].copy_from_slice(&sport.to_be_bytes());
        seg[2..4].copy_from_slice(&port.to_be_bytes());
        seg[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
        seg[8..12].copy_from_slice(&(!i).to_be_bytes());
        seg[12] = 5 << 4; // data offset: 5 words, no options
        seg[13] = 0x10; // ACK
        seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
        let sum = tcp_checksum([127, 0, 0, 1], [127, 0, 0, 1], &seg);
        seg[16..18].copy_from_slice(&sum.to_be_bytes());
        if socket.send_to(&seg, &to).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// The TCP checksum over the IPv4 pseudo-header and `segment`.
fn tcp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).copied().map_or(0, u32::from);
        }
    };
    add(&src);
    add(&dst);
    add(&[0, 6]);
    add(&(segment.len() as u16).to_be_bytes());
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A stray-segment flood at a served live-store's advertised port (bare ACKs
/// from 40,000 client ports; `sk_lookup` runs for every segment that finds
/// no established socket, and its context has no TCP flags): the listener
/// answers each with a reset, and nothing is stored for any of them, so
/// another pod's connections keep exact records and no map grows. The flood
/// shows as lookups far above handshakes.
#[test]
fn a_stray_ack_flood_leaves_no_state_behind() {
    enter_test_cgroup();
    let agent = discovering();
    let target = pod("strays");
    let _target = start(&target, "live-store", &["-target=live-store"]);
    let other = pod("strays-other");
    let _other = start(&other, "live-store-2", &["-target=live-store"]);
    for (p, name) in [(&target, "live-store"), (&other, "live-store-2")] {
        assert!(
            wait_until(Duration::from_secs(3), || served(&p.ns).as_deref()
                == Some(name)),
            "{:?}",
            agent.status()
        );
    }
    // The requests above have closed and been recorded by now.
    thread::sleep(Duration::from_millis(500));
    let before = metrics(&agent);
    let entries_before = state_entries();
    let port: u16 = ADVERTISE.parse().expect("port");
    const STRAYS: u32 = 100_000;
    const REAL: u64 = 20;
    let sent = thread::scope(|s| {
        let flood = s.spawn(|| target.ns.run(|| stray_acks(port, STRAYS)));
        for _ in 0..REAL {
            assert_eq!(served(&other.ns).as_deref(), Some("live-store-2"));
        }
        flood.join().expect("flood thread")
    });
    assert!(sent > STRAYS / 2, "only {sent} stray ACKs sent");
    let closed = "redirector_flows_closed_total";
    await_sample(
        &agent,
        closed,
        sample(&before, closed) + REAL,
        Duration::from_secs(3),
    );
    let after = metrics(&agent);
    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    // Only the real connections completed handshakes, each with its records.
    assert_eq!(
        delta("redirector_connections_redirected_total"),
        REAL,
        "{after}"
    );
    assert_eq!(delta(closed), REAL, "{after}");
    assert_eq!(delta("redirector_flows_untracked_total"), 0, "{after}");
    // The flood, by name: lookups handed to the listener without a handshake.
    let lookups = delta("redirector_lookups_redirected_total");
    assert!(
        lookups >= 10_000,
        "{lookups} lookups for {sent} stray ACKs:\n{after}"
    );
    assert_eq!(
        state_entries(),
        entries_before,
        "stray segments left entries in the node's maps"
    );
    assert_unharmed(agent, "strays");
}

/// A pod that makes 5,000 user+network namespaces in a loop (children, 32
/// at a time, each listening on the listen port for 50 ms with the pod's
/// claim on its command line): its pod gets `NAMESPACES_PER_POD` served and
/// no more, the rest cost no program load (most are gone before anything
/// reads them; those judged are refused for their pod), and a live-store in
/// another pod is served meanwhile.
#[test]
fn five_thousand_namespaces_made_in_a_loop_cost_only_their_pod() {
    enter_test_cgroup();
    const MADE: u32 = 5000;
    let agent = discovering();
    let hostile = pod("ns-loop");
    let made_file = std::env::temp_dir().join(format!("nb-made-{}", std::process::id()));
    let _ = std::fs::remove_file(&made_file);
    let mut args = vec![format!("[::]:{LISTEN}"), "claim".to_owned()];
    args.push("-target=live-store".to_owned());
    args.push(format!("--unshare-loop={MADE}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let _loop = Process::start_in(
        &hostile.ns,
        Some(&hostile.ctr),
        standin(),
        &args,
        &[("STANDIN_MADE_FILE", made_file.to_str().expect("utf-8"))],
    )
    .expect("the loop starts");
    let refused = "redirector_namespaces_refused_per_pod_total";
    let mut most_programs = 0;
    let done = wait_until(latency_bound(Duration::from_secs(120)), || {
        most_programs = most_programs.max(sample(&metrics(&agent), "redirector_programs_attached"));
        made_file.exists()
    });
    let made: u32 = std::fs::read_to_string(&made_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::remove_file(&made_file);
    assert!(done, "the loop did not finish in time");
    assert_eq!(made, MADE, "namespaces made");
    let body = metrics(&agent);
    eprintln!(
        "{made} namespaces in {:?}: {} refused for their pod, {} inspections dropped, at most {most_programs} programs attached",
        started.elapsed(),
        sample(&body, refused),
        sample(&body, "redirector_pod_inspections_dropped_total"),
    );
    // The pod's own namespace and at most one more: an sk_lookup instance
    // each, and sock_ops on its pod cgroup.
    assert!(
        most_programs <= redirector::agent::NAMESPACES_PER_POD as u64 + 1,
        "{most_programs} programs attached:\n{body}"
    );
    assert!(sample(&body, refused) > 0, "{body}");
    assert_unharmed(agent, "ns-loop");
}
