//! The agent's own log (`logging`) and its HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the
//! process serves) and `/readyz` (every program the agent attached is still
//! attached).
//!
//! Every pod on the node can reach this endpoint and none is trusted, so what
//! one client can make the agent spend is bounded: a request reads the
//! kernel's counters and what [`Telemetry::refresh`] stored (never a walk of
//! kernel maps), connections are capped, a request's headers must arrive
//! within seconds and fit in a few KiB, and `/readyz` names no other pod's
//! namespace, cgroup, process or address.

mod http;
pub mod logging;

pub use http::{serve, Limits, Rejection, Rejections};

use std::{
    fmt,
    fs::File,
    os::fd::AsFd,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
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

/// `redirector_build_info`: a gauge at 1 whose labels say which build runs, as
/// Prometheus exporters conventionally publish it (join on it by instance).
fn build_info() -> Family<Vec<(String, String)>, Gauge> {
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("bpf_object".to_owned(), crate::bpf::datapath::build_id()),
    ])
    .set(1);
    info
}

/// What readiness checks: each (cgroup, sock_ops program id) and each
/// (namespace, sk_lookup program id).
pub struct Attachments {
    pub cgroups: Vec<(String, File, u32)>,
    pub namespaces: Vec<(String, File, u32)>,
}

/// The kinds of program the agent attaches: `/readyz` counts missing ones by
/// kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentKind {
    SockOps,
    SkLookup,
}

impl AttachmentKind {
    const ALL: [AttachmentKind; 2] = [AttachmentKind::SockOps, AttachmentKind::SkLookup];

    fn label(self) -> &'static str {
        match self {
            AttachmentKind::SockOps => "sock_ops",
            AttachmentKind::SkLookup => "sk_lookup",
        }
    }
}

/// A program no longer attached where the agent attached it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub kind: AttachmentKind,
    /// The cgroup or namespace path: for the agent's own log, never for
    /// `/readyz`, which anyone on the node may read.
    pub place: String,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            AttachmentKind::SockOps => write!(f, "sock_ops on cgroup {}", self.place),
            AttachmentKind::SkLookup => write!(f, "sk_lookup in {}", self.place),
        }
    }
}

impl Attachments {
    /// Programs no longer attached where the agent attached them (one
    /// `BPF_PROG_QUERY` each).
    pub fn missing(&self) -> Vec<Missing> {
        let attached = |fd: &File, kind, id| {
            sys::prog_query(fd.as_fd(), kind)
                .map(|ids| ids.contains(&id))
                .unwrap_or(false)
        };
        let cgroups = self
            .cgroups
            .iter()
            .filter(|(_, fd, id)| !attached(fd, sys::BPF_CGROUP_SOCK_OPS, *id))
            .map(|(name, _, _)| Missing {
                kind: AttachmentKind::SockOps,
                place: name.clone(),
            });
        let namespaces = self
            .namespaces
            .iter()
            .filter(|(_, fd, id)| !attached(fd, sys::BPF_SK_LOOKUP, *id))
            .map(|(name, _, _)| Missing {
                kind: AttachmentKind::SkLookup,
                place: name.clone(),
            });
        cgroups.chain(namespaces).collect()
    }

    fn len(&self) -> usize {
        self.cgroups.len() + self.namespaces.len()
    }
}

/// How old a check may be when a request reads it.
const FRESH: Duration = Duration::from_secs(1);

/// What the last [`Telemetry::refresh`] found: requests read this, checked
/// again at most once per [`FRESH`].
#[derive(Clone, Debug, Default)]
struct Checked {
    /// Entries of the LISTENERS map.
    listeners: usize,
    /// Programs the agent attached: sock_ops per cgroup, sk_lookup per namespace.
    expected: usize,
    missing: Vec<Missing>,
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
    pods: Family<Vec<(String, String)>, Gauge>,
    programs: Gauge,
    expected: Gauge,
    ready: Gauge,
}

