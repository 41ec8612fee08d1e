//! The paths under test and how each is set up and torn down around its
//! measurement slot. Only one path owns the advertised port at a time: the
//! proxies listen on it, nftables rewrites it, and redirector's sk_lookup
//! program would steal it from a proxy, so everything is started right before
//! its slot and stopped right after, and each reports proof that it carried
//! the traffic (its own counters, access log or stats).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::{net::TcpStream, runtime::Runtime};

use super::topology::{runtime_in, Netns, Topology, ADVERTISE_PORT, LISTEN_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PathKind {
    Direct,
    Redirector,
    Nftables,
    Nginx,
    Haproxy,
    TokioProxy,
    Envoy,
    Traefik,
}

pub const ALL: [PathKind; 8] = [
    PathKind::Direct,
    PathKind::Redirector,
    PathKind::Nftables,
    PathKind::Nginx,
    PathKind::Haproxy,
    PathKind::TokioProxy,
    PathKind::Envoy,
    PathKind::Traefik,
];

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Redirector => "redirector",
            PathKind::Nftables => "nftables",
            PathKind::Nginx => "nginx",
            PathKind::Haproxy => "haproxy",
            PathKind::TokioProxy => "tokio-proxy",
            PathKind::Envoy => "envoy",
            PathKind::Traefik => "traefik",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PathKind::Direct => "querier dials 9095 itself: the physical limit",
            PathKind::Redirector => "sk_lookup hands 12345 to the 9095 listener (flow logging on)",
            PathKind::Nftables => "nat prerouting `redirect to :9095` (conntrack on)",
            PathKind::Nginx => "nginx stream proxy_pass 127.0.0.1:9095 (access log on)",
            PathKind::Haproxy => "HAProxy mode tcp to 127.0.0.1:9095",
            PathKind::TokioProxy => "tokio copy_bidirectional to 127.0.0.1:9095",
            PathKind::Envoy => "Envoy tcp_proxy to 127.0.0.1:9095",
            PathKind::Traefik => "Traefik TCP router to 127.0.0.1:9095",
        }
    }

    /// The port a querier dials on this path.
    pub fn port(self) -> u16 {
        if self == PathKind::Direct {
            LISTEN_PORT
        } else {
            ADVERTISE_PORT
        }
    }

    /// Whether the machine can run this path; `Err` says why not.
    pub fn available(self, agent: &Path) -> std::result::Result<(), String> {
        let need = |bin: &str, why: &str| {
            if on_path(bin).is_some() {
                Ok(())
            } else {
                Err(why.to_owned())
            }
        };
        match self {
            PathKind::Direct | PathKind::TokioProxy => Ok(()),
            PathKind::Redirector => {
                if agent.exists() {
                    Ok(())
                } else {
                    Err(format!("{} not built", agent.display()))
                }
            }
            PathKind::Nftables => need("nft", "nft not installed"),
            PathKind::Nginx => {
                need("nginx", "nginx not installed")?;
                if Path::new(NGINX_STREAM_MODULE).exists() {
                    Ok(())
                } else {
                    Err("libnginx-mod-stream not installed".into())
                }
            }
            PathKind::Haproxy => need("haproxy", "haproxy not installed"),
            PathKind::Envoy => need(
                "envoy",
                "envoy not on PATH (not packaged for Debian; cannot be installed here)",
            ),
            PathKind::Traefik => need(
                "traefik",
                "traefik not on PATH (not packaged for Debian; cannot be installed here)",
            ),
        }
    }
}

const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub fn on_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Evidence that a path carried the slot's traffic.
#[derive(Clone, Debug, Serialize)]
pub struct Proof {
    pub path: String,
    /// Connections (or redirects, packets) the path itself counted.
    pub handled: u64,
    pub evidence: String,
}

