//! `cargo xtask bench --faults`: the failure modes, each with its figures, on
//! the harness's topology, agent launcher, CPU pinning and BPF run-time stats:
//!
//! - `synflood`: as many connection attempts as one core can send for 10 s
//!   to the advertised port of a namespace with no live-store listening,
//!   while a healthy namespace is served by the same agent;
//! - `restart`: the live-store closes its listener and listens again, and is
//!   killed with SIGKILL and started again, under load; redirector against the
//!   nginx sidecar;
//! - `agent-kill`: the agent killed with SIGKILL under load, pinned and not.
//!
//! Each scenario is a few seconds; the whole mode runs in about a minute and
//! writes `results.md` and `results.json` to `target/bench/faults/`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{
    bpf,
    cpu::{self, CpuTimes},
    packages,
    paths::{counter, process_cpu_secs, Agent, PathKind, Running},
    report::{self, Machine},
    stats::spread,
    topology::{
        live_store_cpu, pin_current_thread, Netns, Topology, ADVERTISE_PORT, LISTEN_PORT,
        LIVE_STORE_V4, QUERIER_CPU, QUERIER_V4,
    },
    BenchArgs, WorkDir,
};

pub const SCENARIOS: [&str; 3] = ["synflood", "restart", "agent-kill"];

/// How long the SYN flood runs (the issue asks for 10 s).
const FLOOD: Duration = Duration::from_secs(10);
/// Healthy connections per second during the flood (one paced client).
const HEALTHY_RATE: u64 = 1000;
/// Restarts per kind and path; figures are medians over them.
const RESTARTS: usize = 5;
/// Time the live-store serves between restarts.
const UP: Duration = Duration::from_millis(300);
/// Time without any agent in the agent-kill scenario.
const AGENTLESS: Duration = Duration::from_secs(1);

/// One figure of a scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub case: String,
    pub figure: String,
    pub value: String,
    /// The number behind `value`, for scripts.
    pub raw: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub what: String,
    pub secs: f64,
    /// Other tenants' CPU during the scenario, in cores: whole-machine busy
    /// time (/proc/stat) less the bench's own cgroup.
    pub foreign_cpu_cores: Option<f64>,
    pub figures: Vec<Figure>,
}

#[derive(Debug, Serialize)]
pub struct FaultResults {
    pub machine: Machine,
    pub command: String,
    pub scenarios: Vec<Scenario>,
    pub notes: Vec<String>,
    pub elapsed_secs: f64,
}

impl Scenario {
    fn new(name: &str, what: &str) -> Self {
        Self {
            name: name.into(),
            what: what.into(),
            secs: 0.0,
            foreign_cpu_cores: None,
            figures: Vec::new(),
        }
    }

    fn add(&mut self, case: &str, figure: &str, value: String, raw: Option<f64>) {
        self.figures.push(Figure {
            case: case.into(),
            figure: figure.into(),
            value,
            raw,
        });
    }