pub struct Telemetry {
    counters: PerCpuArray<MapData, u64>,
    listeners: MapData,
    attachments: Mutex<Attachments>,
    /// `None` until the first [`Telemetry::refresh`]: not checked yet, so
    /// not ready. With when it was checked.
    checked: Mutex<Option<(Instant, Checked)>>,
    /// Live-store listeners of served namespaces that are not registered, by
    /// namespace name (from the last reconcile pass).
    unservable: Mutex<Vec<(String, Unservable)>>,
    /// `--kube`: (namespace, pod, node) of each pod served.
    served_pods: Mutex<Vec<[String; 3]>>,
    metrics: Mutex<Metrics>,
    http_rejected: Rejections,
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
            "Live-store listening sockets registered (checked at most once a second)",
            listeners_gauge.clone(),
        );
        let unservable = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "listeners_unservable",
            "Live-store listeners in served namespaces that are not registered, by reason (mptcp, no_owner, copy_denied, register_failed); the live-store's problem, so not part of ready",
            unservable.clone(),
        );
        let pods = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "pod_served",
            "1 for each Kubernetes pod whose live-store the agent serves (--kube), by namespace, pod and node: one series per selected pod of this node",
            pods.clone(),
        );
        let programs = Gauge::default();
        registry.register(
            "programs_attached",
            "redirector programs attached (sock_ops per served pod cgroup + one sk_lookup per namespace), checked at most once a second",
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
            "1 when /readyz answers 200: every program the agent attached is still attached (checked at most once a second); 0 while starting or when one was detached. Unservable live-store listeners do not count (see listeners_unservable)",
            ready.clone(),
        );
        let http_rejected = Rejections::register(&mut registry, Limits::AGENT);
        registry.register(
            "build_info",
            "1, labelled with the agent's version and the build id of its kernel object (agents of one bpf_object adopt each other's pinned state)",
            build_info(),
        );
        let telemetry = Self {
            counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(counters))
                .context("COUNTERS map")?,
            listeners,
            attachments: Mutex::new(attachments),
            checked: Mutex::new(None),
            unservable: Mutex::new(Vec::new()),
            served_pods: Mutex::new(Vec::new()),
            metrics: Mutex::new(Metrics {
                registry,
                last: vec![0; kernel.len()],
                kernel,
                active,
                listeners: listeners_gauge,
                unservable,
                pods,
                programs,
                expected,
                ready,
            }),
            http_rejected,
            flow_subscriber_lost,
            flow_subscribers,
        };
        telemetry.refresh();
        Ok(telemetry)
    }

    /// Adds metric families that another part of the agent keeps up to date
    /// (the ring check's), next to the agent's own.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        if let Ok(mut m) = self.metrics.lock() {
            f(&mut m.registry);
        }
    }

    /// Replaces what readiness checks (the served set changed), and checks it.
    pub fn set_attachments(
        &self,
        cgroups: Vec<(String, File, u32)>,
        namespaces: Vec<(String, File, u32)>,
    ) {
        if let Ok(mut a) = self.attachments.lock() {
            a.cgroups = cgroups;
            a.namespaces = namespaces;
        }
        self.refresh();
    }

    /// Stores what scrapes and `/readyz` report: the number of registered
    /// listeners (a walk of the LISTENERS map) and whether each program the
    /// agent attached is still attached (a `BPF_PROG_QUERY` each). Run when
    /// the served set changes and, on a request, when the last check is
    /// older than [`FRESH`]: however many requests arrive, they cost at most
    /// one walk a second, and an agent nobody asks costs none. A program
    /// found missing is named in the agent's log, once: `/readyz` only
    /// counts them.
    pub fn refresh(&self) {
        let listeners = sys::map_keys::<ListenerKey>(self.listeners.fd().as_fd()).map(|k| k.len());
        let (expected, missing) = {
            let a = self
                .attachments
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (a.len(), a.missing())
        };
        let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
        let before = checked.take().map(|(_, c)| c).unwrap_or_default();
        for m in missing.iter().filter(|m| !before.missing.contains(m)) {
            tracing::warn!(
                "{m} is no longer attached: something detached it behind the agent's back; restart the agent to attach it again"
            );
        }
        let listeners = match listeners {
            Ok(n) => n,
            // A failed walk says nothing about the listeners: keep the last count.
            Err(e) => {
                tracing::debug!("counting registered listeners: {e}");
                before.listeners
            }
        };
        *checked = Some((
            Instant::now(),
            Checked {
                listeners,
                expected,
                missing,
            },
        ));
    }

    /// The last check, made again first if it is older than [`FRESH`].
    fn checked(&self) -> Option<Checked> {
        let stale = self
            .checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= FRESH);
        if stale {
            self.refresh();
        }
        self.checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(_, c)| c.clone())
    }

    /// Replaces the listeners reported unservable (each reconcile pass).
    pub fn set_unservable(&self, unservable: Vec<(String, Unservable)>) {
        if let Ok(mut u) = self.unservable.lock() {
            *u = unservable;
        }
    }

    /// Replaces the pods served (`--kube`): (namespace, pod, node).
    pub fn set_served_pods(&self, pods: Vec<[String; 3]>) {
        if let Ok(mut p) = self.served_pods.lock() {
            *p = pods;
        }
    }

    fn unservable(&self) -> Vec<(String, Unservable)> {
        self.unservable
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// A counter as every report of it says it: the kernel's per-CPU slots,
    /// plus, for registrations, the listeners the agent registered itself
    /// (ones that listened before it): /metrics and the exit summary agree.
    pub fn kernel_counter(&self, c: Counter) -> u64 {
        let kernel = self
            .counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        match c {
            Counter::ListenerRegistered => kernel + crate::bpf::registry::registered_by_agent(),
            _ => kernel,
        }
    }

    /// What `/readyz` answers now: Ok, or why not (the text it serves).
    pub fn readiness(&self) -> Result<(), String> {
        readiness(self.checked().as_ref())
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
        let closed = self.kernel_counter(Counter::FlowsClosed)
            + self.kernel_counter(Counter::FlowTableFull)
            + self.kernel_counter(Counter::FlowQuotaExceeded);
        m.active.set(opened.saturating_sub(closed) as i64);
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
        // A deleted pod's series goes with it.
        m.pods.clear();
        if let Ok(pods) = self.served_pods.lock() {
            for [namespace, pod, node] in pods.iter() {
                m.pods
                    .get_or_create(&vec![
                        ("namespace".to_owned(), namespace.clone()),
                        ("pod".to_owned(), pod.clone()),
                        ("node".to_owned(), node.clone()),
                    ])
                    .set(1);
            }
        }
        let checked = self.checked();
        let c = checked.clone().unwrap_or_default();
        m.listeners.set(c.listeners as i64);
        m.programs
            .set(c.expected.saturating_sub(c.missing.len()) as i64);
        m.expected.set(c.expected as i64);
        // From the same state the gauges above report, through the same
        // function as /readyz, so the two never disagree.
        m.ready.set(i64::from(readiness(checked.as_ref()).is_ok()));
        let mut out = String::new();
        encode(&mut out, &m.registry)?;
        Ok(out)
    }
}

