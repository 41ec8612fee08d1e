//! `redirector run`: validate, attach, serve until a signal, detach.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, IsTerminal, Write},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use redirector_common::{Counter, FlowEvent};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    cli::RunArgs,
    config,
    datapath::{Datapath, Redirect},
    error::Fatal,
    flowlog::{self, FlowFormat, Recorder},
    netns::{Netns, SELF_NETNS},
    sys,
    telemetry::{self, Attachments, Telemetry},
};

pub async fn run(args: RunArgs) -> Result<()> {
    let redirect = match &args.tempo_config {
        Some(path) => {
            let ports = config::tempo_ports(path)?;
            Redirect {
                advertise_port: ports.advertise_port,
                listen_port: ports.listen_port,
            }
        }
        None => Redirect {
            advertise_port: args.advertise_port,
            listen_port: args.listen_port,
        },
    };
    if redirect.advertise_port == redirect.listen_port {
        return Err(Fatal::Usage(format!(
            "--advertise-port and --listen-port are both {}: the advertised port must differ from the port the live-store listens on",
            redirect.listen_port
        ))
        .into());
    }
    let paths: Vec<PathBuf> = if args.netns.is_empty() {
        vec![PathBuf::from(SELF_NETNS)]
    } else {
        args.netns.clone()
    };
    for path in &paths {
        if !path.exists() {
            return Err(Fatal::Usage(format!(
                "network namespace {} does not exist",
                path.display()
            ))
            .into());
        }
    }
    check_privileges()?;
    let (flow_out, flow_format) = open_flow_output(&args)?;

    // Signals first: a SIGTERM that arrives while attaching still detaches cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let namespaces = paths
        .iter()
        .map(|p| Netns::open(p))
        .collect::<Result<Vec<_>>>()?;
    let mut datapath = Datapath::load(args.flow_ring_bytes)?;
    println!("attached sock_ops to cgroup {}", datapath.cgroup.display());
    for netns in namespaces {
        let served = datapath.serve(netns, &[redirect])?;
        let ports: Vec<String> = served
            .redirects
            .iter()
            .map(|r| format!("{} -> {}", r.advertise_port, r.listen_port))
            .collect();
        println!(
            "attached sk_lookup to netns {}: {}, {} existing listener(s) registered",
            served.netns,
            ports.join(", "),
            served.existing_listeners
        );
    }

    let handles = datapath.map_handles()?;
    let telemetry = Arc::new(Telemetry::new(
        handles.counters,
        handles.listeners,
        attachments(&datapath)?,
    )?);
    let metrics_addr = telemetry::serve(args.metrics_addr, telemetry.clone()).await?;
    println!("metrics on http://{metrics_addr}/metrics (also /healthz, /readyz)");

    let recorder = Recorder {
        netns_names: datapath
            .served
            .iter()
            .map(|s| (s.netns.cookie, s.netns.path.display().to_string()))
            .collect::<HashMap<_, _>>(),
        clock_offset_ns: sys::monotonic_to_unix_offset_ns(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(read_flows(
        handles.flow_events,
        recorder,
        flow_format,
        flow_out,
        stop_rx,
    ));
    println!(
        "ready: redirecting in {} network namespace(s)",
        datapath.served.len()
    );

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received"),
        _ = sigint.recv() => tracing::info!("SIGINT received"),
    }
    drop(datapath);
    // The programs are gone: drain what they wrote, then report.
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
    println!(
        "detached all programs; flow records delivered={delivered}; counters: {}",
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

fn attachments(datapath: &Datapath) -> Result<Attachments> {
    let reopen = |f: &File| f.try_clone().context("duplicating a namespace fd");
    Ok(Attachments {
        cgroup: File::open(&datapath.cgroup)
            .with_context(|| format!("opening {}", datapath.cgroup.display()))?,
        sock_ops_id: datapath.sock_ops_id,
        namespaces: datapath
            .served
            .iter()
            .map(|s| {
                Ok((
                    s.netns.path.display().to_string(),
                    reopen(&s.netns.file)?,
                    s.prog_id,
                ))
            })
            .collect::<Result<_>>()?,
    })
}

type FlowOut = Box<dyn Write + Send>;

fn open_flow_output(args: &RunArgs) -> Result<(FlowOut, FlowFormat)> {
    match &args.flow_log {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Fatal::Usage(format!("cannot open flow log {}: {e}", path.display()))
                })?;
            Ok((
                Box::new(io::BufWriter::new(file)),
                args.flow_format.unwrap_or(FlowFormat::Json),
            ))
        }
        None => {
            let default = if io::stdout().is_terminal() {
                FlowFormat::Text
            } else {
                FlowFormat::Json
            };
            Ok((Box::new(io::stdout()), args.flow_format.unwrap_or(default)))
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

fn check_privileges() -> Result<()> {
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
