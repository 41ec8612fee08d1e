//! Load generators, all running in the querier namespace: raw request/response
//! on one persistent connection (RR), connect-request-close (CRR), gRPC unary
//! open-loop at fixed offered rates and closed-loop at saturation, and gRPC
//! server-streaming bulk transfer. Each returns a `Sample` with its latency
//! histogram and the whole machine's CPU time over the measurement.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::runtime::Runtime;

use super::{
    cpu::CpuTimes,
    grpc,
    metric::Metric,
    stats::{self, new_histogram},
    topology::{pin_current_thread, Netns, QUERIER_CPU},
};

/// Everything one workload run produced.
pub struct Sample {
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub bytes: u64,
    pub cpu_secs: f64,
    /// CPU of the bench's own cgroup (NaN without one).
    pub own_cpu_secs: f64,
    pub hist: Histogram<u64>,
}

impl Sample {
    /// Closes a measurement that began at `start` with CPU times `cpu0`.
    fn finish(
        start: Instant,
        cpu0: &CpuTimes,
        hist: Histogram<u64>,
        ops: u64,
        errors: u64,
        bytes: u64,
    ) -> Result<Self> {
        let secs = start.elapsed().as_secs_f64();
        let cpu1 = CpuTimes::now()?;
        Ok(Sample {
            ops,
            errors,
            secs,
            bytes,
            cpu_secs: cpu0.busy_secs_until(&cpu1),
            own_cpu_secs: cpu0.own_secs_until(&cpu1),
            hist,
        })
    }
}

/// Which figures a workload reports.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Kind {
    /// Ping-pong on one connection: latency and CPU per round trip.
    Rr,
    /// Connect, request, close: connections/s, latency, CPU per connection.
    Crr,
    /// gRPC unary at a fixed offered rate: latency from the scheduled send.
    Open,
    /// gRPC unary closed loop: requests/s and latency at saturation.
    Saturation,
    /// gRPC streaming: MiB/s and CPU seconds per GiB.
    Bulk,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub name: String,
    pub kind: Kind,
    pub what: String,
    #[serde(skip)]
    pub spec: Spec,
}

#[derive(Clone, Copy, Debug)]
pub enum Spec {
    Rr { size: usize },
    Crr,
    Open { conns: usize, rate: u64 },
    Saturation { conns: usize, inflight: usize },
    Bulk,
}

impl Sample {
    /// The figures reported for a workload of `kind`.
    pub fn metrics(&self, kind: Kind) -> BTreeMap<Metric, f64> {
        let mut m: BTreeMap<Metric, f64> = kind
            .reported()
            .iter()
            .map(|&metric| (metric, self.value(metric)))
            .collect();
        m.insert(Metric::Errors, self.value(Metric::Errors));
        // Reported so a reader can judge how disturbed a run was; without a
        // bench cgroup there is nothing to subtract.
        if self.secs > 0.0 && self.own_cpu_secs.is_finite() {
            m.insert(Metric::ForeignCpuCores, self.value(Metric::ForeignCpuCores));
        }
        m
    }

    /// One figure of this sample: 0 for a rate over no time, NaN for a cost
    /// per nothing (no operation, no byte, no cgroup).
    fn value(&self, metric: Metric) -> f64 {
        let per_sec = |n: f64| if self.secs > 0.0 { n / self.secs } else { 0.0 };
        let per_op = |cpu: f64| {
            if self.ops > 0 {
                cpu * 1e6 / self.ops as f64
            } else {
                f64::NAN
            }
        };
        let gib = self.bytes as f64 / (1u64 << 30) as f64;
        let per_gib = |cpu: f64| if gib > 0.0 { cpu / gib } else { f64::NAN };
        let l = stats::latency(&self.hist);
        match metric {
            Metric::P50Us => l.p50_us,
            Metric::P90Us => l.p90_us,
            Metric::P99Us => l.p99_us,
            Metric::P999Us => l.p999_us,
            Metric::MaxUs => l.max_us,
            Metric::ReqPerS | Metric::ConnPerS => per_sec(self.ops as f64),
            Metric::CpuUsPerReq | Metric::CpuUsPerConn => per_op(self.cpu_secs),
            Metric::OwnCpuUsPerReq | Metric::OwnCpuUsPerConn => per_op(self.own_cpu_secs),
            Metric::MibPerS => per_sec(self.bytes as f64 / (1u64 << 20) as f64),
            Metric::CpuSPerGib => per_gib(self.cpu_secs),
            Metric::OwnCpuSPerGib => per_gib(self.own_cpu_secs),
            Metric::Errors => self.errors as f64,
            // Everything /proc/stat saw that the bench's cgroup did not: other
            // tenants of this shared machine (and tick-sampling error).
            Metric::ForeignCpuCores => ((self.cpu_secs - self.own_cpu_secs) / self.secs).max(0.0),
        }
    }
}

/// The querier side: a tokio runtime in the querier namespace for gRPC, and
/// plain threads in it for the raw workloads.
pub struct Querier<'a> {
    pub ns: &'a Netns,
    pub rt: Runtime,
}

