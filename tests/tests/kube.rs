//! `run --kube` against a real API server (etcd + kube-apiserver on loopback,
//! RBAC on, the agent with its own ServiceAccount's token), with the tests
//! playing kubelet: the Pod object first (bound to this node), then its pod
//! cgroup, its sandbox (a process holding a new network namespace), then the
//! container: the real Go live-store, no GODEBUG, so it listens with MPTCP
//! wherever the namespace allows it.

use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{
    enter_test_cgroup, go_live_store_bin, http_get, kube_api, metric, request, veth, wait_until,
    Agent, Cgroup, Netns, Process, LIVE_STORE_V4,
};

const LISTEN: &str = "19495";
const ADVERTISE: &str = "22745";
const LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "tempo"),
    ("app.kubernetes.io/component", "live-store"),
];

/// The API server, the admin's client, the agent's kubeconfig and a kubepods
/// tree of the test's own, removed on drop.
struct Cluster {
    rt: tokio::runtime::Runtime,
    admin: kube::Client,
    kubeconfig: PathBuf,
    node: String,
    /// kubelet's root of pod cgroups, inside `_tree` (the test's own).
    kubepods: PathBuf,
    _tree: Cgroup,
    proxy: Option<kube_api::Proxy>,
    // Last: stopped after everything that talks to it.
    api: kube_api::ApiServer,
}

impl Cluster {
    /// `through_proxy`: the agent reaches the API through a proxy the test can cut.
    fn start(tag: &str, through_proxy: bool) -> Self {
        let api = kube_api::start_api_server(tag, &[]).expect("API server");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let admin = rt
            .block_on(kube_api::admin_client(&api))
            .expect("admin client");
        let proxy = through_proxy.then(|| {
            let upstream = kube_api::url_addr(api.url()).expect("API address");
            rt.block_on(kube_api::Proxy::start(upstream))
                .expect("proxy")
        });
        let url = proxy
            .as_ref()
            .map_or_else(|| api.url().to_owned(), kube_api::Proxy::url);
        let kubeconfig = rt
            .block_on(kube_api::agent_kubeconfig(&api, &admin, &url))
            .expect("the agent's kubeconfig");
        rt.block_on(kube_api::create_namespace(&admin, "tempo"))
            .expect("namespace");
        // The whole tree is removed on drop, the test's own top directory too.
        let tree = Cgroup::new(&format!(
            "redirector-test-kube-{}-{tag}",
            std::process::id()
        ))
        .expect("the test's cgroup tree");
        let kubepods = tree.path.join("kubepods.slice");
        std::fs::create_dir_all(&kubepods).expect("kubepods root");
        Cluster {
            rt,
            admin,
            kubeconfig,
            node: format!("node-{}", std::process::id()),
            kubepods,
            _tree: tree,
            proxy,
            api,
        }
    }

    fn agent(&self) -> Agent {
        let root = self.kubepods.display().to_string();
        Agent::start(&[
            "--kube",
            "--kubeconfig",
            self.kubeconfig.to_str().expect("utf-8"),
            "--node-name",
            &self.node,
            "--kube-cgroup-root",
            &root,
            "--listen-port",
            LISTEN,
            "--advertise-port",
            ADVERTISE,
        ])
        .expect("agent with --kube")
    }

    /// A Pod object on this node (or `node`), with `labels`; its UID.
    fn create_pod(&self, name: &str, labels: &[(&str, &str)], node: Option<&str>) -> String {
        let pod = self
            .rt
            .block_on(kube_api::create_pod(
                &self.admin,
                "tempo",
                name,
                labels,
                node.unwrap_or(&self.node),
            ))
            .expect("pod");
        pod.metadata.uid.expect("uid")
    }