/// A started path; `finish` stops it and returns its proof.
pub enum Running {
    Direct,
    Redirector(Agent),
    Nftables(NatTable),
    Process {
        kind: PathKind,
        child: ChildGuard,
        dir: PathBuf,
    },
    Tokio(TokioProxy),
}

impl Running {
    pub fn start(kind: PathKind, topo: &Topology, agent: &Path, dir: &Path) -> Result<Self> {
        let ls = &topo.live_store;
        Ok(match kind {
            PathKind::Direct => Running::Direct,
            PathKind::Redirector => Running::Redirector(Agent::start(agent, ls, dir)?),
            PathKind::Nftables => Running::Nftables(NatTable::create(ls, dir)?),
            PathKind::TokioProxy => Running::Tokio(TokioProxy::start(ls)?),
            PathKind::Nginx | PathKind::Haproxy | PathKind::Envoy | PathKind::Traefik => {
                let dir = dir.join(kind.name());
                fs::create_dir_all(&dir)?;
                let child = start_proxy(kind, ls, &dir)?;
                Running::Process { kind, child, dir }
            }
        })
    }

    /// The agent's pid, on the redirector path.
    pub fn agent_pid(&self) -> Option<u32> {
        match self {
            Running::Redirector(a) => Some(a.child.pid()),
            _ => None,
        }
    }

    pub fn stop(self, direct_accepts: u64) -> Result<Proof> {
        match self {
            Running::Direct => Ok(Proof {
                path: "direct".into(),
                handled: direct_accepts,
                evidence: format!("live-store accepted {direct_accepts} connections on 9095"),
            }),
            Running::Redirector(agent) => agent.stop(),
            Running::Nftables(table) => table.delete(),
            Running::Tokio(proxy) => Ok(proxy.stop()),
            Running::Process { kind, child, dir } => {
                // HAProxy's counters must be read while it runs.
                let stats = if kind == PathKind::Haproxy {
                    haproxy_sessions(&dir.join("haproxy.sock"))
                } else {
                    Ok(0)
                };
                drop(child);
                match kind {
                    PathKind::Nginx => {
                        let log = fs::read_to_string(dir.join("access.log")).unwrap_or_default();
                        let n = log.lines().count() as u64;
                        // Truncate so the next slot's proof counts only its own sessions.
                        let _ = fs::write(dir.join("access.log"), "");
                        Ok(Proof {
                            path: kind.name().into(),
                            handled: n,
                            evidence: format!("nginx access log: {n} sessions"),
                        })
                    }
                    PathKind::Haproxy => {
                        let n = stats?;
                        Ok(Proof {
                            path: kind.name().into(),
                            handled: n,
                            evidence: format!("haproxy `show stat` frontend stot={n}"),
                        })
                    }
                    _ => Ok(Proof {
                        path: kind.name().into(),
                        handled: 0,
                        evidence: "no counter read (unverified)".into(),
                    }),
                }
            }
        }
    }
}

/// A child process killed (SIGTERM, then SIGKILL) by pid on drop.
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn log_file(dir: &Path, name: &str) -> Result<fs::File> {
    fs::File::create(dir.join(name)).with_context(|| format!("create {name}"))
}

