//! `redirector run`: resolve the settings, attach, keep the set of served
//! namespaces current (explicit ones that vanish, discovered ones that come and
//! go), serve until a signal, then detach (or, with `--pin`, leave it running).

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{self, IsTerminal, Write},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use redirector_common::{Counter, FlowEvent, DEFAULT_ADVERTISE_PORT, DEFAULT_LISTEN_PORT};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    cli::RunArgs,
    config::{self, FileConfig},
    datapath::{Datapath, Redirect},
    discover,
    error::Fatal,
    flowlog::{self, FlowFormat, NsInfo, Recorder},
    listeners::{self, Owner},
    netns::{Netns, SELF_NETNS},
    pins::{PinLayout, PIN_ROOT},
    sys,
    telemetry::{self, Attachments, Telemetry},
};

const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Everything `run` needs, after flags, the config file and defaults are merged.
struct Settings {
    redirects: Vec<Redirect>,
    netns: Vec<PathBuf>,
    discover: bool,
    cgroup_pattern: Option<String>,
    listener_grace: Duration,
    pin: bool,
    flow_format: Option<FlowFormat>,
    flow_log: Option<PathBuf>,
    metrics_addr: SocketAddr,
    flow_ring_bytes: u32,
}

impl Settings {
    fn listen_ports(&self) -> Vec<u16> {
        self.redirects.iter().map(|r| r.listen_port).collect()
    }
}

fn usage(msg: String) -> anyhow::Error {
    Fatal::Usage(msg).into()
}

fn settings(args: RunArgs) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => FileConfig::default(),
    };
    let redirects: Vec<Redirect> = if args.advertise_port.is_some() || args.listen_port.is_some() {
        vec![Redirect {
            advertise_port: args.advertise_port.unwrap_or(DEFAULT_ADVERTISE_PORT),
            listen_port: args.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
        }]
    } else if let Some(path) = &args.tempo_config {
        let ports = config::tempo_ports(path)?;
        vec![Redirect {
            advertise_port: ports.advertise_port,
            listen_port: ports.listen_port,
        }]
    } else {
        let from_file = config::resolve_redirects(&file)?;
        if from_file.is_empty() {
            vec![Redirect {
                advertise_port: DEFAULT_ADVERTISE_PORT,
                listen_port: DEFAULT_LISTEN_PORT,
            }]
        } else {
            from_file
                .into_iter()
                .map(|r| Redirect {
                    advertise_port: r.advertise_port,
                    listen_port: r.listen_port,
                })
                .collect()
        }
    };
    for r in &redirects {
        if r.advertise_port == r.listen_port {
            return Err(usage(format!(
                "--advertise-port and --listen-port are both {}: the advertised port must differ from the port the live-store listens on",
                r.listen_port
            )));
        }
    }
    let discover = args.discover || file.discover.unwrap_or(false);
    let mut netns = if args.netns.is_empty() {
        file.netns
    } else {
        args.netns
    };
    if netns.is_empty() && !discover {
        netns.push(PathBuf::from(SELF_NETNS));
    }
    let metrics_addr = match args.metrics_addr.or(file.metrics_addr) {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR
            .parse()
            .context("default metrics address")?,
    };
    Ok(Settings {
        redirects,
        netns,
        discover,
        cgroup_pattern: args.cgroup_pattern.or(file.cgroup_pattern),
        listener_grace: Duration::from_secs(args.listener_grace),
        pin: args.pin || file.pin.unwrap_or(false),
        flow_format: args.flow_format.or(file.flow_format),
        flow_log: args.flow_log.or(file.flow_log),
        metrics_addr,
        flow_ring_bytes: args.flow_ring_bytes,
    })
}

/// How a served namespace came to be served, which decides when it stops.
enum Origin {
    /// Listed by the operator: served until its path disappears.
    Explicit { path: PathBuf, ino: u64 },
    /// Found by discovery: served while it exists and, within the grace
    /// period, has a listener.
    Discovered {
        ino: u64,
        without_listener_since: Option<Instant>,
    },
}

