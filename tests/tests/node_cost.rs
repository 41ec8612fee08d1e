//! What the agent costs the rest of the node, and how it finds live-stores:
//! connections of pods it does not serve run none of its programs; a
//! live-store is served from its bind()/listen(), not from a poll; Tempo
//! components other than live-stores are left alone.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{
    enter_test_cgroup, redirector, redirector_program_runs, request, veth, Agent, Cgroup, Netns,
    Process, RunStats, LIVE_STORE_V4,
};

/// Ports of their own, so nothing else on the machine is discovered.
const LISTEN: &str = "19195";
const ADVERTISE: &str = "22445";

/// A pod cgroup the way kubelet's cgroupfs driver names it, with a
/// container: (the tree, removed on drop; the pod; the container).
fn pod(tag: &str) -> (Cgroup, std::path::PathBuf, std::path::PathBuf) {
    let uid = format!("0f1e2d3c-4b5a-6978-8796-{:012x}", std::process::id());
    let tree = Cgroup::new(&format!("redirector-test-{tag}")).expect("cgroup tree");
    let pod = tree.path.join(format!("pod{uid}"));
    let ctr = pod.join("ctr");
    std::fs::create_dir_all(&ctr).expect("pod and container cgroups");
    (tree, pod, ctr)
}

fn stand_in(ns: &Netns, cgroup: &Path, addr: &str, name: &str, target: &str) -> Process {
    let target = format!("-target={target}");
    Process::start_in(
        ns,
        Some(cgroup),
        env!("CARGO_BIN_EXE_live-store-standin"),
        &[addr, name, &target],
        &[],
    )
    .expect("the stand-in starts")
}

fn discovering(extra: &[&str]) -> Agent {
    let mut args = vec![
        "--discover",
        "--listen-port",
        LISTEN,
        "--advertise-port",
        ADVERTISE,
    ];
    args.extend_from_slice(extra);
    Agent::start(&args).expect("agent with discovery")
}

