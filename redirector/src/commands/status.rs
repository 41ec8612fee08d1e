//! `redirector status` and `redirector detach`: read or remove the pinned state
//! a `--pin` agent leaves in bpffs. `status` never changes anything.

use std::{collections::BTreeMap, fmt::Write as _, os::fd::AsFd};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use clap::Args;
use redirector_common::{
    Counter, MptcpWas, NsPort, RedirectTarget, AF_INET, MAP_COUNTERS, MAP_LISTENERS, MAP_MPTCP_WAS,
    MAP_REDIRECTS, PROG_PREFIX,
};
use serde::Serialize;

use crate::{
    bpf::pins::{PinLayout, PIN_ROOT},
    bpf::registry::{Registry, Unservable},
    bpf::Redirect,
    commands::Output,
    config::settings::state_file,
    sys,
    sys::netns::Netns,
};

/// `redirector status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The running agent's state file (next to its --flows-socket): what it
    /// serves and why.
    #[arg(long, value_name = "PATH", default_value_os_t = default_state_file())]
    pub state_file: std::path::PathBuf,
}

/// Where an agent with the default --flows-socket writes its state file.
fn default_state_file() -> std::path::PathBuf {
    state_file(std::path::Path::new(
        crate::flows::sub::DEFAULT_FLOWS_SOCKET,
    ))
}

/// `redirector detach`.
#[derive(Args, Debug)]
pub struct DetachArgs {
    /// After removing, stay running until SIGTERM: the uninstall
    /// DaemonSet's pods (deploy/uninstall.yaml) must not exit.
    #[arg(long)]
    pub wait: bool,
}

/// `redirector status`: the pinned state and the agent's, printed.
pub fn main(args: StatusArgs) -> Result<()> {
    let layout = PinLayout::default();
    let mut report = collect(&layout)?;
    report.agent = agent_state(&args.state_file);
    print!("{}", render(&report, args.output)?);
    Ok(())
}

/// `redirector detach`: everything pinned removed; with --wait, then up until
/// SIGTERM.
pub async fn detach_main(args: DetachArgs) -> Result<()> {
    crate::sys::require_capabilities()?;
    print!("{}", detach(&PinLayout::default())?);
    if args.wait {
        use std::io::Write as _;
        println!("detached; waiting for SIGTERM");
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct Status {
    pub pinned: bool,
    pub pin_root: &'static str,
    pub build: Option<String>,
    /// Pinned sock_ops links (one per served pod cgroup, or the root's).
    pub sock_ops_attached: usize,
    /// What a running agent serves and why (its state file).
    pub agent: Option<crate::agent::State>,
    pub namespaces: Vec<NamespaceStatus>,
    pub counters: BTreeMap<&'static str, u64>,
    /// redirector programs loaded in the kernel (pinned or by running agents).
    pub programs_loaded: usize,
    /// Their size and, with `sysctl kernel.bpf_stats_enabled=1`, their cost.
    pub programs: Vec<ProgramStatus>,
}

#[derive(Serialize, Debug)]
pub struct ProgramStatus {
    pub id: u32,
    pub name: String,
    /// Instructions the verifier processed to accept the program.
    pub verified_insns: Option<u32>,
    /// Instructions after the kernel's rewrites (what runs, before JIT).
    pub translated_insns: Option<u32>,
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[derive(Serialize, Debug)]
pub struct NamespaceStatus {
    pub netns_cookie: u64,
    /// `net:[inode]` of the namespace; 0 when it no longer exists.
    pub netns_inode: u32,
    pub attached: bool,
    pub redirects: Vec<RedirectStatus>,
    /// Live-store listeners in the namespace that are not registered, and why.
    pub unservable: Vec<Unservable>,
}

#[derive(Serialize, Debug)]
pub struct RedirectStatus {
    pub advertise_port: u16,
    pub listen_port: u16,
    pub listener_registered: bool,
    pub listener_families: Vec<&'static str>,
}

fn programs() -> Vec<ProgramStatus> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with(PROG_PREFIX)))
        .map(|p| ProgramStatus {
            id: p.id(),
            name: p.name_as_str().unwrap_or_default().to_owned(),
            verified_insns: p.verified_instruction_count(),
            translated_insns: p.size_translated().map(|bytes| bytes / 8),
            run_count: p.run_count(),
            run_time_ns: p.run_time().as_nanos() as u64,
        })
        .collect()
}

fn programs_loaded() -> usize {
    programs().len()
}

fn open_map(layout: &PinLayout, name: &str) -> Result<aya::maps::Map> {
    let data = MapData::from_pin(layout.map(name))
        .with_context(|| format!("opening pinned map {name}"))?;
    Ok(match name {
        MAP_COUNTERS => aya::maps::Map::PerCpuArray(data),
        _ => aya::maps::Map::HashMap(data),
    })
}

