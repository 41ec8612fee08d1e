//! The pods bound to this node, from the Kubernetes API: one watcher per
//! namespace asked for (or one over all namespaces), restricted by the API
//! server itself to `spec.nodeName=<node>` and a label selector, reported on
//! the caller's bounded channel.
//!
//! The API server knows which pods are scheduled here before any of their
//! processes exist, and keeps knowing while the node's /proc says nothing
//! about a pod (a sandbox being torn down, a container restarting): this is
//! what tells the agent which pods to serve, the kernel-side discovery where.
//!
//! The mapping from the runtime's watcher events to `PodEvent`s is `Watches`,
//! a state machine with no I/O, so that it is tested without a server; `run`
//! only moves events between the watchers and the channel.

use std::{
    collections::HashMap,
    env,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    config::{Config, KubeConfigOptions, Kubeconfig},
    runtime::watcher,
    Api, Client,
};
use tokio::sync::mpsc;

/// The labels the tempo-distributed Helm chart puts on live-store pods
/// (`tempo.podLabels` with component `live-store`, grafana-community/
/// helm-charts). `app.kubernetes.io/instance` (the release name) is left out
/// so that every release on the node qualifies; a chart installed with
/// `nameOverride` needs its own selector.
pub const DEFAULT_LABELS: &str =
    "app.kubernetes.io/name=tempo,app.kubernetes.io/component=live-store";

/// Where `--node-name` comes from: the downward API puts the node's name there.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Kubernetes' own limit for names (DNS subdomains). Anything a pod's author
/// controls is cut to this, so that a hostile object cannot make the agent
/// hold or log more.
pub const MAX_FIELD_BYTES: usize = 253;

/// Identical errors are reported once per this, however often the watcher
/// retries (its backoff starts below a second).
const ERROR_INTERVAL: Duration = Duration::from_secs(30);

/// How many distinct error messages the rate limiter remembers; beyond that
/// it forgets the oldest, which then may be reported once more.
const MAX_ERROR_KINDS: usize = 64;

/// An error message is the API server's or the TLS stack's text: kept whole
/// up to this, to bound what one error costs the channel and the log.
const MAX_ERROR_BYTES: usize = 1024;

/// Retry delays after a failure: from RETRY_MIN, doubling, at most
/// RETRY_MAX; back to RETRY_MIN once the watch has gone RETRY_RESET without
/// one. RETRY_MAX bounds how long after the API server's return the agent
/// learns about the pods it missed.
const RETRY_MIN: Duration = Duration::from_millis(800);
const RETRY_MAX: Duration = Duration::from_secs(30);
const RETRY_RESET: Duration = Duration::from_secs(120);

/// A list is held whole until it is complete (a `Synced` must be the whole
/// set). The field selector bounds it by the node's pods (kubelet's
/// `--max-pods`, 110 by default); this is the guard against a server that
/// answers something else.
const MAX_LISTED_PODS: usize = 8192;

/// Which pods to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// This node's name (`spec.nodeName` of the pods bound to it).
    pub node: String,
    /// A label selector (`a=b,c in (d)`), or empty for every pod.
    pub labels: String,
    /// Namespaces to watch, one watcher each; empty means all namespaces.
    pub namespaces: Vec<String>,
}

/// A pod as the agent needs it. Every string is the API's, kept as it is
/// (the consumer escapes what it logs) but cut to `MAX_FIELD_BYTES`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// `status.qosClass`: Guaranteed, Burstable or BestEffort.
    pub qos_class: Option<String>,
    /// `status.phase`: Pending, Running, Succeeded, Failed or Unknown.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set: the pod is terminating.
    pub deleting: bool,
}