    fn num(&mut self, case: &str, figure: &str, v: f64, unit: &str) {
        let value = if v.is_finite() {
            format!("{}{unit}", fmt_num(v))
        } else {
            "n/a".into()
        };
        self.add(case, figure, value, v.is_finite().then_some(v));
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let chosen: Vec<&str> = if args.scenario.is_empty() {
        SCENARIOS.to_vec()
    } else {
        for s in &args.scenario {
            if !SCENARIOS.contains(&s.as_str()) {
                bail!(
                    "unknown scenario {s:?}: choose from {}",
                    SCENARIOS.join(", ")
                );
            }
        }
        SCENARIOS
            .into_iter()
            .filter(|s| args.scenario.iter().any(|a| a == s))
            .collect()
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/faults"));
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let work = WorkDir::create(root)?;
    let bin = root.join("target/release/redirector");
    if !bin.exists() {
        bail!("{} not built (run without --no-build)", bin.display());
    }
    let mut notes = packages::ensure();
    let cgroup = match cpu::BenchCgroup::enter() {
        Ok(c) => Some(c),
        Err(e) => {
            notes.push(format!("no bench cgroup, so no noise figure: {e:#}"));
            None
        }
    };
    let topo = Topology::create()?;
    let mut scenarios = Vec::new();
    for name in chosen {
        eprintln!("bench: faults: {name}");
        let t0 = CpuTimes::now()?;
        let start = Instant::now();
        let mut s = match name {
            "synflood" => synflood(&topo, &bin, work.path())?,
            "restart" => restart(root, &topo, &bin, work.path(), &mut notes)?,
            _ => agent_kill(&topo, &bin, work.path())?,
        };
        let t1 = CpuTimes::now()?;
        s.secs = start.elapsed().as_secs_f64();
        let foreign = (t0.busy_secs_until(&t1) - t0.own_secs_until(&t1)) / s.secs;
        s.foreign_cpu_cores = foreign.is_finite().then_some(foreign.max(0.0));
        scenarios.push(s);
    }
    drop(topo);
    drop(cgroup);
    let results = FaultResults {
        machine: report::machine(),
        command: std::iter::once("cargo xtask bench".to_owned())
            .chain(std::env::args().skip(2))
            .collect::<Vec<_>>()
            .join(" "),
        scenarios,
        notes,
        elapsed_secs: started.elapsed().as_secs_f64(),
    };
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = markdown(&results);
    fs::write(out.join("results.md"), &md)?;
    println!("{md}");
    eprintln!(
        "bench: wrote {}/results.{{md,json}} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    work.done();
    Ok(())
}

fn markdown(r: &FaultResults) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Failure modes: `{}`\n", r.command);
    let _ = writeln!(
        md,
        "{} ({} cores, {}), kernel {}, {}, commit {}; {:.0} s in all.\n",
        m.cpu, m.cores, m.memory, m.kernel, m.date, m.commit, r.elapsed_secs
    );
    for s in &r.scenarios {
        let _ = writeln!(md, "## {}\n\n{}\n", s.name, s.what);
        let _ = writeln!(
            md,
            "{:.1} s; other tenants used {} cores on average meanwhile.\n",
            s.secs,
            s.foreign_cpu_cores
                .map_or("an unknown number of".to_owned(), |c| format!("{c:.2}"))
        );
        let _ = writeln!(md, "| case | figure | value |\n|---|---|---|");
        for f in &s.figures {
            let _ = writeln!(md, "| {} | {} | {} |", f.case, f.figure, f.value);
        }
        md.push('\n');
    }
    if !r.notes.is_empty() {
        let _ = writeln!(md, "Notes:\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md
}

/// The live-store's address on the advertised or the listen port.
fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(LIVE_STORE_V4), port)
}

/// The extra agent arguments every scenario passes: a `redirector flows`
/// socket of its own (never the default one another agent on the machine
/// may use), when the agent has the flag.
fn agent_args(bin: &Path, dir: &Path, pin: bool) -> Vec<String> {
    let mut extra = Vec::new();
    if pin {
        extra.push("--pin".to_owned());
    }
    let help = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if help.contains("--flows-socket") {
        extra.push("--flows-socket".to_owned());
        extra.push(dir.join("flows.sock").display().to_string());
    }
    extra
}

fn launch(bin: &Path, namespaces: &[&Netns], pin: bool, dir: &Path) -> Result<Agent> {
    fs::create_dir_all(dir)?;
    let extra = agent_args(bin, dir, pin);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Agent::launch(bin, namespaces, &extra, dir)
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<()> {
    let file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns(2) on the calling thread with a valid, open netns fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A live-store stand-in that speaks like the real Go one (tests/go): reads
/// the request to its end, answers `live-store <peer>` and the request. One
/// thread on the live-store CPU, one connection at a time (the loads here are
/// one client each). `listened` is when listen() returned.
struct Listener {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    listened: Instant,
}

impl Listener {
    fn start(ns: &Netns) -> Result<Self> {
        // std binds with SO_REUSEADDR and listens before returning; [::] is
        // dual-stack, like Go's ":9095".
        let listener =
            ns.try_run(|| TcpListener::bind(("::", LISTEN_PORT)).context("bind [::]:9095"))?;
        let listened = Instant::now();
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, stop) = (listener.clone(), stop.clone());
            thread::spawn(move || {
                pin_current_thread(live_store_cpu());
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((conn, peer)) = listener.accept() {
                        answer(conn, peer);
                    }
                }
            })
        };
        Ok(Self {
            listener,
            stop,
            thread: Some(thread),
            listened,
        })
    }

    /// Closes the listening socket; returns once it is closed.
    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept() (it fails with EINVAL on a socket shut
        // down for reading).
        // SAFETY: shutdown(2) on the listener's own open fd.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.halt();
    }
}

fn answer(mut conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut payload = Vec::new();
    if conn.read_to_end(&mut payload).is_err() {
        return;
    }
    let _ = conn.write_all(format!("live-store {peer}\n").as_bytes());
    let _ = conn.write_all(&payload);
}

/// One connection as a querier makes it: connect, send 64 B, half-close,
/// read the answer; ok if the live-store answered.
fn attempt(target: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = Vec::new();
    c.write_all(&[b'q'; 64]).is_ok()
        && c.shutdown(Shutdown::Write).is_ok()
        && c.read_to_end(&mut answer).is_ok()
        && answer.starts_with(b"live-store ")
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    start: Instant,
    end: Instant,
    ok: bool,
}

/// A querier load on a thread of its own in the querier namespace: back to
/// back, or paced at `pace` per connection; every attempt is kept.
struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Attempt>>>,
}