fn start_proxy(kind: PathKind, ls: &Netns, dir: &Path) -> Result<ChildGuard> {
    let mut cmd = match kind {
        PathKind::Nginx => {
            let conf = dir.join("nginx.conf");
            fs::write(&conf, nginx_conf(dir))?;
            let mut c = ls.command("nginx");
            c.arg("-p").arg(dir).arg("-c").arg(&conf);
            c.args(["-g", "daemon off;"]);
            c
        }
        PathKind::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            fs::write(&conf, haproxy_conf(dir))?;
            let mut c = ls.command("haproxy");
            c.arg("-f").arg(&conf).arg("-db");
            c
        }
        PathKind::Envoy => {
            let conf = dir.join("envoy.yaml");
            fs::write(&conf, ENVOY_CONF)?;
            let mut c = ls.command("envoy");
            c.arg("-c").arg(&conf).args(["--concurrency", "2"]);
            c
        }
        PathKind::Traefik => {
            let dynamic = dir.join("dynamic.yaml");
            fs::write(&dynamic, TRAEFIK_DYNAMIC)?;
            let mut c = ls.command("traefik");
            c.arg(format!("--entrypoints.rdb.address=:{ADVERTISE_PORT}"))
                .arg(format!("--providers.file.filename={}", dynamic.display()));
            c
        }
        _ => bail!("{} is not a proxy process", kind.name()),
    };
    cmd.stdin(Stdio::null())
        .stdout(log_file(dir, "stdout.log")?)
        .stderr(log_file(dir, "stderr.log")?);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kind.name()))?;
    Ok(ChildGuard::new(child))
}

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# Written by cargo xtask bench: a sidecar-style stream proxy.
load_module {NGINX_STREAM_MODULE};
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
stream {{
    log_format basic '$remote_addr $upstream_addr $bytes_received $bytes_sent $session_time';
    access_log {d}/access.log basic;
    upstream live_store {{ server 127.0.0.1:{LISTEN_PORT}; }}
    server {{
        listen {ADVERTISE_PORT} reuseport backlog=4096;
        proxy_pass live_store;
        tcp_nodelay on;
        # A querier's half-close reaches the live-store (which answers after
        # reading to the end, as tests/go does) instead of ending the session.
        proxy_half_close on;
    }}
}}
"
    )
}

fn haproxy_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# Written by cargo xtask bench: a sidecar-style TCP proxy.
global
    maxconn 8000
    nbthread 2
    stats socket {d}/haproxy.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend advertised
    bind :{ADVERTISE_PORT}
    default_backend live_store
backend live_store
    server ls 127.0.0.1:{LISTEN_PORT}
"
    )
}

const ENVOY_CONF: &str = r#"# Written by cargo xtask bench: a sidecar-style TCP proxy.
static_resources:
  listeners:
  - address: {socket_address: {address: 0.0.0.0, port_value: 12345}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: rdb
          cluster: live_store
  clusters:
  - name: live_store
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: live_store
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9095}}}
"#;

const TRAEFIK_DYNAMIC: &str = r#"# Written by cargo xtask bench.
tcp:
  routers:
    live-store:
      entryPoints: [rdb]
      rule: "HostSNI(`*`)"
      service: live-store
  services:
    live-store:
      loadBalancer:
        servers:
        - address: "127.0.0.1:9095"
"#;

/// Total sessions of HAProxy's frontend, from `show stat` on its stats socket.
fn haproxy_sessions(sock: &Path) -> Result<u64> {
    let mut s = UnixStream::connect(sock).context("haproxy stats socket")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"show stat\n")?;
    let mut csv = String::new();
    s.read_to_string(&mut csv)?;
    parse_haproxy_stot(&csv).context("no FRONTEND row in haproxy stats")
}

/// `stot` (column 8) of the FRONTEND row of HAProxy's CSV stats.
fn parse_haproxy_stot(csv: &str) -> Option<u64> {
    csv.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > 7 && f[1] == "FRONTEND")
        .and_then(|f| f[7].parse().ok())
}

/// The nat table for the nftables path. It exists only during its slot: any
/// nat table makes conntrack track every flow of the namespace, which would
/// tax the other paths.
pub struct NatTable {
    ns_name: String,
    deleted: bool,
}

const NAT_TABLE: &str = "rdb_nat";