impl From<&Pod> for PodInfo {
    fn from(pod: &Pod) -> Self {
        let text = |s: Option<&String>| s.map(|s| capped(s)).unwrap_or_default();
        let status = pod.status.as_ref();
        Self {
            uid: text(pod.metadata.uid.as_ref()),
            namespace: text(pod.metadata.namespace.as_ref()),
            name: text(pod.metadata.name.as_ref()),
            node: text(pod.spec.as_ref().and_then(|s| s.node_name.as_ref())),
            qos_class: status.and_then(|s| s.qos_class.as_deref()).map(capped),
            phase: status.and_then(|s| s.phase.as_deref()).map(capped),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// What `run` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// A pod appeared or changed (including: started terminating).
    Applied(PodInfo),
    /// A pod is gone from the API.
    Deleted(PodInfo),
    /// After every (re)list: the complete set of matching pods now; the
    /// receiver drops what it serves that is not in it.
    Synced {
        /// The namespace this watcher covers; None = all namespaces. With
        /// several namespaces each watcher relists on its own, so a
        /// `Synced` replaces only the pods of its scope.
        scope: Option<String>,
        pods: Vec<PodInfo>,
    },
    /// The watch failed; the receiver keeps serving what it serves. The
    /// watcher retries by itself (exponential backoff up to 30 s).
    Error(String),
}

/// Watches the pods `selector` names and sends what happens to them on `tx`
/// until `tx` is closed. Each watcher first lists (one `Synced` per watcher),
/// then follows changes; after a disconnection it resumes where it was, or
/// lists again when the server no longer has that point (410 Gone), with
/// another `Synced`. `tx` is bounded: a slow receiver slows the watch down
/// rather than letting events pile up here. An empty `selector.node` is
/// reported as an Error and ends it at once.
pub async fn run(client: Client, selector: Selector, tx: mpsc::Sender<PodEvent>) {
    if selector.node.is_empty() {
        // `spec.nodeName=` would select the pods bound to no node.
        let _ = tx
            .send(PodEvent::Error(
                "no node name to watch the pods of: not watching".into(),
            ))
            .await;
        return;
    }
    let config = watcher_config(&selector);
    let scopes = scopes(&selector.namespaces);
    let watchers = scopes.iter().enumerate().map(|(index, scope)| {
        let api: Api<Pod> = match scope {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        };
        paced(watcher(api, config.clone()))
            .map(move |item| (index, item))
            .boxed()
    });
    let mut events = stream::select_all(watchers);
    let mut watches = Watches::new(scopes);
    loop {
        // A closed channel is noticed at once, not at the next pod event,
        // which may be hours away.
        let (index, item) = tokio::select! {
            () = tx.closed() => return,
            next = events.next() => match next {
                Some(next) => next,
                // The runtime's watchers never end; nothing left to watch.
                None => return,
            },
        };
        if let Some(event) = watches.on_item(index, item, Instant::now()) {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// A client for the API server: in-cluster (the pod's ServiceAccount token
/// and CA, `KUBERNETES_SERVICE_HOST`) when `kubeconfig` is None, else from
/// that kubeconfig file (its current context).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        None => in_cluster_config()?,
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
    };
    Client::try_from(config).context("creating the Kubernetes API client")
}

/// This node's name (`--node-name`, or `NODE_NAME`, which the DaemonSet sets
/// from the pod's `spec.nodeName` through the downward API).
pub fn node(given: Option<&str>) -> Result<String> {
    const HOW: &str = "set it in the DaemonSet from the pod's spec.nodeName: \
        env: [{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}], or give --node-name";
    match given {
        Some(node) if !node.trim().is_empty() => Ok(node.to_owned()),
        Some(_) => bail!("{NODE_NAME_ENV} is empty: {HOW}"),
        None => bail!("{NODE_NAME_ENV} is unset: {HOW}"),
    }
}

/// kube's own in-cluster loader, after checks that say which piece is
/// missing (its errors name only the failing call).
fn in_cluster_config() -> Result<Config> {
    const SECRETS: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    if env::var_os("KUBERNETES_SERVICE_HOST").is_none_or(|h| h.is_empty()) {
        bail!("not running in a pod (KUBERNETES_SERVICE_HOST unset): give --kubeconfig");
    }
    if env::var_os("KUBERNETES_SERVICE_PORT").is_none_or(|p| p.is_empty()) {
        bail!(
            "KUBERNETES_SERVICE_PORT is unset (KUBERNETES_SERVICE_HOST is set): \
             the pod's environment is incomplete; give --kubeconfig"
        );
    }
    for (file, what) in [
        ("token", "ServiceAccount token"),
        ("ca.crt", "cluster CA certificate"),
        ("namespace", "ServiceAccount namespace"),
    ] {
        let path = Path::new(SECRETS).join(file);
        if !path.is_file() {
            bail!(
                "no {what} at {}: the pod needs its ServiceAccount token mounted \
                 (automountServiceAccountToken must not be false), or give --kubeconfig",
                path.display()
            );
        }
    }
    Config::incluster().context("loading the in-cluster Kubernetes configuration")
}

fn watcher_config(selector: &Selector) -> watcher::Config {
    let config = watcher::Config::default().fields(&format!(
        "spec.nodeName={}",
        escape_field_value(&selector.node)
    ));
    if selector.labels.trim().is_empty() {
        config
    } else {
        config.labels(&selector.labels)
    }
}

/// A field selector value, escaped as the API server unescapes it
/// (`fields.EscapeValue`): a node name never needs it, an environment
/// variable might.
fn escape_field_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One watcher per distinct, non-empty namespace; all namespaces if none.
fn scopes(namespaces: &[String]) -> Vec<Option<String>> {
    let mut scopes: Vec<Option<String>> = Vec::new();
    for namespace in namespaces.iter().filter(|n| !n.is_empty()) {
        let scope = Some(namespace.clone());
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        scopes.push(None);
    }
    scopes
}

/// The pure half of `run`: watcher items in (tagged with the index of their
/// scope), `PodEvent`s out.
struct Watches {
    scopes: Vec<Scope>,
    errors: ErrorLimiter,
}

struct Scope {
    namespace: Option<String>,
    /// The list in progress (between Init and InitDone).
    listed: Option<Vec<PodInfo>>,
    /// The list outgrew MAX_LISTED_PODS: it is dropped at InitDone.
    overflowed: bool,
}

impl Watches {
    fn new(scopes: Vec<Option<String>>) -> Self {
        Self {
            scopes: scopes
                .into_iter()
                .map(|namespace| Scope {
                    namespace,
                    listed: None,
                    overflowed: false,
                })
                .collect(),
            errors: ErrorLimiter::default(),
        }
    }

    fn on_item(
        &mut self,
        index: usize,
        item: watcher::Result<watcher::Event<Pod>>,
        now: Instant,
    ) -> Option<PodEvent> {
        let scope = self.scopes.get_mut(index)?;
        let event = match item {
            Ok(event) => event,
            Err(e) => {
                let message = format!("watching pods in {}: {}", scope.name(), describe(&e));
                return self.errors.report(message, now);
            }
        };
        match event {
            watcher::Event::Init => {
                scope.listed = Some(Vec::new());
                scope.overflowed = false;
                None
            }
            watcher::Event::InitApply(pod) => {
                // The runtime always starts with Init; a stray InitApply
                // still belongs to a list, never to the served set directly.
                let listed = scope.listed.get_or_insert_with(Vec::new);
                if listed.len() < MAX_LISTED_PODS {
                    listed.push(PodInfo::from(&pod));
                } else {
                    scope.overflowed = true;
                }
                None
            }
            watcher::Event::InitDone => {
                let pods = scope.listed.take().unwrap_or_default();
                if std::mem::take(&mut scope.overflowed) {
                    // An incomplete set would make the receiver drop pods
                    // it rightly serves: better keep what it has.
                    let message = format!(
                        "listing pods in {}: more than {MAX_LISTED_PODS} pods match; \
                         ignoring the list (is the selector right?)",
                        scope.name()
                    );
                    return self.errors.report(message, now);
                }
                Some(PodEvent::Synced {
                    scope: scope.namespace.clone(),
                    pods,
                })
            }
            watcher::Event::Apply(pod) => Some(PodEvent::Applied(PodInfo::from(&pod))),
            watcher::Event::Delete(pod) => Some(PodEvent::Deleted(PodInfo::from(&pod))),
        }
    }
}

impl Scope {
    fn name(&self) -> String {
        match &self.namespace {
            Some(namespace) => format!("namespace {namespace}"),
            None => "all namespaces".into(),
        }
    }
}

/// A watcher's items, with a pause after each failure before the watcher
/// is polled again (polling is what makes it retry). Not the runtime's
/// `default_backoff`, for three reasons: its jitter goes up to twice its
/// 30 s cap; it starts over at every good item, and a list that keeps
/// failing (403, a bad label selector) comes right after one (the watcher's
/// Init), which makes a retry about every second, forever, from every node;
/// and it pauses after a 410 Gone too, when the watcher's answer, a new list,
/// is what the receiver waits for.
fn paced<S>(watcher: S) -> impl futures::Stream<Item = S::Item> + Send
where
    S: futures::Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send + 'static,
{
    let start = (Box::pin(watcher), RetryDelay::default(), None);
    stream::unfold(start, |(mut watcher, mut delay, pause)| async move {
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        let item = watcher.next().await?;
        let pause = match &item {
            Err(e) => {
                let unit = delay.rng.f32();
                delay.after(e, Instant::now(), unit)
            }
            Ok(_) => None,
        };
        Some((item, (watcher, delay, pause)))
    })
}

/// The pauses of `paced`: from RETRY_MIN, doubling, at most RETRY_MAX, back
/// to RETRY_MIN after RETRY_RESET without an error. Each is drawn in [d/2, d]
/// so that the agents of a cluster do not all retry at the same instant
/// after an API server restart. A 410 Gone is no failure: the relist it
/// calls for comes at once, unless the previous 410 was less than
/// RETRY_MAX ago (a server that answers every list with one must not get a
/// list after list).
struct RetryDelay {
    current: Option<Duration>,
    last_error: Option<Instant>,
    last_gone: Option<Instant>,
    rng: fastrand::Rng,
}

impl Default for RetryDelay {
    fn default() -> Self {
        Self {
            current: None,
            last_error: None,
            last_gone: None,
            rng: fastrand::Rng::new(),
        }
    }
}

impl RetryDelay {
    /// The pause after `error` at `now` (None: none); `unit` in [0, 1)
    /// picks it within its range.
    fn after(&mut self, error: &watcher::Error, now: Instant, unit: f32) -> Option<Duration> {
        if is_gone(error) {
            let again = self
                .last_gone
                .is_some_and(|last| now.saturating_duration_since(last) < RETRY_MAX);
            self.last_gone = Some(now);
            if !again {
                return None;
            }
        }
        let quiet = self
            .last_error
            .is_none_or(|last| now.saturating_duration_since(last) >= RETRY_RESET);
        let delay = match self.current {
            Some(current) if !quiet => current.saturating_mul(2).min(RETRY_MAX),
            _ => RETRY_MIN,
        };
        self.current = Some(delay);
        self.last_error = Some(now);
        Some(delay.saturating_sub((delay / 2).mul_f32(unit.clamp(0.0, 1.0))))
    }
}

/// 410 Gone: the server no longer has the point the watcher would resume
/// from (on the watch), or the list's continue token expired (on a list);
/// either way the watcher lists again from scratch.
fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// Reports each distinct error message at most once per ERROR_INTERVAL and
/// counts every one: a report says how many like it it stands for.
#[derive(Default)]
struct ErrorLimiter {
    recent: HashMap<String, Recent>,
    total: u64,
}

struct Recent {
    reported: Instant,
    suppressed: u64,
}

impl ErrorLimiter {
    fn report(&mut self, message: String, now: Instant) -> Option<PodEvent> {
        self.total = self.total.saturating_add(1);
        tracing::debug!("kube watch error #{}: {message}", self.total);
        let message = truncated(message, MAX_ERROR_BYTES);
        let suppressed = match self.recent.get_mut(&message) {
            Some(recent) if now.saturating_duration_since(recent.reported) < ERROR_INTERVAL => {
                recent.suppressed = recent.suppressed.saturating_add(1);
                return None;
            }
            Some(recent) => std::mem::take(&mut recent.suppressed),
            None => {
                self.make_room(now);
                0
            }
        };
        self.recent.insert(
            message.clone(),
            Recent {
                reported: now,
                suppressed: 0,
            },
        );
        Some(PodEvent::Error(if suppressed == 0 {
            message
        } else {
            format!("{message} (and {suppressed} more like it since it was last reported)")
        }))
    }

    fn make_room(&mut self, now: Instant) {
        if self.recent.len() < MAX_ERROR_KINDS {
            return;
        }
        self.recent
            .retain(|_, r| now.saturating_duration_since(r.reported) < ERROR_INTERVAL);
        while self.recent.len() >= MAX_ERROR_KINDS {
            let oldest = self
                .recent
                .iter()
                .min_by_key(|(_, r)| r.reported)
                .map(|(m, _)| m.clone());
            match oldest {
                Some(oldest) => self.recent.remove(&oldest),
                None => break,
            };
        }
    }
}

/// A watcher error as the log should say it: a status from the API server
/// (410 Gone above all) with its code, which its text alone does not give.
fn describe(error: &watcher::Error) -> String {
    match error {
        watcher::Error::WatchError(status) => format!("{} (code {})", chain(error), status.code),
        _ => chain(error),
    }
}

/// An error and its causes, each cause only where the text so far does not
/// already say it (kube's errors often repeat their source).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        if text.len() > MAX_ERROR_BYTES {
            break;
        }
        source = cause.source();
    }
    text
}