impl Load {
    fn start(ns: &Netns, target: SocketAddr, pace: Option<Duration>, cpu: Option<usize>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let path = ns.path();
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            enter_netns(&path)?;
            if let Some(c) = cpu {
                pin_current_thread(c);
            }
            let mut attempts = Vec::new();
            let begin = Instant::now();
            while !flag.load(Ordering::SeqCst) {
                if let Some(p) = pace {
                    // Open loop: the next connection is due at a fixed time.
                    let due = begin + p * attempts.len() as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                }
                let start = Instant::now();
                let ok = attempt(target);
                attempts.push(Attempt {
                    start,
                    end: Instant::now(),
                    ok,
                });
            }
            Ok(attempts)
        });
        Self { stop, thread }
    }

    fn stop(self) -> Result<Vec<Attempt>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    }
}

/// Non-blocking connect() attempts to `target` from `ns`, back to back on
/// `QUERIER_CPU`, for `dur`; each socket is closed at once (its SYN is out).
/// Returns the number of attempts.
fn flood(ns: &Netns, target: SocketAddr, dur: Duration) -> Result<u64> {
    let IpAddr::V4(ip) = target.ip() else {
        bail!("the flood is IPv4");
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    ns.try_run(|| {
        pin_current_thread(QUERIER_CPU);
        let deadline = Instant::now() + dur;
        let mut attempts = 0u64;
        while Instant::now() < deadline {
            // SAFETY: socket(2); the fd is checked and closed below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                continue;
            }
            // SAFETY: connect(2) with a valid sockaddr_in and its size; close(2)
            // of the fd we own. EINPROGRESS is the expected result.
            unsafe {
                libc::connect(
                    fd,
                    (&sin as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                libc::close(fd);
            }
            attempts += 1;
        }
        Ok(attempts)
    })
}

/// Flow records of a JSON flow log: (event, netns) -> count, and lines that
/// are not JSON (a record cut short by a SIGKILL in the middle of a write).
fn flow_log(path: &Path) -> (BTreeMap<(String, String), u64>, u64) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut counts = BTreeMap::new();
    let mut broken = 0;
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                let key = (
                    v["event"].as_str().unwrap_or_default().to_owned(),
                    v["netns"].as_str().unwrap_or_default().to_owned(),
                );
                *counts.entry(key).or_insert(0) += 1;
            }
            Err(_) => broken += 1,
        }
    }
    (counts, broken)
}

fn records(counts: &BTreeMap<(String, String), u64>, event: &str, ns: &Netns) -> u64 {
    counts
        .get(&(event.to_owned(), ns.path().display().to_string()))
        .copied()
        .unwrap_or(0)
}

fn count(line: &str, name: &str) -> Result<u64> {
    counter(line, name).with_context(|| format!("no {name}= in the agent's summary: {line}"))
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "**no**" }.to_owned()
}

/// The ids of loaded redirector programs.
fn program_ids() -> Vec<u32> {
    bpf::run_stats().iter().map(|s| s.0).collect()
}

