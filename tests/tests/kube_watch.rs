//! The agent's Pod watcher (`discovery::kube::watch`) against a real
//! kube-apiserver 1.20 + etcd on loopback (`cargo xtask kube-api` builds
//! them once), always as the agent's own ServiceAccount with get/list/watch
//! on pods and nothing more: the selection the API server makes, what RBAC
//! allows, and what the watcher reports through an API server restart and a
//! 410 Gone.
//!
//! No BPF, no privileges: `cargo test --release -p redirector-tests --test
//! kube_watch -- --test-threads=1`. Each test has its own server, stopped and
//! removed on drop, even when the test fails.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    api::{ListParams, PostParams, WatchEvent, WatchParams},
    Api, Client,
};
use redirector::discovery::kube::watch::{self, PodEvent, PodInfo, Selector, DEFAULT_LABELS};
use redirector_tests::kube_api::{self, ApiServer, Proxy};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::StreamExt;

const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";

/// What the tempo-distributed chart puts on a live-store pod (the part a
/// selector can rely on).
const LIVE_STORE: &[(&str, &str)] = &[
    ("app.kubernetes.io/name", "tempo"),
    ("app.kubernetes.io/instance", "tempo"),
    ("app.kubernetes.io/component", "live-store"),
    ("app.kubernetes.io/part-of", "memberlist"),
];
/// Another Tempo component of the same release on the same node.
const INGESTER: &[(&str, &str)] = &[
    ("app.kubernetes.io/name", "tempo"),
    ("app.kubernetes.io/instance", "tempo"),
    ("app.kubernetes.io/component", "ingester"),
];

/// How long one expected event may take (the API server answers in
/// milliseconds; the margin is for a loaded machine).
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A server, its admin, and the agent's kubeconfig for it. The server is
/// last so that it is dropped last: the admin's connections are gone by
/// then rather than keeping a SIGTERMed API server waiting on them.
struct Cluster {
    admin: Client,
    agent_kubeconfig: std::path::PathBuf,
    server: ApiServer,
}

/// Starts a server for one test. Called from the test's own thread (the
/// body of a multi-thread tokio test runs there), which the server's
/// processes are tied to.
async fn cluster(name: &str, apiserver_args: &[&str]) -> Cluster {
    let started = Instant::now();
    let server = kube_api::start_api_server(name, apiserver_args)
        .unwrap_or_else(|e| panic!("starting the API server: {e:#}"));
    eprintln!(
        "{name}: kube-apiserver ready in {:.1} s at {}",
        started.elapsed().as_secs_f64(),
        server.url()
    );
    let admin = kube_api::admin_client(&server)
        .await
        .unwrap_or_else(|e| panic!("admin client: {e:#}"));
    let url = server.url().to_owned();
    let agent_kubeconfig = kube_api::agent_kubeconfig(&server, &admin, &url)
        .await
        .unwrap_or_else(|e| panic!("the agent's ServiceAccount: {e:#}"));
    Cluster {
        admin,
        agent_kubeconfig,
        server,
    }
}

fn selector(namespaces: &[&str]) -> Selector {
    Selector {
        node: NODE.into(),
        labels: DEFAULT_LABELS.into(),
        namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
    }
}

/// A running `watch::run` as the agent's ServiceAccount, and everything it
/// reported so far (quoted when an expectation fails).
struct Watching {
    rx: mpsc::Receiver<PodEvent>,
    task: JoinHandle<()>,
    seen: Vec<PodEvent>,
}

impl Watching {
    async fn start(kubeconfig: &Path, selector: Selector) -> Self {
        let client = kube_api::client_from(kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("the agent's client: {e:#}"));
        // Small, as the agent's: the watcher must cope with backpressure.
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(watch::run(client, selector, tx));
        Self {
            rx,
            task,
            seen: Vec::new(),
        }
    }

