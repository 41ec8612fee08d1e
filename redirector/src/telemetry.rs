//! The agent's HTTP endpoint: Prometheus metrics read from the kernel's own
//! counters at scrape time, `/healthz` (the process serves) and `/readyz`
//! (every program is still attached where it should be).

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use axum::{
    extract::State,
    http::{
        header::{ACCEPT, CONTENT_TYPE},
        HeaderMap, StatusCode,
    },
    routing::get,
    Router,
};
use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter as PromCounter, family::Family, gauge::Gauge},
    registry::Registry,
};
use redirector_common::{Counter, ListenerKey};

use crate::{
    bpf::registry::{Reason, Unservable},
    sys,
};

/// What readiness checks: each (cgroup, sock_ops program id) and each
/// (namespace, sk_lookup program id).
pub struct Attachments {
    pub cgroups: Vec<(String, File, u32)>,
    pub namespaces: Vec<(String, File, u32)>,
}

impl Attachments {
    /// Namespaces (or the cgroup) whose program is no longer attached.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        let attached = |fd: &File, kind, id| {
            sys::prog_query(fd.as_fd(), kind)
                .map(|ids| ids.contains(&id))
                .unwrap_or(false)
        };
        for (name, fd, id) in &self.cgroups {
            if !attached(fd, sys::BPF_CGROUP_SOCK_OPS, *id) {
                missing.push(format!("sock_ops on cgroup {name}"));
            }
        }
        for (name, fd, id) in &self.namespaces {
            if !attached(fd, sys::BPF_SK_LOOKUP, *id) {
                missing.push(format!("sk_lookup in {name}"));
            }
        }
        missing
    }
}

/// Metric families mirror kernel counters: on each scrape the counters advance
/// by what the kernel counted since the previous scrape.
struct Metrics {
    registry: Registry,
    kernel: Vec<(Counter, PromCounter)>,
    last: Vec<u64>,
    active: Gauge,
    listeners: Gauge,
    unservable: Family<Vec<(String, String)>, Gauge>,
    programs: Gauge,
    expected: Gauge,
    ready: Gauge,
}

pub struct Telemetry {
    counters: PerCpuArray<MapData, u64>,
    listeners: MapData,
    attachments: Mutex<Attachments>,
    /// Live-store listeners of served namespaces that are not registered, by
    /// namespace name (from the last reconcile pass).
    unservable: Mutex<Vec<(String, Unservable)>>,
    metrics: Mutex<Metrics>,
    /// Records `redirector flows` subscribers missed by reading too slowly.
    pub flow_subscriber_lost: PromCounter,
    /// `redirector flows` subscribers connected now.
    pub flow_subscribers: Gauge,
}

