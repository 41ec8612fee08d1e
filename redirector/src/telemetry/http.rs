//! The endpoint's HTTP side: `/metrics` in the format the scraper asks for,
//! `/healthz`, `/readyz`, and the bounds every connection is held to (every
//! pod on the node can reach it, and none is trusted).

use std::{
    convert::Infallible,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    extract::State,
    http::{
        header::{ACCEPT, CONNECTION, CONTENT_TYPE},
        HeaderMap, Request, StatusCode,
    },
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hyper::{
    body::{Body as _, Incoming},
    server::conn::http1,
    service::{service_fn, Service as _},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::{
    metrics::{counter::Counter as PromCounter, family::Family},
    registry::Registry,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::*;

/// Why the endpoint closed a connection before serving it to the end: the
/// `reason` label of `redirector_http_connections_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Over the connection cap: closed as soon as it was accepted.
    Limit,
    /// No complete request header within the header timeout of connecting
    /// (half a header, or nothing at all).
    HeaderTimeout,
    /// Request headers over the size limit (answered 431), or a request with
    /// a body (413).
    TooLarge,
    /// Still open past the whole-connection bound, after a grace period to
    /// finish its answer: a client that does not read it.
    Lifetime,
}

impl Rejection {
    const ALL: [Rejection; 4] = [
        Rejection::Limit,
        Rejection::HeaderTimeout,
        Rejection::TooLarge,
        Rejection::Lifetime,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::Limit => "limit",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::TooLarge => "too_large",
            Rejection::Lifetime => "lifetime",
        }
    }
}

/// Connections the endpoint closed, by [`Rejection`].
#[derive(Clone, Default)]
pub struct Rejections(Family<Vec<(String, String)>, PromCounter>);

impl Rejections {
    /// `http_connections_rejected{reason}` in `registry`, every reason at 0
    /// from the start (rate() and alerts need the series before the first
    /// rejection), described with the `limits` the endpoint enforces.
    pub(super) fn register(registry: &mut Registry, limits: Limits) -> Self {
        let rejections = Self::default();
        for r in Rejection::ALL {
            rejections.counter(r);
        }
        registry.register(
            "http_connections_rejected",
            format!(
                "Connections to this HTTP endpoint (/metrics, /healthz, /readyz) the agent closed before serving them to the end, by reason: \
                 limit ({} connections served at once: closed at accept), \
                 header_timeout (no complete request within {} s of connecting), \
                 too_large (request line and headers over {} bytes, or a request body), \
                 lifetime (open over {} s and not done within {} s more: a client that does not read its answer)",
                limits.max_connections,
                limits.header_read_timeout.as_secs(),
                limits.max_request_bytes,
                limits.max_connection_age.as_secs(),
                limits.header_read_timeout.as_secs(),
            ),
            rejections.0.clone(),
        );
        rejections
    }

    fn counter(&self, r: Rejection) -> PromCounter {
        self.0
            .get_or_create(&vec![("reason".to_owned(), r.label().to_owned())])
            .clone()
    }

    pub(super) fn count(&self, r: Rejection) {
        self.counter(r).inc();
    }

    pub fn get(&self, r: Rejection) -> u64 {
        self.counter(r).get()
    }
}

/// What the endpoint's clients can hold, together (connections) and each.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; one more is closed as soon as it is
    /// accepted.
    pub max_connections: usize,
    /// For a request's headers to arrive, and for a kept-alive connection's
    /// next request to start.
    pub header_read_timeout: Duration,
    /// For a connection as a whole, whatever it does; then it may finish the
    /// answer it is being sent within one more `header_read_timeout`.
    pub max_connection_age: Duration,
    /// Request line and headers, in bytes.
    pub max_request_bytes: usize,
}

impl Limits {
    /// Prometheus and the kubelet send one small GET at a time, on a
    /// connection or two each: far more than they need, far less than would
    /// cost the agent anything.
    pub const AGENT: Limits = Limits {
        // 500 slow clients (each held at most the header timeout) leave room
        // for the kubelet's probes and Prometheus.
        max_connections: 1024,
        header_read_timeout: Duration::from_secs(5),
        max_connection_age: Duration::from_secs(30),
        max_request_bytes: 8 * 1024,
    };
}

/// hyper refuses a smaller read buffer (it panics).
pub(super) const HYPER_MIN_BUF_SIZE: usize = 8192;