pub async fn run(args: RunArgs) -> Result<()> {
    let s = settings(args)?;
    for path in &s.netns {
        if !path.exists() {
            return Err(usage(format!(
                "network namespace {} does not exist",
                path.display()
            )));
        }
    }
    check_privileges()?;
    let (flow_out, flow_format) = open_flow_output(&s)?;

    // Signals first: a SIGTERM that arrives while attaching still ends cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let namespaces = s
        .netns
        .iter()
        .map(|p| Netns::open(p))
        .collect::<Result<Vec<_>>>()?;
    let pins = s.pin.then(PinLayout::default);
    let mut datapath = Datapath::load(s.flow_ring_bytes, pins)?;
    let verb = if datapath.sock_ops_adopted {
        "adopted"
    } else {
        "attached"
    };
    println!("{verb} sock_ops on cgroup {}", datapath.cgroup.display());

    let mut origins: HashMap<u64, Origin> = HashMap::new();
    for netns in namespaces {
        let origin = Origin::Explicit {
            path: netns.path.clone(),
            ino: netns.inode(),
        };
        let cookie = netns.cookie;
        serve(&mut datapath, netns, &s.redirects)?;
        origins.insert(cookie, origin);
    }

    let handles = datapath.map_handles()?;
    let telemetry = Arc::new(Telemetry::new(
        handles.counters,
        handles.listeners,
        attachments(&datapath)?,
    )?);
    let metrics_addr = telemetry::serve(s.metrics_addr, telemetry.clone()).await?;
    println!("metrics on http://{metrics_addr}/metrics (also /healthz, /readyz)");

    let names = Arc::new(Mutex::new(HashMap::new()));
    let recorder = Recorder {
        namespaces: names.clone(),
        clock_offset_ns: sys::monotonic_to_unix_offset_ns(),
    };
    spawn_kernel_logs(datapath.sock_ops.prog_id);
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(read_flows(
        handles.flow_events,
        recorder,
        flow_format,
        flow_out,
        stop_rx,
    ));

    let mut agent = Agent {
        datapath,
        origins,
        settings: s,
        telemetry: telemetry.clone(),
        names,
        owners: HashMap::new(),
    };
    agent.maintain()?;
    // Everything this agent serves is adopted or attached by now: what else a
    // previous agent pinned is stale, or belongs to the build we replace.
    if let Some(old) = agent.datapath.replaces().map(str::to_owned) {
        let removed = agent.datapath.persist()?;
        println!(
            "replaced the pinned state of build {old} ({} objects) with build {}, without a gap",
            removed.len(),
            crate::datapath::build_id()
        );
    }
    for what in agent.datapath.sweep_unserved()? {
        println!("removed stale pinned {what}");
    }
    agent.publish()?;
    println!(
        "ready: redirecting in {} network namespace(s){}",
        agent.datapath.served.len(),
        if agent.settings.discover {
            ", discovering more"
        } else {
            ""
        }
    );

    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
            _ = tick.tick() => {
                if let Err(e) = agent.maintain().and_then(|()| agent.publish()) {
                    tracing::error!("updating served namespaces: {e:#}");
                }
            }
        }
    }
    let pinned = agent.settings.pin;
    drop(agent);
    // Unpinned programs are gone now: drain what they wrote, then report.
    let _ = stop_tx.send(true);
    let delivered = match reader.await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::error!("flow reader failed: {e:#}");
            0
        }
        Err(e) => {
            tracing::error!("flow reader task failed: {e}");
            0
        }
    };
    let summary: Vec<String> = Counter::ALL
        .iter()
        .map(|&c| format!("{}={}", c.name(), telemetry.kernel_counter(c)))
        .collect();
    let what = if pinned {
        format!(
            "left programs attached and pinned under {PIN_ROOT} (`redirector detach` removes them)"
        )
    } else {
        "detached all programs".to_owned()
    };
    println!(
        "{what}; flow records delivered={delivered}; counters: {}",
        summary.join(" ")
    );
    let dropped = telemetry.kernel_counter(Counter::RecordsDropped);
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "flow records were dropped because the ring buffer was full (raise --flow-ring-bytes)"
        );
    }
    Ok(())
}