fn nft(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .context("running nft")?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NatTable {
    fn create(ls: &Netns, dir: &Path) -> Result<Self> {
        if nft(&ls.name, &["list", "tables"])?.contains("nat") {
            bail!("a nat table already exists in {}", ls.name);
        }
        let rules = dir.join("nat.nft");
        fs::write(
            &rules,
            format!(
                "table ip {NAT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport {ADVERTISE_PORT} counter redirect to :{LISTEN_PORT}
    }}
}}
"
            ),
        )?;
        let path = rules.to_string_lossy().into_owned();
        let table = Self {
            ns_name: ls.name.clone(),
            deleted: false,
        };
        nft(&ls.name, &["-f", &path])?;
        Ok(table)
    }

    fn delete(mut self) -> Result<Proof> {
        let listing = nft(&self.ns_name, &["list", "table", "ip", NAT_TABLE]);
        self.remove()?;
        let n = parse_nft_packets(&listing?).unwrap_or(0);
        Ok(Proof {
            path: "nftables".into(),
            handled: n,
            evidence: format!("redirect rule counter: {n} packets"),
        })
    }

    fn remove(&mut self) -> Result<()> {
        if !self.deleted {
            nft(&self.ns_name, &["delete", "table", "ip", NAT_TABLE])?;
            self.deleted = true;
            if nft(&self.ns_name, &["list", "tables"])?.contains("nat") {
                bail!("nat table still present after delete");
            }
        }
        Ok(())
    }
}

impl Drop for NatTable {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

fn parse_nft_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

/// The redirector agent, run for its slot only: while attached, its sk_lookup
/// program would also take 12345 away from any proxy, and its sock_ops
/// program sees every socket on the machine.
pub struct Agent {
    child: ChildGuard,
    lines: Arc<Mutex<Vec<String>>>,
    flow_log: String,
}

impl Agent {
    fn start(bin: &Path, ls: &Netns, dir: &Path) -> Result<Self> {
        Self::launch(bin, &[ls], &[], dir)
    }