impl<'a> Querier<'a> {
    pub fn new(ns: &'a Netns) -> Result<Self> {
        Ok(Self {
            ns,
            rt: super::topology::runtime_in(ns, 2, "rdb-querier", Some(QUERIER_CPU))?,
        })
    }

    pub fn run(&self, spec: Spec, addr: SocketAddr, dur: Duration) -> Result<Sample> {
        match spec {
            Spec::Rr { size } => self.ns.try_run(|| {
                pin_current_thread(QUERIER_CPU);
                rr(addr, size, dur)
            }),
            Spec::Crr => self.ns.try_run(|| {
                pin_current_thread(QUERIER_CPU);
                crr(addr, dur)
            }),
            Spec::Open { conns, rate } => self.open_loop(addr, conns, rate, dur),
            Spec::Saturation { conns, inflight } => self.saturation(addr, conns, inflight, dur),
            Spec::Bulk => self.bulk(addr, dur),
        }
    }

    /// Runs `fut` on the querier runtime's workers (so its sockets are created
    /// in the querier namespace), bounded by `limit`.
    fn on_rt<T: Send + 'static>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let handle = self.rt.spawn(async move {
            tokio::time::timeout(limit, fut)
                .await
                .map_err(|_| anyhow::anyhow!("workload did not finish in {limit:?}"))?
        });
        self.rt
            .block_on(handle)
            .map_err(|e| anyhow::anyhow!("workload task: {e}"))?
    }

    fn connect_all(&self, addr: SocketAddr, conns: usize) -> Result<Vec<grpc::Client>> {
        self.on_rt(Duration::from_secs(10), async move {
            let mut clients = Vec::with_capacity(conns);
            for _ in 0..conns {
                let mut c = grpc::connect(addr).await?;
                // Warm the connection (HTTP/2 settings, windows) before timing.
                for _ in 0..20 {
                    grpc::search(&mut c).await.context("warm-up call")?;
                }
                clients.push(c);
            }
            Ok(clients)
        })
    }

    /// Open loop: requests are scheduled at fixed intervals whatever happens to
    /// earlier ones, and latency counts from the scheduled time, so a stall is
    /// charged to every request it delays (no coordinated omission). The
    /// schedule is kept by a dedicated thread with 1 ns timer slack, since
    /// tokio's timer wheel has millisecond granularity.
    fn open_loop(
        &self,
        addr: SocketAddr,
        conns: usize,
        rate: u64,
        dur: Duration,
    ) -> Result<Sample> {
        let clients = self.connect_all(addr, conns)?;
        let total = ((rate as f64) * dur.as_secs_f64()).round().max(1.0) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let collector = self.rt.spawn(async move {
            let mut hist = new_histogram();
            let mut errors = 0u64;
            let mut set = tokio::task::JoinSet::new();
            let mut i = 0usize;
            let mut record = |r: Result<Option<Duration>, tokio::task::JoinError>,
                              hist: &mut Histogram<u64>| match r {
                Ok(Some(d)) => {
                    let _ = hist.record(d.as_nanos() as u64);
                }
                _ => errors += 1,
            };
            while let Some(scheduled) = rx.recv().await {
                let mut c = clients[i % clients.len()].clone();
                i += 1;
                set.spawn(async move {
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), grpc::search(&mut c)).await;
                    matches!(r, Ok(Ok(_))).then(|| scheduled.elapsed())
                });
                while let Some(r) = set.try_join_next() {
                    record(r, &mut hist);
                }
            }
            while let Some(r) = set.join_next().await {
                record(r, &mut hist);
            }
            (hist, errors)
        });
        let cpu0 = CpuTimes::now()?;
        let start = Instant::now() + Duration::from_millis(2);
        // The dispatcher belongs to the querier: its own thread on the
        // querier's CPU, with 1 ns timer slack so nanosleep wakes on time.
        std::thread::scope(|s| {
            s.spawn(|| {
                pin_current_thread(QUERIER_CPU);
                // SAFETY: prctl(2) and sched_setscheduler(2) on this thread only,
                // with a valid sched_param.
                unsafe {
                    libc::prctl(libc::PR_SET_TIMERSLACK, 1);
                    // Real-time priority 1: the dispatcher sleeps almost all the
                    // time, but when a send is due it must not wait a scheduler
                    // slice behind the querier's own workers on this CPU, or the
                    // harness would add its own tail to every path's latency.
                    let param = libc::sched_param { sched_priority: 1 };
                    libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
                }
                for i in 0..total {
                    let at = start + interval * i as u32;
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    if tx.send(at).is_err() {
                        break;
                    }
                }
                drop(tx);
            });
        });
        let (hist, errors) = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), collector).await })
            .context("open-loop requests did not finish in 30 s")?
            .map_err(|e| anyhow::anyhow!("collector: {e}"))?;
        let ops = hist.len();
        Sample::finish(start, &cpu0, hist, ops, errors, 0)
    }

    /// Closed loop: `inflight` callers spread over `conns` connections, each
    /// issuing its next call as soon as the previous one returns.
    fn saturation(
        &self,
        addr: SocketAddr,
        conns: usize,
        inflight: usize,
        dur: Duration,
    ) -> Result<Sample> {
        let clients = self.connect_all(addr, conns)?;
        let cpu0 = CpuTimes::now()?;
        let start = Instant::now();
        let (hist, errors) = self.on_rt(dur + Duration::from_secs(30), async move {
            let deadline = tokio::time::Instant::now() + dur;
            let mut set = tokio::task::JoinSet::new();
            for i in 0..inflight {
                let mut c = clients[i % clients.len()].clone();
                set.spawn(async move {
                    let mut hist = new_histogram();
                    let mut errors = 0u64;
                    while tokio::time::Instant::now() < deadline {
                        let t = Instant::now();
                        match tokio::time::timeout(Duration::from_secs(5), grpc::search(&mut c))
                            .await
                        {
                            Ok(Ok(_)) => {
                                let _ = hist.record(t.elapsed().as_nanos() as u64);
                            }
                            _ => errors += 1,
                        }
                    }
                    (hist, errors)
                });
            }
            let mut hist = new_histogram();
            let mut errors = 0;
            while let Some(r) = set.join_next().await {
                let (h, e) = r.context("caller task")?;
                hist.add(&h).context("merge histograms")?;
                errors += e;
            }
            Ok((hist, errors))
        })?;
        let ops = hist.len();
        Sample::finish(start, &cpu0, hist, ops, errors, 0)
    }

    /// Server streaming on one connection: repeated Fetch calls of 64 x 64 KiB
    /// (a querier pulling a live-store's recent blocks), for `dur`.
    fn bulk(&self, addr: SocketAddr, dur: Duration) -> Result<Sample> {
        let clients = self.connect_all(addr, 1)?;
        let cpu0 = CpuTimes::now()?;
        let start = Instant::now();
        let (bytes, calls, hist) = self.on_rt(dur + Duration::from_secs(30), async move {
            let mut c = clients.into_iter().next().context("no client connection")?;
            let deadline = Instant::now() + dur;
            let (mut bytes, mut calls) = (0u64, 0u64);
            let mut hist = new_histogram();
            while Instant::now() < deadline {
                let t = Instant::now();
                bytes += grpc::fetch(&mut c, 64, 64 * 1024).await?;
                let _ = hist.record(t.elapsed().as_nanos() as u64);
                calls += 1;
            }
            Ok((bytes, calls, hist))
        })?;
        Sample::finish(start, &cpu0, hist, calls, 0, bytes)
    }
}