fn capped(s: &str) -> String {
    truncated(s.to_owned(), MAX_FIELD_BYTES)
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncated(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };
    use kube::core::Status;

    fn pod(namespace: &str, name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(format!("uid-{namespace}-{name}")),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                qos_class: Some("Burstable".into()),
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn info(namespace: &str, name: &str) -> PodInfo {
        PodInfo {
            uid: format!("uid-{namespace}-{name}"),
            namespace: namespace.into(),
            name: name.into(),
            node: "node-a".into(),
            qos_class: Some("Burstable".into()),
            phase: Some("Running".into()),
            deleting: false,
        }
    }

    fn gone() -> watcher::Error {
        watcher::Error::WatchError(Box::new(Status {
            code: 410,
            reason: "Expired".into(),
            message: "too old resource version: 5 (9)".into(),
            ..Status::default()
        }))
    }

    fn feed(
        watches: &mut Watches,
        index: usize,
        items: Vec<watcher::Result<watcher::Event<Pod>>>,
        now: Instant,
    ) -> Vec<PodEvent> {
        items
            .into_iter()
            .filter_map(|item| watches.on_item(index, item, now))
            .collect()
    }

    #[test]
    fn a_list_is_one_synced_at_init_done() {
        let mut w = Watches::new(vec![None]);
        let now = Instant::now();
        let out = feed(
            &mut w,
            0,
            vec![
                Ok(watcher::Event::Init),
                Ok(watcher::Event::InitApply(pod("tempo", "a"))),
                Ok(watcher::Event::InitApply(pod("other", "b"))),
            ],
            now,
        );
        assert_eq!(out, vec![], "nothing before the list is complete");
        let out = feed(&mut w, 0, vec![Ok(watcher::Event::InitDone)], now);
        assert_eq!(
            out,
            vec![PodEvent::Synced {
                scope: None,
                pods: vec![info("tempo", "a"), info("other", "b")],
            }]
        );
    }

    #[test]
    fn an_empty_list_is_an_empty_synced() {
        let mut w = Watches::new(vec![Some("tempo".into())]);
        let out = feed(
            &mut w,
            0,
            vec![Ok(watcher::Event::Init), Ok(watcher::Event::InitDone)],
            Instant::now(),
        );
        assert_eq!(
            out,
            vec![PodEvent::Synced {
                scope: Some("tempo".into()),
                pods: vec![],
            }]
        );
    }

    #[test]
    fn a_relist_starts_afresh() {
        let mut w = Watches::new(vec![None]);
        let now = Instant::now();
        // A list cut short by an error, then a new one: nothing of the
        // first may leak into the second.
        let out = feed(
            &mut w,
            0,
            vec![
                Ok(watcher::Event::Init),
                Ok(watcher::Event::InitApply(pod("tempo", "old"))),
                Err(gone()),
                Ok(watcher::Event::Init),
                Ok(watcher::Event::InitApply(pod("tempo", "new"))),
                Ok(watcher::Event::InitDone),
            ],
            now,
        );
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            out[0],
            PodEvent::Error(
                "watching pods in all namespaces: error returned by apiserver during watch: \
                 too old resource version: 5 (9): Expired (code 410)"
                    .into()
            )
        );
        assert_eq!(
            out[1],
            PodEvent::Synced {
                scope: None,
                pods: vec![info("tempo", "new")],
            }
        );
    }

    #[test]
    fn apply_and_delete_map_one_to_one() {
        let mut w = Watches::new(vec![None]);
        let mut deleting = pod("tempo", "a");
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        let out = feed(
            &mut w,
            0,
            vec![
                Ok(watcher::Event::Apply(pod("tempo", "a"))),
                Ok(watcher::Event::Apply(deleting)),
                Ok(watcher::Event::Delete(pod("tempo", "a"))),
            ],
            Instant::now(),
        );
        let mut terminating = info("tempo", "a");
        terminating.deleting = true;
        assert_eq!(
            out,
            vec![
                PodEvent::Applied(info("tempo", "a")),
                PodEvent::Applied(terminating),
                PodEvent::Deleted(info("tempo", "a")),
            ]
        );
    }

    #[test]
    fn each_scope_lists_on_its_own() {
        let mut w = Watches::new(vec![Some("a".into()), Some("b".into())]);
        let now = Instant::now();
        let mut out = Vec::new();
        // Interleaved as select_all may deliver them.
        for (index, item) in [
            (0, Ok(watcher::Event::Init)),
            (1, Ok(watcher::Event::Init)),
            (0, Ok(watcher::Event::InitApply(pod("a", "x")))),
            (1, Ok(watcher::Event::InitApply(pod("b", "y")))),
            (1, Ok(watcher::Event::InitDone)),
            (0, Ok(watcher::Event::InitDone)),
        ] {
            out.extend(w.on_item(index, item, now));
        }
        assert_eq!(
            out,
            vec![
                PodEvent::Synced {
                    scope: Some("b".into()),
                    pods: vec![info("b", "y")],
                },
                PodEvent::Synced {
                    scope: Some("a".into()),
                    pods: vec![info("a", "x")],
                },
            ]
        );
        assert_eq!(w.on_item(7, Ok(watcher::Event::InitDone), now), None);
    }

    #[test]
    fn identical_errors_are_reported_once_per_interval_and_counted() {
        let mut w = Watches::new(vec![None]);
        let t0 = Instant::now();
        let first = w.on_item(0, Err(watcher::Error::NoResourceVersion), t0);
        assert!(
            matches!(&first, Some(PodEvent::Error(m)) if m.starts_with("watching pods in all namespaces: no metadata.resourceVersion")),
            "{first:?}"
        );
        for s in 1..10 {
            let again = w.on_item(
                0,
                Err(watcher::Error::NoResourceVersion),
                t0 + Duration::from_secs(s),
            );
            assert_eq!(again, None, "suppressed within 30 s");
        }
        // Another message is not held back by the first.
        let other = w.on_item(0, Err(gone()), t0 + Duration::from_secs(10));
        assert!(matches!(other, Some(PodEvent::Error(_))));
        assert_eq!(
            w.on_item(0, Err(gone()), t0 + Duration::from_secs(11)),
            None
        );
        // After the interval, reported again with what was held back.
        let later = w.on_item(
            0,
            Err(watcher::Error::NoResourceVersion),
            t0 + ERROR_INTERVAL,
        );
        assert!(
            matches!(&later, Some(PodEvent::Error(m)) if m.ends_with("(and 9 more like it since it was last reported)")),
            "{later:?}"
        );
        assert_eq!(w.errors.total, 13);
    }

    #[test]
    fn the_error_memory_is_bounded() {
        let mut limiter = ErrorLimiter::default();
        let now = Instant::now();
        for i in 0..(MAX_ERROR_KINDS * 3) {
            assert!(limiter.report(format!("error {i}"), now).is_some());
        }
        assert!(limiter.recent.len() <= MAX_ERROR_KINDS);
        assert_eq!(limiter.total, (MAX_ERROR_KINDS * 3) as u64);
        let long = limiter.report("é".repeat(MAX_ERROR_BYTES), now);
        assert!(matches!(long, Some(PodEvent::Error(m)) if m.len() <= MAX_ERROR_BYTES));
    }

    #[test]
    fn an_oversized_list_is_an_error_not_a_partial_synced() {
        let mut w = Watches::new(vec![None]);
        let now = Instant::now();
        assert_eq!(w.on_item(0, Ok(watcher::Event::Init), now), None);
        for i in 0..=MAX_LISTED_PODS {
            let item = Ok(watcher::Event::InitApply(pod("tempo", &format!("p{i}"))));
            assert_eq!(w.on_item(0, item, now), None);
        }
        let done = w.on_item(0, Ok(watcher::Event::InitDone), now);
        assert!(
            matches!(&done, Some(PodEvent::Error(m)) if m.contains("more than")),
            "{done:?}"
        );
        // The next list is judged on its own.
        let out = feed(
            &mut w,
            0,
            vec![
                Ok(watcher::Event::Init),
                Ok(watcher::Event::InitApply(pod("tempo", "a"))),
                Ok(watcher::Event::InitDone),
            ],
            now,
        );
        assert_eq!(
            out,
            vec![PodEvent::Synced {
                scope: None,
                pods: vec![info("tempo", "a")],
            }]
        );
    }

    #[test]
    fn retries_back_off_to_the_cap_and_start_over_after_quiet() {
        let failed = watcher::Error::NoResourceVersion;
        let mut r = RetryDelay::default();
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for i in 0..10 {
            delays.push(r.after(&failed, t0 + Duration::from_secs(i), 0.0));
        }
        let secs: Vec<f32> = delays.iter().flatten().map(Duration::as_secs_f32).collect();
        assert_eq!(
            secs,
            [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0, 30.0],
            "doubling up to 30 s"
        );
        // Jitter stays within [d/2, d].
        let low = r.after(&failed, t0 + Duration::from_secs(21), 0.999_999);
        assert!(
            low.is_some_and(|d| d >= RETRY_MAX / 2 && d <= RETRY_MAX),
            "{low:?}"
        );
        // After RETRY_RESET without an error, from the start.
        let later = t0 + Duration::from_secs(21) + RETRY_RESET;
        assert_eq!(r.after(&failed, later, 0.0), Some(RETRY_MIN));
        let mid = r
            .after(&failed, later, 0.5)
            .unwrap_or_default()
            .as_secs_f64();
        assert!((mid - 1.2).abs() < 1e-6, "{mid}");
    }

    #[test]
    fn a_410_relists_at_once_but_not_twice_in_a_row() {
        let failed = watcher::Error::NoResourceVersion;
        let mut r = RetryDelay::default();
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(r.after(&failed, t0 + Duration::from_secs(i), 0.0).is_some());
        }
        // After an outage, the 410 of the server that is back: relist now.
        assert_eq!(r.after(&gone(), t0 + Duration::from_secs(5), 0.0), None);
        // Another one soon after: a failure like any other, paced as such.
        assert_eq!(
            r.after(&gone(), t0 + Duration::from_secs(6), 0.0),
            Some(Duration::from_millis(12_800))
        );
        // Long after the last, at once again.
        let later = t0 + Duration::from_secs(6) + RETRY_MAX;
        assert_eq!(r.after(&gone(), later, 0.0), None);
        let expired_list = watcher::Error::InitialListFailed(kube::Error::Api(Box::new(Status {
            code: 410,
            ..Status::default()
        })));
        assert!(is_gone(&expired_list));
        assert!(!is_gone(&failed));
    }

    #[test]
    fn pod_strings_are_capped_at_a_character_boundary() {
        let mut p = pod("tempo", "a");
        // 2-byte characters across the limit: a byte cut would split one.
        p.metadata.name = Some(format!("x{}", "é".repeat(300)));
        p.metadata.uid = Some("u".repeat(1000));
        p.status = Some(PodStatus {
            qos_class: Some("Q".repeat(254)),
            ..PodStatus::default()
        });
        let i = PodInfo::from(&p);
        assert_eq!(i.name.len(), MAX_FIELD_BYTES);
        assert!(i.name.starts_with('x') && i.name.ends_with('é'));
        assert_eq!(i.uid.len(), MAX_FIELD_BYTES);
        assert_eq!(i.qos_class.as_deref().map(str::len), Some(MAX_FIELD_BYTES));
        assert_eq!(i.phase, None);
    }

    #[test]
    fn a_pod_missing_everything_is_still_a_pod_info() {
        let i = PodInfo::from(&Pod::default());
        assert_eq!(
            i,
            PodInfo {
                uid: String::new(),
                namespace: String::new(),
                name: String::new(),
                node: String::new(),
                qos_class: None,
                phase: None,
                deleting: false,
            }
        );
    }

    #[test]
    fn the_selector_becomes_field_and_label_selectors() {
        let selector = Selector {
            node: "node-a".into(),
            labels: DEFAULT_LABELS.into(),
            namespaces: vec![],
        };
        let config = watcher_config(&selector);
        assert_eq!(
            config.field_selector.as_deref(),
            Some("spec.nodeName=node-a")
        );
        assert_eq!(config.label_selector.as_deref(), Some(DEFAULT_LABELS));
        let all = watcher_config(&Selector {
            labels: " ".into(),
            node: "we,ird=\\".into(),
            ..selector
        });
        assert_eq!(all.label_selector, None);
        assert_eq!(
            all.field_selector.as_deref(),
            Some("spec.nodeName=we\\,ird\\=\\\\")
        );
    }

    #[test]
    fn namespaces_become_distinct_scopes() {
        assert_eq!(scopes(&[]), vec![None]);
        assert_eq!(scopes(&["".into()]), vec![None]);
        assert_eq!(
            scopes(&["a".into(), "b".into(), "a".into(), "".into()]),
            vec![Some("a".into()), Some("b".into())]
        );
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named() {
        let path = Path::new("/nonexistent/redirector/kubeconfig");
        let e = client(Some(path)).await.err().map(|e| format!("{e:#}"));
        assert!(
            e.as_deref().is_some_and(
                |e| e.contains("reading kubeconfig /nonexistent/redirector/kubeconfig")
            ),
            "{e:?}"
        );
    }

    #[test]
    fn node_name_comes_from_the_downward_api() {
        assert_eq!(node(Some("node-a")).unwrap(), "node-a");
        for value in [Some(""), Some("  "), None] {
            let e = node(value).unwrap_err().to_string();
            assert!(
                e.contains("NODE_NAME") && e.contains("spec.nodeName") && e.contains("fieldRef"),
                "{e}"
            );
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "failed: client error (Connect)",
            Some(Box::new(E(
                "client error (Connect)",
                Some(Box::new(E("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            chain(&e),
            "failed: client error (Connect): Connection refused (os error 111)"
        );
    }
}