pub fn collect(layout: &PinLayout) -> Result<Status> {
    let mut status = Status {
        pinned: layout.exists(),
        pin_root: PIN_ROOT,
        build: layout.pinned_build(),
        sock_ops_attached: 0,
        agent: None,
        namespaces: Vec::new(),
        counters: BTreeMap::new(),
        programs_loaded: 0,
        programs: programs(),
    };
    status.programs_loaded = status.programs.len();
    if !status.pinned {
        return Ok(status);
    }
    status.sock_ops_attached = std::iter::once(layout.sock_ops_link())
        .chain(layout.pinned_sock_ops().into_iter().map(|(_, p)| p))
        .filter(|p| {
            sys::obj_get(p)
                .and_then(|fd| sys::link_info(fd.as_fd()))
                .is_ok_and(|i| i.netns_ino != 0)
        })
        .count();
    let redirects: HashMap<MapData, NsPort, RedirectTarget> =
        open_map(layout, MAP_REDIRECTS)?.try_into()?;
    let counters: PerCpuArray<MapData, u64> = open_map(layout, MAP_COUNTERS)?.try_into()?;
    let mut registry = Registry::new(
        MapData::from_pin(layout.map(MAP_LISTENERS)).context("opening pinned map LISTENERS")?,
        MapData::from_pin(layout.map(MAP_REDIRECTS)).context("opening pinned map REDIRECTS")?,
    )?;
    let snapshot = registry.snapshot()?;
    let mut by_cookie: BTreeMap<u64, Vec<RedirectStatus>> = BTreeMap::new();
    for (key, target) in redirects.iter().filter_map(Result::ok) {
        let mut families: Vec<&'static str> = snapshot
            .in_netns(key.netns_cookie)
            .filter(|(l, _)| l.port == target.listen_port)
            .map(|(l, _)| if l.family == AF_INET { "ipv4" } else { "ipv6" })
            .collect();
        families.sort_unstable();
        families.dedup();
        by_cookie
            .entry(key.netns_cookie)
            .or_default()
            .push(RedirectStatus {
                advertise_port: key.port,
                listen_port: target.listen_port,
                listener_registered: !families.is_empty(),
                listener_families: families,
            });
    }
    for pinned in layout.pinned_netns() {
        let redirects = by_cookie.remove(&pinned.cookie).unwrap_or_default();
        let netns_inode = pinned.info.map(|i| i.netns_ino).unwrap_or(0);
        // Read-only: the same checks the agent's reconcile pass makes.
        let unservable = crate::sys::netns::find_by_inode(netns_inode as u64)
            .and_then(|path| Netns::open(&path).ok())
            .filter(|n| n.cookie == pinned.cookie)
            .map(|netns| {
                let rs: Vec<Redirect> = redirects
                    .iter()
                    .map(|r| Redirect {
                        advertise_port: r.advertise_port,
                        listen_port: r.listen_port,
                    })
                    .collect();
                registry
                    .inspect(&netns, &rs)
                    .map(|r| r.unservable)
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        status.namespaces.push(NamespaceStatus {
            netns_cookie: pinned.cookie,
            netns_inode,
            attached: pinned.info.is_some_and(|i| i.netns_ino != 0),
            redirects,
            unservable,
        });
    }
    for c in Counter::ALL {
        let total = counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        status.counters.insert(c.name(), total);
    }
    Ok(status)
}

/// The running agent's state file, if an agent that is still running wrote it.
pub fn agent_state(path: &std::path::Path) -> Option<crate::agent::State> {
    let text = std::fs::read_to_string(path).ok()?;
    let state: crate::agent::State = serde_json::from_str(&text).ok()?;
    std::path::Path::new(&format!("/proc/{}", state.pid))
        .exists()
        .then_some(state)
}

fn write_agent(out: &mut String, status: &Status) -> Result<()> {
    let Some(a) = &status.agent else {
        return Ok(());
    };
    writeln!(out, "agent pid {}:", a.pid)?;
    writeln!(out, "  sock_ops: {}", a.sock_ops_cgroup)?;
    for c in &a.sock_ops_attached {
        writeln!(out, "    attached to {c}")?;
    }
    writeln!(out, "  new listeners: {}", a.listen_events)?;
    writeln!(out, "  resync every {}s", a.resync_interval_secs)?;
    let i = &a.inspector;
    writeln!(
        out,
        "  pod inspector: {} thread(s); {} inspection(s) stalled and abandoned, {} dropped (queue full); \
         config files refused: {} not regular (FIFO, device), {} too large, {} unreadable",
        i.workers, i.stalled, i.dropped, i.files_not_regular, i.files_too_large, i.files_unreadable
    )?;
    if i.namespaces_refused_per_pod > 0 {
        writeln!(
            out,
            "  {} network namespace(s) not served: their pod has {} served already",
            i.namespaces_refused_per_pod,
            crate::agent::NAMESPACES_PER_POD
        )?;
    }
    writeln!(out, "  serves {} namespace(s):", a.namespaces.len())?;
    for ns in &a.namespaces {
        writeln!(out, "    {}: {}", ns.netns, ns.why)?;
        if ns.listeners_held >= redirector_common::LISTENERS_PER_NETNS as i64 {
            writeln!(
                out,
                "      listener quota reached: {} of {} registered by sock_ops; more are refused \
                 (listener_quota_exceeded)",
                ns.listeners_held,
                redirector_common::LISTENERS_PER_NETNS
            )?;
        }
        for p in &ns.sock_ops_problems {
            writeln!(out, "      no flow records: {p}")?;
        }
    }
    Ok(())
}

pub fn render(status: &Status, output: Output) -> Result<String> {
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(status)? + "\n");
    }
    let mut out = String::new();
    write_agent(&mut out, status)?;
    if !status.pinned {
        match crate::bpf::pins::bpffs_hidden() {
            Some(why) => writeln!(out, "{why}")?,
            None => writeln!(
                out,
                "no pinned state under {PIN_ROOT} (agents without --pin keep theirs private)"
            )?,
        }
        write_programs(&mut out, status)?;
        return Ok(out);
    }
    writeln!(
        out,
        "pinned state: {PIN_ROOT} (build {})",
        status.build.as_deref().unwrap_or("unknown")
    )?;
    writeln!(
        out,
        "pinned sock_ops links attached: {}",
        status.sock_ops_attached
    )?;
    writeln!(
        out,
        "{:<22} {:<16} {:<9} {:<9} {:<8} listener",
        "NETNS COOKIE", "NETNS", "ATTACHED", "ADVERTISE", "LISTEN"
    )?;
    for ns in &status.namespaces {
        let netns = if ns.netns_inode == 0 {
            "gone".to_owned()
        } else {
            format!("net:[{}]", ns.netns_inode)
        };
        if ns.redirects.is_empty() {
            writeln!(
                out,
                "{:<22} {:<16} {:<9} -",
                ns.netns_cookie, netns, ns.attached
            )?;
        }
        for u in &ns.unservable {
            writeln!(out, "  {u}")?;
        }
        for r in &ns.redirects {
            let listener = if r.listener_registered {
                r.listener_families.join("+")
            } else {
                "none (fail-open)".to_owned()
            };
            writeln!(
                out,
                "{:<22} {:<16} {:<9} {:<9} {:<8} {}",
                ns.netns_cookie, netns, ns.attached, r.advertise_port, r.listen_port, listener
            )?;
        }
    }
    let counters: Vec<String> = status
        .counters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    writeln!(out, "counters: {}", counters.join(" "))?;
    write_programs(&mut out, status)?;
    Ok(out)
}