/// `/readyz`'s verdict on what the last refresh found. Anyone on the node
/// can read it, so it counts missing programs by kind and names no namespace,
/// cgroup, process or address: the agent's log and `redirector status` on the
/// node have those. Unservable listeners are the live-store's problem, not the
/// agent's: they are reported apart (`listeners_unservable`, `status`).
fn readiness(checked: Option<&Checked>) -> Result<(), String> {
    let Some(checked) = checked else {
        return Err("starting: the agent has not checked its programs yet\n".to_owned());
    };
    let lines: Vec<String> = AttachmentKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let n = checked.missing.iter().filter(|m| m.kind == kind).count();
            (n > 0).then(|| {
                format!(
                    "not ready: {n} {} attachment(s) missing; see the agent's log or `redirector status` on the node\n",
                    kind.label()
                )
            })
        })
        .collect();
    if lines.is_empty() {
        Ok(())
    } else {
        Err(lines.concat())
    }
}

#[cfg(test)]
mod tests {
    use super::{http::*, *};
    use std::{
        io,
        net::{Ipv4Addr, Ipv6Addr, SocketAddr},
        time::{Duration, Instant},
    };

    use anyhow::Result;
    use axum::{routing::get, Router};

    use prometheus_client::{encoding::text::encode, registry::Registry};