impl Telemetry {
    pub fn new(counters: MapData, listeners: MapData, attachments: Attachments) -> Result<Self> {
        let mut registry = Registry::with_prefix("redirector");
        let mut kernel = Vec::new();
        for c in Counter::ALL {
            let counter = PromCounter::default();
            registry.register(c.info().metric, c.info().help, counter.clone());
            kernel.push((c, counter));
        }
        let active = Gauge::default();
        registry.register(
            "connections_active",
            "Redirected connections open now",
            active.clone(),
        );
        let listeners_gauge = Gauge::default();
        registry.register(
            "listeners_registered",
            "Live-store listening sockets registered now",
            listeners_gauge.clone(),
        );
        let unservable = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "listeners_unservable",
            "Live-store listeners in served namespaces that are not registered, by reason (mptcp, no_owner, copy_denied, register_failed)",
            unservable.clone(),
        );
        let programs = Gauge::default();
        registry.register(
            "programs_attached",
            "redirector programs attached (sock_ops per served pod cgroup + one sk_lookup per namespace)",
            programs.clone(),
        );
        let flow_subscriber_lost = PromCounter::default();
        registry.register(
            "flow_subscriber_records_lost",
            "Flow records `redirector flows` subscribers missed because they read too slowly (each is told how many)",
            flow_subscriber_lost.clone(),
        );
        let flow_subscribers = Gauge::default();
        registry.register(
            "flow_subscribers",
            "`redirector flows` subscribers connected to the flow socket now",
            flow_subscribers.clone(),
        );
        // Alerts compare the two: attached < expected means something detached
        // a program behind the agent's back.
        let expected = Gauge::default();
        registry.register(
            "programs_expected",
            "redirector programs that should be attached (sock_ops per served pod cgroup + one sk_lookup per served namespace)",
            expected.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when /readyz answers 200 (every program attached, every live-store listener registered), else 0",
            ready.clone(),
        );
        Ok(Self {
            counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(counters))
                .context("COUNTERS map")?,
            listeners,
            attachments: Mutex::new(attachments),
            unservable: Mutex::new(Vec::new()),
            metrics: Mutex::new(Metrics {
                registry,
                last: vec![0; kernel.len()],
                kernel,
                active,
                listeners: listeners_gauge,
                unservable,
                programs,
                expected,
                ready,
            }),
            flow_subscriber_lost,
            flow_subscribers,
        })
    }

    /// Adds metric families that another part of the agent keeps up to date
    /// (the ring check's), next to the agent's own.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        if let Ok(mut m) = self.metrics.lock() {
            f(&mut m.registry);
        }
    }

    /// Replaces what readiness checks (the served set changed).
    pub fn set_attachments(
        &self,
        cgroups: Vec<(String, File, u32)>,
        namespaces: Vec<(String, File, u32)>,
    ) {
        if let Ok(mut a) = self.attachments.lock() {
            a.cgroups = cgroups;
            a.namespaces = namespaces;
        }
    }

    /// Replaces the listeners reported unservable (each reconcile pass).
    pub fn set_unservable(&self, unservable: Vec<(String, Unservable)>) {
        if let Ok(mut u) = self.unservable.lock() {
            *u = unservable;
        }
    }

    fn unservable(&self) -> Vec<(String, Unservable)> {
        self.unservable
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// (programs that should be attached, what is missing).
    fn attachment_state(&self) -> (usize, Vec<String>) {
        match self.attachments.lock() {
            Ok(a) => (a.cgroups.len() + a.namespaces.len(), a.missing()),
            Err(_) => (0, vec!["attachment state (lock poisoned)".to_owned()]),
        }
    }

    pub fn kernel_counter(&self, c: Counter) -> u64 {
        self.counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    pub fn render(&self) -> Result<String> {
        let mut m = self
            .metrics
            .lock()
            .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))?;
        let m = &mut *m;
        for (i, (c, counter)) in m.kernel.iter().enumerate() {
            let now = self.kernel_counter(*c);
            counter.inc_by(now.saturating_sub(m.last[i]));
            m.last[i] = now;
        }
        let opened = self.kernel_counter(Counter::FlowsOpened);
        let closed =
            self.kernel_counter(Counter::FlowsClosed) + self.kernel_counter(Counter::FlowTableFull);
        m.active.set(opened.saturating_sub(closed) as i64);
        let registered = sys::map_keys::<ListenerKey>(self.listeners.fd().as_fd())
            .map(|k| k.len())
            .unwrap_or(0);
        m.listeners.set(registered as i64);
        let unservable = self.unservable();
        for reason in Reason::ALL {
            let n = unservable
                .iter()
                .filter(|(_, u)| u.reason == reason)
                .count();
            m.unservable
                .get_or_create(&vec![("reason".to_owned(), reason.label().to_owned())])
                .set(n as i64);
        }
        let (total, missing) = self.attachment_state();
        m.programs.set(total.saturating_sub(missing.len()) as i64);
        m.expected.set(total as i64);
        // From the same state the gauges above report, through the same
        // function as /readyz, so the two never disagree.
        m.ready
            .set(i64::from(problems(missing, unservable).is_empty()));
        let mut out = String::new();
        encode(&mut out, &m.registry)?;
        Ok(out)
    }
}

/// OpenMetrics, what Prometheus asks for first in its `Accept` header.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for everything else (curl, promtool,
/// older scrapers).
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves OpenMetrics to clients that ask for it, the classic text format
/// otherwise: each under its own content type, so no parser reads one as the
/// other.
async fn metrics(
    State(t): State<Arc<Telemetry>>,
    headers: HeaderMap,
) -> (
    StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
) {
    let openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|a| a.contains("application/openmetrics-text"));
    match t.render() {
        Ok(body) if openmetrics => (StatusCode::OK, [(CONTENT_TYPE, OPENMETRICS)], body),
        Ok(body) => (StatusCode::OK, [(CONTENT_TYPE, CLASSIC)], classic(&body)),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{e:#}\n"),
        ),
    }
}

/// The classic text format from OpenMetrics text: a counter family is named
/// by its sample (`x_total`) in HELP and TYPE, and there is no `# EOF`.
fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// What keeps the agent from being ready, one line each: programs no longer
/// attached, then unregistered listeners.
fn problems(missing: Vec<String>, unservable: Vec<(String, Unservable)>) -> Vec<String> {
    missing
        .into_iter()
        .map(|m| format!("not attached: {m}"))
        .chain(
            unservable
                .into_iter()
                .map(|(netns, u)| format!("netns {netns}: {u}")),
        )
        .collect()
}

/// Ready when every program is attached and every live-store listener of a
/// served namespace is registered; otherwise 503 with one line per problem.
async fn ready(State(t): State<Arc<Telemetry>>) -> (StatusCode, String) {
    let (_, missing) = t.attachment_state();
    let problems = problems(missing, t.unservable());
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

/// Binds `addr` and serves until the runtime stops. Returns the bound address
/// (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(telemetry);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_names_counter_families_by_their_samples() {
        let om = "# HELP r_x Things.\n# TYPE r_x counter\nr_x_total 3\n# HELP r_g Now.\n# TYPE r_g gauge\nr_g 1\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP r_x_total Things.\n# TYPE r_x_total counter\nr_x_total 3\n# HELP r_g Now.\n# TYPE r_g gauge\nr_g 1\n"
        );
    }
}