/// Forwards the kernel programs' aya-log records (debug level only, see
/// `RUST_LOG`) into this process's log. All instances share one ring.
fn spawn_kernel_logs(prog_id: u32) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let logger = match aya_log::EbpfLogger::init_from_id(prog_id) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("kernel debug messages unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring fd and keeps it open, unchanged,
        // until the AsyncFd (which owns the logger) is dropped.
        let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
            return;
        };
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn serve(datapath: &mut Datapath, netns: Netns, redirects: &[Redirect]) -> Result<()> {
    let served = datapath.serve(netns, redirects)?;
    let ports: Vec<String> = served
        .redirects
        .iter()
        .map(|r| format!("{} -> {}", r.advertise_port, r.listen_port))
        .collect();
    println!(
        "{} sk_lookup in netns {}: {}, {} existing listener(s) registered",
        if served.adopted {
            "adopted"
        } else {
            "attached"
        },
        served.netns,
        ports.join(", "),
        served.existing_listeners
    );
    Ok(())
}

struct Agent {
    datapath: Datapath,
    origins: HashMap<u64, Origin>,
    settings: Settings,
    telemetry: Arc<Telemetry>,
    names: Arc<Mutex<HashMap<u64, NsInfo>>>,
    /// Per namespace: the listening socket inodes last seen and their owner.
    owners: HashMap<u64, (Vec<u64>, Option<Owner>)>,
}

impl Agent {
    /// Drops namespaces that are gone (or whose live-store stopped for good) and,
    /// with discovery, serves new ones.
    fn maintain(&mut self) -> Result<()> {
        let scan = self.settings.discover.then(|| {
            discover::scan(
                &self.settings.listen_ports(),
                self.settings.cgroup_pattern.as_deref(),
            )
        });
        let now = Instant::now();
        let mut gone: Vec<(u64, &'static str)> = Vec::new();
        for (cookie, origin) in self.origins.iter_mut() {
            match origin {
                Origin::Explicit { path, ino } => {
                    // A deleted bind mount (ip netns del) or a dead process: the
                    // path no longer names the namespace we hold open.
                    if std::fs::metadata(&*path).map(|m| m.ino()).ok() != Some(*ino) {
                        gone.push((*cookie, "its namespace path is gone"));
                    }
                }
                Origin::Discovered {
                    ino,
                    without_listener_since,
                } => match scan.as_ref().and_then(|s| s.get(ino)) {
                    None => gone.push((*cookie, "no process is left in the namespace")),
                    Some(c) if c.has_listener => *without_listener_since = None,
                    Some(_) => {
                        let since = *without_listener_since.get_or_insert(now);
                        if now.duration_since(since) >= self.settings.listener_grace {
                            gone.push((*cookie, "its live-store stopped listening"));
                        }
                    }
                },
            }
        }
        for (cookie, why) in gone {
            self.origins.remove(&cookie);
            if let Some(netns) = self.datapath.unserve(cookie) {
                println!("detached sk_lookup from netns {netns}: {why}");
            }
        }
        let Some(scan) = scan else {
            return Ok(());
        };
        let served: HashSet<u64> = self
            .origins
            .values()
            .map(|o| match o {
                Origin::Explicit { ino, .. } | Origin::Discovered { ino, .. } => *ino,
            })
            .collect();
        for (ino, candidate) in scan {
            if !candidate.has_listener || served.contains(&ino) {
                continue;
            }
            // The process may have exited since the scan: try again next time.
            let netns = match Netns::open(&candidate.path) {
                Ok(n) if n.inode() == ino => n,
                Ok(_) | Err(_) => continue,
            };
            let cookie = netns.cookie;
            match serve(&mut self.datapath, netns, &self.settings.redirects) {
                Ok(()) => {
                    self.origins.insert(
                        cookie,
                        Origin::Discovered {
                            ino,
                            without_listener_since: None,
                        },
                    );
                }
                Err(e) => tracing::warn!(
                    "serving discovered netns {}: {e:#}",
                    candidate.path.display()
                ),
            }
        }
        Ok(())
    }

    /// Shares the current set of namespaces with readiness checks and flow
    /// records, including which process holds each live-store listener (looked
    /// up again only when the listening sockets change).
    fn publish(&mut self) -> Result<()> {
        self.telemetry
            .set_namespaces(attachments(&self.datapath)?.namespaces);
        let ports = self.settings.listen_ports();
        let mut infos = HashMap::new();
        for s in &self.datapath.served {
            let inodes = listeners::listening_inodes(&s.netns, &ports).unwrap_or_default();
            let cached = self
                .owners
                .get(&s.netns.cookie)
                .filter(|(seen, _)| *seen == inodes);
            let owner = match cached {
                Some((_, owner)) => owner.clone(),
                None => {
                    let owner = listeners::owner(&inodes);
                    self.owners.insert(s.netns.cookie, (inodes, owner.clone()));
                    owner
                }
            };
            infos.insert(
                s.netns.cookie,
                NsInfo {
                    name: s.netns.path.display().to_string(),
                    listener: owner,
                },
            );
        }
        self.owners.retain(|cookie, _| infos.contains_key(cookie));
        if let Ok(mut names) = self.names.lock() {
            *names = infos;
        }
        Ok(())
    }
}

fn attachments(datapath: &Datapath) -> Result<Attachments> {
    let reopen = |f: &File| f.try_clone().context("duplicating a namespace fd");
    Ok(Attachments {
        cgroup: File::open(&datapath.cgroup)
            .with_context(|| format!("opening {}", datapath.cgroup.display()))?,
        sock_ops_id: datapath.sock_ops.prog_id,
        namespaces: datapath
            .served
            .iter()
            .map(|s| {
                Ok((
                    s.netns.path.display().to_string(),
                    reopen(&s.netns.file)?,
                    s.link.prog_id,
                ))
            })
            .collect::<Result<_>>()?,
    })
}

type FlowOut = Box<dyn Write + Send>;

fn open_flow_output(s: &Settings) -> Result<(FlowOut, FlowFormat)> {
    match &s.flow_log {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| usage(format!("cannot open flow log {}: {e}", path.display())))?;
            Ok((
                Box::new(io::BufWriter::new(file)),
                s.flow_format.unwrap_or(FlowFormat::Json),
            ))
        }
        None => {
            let default = if io::stdout().is_terminal() {
                FlowFormat::Text
            } else {
                FlowFormat::Json
            };
            Ok((Box::new(io::stdout()), s.flow_format.unwrap_or(default)))
        }
    }
}

