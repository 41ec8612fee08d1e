//! `redirector run`: validate, attach, serve until a signal, detach.

use std::path::PathBuf;

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::RunArgs,
    datapath::{Datapath, Redirect},
    error::Fatal,
    netns::{Netns, SELF_NETNS},
    sys,
};

pub async fn run(args: RunArgs) -> Result<()> {
    let redirect = Redirect {
        advertise_port: args.advertise_port,
        listen_port: args.listen_port,
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

    // Signals first: a SIGTERM that arrives while attaching still detaches cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let namespaces = paths
        .iter()
        .map(|p| Netns::open(p))
        .collect::<Result<Vec<_>>>()?;
    let mut datapath = Datapath::load()?;
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
    println!(
        "ready: redirecting in {} network namespace(s)",
        datapath.served.len()
    );

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received"),
        _ = sigint.recv() => tracing::info!("SIGINT received"),
    }
    let counters = datapath.counters()?;
    drop(datapath);
    let summary: Vec<String> = counters
        .iter()
        .map(|(c, v)| format!("{}={v}", c.name()))
        .collect();
    println!("detached all programs; counters: {}", summary.join(" "));
    Ok(())
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