    /// The agent serving `namespaces`, with `extra` arguments (`--pin`, ...);
    /// its flow log and logs go to `dir`.
    pub fn launch(bin: &Path, namespaces: &[&Netns], extra: &[&str], dir: &Path) -> Result<Self> {
        let help = Command::new(bin)
            .args(["run", "--help"])
            .output()
            .context("redirector run --help")?;
        let help = String::from_utf8_lossy(&help.stdout);
        let has_flow_log = help.contains("--flow-log");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(["--advertise-port", &ADVERTISE_PORT.to_string()])
            .args(["--listen-port", &LISTEN_PORT.to_string()])
            .args(extra);
        for ns in namespaces {
            cmd.arg("--netns").arg(ns.path());
        }
        if help.contains("--metrics-addr") {
            // A free port: the default one may be taken by another agent on the host.
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        let flows = dir.join("flows.json");
        let flow_log = if has_flow_log {
            cmd.arg("--flow-log")
                .arg(&flows)
                .args(["--flow-format", "json"]);
            format!("--flow-log {} --flow-format json", flows.display())
        } else {
            "agent stdout captured to agent.log (no --flow-log flag in this build)".to_owned()
        };
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(dir, "agent.stderr.log")?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let child = ChildGuard::new(child);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        {
            let lines = lines.clone();
            thread::spawn(move || {
                // Every line goes to the log file (that is the flow logging when
                // the agent has no --flow-log); the few we need stay in memory.
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = writeln!(log, "{line}");
                    if line.starts_with("ready")
                        || line.starts_with("adopted")
                        || line.contains("counters:")
                    {
                        if let Ok(mut l) = lines.lock() {
                            l.push(line);
                        }
                    }
                }
            });
        }
        let agent = Self {
            child,
            lines,
            flow_log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if agent.has_line(|l| l.starts_with("ready")) {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready after 20 s; see {}",
                    dir.join("agent.stderr.log").display()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn has_line(&self, f: impl Fn(&str) -> bool) -> bool {
        self.lines
            .lock()
            .map(|l| l.iter().any(|s| f(s)))
            .unwrap_or(false)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether it printed a line starting with `prefix` (`ready`, `adopted`).
    pub fn printed(&self, prefix: &str) -> bool {
        self.has_line(|l| l.starts_with(prefix))
    }

    /// SIGKILL: no cleanup of any kind, as when the node's OOM killer picks it.
    pub fn kill(self) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (the
        // guard reaps it when dropped, right after).
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGKILL) };
    }

    /// SIGTERM, then the `counters:` line of its exit summary.
    pub fn finish(mut self) -> Result<String> {
        self.summary()
    }

    /// Stops the agent and returns its exit summary's `counters:` line.
    fn summary(&mut self) -> Result<String> {
        let pid = self.child.pid();
        let status = self.child.terminate();
        // The reader thread drains the pipe after exit.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.has_line(|l| l.contains("counters:")) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.lines
            .lock()
            .ok()
            .and_then(|l| l.iter().find(|s| s.contains("counters:")).cloned())
            .with_context(|| format!("agent (pid {pid}, {status:?}) printed no counters"))
    }

    fn stop(mut self) -> Result<Proof> {
        // The agent's own CPU (userspace: flow records, metrics), read before exit.
        let agent_cpu = process_cpu_secs(self.child.pid());
        let line = self.summary()?;
        // Handshakes completed after a redirect: BPF_PROG_TEST_RUN runs of
        // sk_lookup (the cost measurement) never get that far.
        let opened = counter(&line, "flows_opened").context("no flows_opened= counter")?;
        Ok(Proof {
            path: "redirector".into(),
            handled: opened,
            evidence: format!(
                "{}; flow logging: {}; agent process CPU {}",
                line.trim(),
                self.flow_log,
                agent_cpu
                    .map(|s| format!("{s:.2} s"))
                    .unwrap_or_else(|| "unknown".into())
            ),
        })
    }
}

/// utime + stime of a live process, in seconds (/proc/PID/stat fields 14, 15).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) / hz)
}

/// `name=N` from the agent's `counters:` line.
pub fn counter(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The simplest possible sidecar: accept on 12345, dial 127.0.0.1:9095, and
/// `copy_bidirectional` between them, counting connections.
pub struct TokioProxy {
    rt: Option<Runtime>,
    handled: Arc<AtomicU64>,
}

impl TokioProxy {
    fn start(ls: &Netns) -> Result<Self> {
        let listener = ls.try_run(|| {
            std::net::TcpListener::bind(("::", ADVERTISE_PORT)).context("bind [::]:12345")
        })?;
        listener.set_nonblocking(true)?;
        let rt = runtime_in(ls, 2, "rdb-tokio-proxy", None)?;
        let handled = Arc::new(AtomicU64::new(0));
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let count = handled.clone();
        rt.spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = down.set_nodelay(true);
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", LISTEN_PORT)).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
            }
        });
        Ok(Self {
            rt: Some(rt),
            handled,
        })
    }

    fn stop(mut self) -> Proof {
        self.shutdown();
        let n = self.handled.load(Ordering::Relaxed);
        Proof {
            path: "tokio-proxy".into(),
            handled: n,
            evidence: format!("proxy's own counter: {n} connections"),
        }
    }

    fn shutdown(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for TokioProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_counters() {
        let l = "counters: redirected=42 no_listener=0 assign_error=1 listener_registered=2 listener_register_error=0";
        assert_eq!(counter(l, "redirected"), Some(42));
        assert_eq!(counter(l, "listener_registered"), Some(2));
        assert_eq!(counter(l, "listener"), None);
    }

    #[test]
    fn parses_haproxy_and_nft() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin\nadvertised,FRONTEND,,,0,3,20000,17,100\n";
        assert_eq!(parse_haproxy_stot(csv), Some(17));
        let nft = "table ip rdb_nat {\n chain prerouting {\n tcp dport 12345 counter packets 12 bytes 720 redirect to :9095\n }\n}";
        assert_eq!(parse_nft_packets(nft), Some(12));
    }
}