fn write_programs(out: &mut String, status: &Status) -> Result<()> {
    writeln!(
        out,
        "redirector programs loaded in the kernel: {}",
        status.programs_loaded
    )?;
    for p in &status.programs {
        let per_run = match p.run_count {
            0 => "no run stats (sysctl kernel.bpf_stats_enabled=1 to collect)".to_owned(),
            n => format!("{} runs, {} ns/run", n, p.run_time_ns / n),
        };
        writeln!(
            out,
            "  {} id {}: {} insns verified, {} translated; {per_run}",
            p.name,
            p.id,
            p.verified_insns.map_or("?".to_owned(), |v| v.to_string()),
            p.translated_insns.map_or("?".to_owned(), |v| v.to_string()),
        )?;
    }
    Ok(())
}

/// Gives each namespace a pinned agent turned MPTCP off in its
/// `net.mptcp.enabled` back (the pinned `MPTCP_WAS`), before the pins go.
fn restore_mptcp(layout: &PinLayout) -> Vec<String> {
    let Ok(map) = MapData::from_pin(layout.map(MAP_MPTCP_WAS)) else {
        return Vec::new();
    };
    let Ok(m) = aya::maps::HashMap::<_, u64, MptcpWas>::try_from(aya::maps::Map::HashMap(map))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (cookie, was) in m.iter().filter_map(Result::ok) {
        let ns = crate::sys::netns::find_by_inode(was.netns_inode)
            .and_then(|path| Netns::open(&path).ok())
            .filter(|ns| ns.cookie == cookie);
        let Some(ns) = ns else {
            out.push(format!(
                "net:[{}] is gone: no net.mptcp.enabled to restore",
                was.netns_inode
            ));
            continue;
        };
        let value = was.enabled.to_string();
        match sys::set_netns_sysctl(ns.file.as_fd(), crate::bpf::datapath::MPTCP_SYSCTL, &value) {
            Ok(()) => out.push(format!(
                "restored net.mptcp.enabled={value} in net:[{}]",
                was.netns_inode
            )),
            Err(e) => out.push(format!(
                "cannot restore net.mptcp.enabled={value} in net:[{}]: {e}",
                was.netns_inode
            )),
        }
    }
    out
}

/// `redirector detach`: removes the pinned state and says what went.
pub fn detach(layout: &PinLayout) -> Result<String> {
    let mut out = String::new();
    for line in restore_mptcp(layout) {
        writeln!(out, "{line}")?;
    }
    let removed = layout.remove_all()?;
    if removed.is_empty() {
        writeln!(out, "nothing pinned under {PIN_ROOT}")?;
    }
    for r in removed {
        writeln!(out, "removed {r}")?;
    }
    let left = programs_loaded();
    if left > 0 {
        writeln!(
            out,
            "{left} redirector program(s) still loaded by running agents without --pin: stop them with SIGTERM"
        )?;
    }
    Ok(out)
}