fn wait_for(agent: &Agent, what: &str, count: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if agent.status().iter().filter(|l| l.contains(what)).count() >= count {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

fn served_locally(ns: &Netns) -> Option<String> {
    request(ns, &format!("127.0.0.1:{ADVERTISE}"), b"x")
        .ok()
        .map(|r| r.server)
}

#[test]
fn bystander_connections_run_none_of_redirectors_programs() {
    enter_test_cgroup();
    let _stats = RunStats::enable().expect("BPF run-time statistics");
    // A served live-store in its pod.
    let (_pod, _, ctr) = pod("bystander");
    let l = Netns::new("by-l").expect("netns");
    let _live_store = stand_in(
        &l,
        &ctr,
        &format!("[::]:{LISTEN}"),
        "live-store",
        "live-store",
    );
    // Two other pods talking to each other: a server in a cgroup of its own,
    // and this test process as their client.
    let other = Cgroup::new("redirector-test-bystander-other").expect("cgroup");
    let (client_ns, server_ns) = (
        Netns::new("by-c").expect("netns"),
        Netns::new("by-s").expect("netns"),
    );
    veth(&client_ns, &server_ns).expect("veth");
    let _other = stand_in(
        &server_ns,
        &other.path,
        "0.0.0.0:8080",
        "other-pod",
        "querier",
    );

    let bystanders = |n: usize| {
        for _ in 0..n {
            let reply = request(&client_ns, &format!("{LIVE_STORE_V4}:8080"), b"x")
                .expect("bystander request");
            assert_eq!(reply.server, "other-pod");
        }
    };

    for scope in ["pod", "root"] {
        let agent = discovering(&["--sock-ops-cgroup", scope]);
        assert!(
            wait_for(
                &agent,
                "attached sk_lookup in netns",
                1,
                Duration::from_secs(5)
            ),
            "{:?}",
            agent.status()
        );
        let before = redirector_program_runs();
        bystanders(50);
        let bystander_runs = redirector_program_runs().0 - before.0;
        // The served pod still gets every program it needs.
        let before = redirector_program_runs();
        for _ in 0..5 {
            assert_eq!(served_locally(&l).as_deref(), Some("live-store"));
        }
        let served_runs = redirector_program_runs().0 - before.0;
        let stopped = agent.stop().expect("agent stops");
        assert_eq!(stopped.counter("flows_opened"), 5, "{scope}");
        assert_eq!(stopped.counter("flows_closed"), 5, "{scope}");
        assert!(
            served_runs >= 10,
            "{scope}: served connections ran {served_runs} programs"
        );
        match scope {
            "pod" => assert_eq!(
                bystander_runs, 0,
                "50 connections between unserved pods ran redirector's programs {bystander_runs} times"
            ),
            // The explicit fallback taxes every connection of the node: what
            // the pod scope saves.
            _ => assert!(bystander_runs >= 50, "root scope: {bystander_runs} runs"),
        }
    }
}

#[test]
fn a_live_store_is_served_from_its_listen_not_from_a_poll() {
    enter_test_cgroup();
    let (_tree, pod_cgroup, ctr) = pod("event");
    // No resync for an hour: only the bind hook can find it.
    let agent = discovering(&["--resync-interval", "3600"]);
    let l = Netns::new("ev").expect("netns");
    let started = Instant::now();
    let _live_store = stand_in(
        &l,
        &ctr,
        &format!("[::]:{LISTEN}"),
        "live-store",
        "live-store",
    );
    let mut answer = None;
    while answer.is_none() && started.elapsed() < Duration::from_secs(2) {
        answer = served_locally(&l);
    }
    assert_eq!(
        answer.as_deref(),
        Some("live-store"),
        "{:?}",
        agent.status()
    );
    // sock_ops went to the pod's cgroup (above the container's), not the root.
    // The state file follows the change by a moment.
    let read_state = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(agent.state_file()).expect("state file"))
            .expect("state JSON")
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut state = read_state();
    while state["namespaces"].as_array().is_none_or(|a| a.is_empty()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
        state = read_state();
    }
    let attached: Vec<&str> = state["sock_ops_attached"]
        .as_array()
        .expect("sock_ops_attached")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(attached, [pod_cgroup.to_str().expect("utf-8")], "{state}");
    // Found by the bind hooks, not by a /proc scan (the fallback scans every
    // second whatever --resync-interval says).
    let events = state["listen_events"].as_str().unwrap_or_default();
    assert!(events.starts_with("post_bind4/post_bind6"), "{state}");
    let why = state["namespaces"][0]["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("-target=live-store on its command line"),
        "{state}"
    );

    // The container restarts in the same pod: sock_ops is already there, and
    // the new listener is served again at once.
    drop(_live_store);
    let _restarted = stand_in(
        &l,
        &ctr,
        &format!("[::]:{LISTEN}"),
        "restarted",
        "live-store",
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while served_locally(&l).as_deref() != Some("restarted") {
        assert!(
            Instant::now() < deadline,
            "the restarted live-store is not served"
        );
    }
    let stopped = agent.stop().expect("agent stops");
    assert!(stopped.counter("flows_opened") >= 2);
}

#[test]
fn only_live_stores_are_served_unless_asked_for_more() {
    enter_test_cgroup();
    let (_pod, _, ctr) = pod("roles");
    let (_querier_pod, _, querier_ctr) = pod("roles-querier");
    let l = Netns::new("role-l").expect("netns");
    let q = Netns::new("role-q").expect("netns");
    let _live_store = stand_in(
        &l,
        &ctr,
        &format!("[::]:{LISTEN}"),
        "live-store",
        "live-store",
    );
    let _querier = stand_in(
        &q,
        &querier_ctr,
        &format!("[::]:{LISTEN}"),
        "querier",
        "querier",
    );

    let agent = discovering(&[]);
    assert!(wait_for(
        &agent,
        "attached sk_lookup in netns",
        1,
        Duration::from_secs(5)
    ));
    assert_eq!(served_locally(&l).as_deref(), Some("live-store"));
    // `status` says why, from the agent's state file.
    let state = agent.state_file().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(2);
    let out = loop {
        let (code, out, err) = redirector(&["status", "--state-file", &state]);
        assert_eq!(code, 0, "{err}");
        if out.contains("serves 1 namespace(s)") || Instant::now() > deadline {
            break out;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(out.contains("sock_ops: pod"), "{out}");
    assert!(
        out.contains("is a Tempo live-store: -target=live-store on its command line"),
        "{out}"
    );
    // Give the querier's namespace every chance: a full resync.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        served_locally(&q),
        None,
        "the querier's namespace was served"
    );
    assert_eq!(
        agent
            .status()
            .iter()
            .filter(|l| l.contains("attached sk_lookup"))
            .count(),
        1,
        "{:?}",
        agent.status()
    );
    drop(agent);

    let agent = discovering(&["--serve-target", "live-store,querier"]);
    assert!(wait_for(
        &agent,
        "attached sk_lookup in netns",
        2,
        Duration::from_secs(5)
    ));
    assert_eq!(served_locally(&q).as_deref(), Some("querier"));
}