    use tokio::net::TcpStream;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Generous everywhere but where a test narrows one limit.
    const LOOSE: Limits = Limits {
        max_connections: 16,
        header_read_timeout: Duration::from_secs(20),
        max_connection_age: Duration::from_secs(60),
        max_request_bytes: 8 * 1024,
    };

    /// `app` served by the accept loop on a free loopback port.
    fn start_with(app: Router, limits: Limits) -> (SocketAddr, Rejections) {
        let listener = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("listen");
        let addr = listener.local_addr().expect("bound address");
        let rejected = Rejections::default();
        tokio::spawn(accept_loop(listener, app, limits, rejected.clone()));
        (addr, rejected)
    }

    fn start(limits: Limits) -> (SocketAddr, Rejections) {
        start_with(
            Router::new().route("/healthz", get(|| async { "ok\n" })),
            limits,
        )
    }

    /// Sends `request` and reads until the server closes the connection
    /// (`Err` for a reset), giving up after `limit`.
    async fn exchange(
        addr: SocketAddr,
        request: &[u8],
        limit: Duration,
    ) -> Result<io::Result<String>, tokio::time::error::Elapsed> {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(request).await.expect("send");
        read_until_closed(&mut c, limit).await
    }

    async fn read_until_closed(
        c: &mut TcpStream,
        limit: Duration,
    ) -> Result<io::Result<String>, tokio::time::error::Elapsed> {
        let mut answer = Vec::new();
        tokio::time::timeout(limit, c.read_to_end(&mut answer))
            .await
            .map(|r| r.map(|_| String::from_utf8_lossy(&answer).into_owned()))
    }

    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    async fn healthz(addr: SocketAddr) -> String {
        exchange(addr, HEALTHZ, Duration::from_secs(5))
            .await
            .expect("answered in time")
            .expect("answered")
    }

    async fn counted(rejected: &Rejections, r: Rejection, n: u64) {
        for _ in 0..200 {
            if rejected.get(r) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rejected.get(r), n, "{r:?}");
    }

    #[tokio::test]
    async fn a_half_sent_header_is_dropped_after_the_header_timeout() {
        let timeout = Duration::from_millis(200);
        let (addr, rejected) = start(Limits {
            header_read_timeout: timeout,
            ..LOOSE
        });
        let started = Instant::now();
        let answer = exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
            Duration::from_secs(3),
        )
        .await
        .expect("the server closed the half-sent request");
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        // Closed (end of stream or reset) and never answered as if complete.
        assert!(
            answer.as_ref().map_or(true, |a| !a.contains("200 OK")),
            "{answer:?}"
        );
        counted(&rejected, Rejection::HeaderTimeout, 1).await;
        // A connection that says nothing at all is closed and counted too.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        read_until_closed(&mut silent, Duration::from_secs(3))
            .await
            .expect("the server closed the silent connection")
            .ok();
        counted(&rejected, Rejection::HeaderTimeout, 2).await;
        assert!(healthz(addr).await.starts_with("HTTP/1.1 200 OK"));
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_but_not_counted() {
        let (addr, rejected) = start(Limits {
            header_read_timeout: Duration::from_millis(200),
            ..LOOSE
        });
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let answer = read_until_closed(&mut c, Duration::from_secs(3))
            .await
            .expect("the idle connection was closed")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        // Only rejections are counted: a scraper's kept-alive connection,
        // closed between scrapes, is not one.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(rejected.get(Rejection::HeaderTimeout), 0);
    }