    /// The next event, within `within`.
    async fn next(&mut self, within: Duration, waiting_for: &str) -> PodEvent {
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(event)) => {
                self.seen.push(event.clone());
                event
            }
            Ok(None) => panic!(
                "the watcher stopped while waiting for {waiting_for}; it reported {:#?}",
                self.seen
            ),
            Err(_) => panic!(
                "no {waiting_for} within {} s; the watcher reported {:#?}",
                within.as_secs(),
                self.seen
            ),
        }
    }

    /// Events until `wanted` says yes, all within `within`.
    async fn until<T>(
        &mut self,
        within: Duration,
        waiting_for: &str,
        mut wanted: impl FnMut(&PodEvent) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next(left, waiting_for).await;
            if let Some(found) = wanted(&event) {
                return found;
            }
        }
    }

    /// No event for `quiet`.
    async fn silent_for(&mut self, quiet: Duration) {
        if let Ok(Some(event)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            panic!(
                "unexpected {event:?}; the watcher reported before: {:#?}",
                self.seen
            );
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// namespace/name of each pod, sorted.
fn names(pods: &[PodInfo]) -> Vec<String> {
    let mut names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    names.sort();
    names
}

fn mentions(event: &PodEvent, namespace: &str, name: &str) -> bool {
    let is = |p: &PodInfo| p.namespace == namespace && p.name == name;
    match event {
        PodEvent::Applied(p) | PodEvent::Deleted(p) => is(p),
        PodEvent::Synced { pods, .. } => pods.iter().any(is),
        PodEvent::Error(_) => false,
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

async fn create(
    admin: &Client,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
) -> Pod {
    kube_api::create_pod(admin, namespace, name, labels, node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn status(admin: &Client, namespace: &str, name: &str, qos: &str, phase: &str) -> Pod {
    kube_api::set_pod_status(admin, namespace, name, Some(qos), Some(phase))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn delete(admin: &Client, namespace: &str, name: &str, grace: Option<u32>) {
    kube_api::delete_pod(admin, namespace, name, grace)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Pods on this node with the live-store labels are reported: all of them
/// in one Synced at the start, then each change; pods on another node or
/// of another component never, in any event. With namespaces, one Synced per
/// namespace, scoped to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_live_store_pods_of_this_node_only() {
    let c = cluster("selection", &[]).await;
    let admin = &c.admin;
    for namespace in ["tempo", "monitoring"] {
        kube_api::create_namespace(admin, namespace).await.unwrap();
    }
    create(admin, "tempo", "live-store-0", LIVE_STORE, NODE).await;
    let served = status(admin, "tempo", "live-store-0", "Guaranteed", "Running").await;
    create(admin, "monitoring", "live-store-0", LIVE_STORE, NODE).await;
    // Never to be reported, before the watch and during it.
    let mut never = vec![
        ("tempo", "live-store-1"),
        ("tempo", "ingester-0"),
        ("tempo", "unlabelled-0"),
    ];
    create(admin, "tempo", "live-store-1", LIVE_STORE, OTHER_NODE).await;
    create(admin, "tempo", "ingester-0", INGESTER, NODE).await;
    create(admin, "tempo", "unlabelled-0", &[], NODE).await;

    let mut w = Watching::start(&c.agent_kubeconfig, selector(&[])).await;
    let first = w.next(EVENT_TIMEOUT, "the first Synced").await;
    let PodEvent::Synced { scope, pods } = first else {
        panic!("the first event is not a Synced: {first:?}");
    };
    assert_eq!(scope, None);
    assert_eq!(
        names(&pods),
        ["monitoring/live-store-0", "tempo/live-store-0"]
    );
    let info = pods
        .iter()
        .find(|p| p.namespace == "tempo")
        .expect("tempo/live-store-0");
    assert_eq!(
        *info,
        PodInfo {
            uid: uid(&served),
            namespace: "tempo".into(),
            name: "live-store-0".into(),
            node: NODE.into(),
            qos_class: Some("Guaranteed".into()),
            phase: Some("Running".into()),
            deleting: false,
        }
    );

    // A new live-store: Applied as the API server created it.
    let new = create(admin, "tempo", "live-store-2", LIVE_STORE, NODE).await;
    let event = w.next(EVENT_TIMEOUT, "Applied(tempo/live-store-2)").await;
    assert_eq!(
        event,
        PodEvent::Applied(PodInfo {
            uid: uid(&new),
            namespace: "tempo".into(),
            name: "live-store-2".into(),
            node: NODE.into(),
            qos_class: Some("BestEffort".into()),
            phase: Some("Pending".into()),
            deleting: false,
        })
    );

    // Changes to pods that do not match, and new ones that do not.
    never.push(("tempo", "live-store-3"));
    never.push(("tempo", "ingester-1"));
    create(admin, "tempo", "live-store-3", LIVE_STORE, OTHER_NODE).await;
    create(admin, "tempo", "ingester-1", INGESTER, NODE).await;
    status(admin, "tempo", "live-store-1", "Burstable", "Running").await;
    delete(admin, "tempo", "ingester-0", Some(0)).await;

    // The kubelet's report, then a graceful deletion (the pod stays,
    // terminating, until the kubelet would finish it), then the end.
    status(admin, "tempo", "live-store-2", "Burstable", "Running").await;
    let event = w.next(EVENT_TIMEOUT, "Applied(live-store-2 Running)").await;
    assert!(
        matches!(&event, PodEvent::Applied(p) if p.name == "live-store-2"
            && p.phase.as_deref() == Some("Running")
            && p.qos_class.as_deref() == Some("Burstable")
            && !p.deleting),
        "{event:?}"
    );
    delete(admin, "tempo", "live-store-2", None).await;
    let event = w
        .next(EVENT_TIMEOUT, "Applied(live-store-2 deleting)")
        .await;
    assert!(
        matches!(&event, PodEvent::Applied(p) if p.name == "live-store-2" && p.deleting),
        "{event:?}"
    );
    // Forced: the grace period goes to 0 (one more change, still
    // terminating), then the pod is gone.
    delete(admin, "tempo", "live-store-2", Some(0)).await;
    let gone = w
        .until(EVENT_TIMEOUT, "Deleted(live-store-2)", |e| match e {
            PodEvent::Applied(p) if p.name == "live-store-2" && p.deleting => None,
            other => Some(other.clone()),
        })
        .await;
    assert!(
        matches!(&gone, PodEvent::Deleted(p) if p.name == "live-store-2" && p.uid == uid(&new)),
        "{gone:?}"
    );

    // A marker after everything that must not be reported: watch events
    // come in resourceVersion order, so any of them would be before it.
    create(admin, "tempo", "live-store-9", LIVE_STORE, NODE).await;
    w.until(EVENT_TIMEOUT, "Applied(live-store-9)", |e| {
        matches!(e, PodEvent::Applied(p) if p.name == "live-store-9").then_some(())
    })
    .await;
    for event in &w.seen {
        assert!(
            !matches!(event, PodEvent::Error(_)),
            "an error while the server was up: {event:?}"
        );
        for (namespace, name) in &never {
            assert!(
                !mentions(event, namespace, name),
                "{namespace}/{name} does not match but was reported: {event:?}"
            );
        }
    }
    w.silent_for(Duration::from_secs(1)).await;

    // One watcher per namespace, each with a Synced of its own scope; a
    // namespace that does not exist is an empty one.
    let mut scoped = Watching::start(&c.agent_kubeconfig, selector(&["tempo", "absent"])).await;
    let mut synced = BTreeMap::new();
    while synced.len() < 2 {
        match scoped.next(EVENT_TIMEOUT, "a Synced per namespace").await {
            PodEvent::Synced { scope, pods } => {
                synced.insert(scope, names(&pods));
            }
            other => panic!("before both Synced: {other:?}"),
        }
    }
    assert_eq!(
        synced,
        BTreeMap::from([
            (Some("absent".to_owned()), vec![]),
            (
                Some("tempo".to_owned()),
                vec![
                    "tempo/live-store-0".to_owned(),
                    "tempo/live-store-9".to_owned()
                ]
            ),
        ])
    );
}

/// The ServiceAccount may read pods and nothing else (403 on writes and on
/// other resources), and that is enough for the watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_account_only_reads_pods_and_that_suffices() {
    let c = cluster("rbac", &[]).await;
    kube_api::create_namespace(&c.admin, "tempo").await.unwrap();
    create(&c.admin, "tempo", "live-store-0", LIVE_STORE, NODE).await;
    let agent = kube_api::client_from(&c.agent_kubeconfig).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(agent.clone(), "tempo");

    let forbidden = |what: &str, result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what} as the agent: expected 403 Forbidden, got {other:?}"),
    };
    let pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "intruder", "labels": {"app.kubernetes.io/component": "live-store"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap();
    forbidden(
        "creating a pod",
        pods.create(&PostParams::default(), &pod).await.map(drop),
    );
    forbidden(
        "deleting a pod",
        pods.delete("live-store-0", &Default::default())
            .await
            .map(drop),
    );
    forbidden(
        "setting a pod's status",
        pods.patch_status(
            "live-store-0",
            &Default::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"phase": "Failed"}})),
        )
        .await
        .map(drop),
    );
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), "kube-system");
    forbidden(
        "listing secrets",
        secrets.list(&ListParams::default()).await.map(drop),
    );

    // What it may do: read pods, anywhere.
    let all: Api<Pod> = Api::all(agent.clone());
    let listed = all
        .list(&ListParams::default())
        .await
        .expect("listing pods");
    assert_eq!(listed.items.len(), 1);
    pods.get("live-store-0").await.expect("getting a pod");

    let mut w = Watching::start(&c.agent_kubeconfig, selector(&[])).await;
    let first = w.next(EVENT_TIMEOUT, "the first Synced").await;
    assert!(
        matches!(&first, PodEvent::Synced { scope: None, pods } if names(pods) == ["tempo/live-store-0"]),
        "{first:?}"
    );
    create(&c.admin, "tempo", "live-store-1", LIVE_STORE, NODE).await;
    let event = w.next(EVENT_TIMEOUT, "Applied(live-store-1)").await;
    assert!(
        matches!(&event, PodEvent::Applied(p) if p.name == "live-store-1"),
        "{event:?}"
    );
}

