//! `run --tempo-ring`: the check repeated on a thread of its own, judged by
//! the agent's state, its results kept as metrics and logged when they change.

use std::{
    collections::HashMap,
    os::fd::AsFd,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use redirector_common::ListenerKey;

use super::{
    fetch::{fetch, RingUrl},
    local::node_namespaces,
    source::{AgentSource, AgentView},
    verdict::{evaluate, Outcome, Report},
};
use crate::sys;

/// The period of `run --tempo-ring` when no layer of the settings sets
/// `tempo_ring_interval` (`--tempo-ring-interval`,
/// `REDIRECTOR_TEMPO_RING_INTERVAL`, redirector.yaml).
pub const DEFAULT_INTERVAL_SECS: u64 = 30;

/// The ring metrics the agent exports. The caller registers them where the
/// agent's own are (`register`), so this module needs no telemetry of its own.
#[derive(Clone)]
pub struct RingMetrics {
    live_stores: Family<Vec<(String, String)>, Gauge>,
    errors: Counter,
    last_success: Gauge<f64, AtomicU64>,
}

impl Default for RingMetrics {
    fn default() -> Self {
        let metrics = Self {
            live_stores: Family::default(),
            errors: Counter::default(),
            last_success: Gauge::default(),
        };
        // Every result has a series from the start, so an alert on one has
        // a 0 to compare with before any live-store gets that result.
        for o in Outcome::ALL {
            metrics.live_stores.get_or_create(&label(o)).set(0);
        }
        metrics
    }
}

impl RingMetrics {
    /// Adds the metrics to `registry`: from the agent's, they are
    /// `redirector_ring_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ring_live_stores",
            "Live-stores of the Tempo live-store ring on this node, by result of the ring check (ok, not_served, wrong_port, no_listener)",
            self.live_stores.clone(),
        );
        registry.register(
            "ring_check_errors",
            "Ring checks that could not read the live-store ring (unreachable, not found, not JSON)",
            self.errors.clone(),
        );
        registry.register(
            "ring_last_success_timestamp_seconds",
            "Unix time of the last ring check that read the live-store ring",
            self.last_success.clone(),
        );
    }
}

/// `run --tempo-ring`: the check on a thread of its own, so a slow or
/// unreachable Tempo never holds up the agent's main loop.
pub struct Monitor {
    view: Arc<Mutex<AgentView>>,
}

impl Monitor {
    /// Checks `url` at once and then every `every`, updating `metrics` (registered
    /// by the caller) and judging by `view` until `update` replaces it.
    pub fn start(
        url: RingUrl,
        every: Duration,
        listeners: MapData,
        metrics: RingMetrics,
        view: AgentView,
    ) -> Result<Self> {
        let view = Arc::new(Mutex::new(view));
        let shared = view.clone();
        std::thread::Builder::new()
            .name("ring-check".to_owned())
            .spawn(move || {
                let mut log = LogState::default();
                loop {
                    pass(&url, &shared, &listeners, &metrics, &mut log);
                    std::thread::sleep(every);
                }
            })
            .context("starting the ring check thread")?;
        Ok(Self { view })
    }

    /// Shares the agent's current state with the check (each main-loop tick).
    pub fn update(&self, view: AgentView) {
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }
}

fn label(o: Outcome) -> Vec<(String, String)> {
    vec![("result".to_owned(), o.label().to_owned())]
}

fn pass(
    url: &RingUrl,
    view: &Mutex<AgentView>,
    listeners: &MapData,
    metrics: &RingMetrics,
    log: &mut LogState,
) {
    let page = match fetch(url) {
        Ok(page) => page,
        Err(e) => {
            metrics.errors.inc();
            log.error(e);
            return;
        }
    };
    let view = view.lock().map(|v| v.clone()).unwrap_or_default();
    let registered = sys::map_keys::<ListenerKey>(listeners.fd().as_fd()).unwrap_or_default();
    let mut source = AgentSource { view, registered };
    let report = evaluate(url, &page, &node_namespaces(), &mut source);
    for (o, n) in report.counts() {
        metrics.live_stores.get_or_create(&label(o)).set(n as i64);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.last_success.set(now);
    log.success(url, &report);
}

/// The target of the ring check's log lines: the module's, not this file's,
/// as each line shows it (`target` in JSON logs) and log queries select by it.
const LOG_TARGET: &str = "redirector::ring";

/// Logs what changed only: the same error or finding every period is noise.
#[derive(Default)]
struct LogState {
    error: Option<String>,
    /// Per live-store (id, address): its result and what was said.
    findings: HashMap<(String, String), (Outcome, String)>,
    summary: String,
}

impl LogState {
    fn error(&mut self, e: String) {
        if self.error.as_ref() != Some(&e) {
            tracing::warn!(target: LOG_TARGET, "ring check: {e}");
            self.error = Some(e);
        }
    }

    fn success(&mut self, url: &RingUrl, report: &Report) {
        if self.error.take().is_some() {
            tracing::info!(target: LOG_TARGET, "ring check: {url} answers again");
        }
        let counts: Vec<String> = report
            .counts()
            .iter()
            .map(|(o, n)| format!("{}={n}", o.label()))
            .collect();
        let summary = format!(
            "ring check: {} live-store(s) in the ring, {} on this node ({}), {} elsewhere",
            report.shards,
            report.on_this_node,
            counts.join(" "),
            report.elsewhere
        );
        if summary != self.summary {
            tracing::info!(target: LOG_TARGET, "{summary}");
            self.summary = summary;
        }
        let mut now = HashMap::new();
        for l in &report.live_stores {
            let failed: Vec<String> = l
                .checks
                .iter()
                .filter(|r| !r.ok)
                .map(|r| {
                    format!(
                        "{}; fix: {}",
                        r.detail,
                        r.fix.as_deref().unwrap_or_default()
                    )
                })
                .collect();
            let said = failed.join(" | ");
            let key = (l.id.clone(), l.address.clone());
            let known = self.findings.get(&key);
            if known.map(|(o, s)| (*o, s.as_str())) != Some((l.result, said.as_str())) {
                if l.result == Outcome::Ok {
                    if known.is_some() {
                        tracing::info!(
                            target: LOG_TARGET,
                            "ring check: live-store {} ({}) in {}: ok",
                            l.id,
                            l.address,
                            l.netns
                        );
                    }
                } else {
                    tracing::warn!(
                        target: LOG_TARGET,
                        "ring check: live-store {} ({}) in {}: {}: {said}",
                        l.id,
                        l.address,
                        l.netns,
                        l.result.label()
                    );
                }
            }
            now.insert(key, (l.result, said));
        }
        for ((id, address), (result, _)) in &self.findings {
            if *result != Outcome::Ok && !now.contains_key(&(id.clone(), address.clone())) {
                tracing::info!(
                    target: LOG_TARGET,
                    "ring check: live-store {id} ({address}) is no longer in the ring on this node"
                );
            }
        }
        self.findings = now;
    }
}