    #[tokio::test]
    async fn a_slow_client_never_holds_up_another() {
        let (addr, _) = start(LOOSE);
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")
            .await
            .expect("send");
        let started = Instant::now();
        assert!(healthz(addr).await.starts_with("HTTP/1.1 200 OK"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once_and_counted() {
        let (addr, rejected) = start(Limits {
            max_connections: 2,
            ..LOOSE
        });
        let held = TcpStream::connect(addr).await.expect("connect");
        let _held = TcpStream::connect(addr).await.expect("connect");
        // Accepted after the two above (the backlog is first in, first out),
        // so no slot is left for it.
        let over = exchange(addr, HEALTHZ, Duration::from_secs(2))
            .await
            .expect("closed at once, not left waiting for a slot");
        assert!(
            over.as_ref().map_or(true, |a| a.is_empty()),
            "closed without an answer: {over:?}"
        );
        counted(&rejected, Rejection::Limit, 1).await;
        // A slot is free again as soon as a client leaves.
        drop(held);
        let mut served = false;
        for _ in 0..100 {
            if let Ok(Ok(a)) = exchange(addr, HEALTHZ, Duration::from_secs(2)).await {
                if a.starts_with("HTTP/1.1 200 OK") {
                    served = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "never served after a slot was freed");
    }

    #[tokio::test]
    async fn oversized_headers_and_bodies_are_refused_and_counted() {
        let (addr, rejected) = start(LOOSE);
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(LOOSE.max_request_bytes)
        );
        let answer = exchange(addr, big.as_bytes(), Duration::from_secs(3))
            .await
            .expect("answered in time");
        // hyper may reset the connection before the client reads the 431.
        if let Ok(a) = &answer {
            assert!(a.is_empty() || a.starts_with("HTTP/1.1 431"), "{a}");
        }
        counted(&rejected, Rejection::TooLarge, 1).await;

        let answer = exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            Duration::from_secs(3),
        )
        .await
        .expect("answered in time")
        .expect("answered");
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        counted(&rejected, Rejection::TooLarge, 2).await;
        assert!(healthz(addr).await.starts_with("HTTP/1.1 200 OK"));
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_answer_is_cut_off() {
        // Far more than loopback's socket buffers hold: the server's write
        // blocks until the client reads.
        let big = Router::new().route("/big", get(|| async { vec![b'x'; 64 << 20] }));
        let (addr, rejected) = start_with(
            big,
            Limits {
                max_connection_age: Duration::from_millis(300),
                header_read_timeout: Duration::from_millis(200),
                ..LOOSE
            },
        );
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        counted(&rejected, Rejection::Lifetime, 1).await;
    }

    #[test]
    fn every_address_falls_back_to_ipv4_on_a_node_without_ipv6() {
        const EVERY_ADDRESS: SocketAddr = SocketAddr::V6(std::net::SocketAddrV6::new(
            Ipv6Addr::UNSPECIFIED,
            9464,
            0,
            0,
        ));
        let no_ipv6 = |errno| {
            move |a: SocketAddr| {
                if a.is_ipv6() {
                    Err(io::Error::from_raw_os_error(errno))
                } else {
                    Ok(a)
                }
            }
        };
        for errno in [libc::EAFNOSUPPORT, libc::EADDRNOTAVAIL] {
            assert_eq!(
                bind(EVERY_ADDRESS, no_ipv6(errno)).expect("fell back"),
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9464))
            );
        }
        // What the operator chose fails as it is.
        let chosen = SocketAddr::from((Ipv6Addr::LOCALHOST, 9465));
        assert!(bind(chosen, no_ipv6(libc::EAFNOSUPPORT)).is_err());
        // Any other error (the port is taken) is not hidden by a fallback.
        let e = bind(EVERY_ADDRESS, no_ipv6(libc::EADDRINUSE)).expect_err("in use");
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn run_serves_this_node_only_by_default() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["redirector", "run"]).expect("parses");
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("not run: {:?}", cli.command);
        };
        let settings = crate::commands::run::args::resolve(*args).expect("resolves");
        assert_eq!(
            settings.metrics_addr,
            SocketAddr::from(([127, 0, 0, 1], 9464))
        );
    }