/// The API server stops (etcd and its data stay) and comes back on the same
/// port: the watcher reports the outage as an Error, keeps retrying, and
/// once the server is back lists again (the new server's watch cache starts
/// after the watcher's resourceVersion: 410 Gone, reported too), with a
/// Synced that has the pod created after the restart, within 30 s of it.
///
/// The watcher reaches the server through a `Proxy`, which holds it off from
/// the restart until that pod exists: so the relist comes after the create,
/// as it does whenever the watcher's next retry comes after it; otherwise the
/// race between the two would decide between "in the Synced" and "Applied
/// right after it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_an_api_server_restart() {
    let mut c = cluster("restart", &[]).await;
    kube_api::create_namespace(&c.admin, "tempo").await.unwrap();
    create(&c.admin, "tempo", "live-store-0", LIVE_STORE, NODE).await;
    let proxy = Proxy::start(kube_api::url_addr(c.server.url()).unwrap())
        .await
        .unwrap();
    let token = kube_api::agent_token(&c.admin).await.unwrap();
    let kubeconfig = c.server.work_dir().join("agent-via-proxy.kubeconfig");
    kube_api::write_token_kubeconfig(&kubeconfig, &proxy.url(), c.server.ca_path(), &token)
        .unwrap();
    let mut w = Watching::start(&kubeconfig, selector(&[])).await;
    let first = w.next(EVENT_TIMEOUT, "the first Synced").await;
    assert!(
        matches!(&first, PodEvent::Synced { pods, .. } if names(pods) == ["tempo/live-store-0"]),
        "{first:?}"
    );

    let stopping = Instant::now();
    c.server.stop_apiserver();
    let stopped = Instant::now();
    eprintln!(
        "restart: kube-apiserver stopped in {:.1} s",
        stopped.duration_since(stopping).as_secs_f64()
    );
    let error = w
        .until(
            EVENT_TIMEOUT,
            "an Error while the API server is down",
            |e| match e {
                PodEvent::Error(message) => Some(message.clone()),
                _ => None,
            },
        )
        .await;
    eprintln!(
        "restart: Error {:.1} s after the stop: {error}",
        stopped.elapsed().as_secs_f64()
    );
    assert_eq!(
        w.seen.len(),
        2,
        "only an Error since the Synced: {:#?}",
        w.seen
    );
    proxy.cut();
    // Down for 5 s.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed())).await;

    let restarting = Instant::now();
    c.server
        .restart_apiserver()
        .unwrap_or_else(|e| panic!("restarting the API server: {e:#}"));
    let restarted = Instant::now();
    eprintln!(
        "restart: down {:.1} s; kube-apiserver ready again in {:.1} s",
        restarting.duration_since(stopped).as_secs_f64(),
        restarted.duration_since(restarting).as_secs_f64()
    );
    let after = create(&c.admin, "tempo", "live-store-1", LIVE_STORE, NODE).await;
    proxy.restore();

    let before = w.seen.len();
    let deadline = restarted + Duration::from_secs(30);
    let relisted = w
        .until(
            deadline.saturating_duration_since(Instant::now()),
            "a Synced within 30 s of the restart",
            |e| match e {
                PodEvent::Synced { pods, .. } => Some(pods.clone()),
                _ => None,
            },
        )
        .await;
    let since = &w.seen[before..];
    eprintln!(
        "restart: Synced {:.1} s after the restart; since the restart: {since:?}",
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(
        names(&relisted),
        ["tempo/live-store-0", "tempo/live-store-1"]
    );
    let new = relisted.iter().find(|p| p.name == "live-store-1").unwrap();
    assert_eq!(new.uid, uid(&after));
    assert_a_relist(since, |m| m.contains("(code 410)"));
}