/// Ping-pong of `size` bytes on one persistent connection (blocking sockets on
/// one thread: the lowest-noise client there is).
fn rr(addr: SocketAddr, size: usize, dur: Duration) -> Result<Sample> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connect {addr}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let out = vec![b'r'; size];
    let mut back = vec![0u8; size];
    for _ in 0..200 {
        conn.write_all(&out)?;
        conn.read_exact(&mut back)?;
    }
    let mut hist = new_histogram();
    let cpu0 = CpuTimes::now()?;
    let start = Instant::now();
    let deadline = start + dur;
    let mut now = start;
    while now < deadline {
        conn.write_all(&out)?;
        conn.read_exact(&mut back).context("echo reply")?;
        let after = Instant::now();
        let _ = hist.record((after - now).as_nanos() as u64);
        now = after;
    }
    if back != out {
        bail!("echo returned different bytes");
    }
    let ops = hist.len();
    Sample::finish(start, &cpu0, hist, ops, 0, 0)
}

/// Connections a CRR run makes before it starts counting (and timing).
pub const CRR_WARMUP: u64 = 50;

/// Connect, send 64 bytes, read them back, close; repeated for `dur`, after
/// [`CRR_WARMUP`] untimed ones. The latency covers the whole exchange
/// including the handshake.
fn crr(addr: SocketAddr, dur: Duration) -> Result<Sample> {
    let mut hist = new_histogram();
    let mut errors = 0u64;
    let out = [b'c'; 64];
    let mut back = [0u8; 64];
    let one = |back: &mut [u8; 64]| -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(&out)?;
        conn.read_exact(back)?;
        Ok(())
    };
    for _ in 0..CRR_WARMUP {
        one(&mut back).context("CRR warm-up")?;
    }
    let cpu0 = CpuTimes::now()?;
    let start = Instant::now();
    let deadline = start + dur;
    let mut now = start;
    while now < deadline {
        let r = one(&mut back);
        let after = Instant::now();
        match r {
            Ok(()) => {
                let _ = hist.record((after - now).as_nanos() as u64);
            }
            // Bounded: a path that refuses every connection still ends at the deadline.
            Err(_) => errors += 1,
        }
        now = after;
    }
    let ops = hist.len();
    Sample::finish(start, &cpu0, hist, ops, errors, 0)
}

/// Waits until `addr` accepts a connection from inside `ns` (a proxy that has
/// just been started), for at most `limit`.
pub fn wait_reachable(ns: &Netns, addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    ns.try_run(|| loop {
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            // Prove the whole path works, not just the proxy's accept: echo 1 byte.
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut b = [0u8; 1];
            if c.write_all(b"p").is_ok() && c.read_exact(&mut b).is_ok() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{addr} not reachable after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    })
}