    #[tokio::test]
    async fn the_ipv6_wildcard_takes_ipv4_clients_too() {
        let listener = match listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return,
            Err(e) => panic!("listen on [::]: {e}"),
        };
        let port = listener.local_addr().expect("bound").port();
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        connected.expect("an IPv4 client connects to [::]");
        accepted.expect("accepted");
    }

    #[test]
    fn build_info_is_one_labelled_with_the_version_and_kernel_object() {
        let mut registry = Registry::with_prefix("redirector");
        registry.register("build_info", "which build runs", build_info());
        let mut om = String::new();
        encode(&mut om, &registry).expect("encodes");
        let text = classic(&om);
        assert!(
            text.contains("# TYPE redirector_build_info gauge\n"),
            "{text}"
        );
        let sample = format!(
            "redirector_build_info{{version=\"{}\",bpf_object=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            crate::bpf::datapath::build_id()
        );
        assert!(text.contains(&sample), "{sample} in {text}");
    }

    #[test]
    fn rejections_are_exported_by_reason_from_the_start() {
        let mut registry = Registry::with_prefix("redirector");
        let rejected = Rejections::register(&mut registry, Limits::AGENT);
        rejected.count(Rejection::Limit);
        let mut om = String::new();
        encode(&mut om, &registry).expect("encodes");
        let text = classic(&om);
        assert!(
            text.contains("# TYPE redirector_http_connections_rejected_total counter\n"),
            "{text}"
        );
        assert!(text.contains("1024 connections served at once"), "{text}");
        for (reason, n) in [
            ("limit", 1),
            ("header_timeout", 0),
            ("too_large", 0),
            ("lifetime", 0),
        ] {
            let sample =
                format!("redirector_http_connections_rejected_total{{reason=\"{reason}\"}} {n}\n");
            assert!(text.contains(&sample), "{sample} in {text}");
        }
    }

    fn missing(kind: AttachmentKind, place: &str) -> Missing {
        Missing {
            kind,
            place: place.to_owned(),
        }
    }

    #[test]
    fn readiness_counts_missing_programs_and_names_no_namespace_or_cgroup() {
        assert!(readiness(None)
            .expect_err("not checked yet")
            .starts_with("starting"));
        let healthy = Checked {
            listeners: 3,
            expected: 3,
            missing: Vec::new(),
        };
        assert_eq!(readiness(Some(&healthy)), Ok(()));
        let places = [
            "/proc/4242/ns/net",
            "/var/run/netns/tenant-a",
            "/sys/fs/cgroup/kubepods.slice/kubepods-pod0f1e.slice",
        ];
        let detached = Checked {
            listeners: 3,
            expected: 4,
            missing: vec![
                missing(AttachmentKind::SkLookup, places[0]),
                missing(AttachmentKind::SkLookup, places[1]),
                missing(AttachmentKind::SockOps, places[2]),
            ],
        };
        let why = readiness(Some(&detached)).expect_err("not ready");
        assert_eq!(
            why,
            "not ready: 1 sock_ops attachment(s) missing; see the agent's log or `redirector status` on the node\n\
             not ready: 2 sk_lookup attachment(s) missing; see the agent's log or `redirector status` on the node\n"
        );
        for secret in ["/proc", "4242", "tenant-a", "kubepods", "netns", "cgroup"] {
            assert!(!why.contains(secret), "{secret} in {why}");
        }
        // The agent's own log still names each one.
        assert_eq!(
            missing(AttachmentKind::SkLookup, places[0]).to_string(),
            "sk_lookup in /proc/4242/ns/net"
        );
    }

    #[test]
    fn classic_names_counter_families_by_their_samples() {
        let om = "# HELP r_x Things.\n# TYPE r_x counter\nr_x_total 3\n# HELP r_g Now.\n# TYPE r_g gauge\nr_g 1\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP r_x_total Things.\n# TYPE r_x_total counter\nr_x_total 3\n# HELP r_g Now.\n# TYPE r_g gauge\nr_g 1\n"
        );
    }
}