/// A watcher cut off while the cluster changes and etcd compacts past its
/// resourceVersion gets 410 Gone when it reconnects, lists again and reports
/// the set as it is now in one Synced: the pod deleted meanwhile is not in
/// it, the one created meanwhile is. The watch cache is off for pods
/// (`--watch-cache-sizes=pods#0`), so that watches are served by etcd and its
/// compaction decides what is too old; with the cache on, only its own
/// window does (102400 events, or 75 s), which a test cannot wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relists_after_410_gone() {
    let c = cluster("gone", &["--watch-cache-sizes=pods#0"]).await;
    let admin = &c.admin;
    kube_api::create_namespace(admin, "tempo").await.unwrap();
    create(admin, "tempo", "live-store-0", LIVE_STORE, NODE).await;
    create(admin, "tempo", "live-store-1", LIVE_STORE, NODE).await;

    let proxy = Proxy::start(kube_api::url_addr(c.server.url()).unwrap())
        .await
        .unwrap();
    let token = kube_api::agent_token(admin).await.unwrap();
    let kubeconfig = c.server.work_dir().join("agent-via-proxy.kubeconfig");
    kube_api::write_token_kubeconfig(&kubeconfig, &proxy.url(), c.server.ca_path(), &token)
        .unwrap();
    let mut w = Watching::start(&kubeconfig, selector(&[])).await;
    let first = w.next(EVENT_TIMEOUT, "the first Synced").await;
    assert!(
        matches!(&first, PodEvent::Synced { pods, .. } if names(pods) == ["tempo/live-store-0", "tempo/live-store-1"]),
        "{first:?}"
    );
    // The newest resourceVersion the watcher can hold: anything it saw is
    // at most this.
    let pods: Api<Pod> = Api::all(admin.clone());
    let seen_rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    proxy.cut();
    let cut_error = w
        .until(EVENT_TIMEOUT, "an Error once cut off", |e| match e {
            PodEvent::Error(m) => Some(m.clone()),
            _ => None,
        })
        .await;
    eprintln!("gone: cut off: {cut_error}");

    // Meanwhile: one pod goes, one comes, one changes, and the rest of the
    // cluster writes on (other nodes' pods) past the compaction.
    delete(admin, "tempo", "live-store-0", Some(0)).await;
    let came = create(admin, "tempo", "live-store-2", LIVE_STORE, NODE).await;
    status(admin, "tempo", "live-store-1", "Guaranteed", "Running").await;
    for i in 0..50 {
        create(
            admin,
            "tempo",
            &format!("elsewhere-{i}"),
            LIVE_STORE,
            OTHER_NODE,
        )
        .await;
    }
    let revision = kube_api::etcd_compact(c.server.etcd_url()).unwrap();
    eprintln!("gone: etcd compacted at revision {revision}; the watcher's is at most {seen_rv}");

    // The precondition, checked rather than assumed: a watch from where the
    // watcher was is now answered 410 Gone.
    let mut stream = Box::pin(
        pods.watch(&WatchParams::default().timeout(10), &seen_rv)
            .await
            .expect("a watch from the old resourceVersion"),
    );
    match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(WatchEvent::Error(status)))) => {
            assert_eq!(status.code, 410, "{status:?}")
        }
        other => {
            panic!("a watch from resourceVersion {seen_rv} was not answered 410 Gone: {other:?}")
        }
    }
    drop(stream);

    let before = w.seen.len();
    proxy.restore();
    let relisted = w
        .until(
            Duration::from_secs(60),
            "a Synced after the 410",
            |e| match e {
                PodEvent::Synced { pods, .. } => Some(pods.clone()),
                _ => None,
            },
        )
        .await;
    let after = &w.seen[before..];
    eprintln!("gone: after reconnecting: {after:#?}");
    assert_eq!(
        names(&relisted),
        ["tempo/live-store-1", "tempo/live-store-2"],
        "the relist is the set as it is now"
    );
    let one = relisted.iter().find(|p| p.name == "live-store-1").unwrap();
    assert_eq!(one.phase.as_deref(), Some("Running"));
    assert_eq!(one.qos_class.as_deref(), Some("Guaranteed"));
    let two = relisted.iter().find(|p| p.name == "live-store-2").unwrap();
    assert_eq!(two.uid, uid(&came));
    // A relist, not a resumed watch: no event about the pods changed while
    // cut off came before the Synced, and the 410 was reported.
    assert_a_relist(after, |m| m.contains("410") || m.contains("too old"));
    // And the watch goes on from the relist.
    create(admin, "tempo", "live-store-3", LIVE_STORE, NODE).await;
    w.until(EVENT_TIMEOUT, "Applied(live-store-3)", |e| {
        matches!(e, PodEvent::Applied(p) if p.name == "live-store-3").then_some(())
    })
    .await;
}

/// A relist, not a resumed watch: only errors and lists among `events`, and
/// an error that `gone` recognises as the 410.
fn assert_a_relist(events: &[PodEvent], gone: impl Fn(&str) -> bool) {
    assert!(
        events
            .iter()
            .all(|e| matches!(e, PodEvent::Error(_) | PodEvent::Synced { .. })),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PodEvent::Error(m) if gone(m))),
        "the 410 was not reported: {events:#?}"
    );
}