/// Reads flow records until told to stop, then drains what is left. Returns the
/// number of records written.
async fn read_flows(
    ring: MapData,
    recorder: Recorder,
    format: FlowFormat,
    mut out: FlowOut,
    mut stop: watch::Receiver<bool>,
) -> Result<u64> {
    let ring = RingBuf::try_from(Map::RingBuf(ring)).context("FLOW_EVENTS ring buffer")?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until the
    // AsyncFd (which owns the RingBuf) is dropped.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the flow ring buffer: {e}"))?;
    let mut written = 0u64;
    loop {
        let stopping = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                written += drain(guard.get_inner_mut(), &recorder, format, &mut out)?;
                guard.clear_ready();
                false
            }
            _ = stop.changed() => true,
        };
        if stopping {
            written += drain(ring.get_mut(), &recorder, format, &mut out)?;
            return Ok(written);
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    recorder: &Recorder,
    format: FlowFormat,
    out: &mut FlowOut,
) -> Result<u64> {
    let mut n = 0;
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<FlowEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole FlowEvent (length checked); the ring
        // gives no alignment guarantee, hence the unaligned read.
        let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
        if let Some(record) = recorder.record(&event) {
            flowlog::write_line(out, format, &record).context("writing a flow record")?;
            n += 1;
        }
    }
    out.flush().context("flushing flow records")?;
    Ok(n)
}

pub fn check_privileges() -> Result<()> {
    let missing = sys::missing_capabilities()?;
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
    let reasons: Vec<String> = missing
        .iter()
        .map(|(n, why)| format!("{n} to {why}"))
        .collect();
    Err(Fatal::Environment(format!(
        "missing capabilities {}: run as root or grant them ({})",
        names.join(", "),
        reasons.join("; ")
    ))
    .into())
}