fn synflood(topo: &Topology, bin: &Path, work: &Path) -> Result<Scenario> {
    let mut s = Scenario::new(
        "synflood",
        &format!(
            "A crash-looping live-store under query load: one thread on CPU {QUERIER_CPU} sends non-blocking connect()s to {LIVE_STORE_V4}:{ADVERTISE_PORT} of a served namespace where nothing listens, for {} s, while the same agent serves a healthy namespace at {HEALTHY_RATE} connections/s (one paced client). Kernel programs' time from the BPF run-time statistics (on during the flood only; they add two clock reads per run).",
            FLOOD.as_secs()
        ),
    );
    // The flood's own pair of namespaces, addressed like the bench's pair.
    let fq = Netns::with_prefix("rdb-", "fq")?;
    let fl = Netns::with_prefix("rdb-", "fl")?;
    let (q4, l4) = (format!("{QUERIER_V4}/24"), format!("{LIVE_STORE_V4}/24"));
    redirector_tests::netns::veth((&fq, &[&q4]), (&fl, &[&l4]))?;
    let healthy = Listener::start(&topo.live_store)?;
    let dir = work.join("synflood");
    let before = program_ids();
    let agent = launch(bin, &[&topo.live_store, &fl], false, &dir)?;
    let ours: Vec<u32> = program_ids()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    let flood_progs = redirector_tests::sk_lookup_programs(&fl);
    let target = addr(ADVERTISE_PORT);
    let stats = bpf::RunStats::enable()?;
    let s0 = bpf::run_stats();
    let cpu0 = process_cpu_secs(agent.pid());
    let load = Load::start(
        &topo.querier,
        target,
        Some(Duration::from_nanos(1_000_000_000 / HEALTHY_RATE)),
        None,
    );
    let started = Instant::now();
    let attempts = flood(&fq, target, FLOOD)?;
    let secs = started.elapsed().as_secs_f64();
    let healthy_attempts = load.stop()?;
    // Let the agent drain what the last moments wrote.
    thread::sleep(Duration::from_millis(300));
    let s1 = bpf::run_stats();
    let cpu1 = process_cpu_secs(agent.pid());
    drop(stats);
    let line = agent.finish()?;
    drop(healthy);
    let (counts, broken) = flow_log(&dir.join("flows.json"));

    let case = "SYN flood, no listener";
    s.num(case, "connection attempts sent", attempts as f64, "");
    s.num(
        case,
        "attempts per second (one core)",
        attempts as f64 / secs,
        "",
    );
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        s.num(
            case,
            "agent CPU (share of one core; 10 ms ticks)",
            (b - a) / secs * 100.0,
            " %",
        );
    }
    let delta = |name: &str, only: Option<&[u32]>| -> (u64, u64) {
        s1.iter()
            .filter(|p| p.1 == name && ours.contains(&p.0))
            .filter(|p| only.is_none_or(|ids| ids.contains(&p.0)))
            .map(|p| {
                let b = s0.iter().find(|q| q.0 == p.0);
                (
                    p.2 - b.map_or(0, |q| q.2).min(p.2),
                    p.3 - b.map_or(0, |q| q.3).min(p.3),
                )
            })
            .fold((0, 0), |acc, (t, c)| (acc.0 + t, acc.1 + c))
    };
    let (lookup_ns, lookup_runs) = delta(bpf::PROG_SK_LOOKUP, Some(&flood_progs));
    s.num(
        case,
        "sk_lookup runs in the flooded namespace",
        lookup_runs as f64,
        "",
    );
    s.num(
        case,
        "sk_lookup time per SYN",
        lookup_ns as f64 / lookup_runs.max(1) as f64,
        " ns",
    );
    let (sockops_ns, sockops_runs) = delta(bpf::PROG_SOCK_OPS, None);
    s.num(
        case,
        "sock_ops time per attempt (every socket on the node runs it, the flood's own included)",
        sockops_ns as f64 / attempts.max(1) as f64,
        &format!(
            " ns ({:.1} runs)",
            sockops_runs as f64 / attempts.max(1) as f64
        ),
    );
    let no_listener = count(&line, "no_listener")?;
    let suppressed = count(&line, "refused_records_suppressed")?;
    let dropped = count(&line, "records_dropped")?;
    let refused = records(&counts, "refused", &fl);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    s.num(
        case,
        "refused connections counted (no_listener)",
        no_listener as f64,
        "",
    );
    s.num(case, "refused records in the flow log", refused as f64, "");
    s.num(
        case,
        "refused records per second (limit 100 per CPU)",
        refused as f64 / secs,
        &format!(" (limit {:.0})", 100.0 * cpus),
    );
    s.num(
        case,
        "refused records suppressed (counted)",
        suppressed as f64,
        "",
    );
    s.add(
        case,
        "records + suppressed = no_listener",
        yes(refused + suppressed == no_listener),
        None,
    );
    let case = "healthy namespace, same agent";
    let ok = healthy_attempts.iter().filter(|a| a.ok).count() as u64;
    s.num(case, "connections", healthy_attempts.len() as f64, "");
    s.num(
        case,
        "failed connections",
        (healthy_attempts.len() as u64 - ok) as f64,
        "",
    );
    let (opens, closes) = (
        records(&counts, "open", &topo.live_store),
        records(&counts, "close", &topo.live_store),
    );
    s.add(
        case,
        "open / close records in the flow log",
        format!("{opens} / {closes} (of {ok})"),
        Some(opens as f64),
    );
    s.num(case, "ring drops (records_dropped)", dropped as f64, "");
    if broken > 0 {
        s.num(case, "flow log lines that are not JSON", broken as f64, "");
    }
    Ok(s)
}