    /// A selected live-store pod on this node, its sandbox started, and a
    /// querier namespace wired to it.
    fn live_store_pod(&self, name: &str, tag: &str) -> (FakePod, Netns) {
        let uid = self.create_pod(name, &LABELS, None);
        let pod = FakePod::start(self, &uid, tag);
        let client = Netns::new(&format!("{tag}-q")).expect("client netns");
        veth(&client, &pod.ns).expect("veth");
        (pod, client)
    }

    fn delete_pod(&self, name: &str) {
        self.rt
            .block_on(kube_api::delete_pod(&self.admin, "tempo", name, Some(0)))
            .expect("delete pod");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nothing else talks to the server now.
        let _ = (&self.api, &self.proxy);
    }
}

/// What kubelet and the runtime make for a pod: its cgroup (BestEffort, the
/// systemd driver's names), a sandbox holding a new network namespace, and
/// the containers, started later.
struct FakePod {
    uid: String,
    ns: Netns,
    cgroup: PathBuf,
    sandbox: Child,
}

impl FakePod {
    /// The pod cgroup and its sandbox, as kubelet and the runtime create them.
    fn start(cluster: &Cluster, uid: &str, tag: &str) -> Self {
        let cgroup = cluster
            .kubepods
            .join("kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        let pause = cgroup.join("cri-containerd-sandbox.scope");
        std::fs::create_dir_all(&pause).expect("pod and sandbox cgroups");
        let ns = Netns::new(tag).expect("netns");
        let sandbox = spawn_in(&ns, &pause, "sleep", &["3600"]);
        FakePod {
            uid: uid.to_owned(),
            ns,
            cgroup,
            sandbox,
        }
    }

    /// A container's cgroup (created once).
    fn container(&self, name: &str) -> PathBuf {
        let dir = self.cgroup.join(format!("cri-containerd-{name}.scope"));
        std::fs::create_dir_all(&dir).expect("container cgroup");
        dir
    }

    /// The real Go live-store as the pod's container: Go's defaults, no GODEBUG.
    fn go_live_store(&self, name: &str) -> Process {
        let ctr = self.container("tempo");
        Process::start_in(
            &self.ns,
            Some(&ctr),
            go_live_store_bin().to_str().expect("utf-8"),
            &[&format!(":{LISTEN}"), name],
            &[],
        )
        .expect("the Go live-store starts")
    }

    fn mptcp_enabled(&self) -> String {
        self.ns.run(|| {
            std::fs::read_to_string("/proc/sys/net/mptcp/enabled")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        })
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.sandbox.kill();
        let _ = self.sandbox.wait();
        let _ = &self.uid;
    }
}

/// `program args` in network namespace `ns` and cgroup `cgroup`, entered in
/// that order before it runs, as a runtime starts a sandbox: its first moment
/// in the pod's cgroup is already in the pod's namespace.
fn spawn_in(ns: &Netns, cgroup: &Path, program: &str, args: &[&str]) -> Child {
    let netns = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file");
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .expect("path");
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: setns/open/write/close are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let f = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if f < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(f, b"0".as_ptr().cast(), 1) == 1;
            libc::close(f);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let child = cmd.spawn().expect("sandbox process");
    drop(netns);
    child
}

/// Which server answers on the advertised port from `client`, if any.
fn served_from(client: &Netns) -> Option<String> {
    request(client, &format!("{LIVE_STORE_V4}:{ADVERTISE}"), b"x")
        .ok()
        .map(|r| r.server)
}

fn status(agent: &Agent) -> String {
    let (code, out, err) = redirector_tests::redirector(&[
        "status",
        "--state-file",
        agent.state_file().to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "status: {err}");
    out
}

/// Waits until `status` lists pod `label` as served (sandbox only: no
/// container yet), then checks MPTCP is off in its namespace.
fn await_served(agent: &Agent, label: &str, pod: &FakePod) {
    assert!(
        wait_until(Duration::from_secs(5), || status(agent).contains(label)),
        "pod {label} not served 5 s after its sandbox started: {}\n{:?}",
        status(agent),
        agent.status()
    );
    assert_eq!(
        pod.mptcp_enabled(),
        "0",
        "net.mptcp.enabled in {label} before its container started"
    );
}

/// The agent's flow records (JSON on its stdout) of pod tempo/live-store-1.
fn pod_records(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .stdout()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["pod"] == "tempo/live-store-1")
        .collect()
}

/// One connection attempt every millisecond from `client` to the advertised
/// port until stopped: (when, whether it was answered by the live-store).
fn load(client: &Netns, stop: &AtomicBool) -> Vec<(Instant, bool)> {
    let addr: std::net::SocketAddr = format!("{LIVE_STORE_V4}:{ADVERTISE}")
        .parse()
        .expect("addr");
    client.run(|| {
        let mut out = Vec::new();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let ok =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok();
            out.push((Instant::now(), ok));
            next += Duration::from_millis(1);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        out
    })
}

/// (1) A new pod is served from its first connection: the agent learns of
/// the pod from the API, serves its namespace while only the sandbox runs
/// (MPTCP off there, `sk_lookup` attached, `sock_ops` on the pod cgroup), so
/// the Go live-store listens with TCP and is registered in the kernel at
/// listen(). Under a load of 1,000 connections a second started before the
/// container, no connection is refused once the first one is answered.
#[test]
fn a_new_pod_is_served_from_its_first_connection() {
    enter_test_cgroup();
    let cluster = Cluster::start("first", false);
    let agent = cluster.agent();
    let (pod, client) = cluster.live_store_pod("live-store-0", "k-first");
    // Served before any container runs: MPTCP is off in the pod already.
    await_served(&agent, "tempo/live-store-0", &pod);
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = thread::scope(|s| {
        let loader = s.spawn(|| load(&client, &stop));
        thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let live_store = pod.go_live_store("live-store-0");
        let listening = Instant::now();
        thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let attempts = loader.join().expect("load thread");
        drop(live_store);
        (started, listening, attempts)
    });
    let (started, listening, attempts) = attempts;
    let first_ok = attempts
        .iter()
        .position(|(_, ok)| *ok)
        .unwrap_or_else(|| panic!("no connection answered; agent: {:?}", agent.status()));
    let refused_after = attempts[first_ok..].iter().filter(|(_, ok)| !ok).count();
    let refused_before = first_ok;
    let answered = attempts.len() - first_ok - refused_after;
    let gap = attempts[first_ok].0.saturating_duration_since(listening);
    eprintln!(
        "{} attempts: {refused_before} refused before the live-store listened ({:?} to start it), \
         first answered {gap:?} after its \"listening\" line, then {answered} answered and {refused_after} refused",
        attempts.len(),
        listening - started
    );
    assert_eq!(
        refused_after,
        0,
        "connections refused after the first was answered; agent: {:?}",
        agent.status()
    );
    assert!(answered >= 500, "only {answered} answered");
    let stopped = agent.stop().expect("agent stops");
    assert!(
        stopped.counter("flows_opened") >= answered as u64,
        "{:?}",
        stopped.stderr
    );
}

/// (2) A pod the selector does not match is not served, whatever its process
/// claims on its command line; (3) container restarts keep the pod served
/// from the kernel's registration, and deleting the pod undoes everything
/// (MPTCP back on, `sk_lookup` gone).
#[test]
fn only_selected_pods_are_served_through_restarts_until_deleted() {
    enter_test_cgroup();
    let cluster = Cluster::start("select", false);
    let agent = cluster.agent();
    // The impostor: a querier pod whose process says -target=live-store.
    let uid = cluster.create_pod(
        "querier-0",
        &[
            ("app.kubernetes.io/name", "tempo"),
            ("app.kubernetes.io/component", "querier"),
        ],
        None,
    );
    let impostor = FakePod::start(&cluster, &uid, "k-imp");
    let ctr = impostor.container("querier");
    let _claim = Process::start_in(
        &impostor.ns,
        Some(&ctr),
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[&format!("[::]:{LISTEN}"), "impostor", "-target=live-store"],
        &[],
    )
    .expect("impostor");
    // A live-store pod on another node: not ours either.
    let elsewhere = cluster.create_pod("live-store-9", &LABELS, Some("other-node"));
    let _elsewhere = FakePod::start(&cluster, &elsewhere, "k-else");

    let (pod, client) = cluster.live_store_pod("live-store-1", "k-sel");
    await_served(&agent, "tempo/live-store-1", &pod);
    let first = pod.go_live_store("live-store-1");
    assert_eq!(served_from(&client).as_deref(), Some("live-store-1"));
    let text = status(&agent);
    assert!(text.contains("tempo/live-store-1"), "{text}");
    let series = format!(
        "redirector_pod_served{{namespace=\"tempo\",pod=\"live-store-1\",node=\"{}\"}} 1",
        cluster.node
    );
    let body = http_get(&agent.metrics_url("/metrics")).1;
    assert!(body.contains(&series), "{series} not in:\n{body}");
    assert_eq!(body.matches("redirector_pod_served{").count(), 1, "{body}");
    assert!(!text.contains("querier-0"), "{text}");
    assert!(!text.contains("live-store-9"), "{text}");
    assert_eq!(
        impostor.mptcp_enabled(),
        "1",
        "the impostor's namespace was touched"
    );

    // A container restart: the new process is registered by sock_ops at listen().
    drop(first);
    let _second = pod.go_live_store("live-store-1b");
    assert_eq!(served_from(&client).as_deref(), Some("live-store-1b"));

    // (6) Records name the pod and carry one flow id from open to close;
    // `redirector flows --pod` keeps that pod's.
    assert!(
        wait_until(Duration::from_secs(3), || {
            pod_records(&agent)
                .iter()
                .filter(|r| r["event"] == "close")
                .count()
                >= 2
        }),
        "{:?}",
        agent.stdout()
    );
    let records = pod_records(&agent);
    for close in records.iter().filter(|r| r["event"] == "close") {
        let id = close["flow_id"].as_u64().expect("flow_id");
        assert!(
            records
                .iter()
                .any(|r| r["event"] == "open" && r["flow_id"].as_u64() == Some(id)),
            "no open record with flow_id {id}: {records:?}"
        );
    }
    for (filter, want) in [
        (["--pod", "live-store-1"], records.len()),
        (["--pod", "tempo/live-store-1"], records.len()),
        (["--namespace", "tempo"], records.len()),
        (["--pod", "querier-0"], 0),
    ] {
        let mut args = vec!["flows", "--last", "100", "--output", "json"];
        args.extend(filter);
        let (code, out, err) = redirector_tests::redirector(&args);
        assert_eq!(code, 0, "{err}");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON record"))
            .collect();
        assert_eq!(lines.len(), want, "{filter:?}: {out}");
        assert!(lines.iter().all(|r| r["pod"] == "tempo/live-store-1"));
    }

    // Deleted: the redirect, sk_lookup and the MPTCP setting go.
    cluster.delete_pod("live-store-1");
    assert!(
        wait_until(Duration::from_secs(5), || pod.mptcp_enabled() == "1"),
        "MPTCP not restored after the pod's deletion; agent: {:?}",
        agent.status()
    );
    assert_eq!(served_from(&client), None);
    let text = status(&agent);
    assert!(!text.contains("live-store-1"), "{text}");
    let body = http_get(&agent.metrics_url("/metrics")).1;
    assert!(!body.contains("redirector_pod_served{"), "{body}");
    // sk_lookup and the pod's sock_ops detached (the gauge is read at most
    // once a second).
    assert!(
        wait_until(Duration::from_secs(3), || {
            let (_, body) = http_get(&agent.metrics_url("/metrics"));
            metric(&body, "redirector_programs_attached") == 0
        }),
        "{}",
        http_get(&agent.metrics_url("/metrics")).1
    );
    agent.stop().expect("agent stops");
}

/// (4) The API unreachable for 30 s: what is served stays served; a pod
/// created meanwhile is served once the API answers again.
#[test]
fn an_unreachable_api_changes_nothing_served() {
    enter_test_cgroup();
    let cluster = Cluster::start("cut", true);
    let agent = cluster.agent();
    let (pod, client) = cluster.live_store_pod("live-store-2", "k-cut");
    await_served(&agent, "tempo/live-store-2", &pod);
    let _ls = pod.go_live_store("live-store-2");
    assert_eq!(
        served_from(&client).as_deref(),
        Some("live-store-2"),
        "{:?}",
        agent.status()
    );

    let proxy = cluster.proxy.as_ref().expect("proxy");
    proxy.cut();
    let late = cluster.create_pod("live-store-3", &LABELS, None);
    let late_pod = FakePod::start(&cluster, &late, "k-late");
    let cut_at = Instant::now();
    while cut_at.elapsed() < Duration::from_secs(30) {
        assert_eq!(
            served_from(&client).as_deref(),
            Some("live-store-2"),
            "{:?} into the outage",
            cut_at.elapsed()
        );
        thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(late_pod.mptcp_enabled(), "1", "served without the API?");
    proxy.restore();
    let restored = Instant::now();
    assert!(
        wait_until(Duration::from_secs(40), || late_pod.mptcp_enabled() == "0"),
        "the pod created during the outage not served 40 s after the API returned; agent: {:?}",
        agent.status()
    );
    eprintln!(
        "pod created during a 30 s outage served {:?} after the API returned",
        restored.elapsed()
    );
    assert_eq!(served_from(&client).as_deref(), Some("live-store-2"));
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
}

/// CPU time (user + system) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 here.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// (5) 200 live-store pods on the node: every one served from its sandbox,
/// and the agent idle afterwards (no polling: < 0.5% of a core).
#[test]
fn two_hundred_pods_are_all_served_and_the_agent_idles() {
    enter_test_cgroup();
    const PODS: usize = 200;
    let cluster = Cluster::start("many", false);
    let agent = cluster.agent();
    let started = Instant::now();
    let pods: Vec<FakePod> = (0..PODS)
        .map(|i| {
            let uid = cluster.create_pod(&format!("live-store-{i}"), &LABELS, None);
            FakePod::start(&cluster, &uid, &format!("k-m{i}"))
        })
        .collect();
    let all_served = wait_until(Duration::from_secs(60), || {
        pods.iter().all(|p| p.mptcp_enabled() == "0")
    });
    let unserved = pods.iter().filter(|p| p.mptcp_enabled() != "0").count();
    assert!(
        all_served,
        "{unserved} of {PODS} pods not served 60 s after the last was created; agent: {:?}",
        agent.status()
    );
    eprintln!("{PODS} pods created and served in {:?}", started.elapsed());
    // MPTCP is turned off just before sk_lookup is attached and the state
    // file written: status follows within moments.
    assert!(
        wait_until(Duration::from_secs(3), || status(&agent)
            .matches("selected by the Kubernetes API")
            .count()
            == PODS),
        "{}",
        status(&agent)
    );
    // Idle: nothing changes on the node for 10 s.
    thread::sleep(Duration::from_secs(2));
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(agent.pid());
    let window = Duration::from_secs(10);
    thread::sleep(window);
    let used = (cpu_ticks(agent.pid()) - before) as f64 / ticks_per_sec;
    let share = used / window.as_secs_f64() * 100.0;
    eprintln!("agent CPU while idle with {PODS} pods served: {share:.2}% of a core");
    assert!(share < 0.5, "agent idle CPU {share:.2}% of a core");
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
}