/// Pause after a failed accept(): out of file descriptors, most often, which
/// connections being served give back as they end. Retrying at once would
/// spin on the same error.
pub(super) const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// OpenMetrics, what Prometheus asks for first in its `Accept` header.
pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for everything else (curl, promtool,
/// older scrapers).
pub(super) const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves OpenMetrics to clients that ask for it, the classic text format
/// otherwise: each under its own content type, so no parser reads one as the
/// other.
pub(super) async fn metrics(
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
pub(super) fn classic(openmetrics: &str) -> String {
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

pub(super) async fn ready(State(t): State<Arc<Telemetry>>) -> (StatusCode, String) {
    match readiness(t.checked().as_ref()) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Binds `addr` and serves until the runtime stops, within [`Limits::AGENT`].
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<SocketAddr> {
    let listener =
        bind(addr, listen).with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    let rejected = telemetry.http_rejected.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(telemetry);
    tokio::spawn(accept_loop(listener, app, Limits::AGENT, rejected));
    Ok(bound)
}

/// `listen(addr)`, and for `[::]` (every address) on a node without IPv6,
/// `0.0.0.0` instead. Any other address fails as it is.
pub(super) fn bind<L>(
    addr: SocketAddr,
    listen: impl Fn(SocketAddr) -> io::Result<L>,
) -> io::Result<L> {
    match listen(addr) {
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
        {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!("no IPv6 on this node ({e}): the metrics endpoint listens on {v4}");
            listen(v4)
        }
        other => other,
    }
}

pub(super) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]` takes IPv4 scrapers and probes too, whatever
        // net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    // As std's bind: a restarted agent binds again while the last one's
    // connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Serves `app` on `listener` until the runtime stops, each connection in a
/// task of its own (one slow client never holds up another) and within
/// `limits`; counts the connections it closes in `rejected`.
pub(super) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    rejected: Rejections,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_request_bytes)
        .max_buf_size(limits.max_request_bytes.max(HYPER_MIN_BUF_SIZE));
    let mut failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "metrics endpoint: accepting a connection failed: {e}; retrying every {ACCEPT_RETRY:?}"
                    );
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed before a byte is read: a client over the cap costs an
            // accept and a close, and never waits for a slot.
            drop(stream);
            rejected.count(Rejection::Limit);
            continue;
        };
        tokio::spawn(serve_connection(
            stream,
            http.clone(),
            app.clone(),
            limits,
            rejected.clone(),
            slot,
        ));
    }
}

pub(super) async fn serve_connection(
    stream: TcpStream,
    http: http1::Builder,
    app: Router,
    limits: Limits,
    rejected: Rejections,
    _slot: OwnedSemaphorePermit,
) {
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let routes = TowerToHyperService::new(app);
        let (requested, rejected) = (requested.clone(), rejected.clone());
        service_fn(move |req: Request<Incoming>| {
            requested.store(true, Ordering::Relaxed);
            // Every route is a GET: a body would only be read to be thrown
            // away, so it is refused unread and the connection closed.
            let has_body = !req.body().is_end_stream();
            if has_body {
                rejected.count(Rejection::TooLarge);
            }
            let routes = routes.clone();
            async move {
                if has_body {
                    return Ok::<Response, Infallible>(
                        (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            [(CONNECTION, "close")],
                            "requests to this endpoint carry no body\n",
                        )
                            .into_response(),
                    );
                }
                routes.call(req).await
            }
        })
    };
    let mut conn = std::pin::pin!(http.serve_connection(TokioIo::new(stream), service));
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = tokio::time::sleep(limits.max_connection_age) => {
            // Lets an answer being written finish, then closes.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_read_timeout, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    rejected.count(Rejection::Lifetime);
                    return;
                }
            }
        }
    };
    match result {
        // The same timer closes a kept-alive connection that waits for its
        // next request: a scraper between scrapes, not a rejection.
        Err(e) if e.is_timeout() => {
            if !requested.load(Ordering::Relaxed) {
                rejected.count(Rejection::HeaderTimeout);
            }
        }
        Err(e) if e.is_parse_too_large() => rejected.count(Rejection::TooLarge),
        Err(e) => tracing::debug!("metrics endpoint connection: {e}"),
        Ok(()) => {}
    }
}