/// How the live-store goes away and comes back.
#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// close() the listening socket, listen() on a new one at once.
    Relisten,
    /// kill -9 the process, start it again.
    Kill,
}

/// The real Go live-store (tests/go), or the tests' stand-in: a process in
/// the live-store namespace on the live-store CPU, killed with SIGKILL.
struct LiveStoreProcess {
    child: Child,
}

impl LiveStoreProcess {
    /// Starts it and returns once it said it listens (after listen()).
    fn start(ns: &Netns, program: &Path) -> Result<(Self, Instant)> {
        let mut cmd = ns.command(&program.display().to_string());
        cmd.args(["[::]:9095", "live-store"])
            // Plain TCP from the first socket, as deploy/tempo-values.yaml
            // sets it, and the same for every path.
            .env("GODEBUG", "multipathtcp=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let cpu = live_store_cpu();
        // SAFETY: sched_setaffinity(2) on the child itself, between fork and
        // exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().context("live-store stdout")?;
        // Killed on drop from here on, also when it says something else.
        let this = Self { child };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let listened = Instant::now();
        if !line.starts_with("listening") {
            bail!("{} said {line:?}", program.display());
        }
        Ok((this, listened))
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LiveStoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The live-store program for the kill -9 case: the Go one if it is built
/// (or can be), else the tests' stand-in.
fn live_store_program(root: &Path, notes: &mut Vec<String>) -> Option<PathBuf> {
    let go = root.join("target/go/live-store");
    if go.exists() {
        return Some(go);
    }
    match crate::golang::build_live_store(root) {
        Ok(p) => return Some(p),
        Err(e) => notes.push(format!("Go live-store not built ({e:#})")),
    }
    let standin = root.join("target/release/live-store-standin");
    if standin.exists() {
        notes.push(
            "kill -9 case: the tests' live-store-standin instead of the Go live-store".into(),
        );
        return Some(standin);
    }
    notes.push("kill -9 case skipped: no live-store program".into());
    None
}

/// One restart: when the live-store went away and when it listened again.
struct Cycle {
    down: Instant,
    listened: Instant,
}

fn restart(
    root: &Path,
    topo: &Topology,
    bin: &Path,
    work: &Path,
    notes: &mut Vec<String>,
) -> Result<Scenario> {
    let mut s = Scenario::new(
        "restart",
        &format!(
            "The live-store restarts {RESTARTS} times under a back-to-back load (one client on CPU {QUERIER_CPU}, live-store on CPU {}): its listening socket closed and a new one opened at once, then the process killed with SIGKILL and started again (the Go live-store of tests/go). Once through redirector, once through the nginx sidecar. Medians over the restarts, max in brackets. 'listen() to first connection' runs from listen() returning (for the process: from reading its `listening` line, so it can be negative) to the end of the first connection the live-store answered.",
            live_store_cpu()
        ),
    );
    let program = live_store_program(root, notes);
    let mut kinds = vec![Restart::Relisten];
    if program.is_some() {
        kinds.push(Restart::Kill);
    }
    let mut paths = vec![PathKind::Redirector];
    match PathKind::Nginx.available(bin) {
        Ok(()) => paths.push(PathKind::Nginx),
        Err(why) => notes.push(format!("restart behind nginx not measured: {why}")),
    }
    let target = addr(ADVERTISE_PORT);
    for path in paths {
        let dir = work.join(format!("restart-{}", path.name()));
        fs::create_dir_all(&dir)?;
        // Either path owns 12345 for the whole scenario.
        let running = match path {
            PathKind::Redirector => {
                Running::Redirector(launch(bin, &[&topo.live_store], false, &dir)?)
            }
            _ => Running::start(path, topo, bin, &dir)?,
        };
        for &kind in &kinds {
            let case = format!(
                "{}, {}",
                path.name(),
                match kind {
                    Restart::Relisten => "close + listen again",
                    Restart::Kill => "kill -9 + start again",
                }
            );
            let (cycles, attempts) = match kind {
                Restart::Relisten => relisten_cycles(topo, target)?,
                Restart::Kill => {
                    let program = program.as_deref().context("no live-store program")?;
                    kill_cycles(topo, target, program)?
                }
            };
            figures(&mut s, &case, &cycles, &attempts);
        }
        let proof = running.stop(0)?;
        notes.push(format!("restart over {}: {}", path.name(), proof.evidence));
    }
    Ok(s)
}

fn relisten_cycles(topo: &Topology, target: SocketAddr) -> Result<(Vec<Cycle>, Vec<Attempt>)> {
    let mut server = Listener::start(&topo.live_store)?;
    let load = Load::start(&topo.querier, target, None, Some(QUERIER_CPU));
    let mut cycles = Vec::new();
    for _ in 0..RESTARTS {
        thread::sleep(UP);
        let down = Instant::now();
        server.stop();
        server = Listener::start(&topo.live_store)?;
        cycles.push(Cycle {
            down,
            listened: server.listened,
        });
    }
    thread::sleep(UP);
    let attempts = load.stop()?;
    server.stop();
    Ok((cycles, attempts))
}

fn kill_cycles(
    topo: &Topology,
    target: SocketAddr,
    program: &Path,
) -> Result<(Vec<Cycle>, Vec<Attempt>)> {
    let (mut process, _) = LiveStoreProcess::start(&topo.live_store, program)?;
    let load = Load::start(&topo.querier, target, None, Some(QUERIER_CPU));
    let mut cycles = Vec::new();
    for _ in 0..RESTARTS {
        thread::sleep(UP);
        let down = Instant::now();
        process.kill();
        let (next, listened) = LiveStoreProcess::start(&topo.live_store, program)?;
        process = next;
        cycles.push(Cycle { down, listened });
    }
    thread::sleep(UP);
    let attempts = load.stop()?;
    drop(process);
    Ok((cycles, attempts))
}

/// Median and max of `v` as "median (max)".
fn median_max(v: &[f64], unit: &str) -> (String, Option<f64>) {
    match spread(v) {
        Some(sp) => {
            let max = v.iter().copied().fold(f64::MIN, f64::max);
            (
                format!("{}{unit} ({}{unit})", fmt_num(sp.median), fmt_num(max)),
                Some(sp.median),
            )
        }
        None => ("n/a".into(), None),
    }
}

fn figures(s: &mut Scenario, case: &str, cycles: &[Cycle], attempts: &[Attempt]) {
    let mut failed = Vec::new();
    let mut gap = Vec::new();
    let mut first = Vec::new();
    let mut outage = Vec::new();
    let mut late = 0u64;
    for (i, c) in cycles.iter().enumerate() {
        let next = cycles.get(i + 1).map(|n| n.down);
        let mine: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.end >= c.down && next.is_none_or(|n| a.end < n))
            .collect();
        let first_ok = mine.iter().find(|a| a.ok && a.end >= c.listened);
        failed.push(mine.iter().filter(|a| !a.ok).count() as f64);
        gap.push(c.listened.duration_since(c.down).as_secs_f64() * 1e3);
        if let Some(a) = first_ok {
            let us = |t: Instant| t.duration_since(c.listened).as_secs_f64() * 1e6;
            // Signed: a connection may be answered before the harness read
            // the process's `listening` line.
            let v = if a.end >= c.listened {
                us(a.end)
            } else {
                -(c.listened.duration_since(a.end).as_secs_f64() * 1e6)
            };
            first.push(v);
            outage.push(a.end.duration_since(c.down).as_secs_f64() * 1e3);
            // Failures that started once the new listener was there.
            late += mine
                .iter()
                .filter(|x| !x.ok && x.start >= c.listened && x.end <= a.end)
                .count() as u64;
        }
    }
    let total = attempts.len() as f64;
    let ok = attempts.iter().filter(|a| a.ok).count() as f64;
    s.add(
        case,
        "connections (answered)",
        format!("{total:.0} ({ok:.0})"),
        Some(total),
    );
    // Every attempt in a gap fails on any path, so failures per restart
    // scale with how fast the client dials: the rate says how fast.
    if let (Some(a), Some(b)) = (attempts.first(), attempts.last()) {
        s.num(
            case,
            "connections per second (one client, back to back)",
            total / b.end.duration_since(a.start).as_secs_f64(),
            "",
        );
    }
    let (v, raw) = median_max(&failed, "");
    s.add(case, "failed connections per restart", v, raw);
    let (v, raw) = median_max(&gap, " ms");
    s.add(case, "gap: gone to listen() returned", v, raw);
    let (v, raw) = median_max(&first, " µs");
    s.add(case, "listen() to first connection answered", v, raw);
    let (v, raw) = median_max(&outage, " ms");
    s.add(case, "gone to first connection answered", v, raw);
    s.num(
        case,
        "failed connections that started after listen()",
        late as f64,
        "",
    );
}

fn agent_kill(topo: &Topology, bin: &Path, work: &Path) -> Result<Scenario> {
    let mut s = Scenario::new(
        "agent-kill",
        &format!(
            "The agent killed with SIGKILL under a back-to-back load (one client on CPU {QUERIER_CPU}), {} s without any agent, then a new agent; unpinned and with --pin (default 1 MiB flow ring, ~9,300 records). Attachment read with BPF_PROG_QUERY on the namespace and the cgroup v2 root.",
            AGENTLESS.as_secs_f64()
        ),
    );
    for pin in [false, true] {
        if pin {
            detach(bin)?;
        }
        let result = kill_once(&mut s, topo, bin, work, pin);
        if pin {
            detach(bin)?;
        }
        result?;
    }
    Ok(s)
}

fn detach(bin: &Path) -> Result<()> {
    let out = Command::new(bin).arg("detach").output()?;
    if !out.status.success() {
        bail!(
            "redirector detach: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Ids attached to the live-store namespace (sk_lookup) and the cgroup v2
/// root (sock_ops).
fn attached(ns: &Netns) -> Vec<u32> {
    let mut ids = redirector_tests::sk_lookup_programs(ns);
    ids.extend(redirector_tests::sock_ops_programs());
    ids
}

fn kill_once(s: &mut Scenario, topo: &Topology, bin: &Path, work: &Path, pin: bool) -> Result<()> {
    let case = if pin { "--pin" } else { "unpinned" };
    let dir = work.join(format!(
        "agent-kill-{}",
        if pin { "pinned" } else { "unpinned" }
    ));
    let server = Listener::start(&topo.live_store)?;
    let before = program_ids();
    let first = launch(bin, &[&topo.live_store], pin, &dir)?;
    let ours: Vec<u32> = program_ids()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    let target = addr(ADVERTISE_PORT);
    let load = Load::start(&topo.querier, target, None, Some(QUERIER_CPU));
    thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    first.kill();
    // What stays attached: sampled every millisecond for 200 ms (pinned: it
    // must all stay; unpinned: when the kernel lets go).
    let mut detached = None;
    let mut unloaded = None;
    let mut stayed = true;
    while killed.elapsed() < Duration::from_millis(200) || (!pin && unloaded.is_none()) {
        let now = attached(&topo.live_store);
        let all = ours.iter().all(|id| now.contains(id));
        stayed &= all;
        if detached.is_none() && ours.iter().all(|id| !now.contains(id)) {
            detached = Some(killed.elapsed());
        }
        if unloaded.is_none() {
            let loaded = program_ids();
            if ours.iter().all(|id| !loaded.contains(id)) {
                unloaded = Some(killed.elapsed());
            }
        }
        if killed.elapsed() > Duration::from_secs(5) {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let left = killed + AGENTLESS;
    if let Some(wait) = left.checked_duration_since(Instant::now()) {
        thread::sleep(wait);
    }
    let restarted = Instant::now();
    let second = launch(bin, &[&topo.live_store], pin, &dir)?;
    let ready = Instant::now();
    let adopted = second.printed("adopted sock_ops") && second.printed("adopted sk_lookup");
    thread::sleep(Duration::from_secs(1));
    let attempts = load.stop()?;
    thread::sleep(Duration::from_millis(300));
    let line = second.finish()?;
    drop(server);

    let ok = attempts.iter().filter(|a| a.ok).count() as u64;
    let failed = attempts.len() as u64 - ok;
    s.add(
        case,
        "connections (failed)",
        format!("{} ({failed})", attempts.len()),
        Some(failed as f64),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if pin {
        s.add(
            case,
            "everything stayed attached after SIGKILL",
            yes(stayed),
            None,
        );
        s.add(
            case,
            "the next agent adopted the pinned programs",
            yes(adopted),
            None,
        );
    } else {
        s.add(
            case,
            "detached after SIGKILL (BPF_PROG_QUERY)",
            detached.map_or("**never (5 s)**".into(), |d| format!("{:.1} ms", ms(d))),
            detached.map(ms),
        );
        s.add(
            case,
            "programs unloaded after SIGKILL",
            unloaded.map_or("**never (5 s)**".into(), |d| format!("{:.1} ms", ms(d))),
            unloaded.map(ms),
        );
    }
    s.num(
        case,
        "new agent: start to ready",
        ms(ready.duration_since(restarted)),
        " ms",
    );
    let first_ok = attempts
        .iter()
        .filter(|a| a.ok && a.start >= killed)
        .map(|a| a.end)
        .find(|&e| e >= restarted || pin);
    if !pin {
        if let Some(e) = first_ok {
            s.num(
                case,
                "SIGKILL to first connection answered again",
                ms(e.duration_since(killed)),
                " ms",
            );
        }
    }
    // Records: with --pin the counters and the ring outlive the agent, so
    // every record is delivered (the next agent drains the ring), dropped and
    // counted (ring full), or lost uncounted (read by the killed agent, not
    // yet written out). Unpinned, the ring dies with the agent: what it held
    // is lost, uncounted, and so is its records_dropped counter.
    let (counts, broken) = flow_log(&dir.join("flows.json"));
    let delivered =
        records(&counts, "open", &topo.live_store) + records(&counts, "close", &topo.live_store);
    let dropped = count(&line, "records_dropped")?;
    let expected = if pin {
        count(&line, "flows_opened")? + count(&line, "flows_closed")?
    } else {
        2 * ok
    };
    if pin {
        let gap_conns = attempts
            .iter()
            .filter(|a| a.ok && a.start >= killed && a.end <= ready)
            .count() as u64;
        s.num(
            case,
            "records written while no agent ran (2 per connection)",
            (2 * gap_conns) as f64,
            "",
        );
    }
    s.num(case, "records expected in all", expected as f64, "");
    s.num(
        case,
        "records delivered to the flow log",
        delivered as f64,
        "",
    );
    s.num(
        case,
        if pin {
            "records dropped, counted (records_dropped)"
        } else {
            "records dropped, counted (the new agent's records_dropped)"
        },
        dropped as f64,
        "",
    );
    s.num(
        case,
        if pin {
            "records lost uncounted (expected - delivered - dropped)"
        } else {
            "records lost uncounted with the killed agent's ring (expected - delivered - dropped)"
        },
        expected as f64 - delivered as f64 - dropped as f64,
        "",
    );
    if broken > 0 {
        s.num(case, "flow log lines cut short", broken as f64, "");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_log_counts_events_per_namespace_and_broken_lines() {
        let dir = std::env::temp_dir().join(format!("rdb-faults-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("flows.json");
        fs::write(
            &log,
            "{\"event\":\"open\",\"netns\":\"/a\"}\n{\"event\":\"close\",\"netns\":\"/a\"}\n{\"event\":\"op\n{\"event\":\"open\",\"netns\":\"/b\"}\n",
        )
        .expect("write");
        let (counts, broken) = flow_log(&log);
        assert_eq!(broken, 1);
        assert_eq!(counts.get(&("open".into(), "/a".into())), Some(&1));
        assert_eq!(counts.get(&("open".into(), "/b".into())), Some(&1));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(1234.5), "1234");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(3.0), "3");
        let (v, m) = median_max(&[1.0, 3.0, 2.0], " ms");
        assert_eq!(v, "2 ms (3 ms)");
        assert_eq!(m, Some(2.0));
    }
}
