//! Fixtures for the privileged integration tests: network namespaces joined by
//! veth pairs, named servers that say who answered and whom they saw, and the
//! real agent binary run as a child process. Every fixture undoes itself on
//! drop, so a failing test leaves no namespace, process or program behind.

use std::{
    collections::HashSet,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub const ADVERTISE: u16 = redirector_common::DEFAULT_ADVERTISE_PORT;
pub const LISTEN: u16 = redirector_common::DEFAULT_LISTEN_PORT;
/// The kernel programs' names, for callers (the bench) that find them among
/// every program loaded on the machine.
pub use redirector_common::{PROG_SK_LOOKUP, PROG_SOCK_OPS};

/// Addresses inside the test namespaces only (RFC 2544 benchmarking range and a
/// ULA prefix); the namespaces have no route anywhere else.
pub const QUERIER_V4: &str = "198.18.0.1";
pub const LIVE_STORE_V4: &str = "198.18.0.2";
pub const QUERIER_V6: &str = "fd00:5eed::1";
pub const LIVE_STORE_V6: &str = "fd00:5eed::2";

pub mod kube_api;
pub mod netns;

pub use netns::Netns;

/// Joins a querier namespace and a live-store namespace with a veth pair that
/// carries both IPv4 and IPv6 (DAD off so v6 addresses are usable at once).
/// Lets this process hold `n` more files than usual (tests that hold
/// thousands of connections; a VM guest starts with 1024). Root may raise the
/// hard limit; elsewhere the soft one goes as far as the hard one allows.
pub fn raise_open_files(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2)/setrlimit(2) with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let want = limit.rlim_cur.saturating_add(n);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Set in the kernel matrix's QEMU guests, which run under software emulation.
pub const EMULATED_ENV: &str = "REDIRECTOR_TEST_EMULATED";

/// A latency bound measured on a real machine, stretched tenfold under
/// emulation (still far below a stall, which is what such bounds catch).
pub fn latency_bound(on_hardware: std::time::Duration) -> std::time::Duration {
    if std::env::var_os(EMULATED_ENV).is_some() {
        on_hardware * 10
    } else {
        on_hardware
    }
}

/// The cgroup the test processes run in (under the cgroup v2 mount).
pub const TEST_CGROUP: &str = "redirector-tests";

/// Moves this test process (and so the servers, stand-ins and clients it
/// starts) out of the cgroup v2 root into a cgroup of its own, as a
/// live-store runs in its pod's: the agent attaches `sock_ops` to served
/// listeners' cgroups, never to the root where a bare test host keeps every
/// process. Once per process; the empty cgroup stays for the next test binary
/// (`cargo xtask test` removes it).
pub fn enter_test_cgroup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Already in a cgroup of its own (a systemd scope, the bench's): the
        // agent can scope sock_ops to it as it is.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if own
            .lines()
            .any(|l| l.strip_prefix("0::").is_some_and(|p| p != "/"))
        {
            return;
        }
        let moved = redirector::bpf::cgroup::cgroup2_mount().and_then(|mount| {
            let dir = mount.join(TEST_CGROUP);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())?;
            Ok(())
        });
        if let Err(e) = moved {
            panic!("moving the test process into cgroup {TEST_CGROUP}: {e:#}");
        }
    });
}

/// Creates cgroup `rel` under the cgroup v2 mount (a pod's, a container's) and
/// removes it on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(rel: &str) -> Result<Self> {
        let path = redirector::bpf::cgroup::cgroup2_mount()?.join(rel);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children first; a cgroup with processes left cannot go (they are
        // killed by their own guards first).
        for _ in 0..50 {
            let mut dirs = vec![self.path.clone()];
            let mut i = 0;
            while i < dirs.len() {
                if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            dirs.push(e.path());
                        }
                    }
                }
                i += 1;
            }
            for d in dirs.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
            if !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

pub fn veth(querier: &Netns, live_store: &Netns) -> Result<()> {
    let (q4, q6) = (format!("{QUERIER_V4}/24"), format!("{QUERIER_V6}/64"));
    let (l4, l6) = (format!("{LIVE_STORE_V4}/24"), format!("{LIVE_STORE_V6}/64"));
    netns::veth((querier, &[&q4, &q6]), (live_store, &[&l4, &l6]))
}

/// A TCP server that answers each connection with its own name and the peer
/// address it saw, then echoes what it read: tests can tell *which* socket
/// answered and that the client's address survived.
pub struct Server {
    pub name: String,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` inside `ns` ("[::]:9095" is dual-stack, like Go's ":9095").
    pub fn start(ns: &Netns, addr: &str, name: &str) -> Result<Self> {
        let addr: SocketAddr = addr.parse().context("server address")?;
        let (listener, _) = ns
            .run(|| listen(addr, ListenOpts::default()))
            .with_context(|| format!("bind {addr} in {}", ns.name))?;
        Ok(Self::serve(listener, name))
    }

    pub fn serve(listener: TcpListener, name: &str) -> Self {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (accepted, stop, name) = (accepted.clone(), stop.clone(), name.to_owned());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            accepted.lock().expect("lock").push(peer);
                            let name = name.clone();
                            thread::spawn(move || answer(conn, &name, peer));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
                // The listener closes here, before `stop()` returns.
            })
        };
        Self {
            name: name.to_owned(),
            accepted,
            stop,
            handle: Some(handle),
        }
    }

    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().expect("lock").clone()
    }

    /// Closes the listening socket (and returns once it is closed).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

fn answer(mut conn: TcpStream, name: &str, peer: SocketAddr) {
    let _ = conn.set_nonblocking(false);
    let mut payload = Vec::new();
    if conn.read_to_end(&mut payload).is_err() {
        return;
    }
    let _ = conn.write_all(format!("{name} {peer}\n").as_bytes());
    let _ = conn.write_all(&payload);
}

/// How a listener is opened, the way real servers do it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenOpts {
    /// Like Go >= 1.24's `net.Listen`: MPTCP first, plain TCP if the
    /// namespace refuses MPTCP sockets (`net.mptcp.enabled=0`).
    pub mptcp: bool,
    /// SO_REUSEPORT, as multi-worker servers (nginx, envoy) listen.
    pub reuseport: bool,
}

/// Opens a listener on `addr` in the calling thread's namespace; says whether
/// it got MPTCP.
pub fn listen(addr: SocketAddr, opts: ListenOpts) -> io::Result<(TcpListener, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    let (socket, mptcp) = match opts
        .mptcp
        .then(|| Socket::new(domain, Type::STREAM, Some(Protocol::MPTCP)))
    {
        Some(Ok(s)) => (s, true),
        // What Go does when the kernel or the namespace refuses MPTCP.
        Some(Err(_)) | None => (
            Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?,
            false,
        ),
    };
    socket.set_reuse_address(true)?;
    if opts.reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok((socket.into(), mptcp))
}

/// Which server answered each of `n` requests to `addr` made from `ns`;
/// panics, naming the connection, at the first that fails.
pub fn answered_by(ns: &Netns, addr: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            request(ns, addr, b"x")
                .unwrap_or_else(|e| panic!("connection {i} to {addr} failed: {e}"))
                .server
        })
        .collect()
}

/// A real server process living inside a namespace (`ip netns exec`), killed
/// on drop: a live-store stand-in, or a real Go program.
pub struct Process {
    child: Child,
    /// The line it printed once listening.
    pub ready: String,
}

impl Process {
    /// Starts `program ARGS` in `ns` (with `env`) and waits for its first
    /// stdout line, which must start with `listening`.
    pub fn start(ns: &Netns, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_in(ns, None, program, args, env)
    }

    /// [`Process::start`] in cgroup `cgroup` (a pod's container), entered
    /// before it runs anything, so its sockets belong to that cgroup.
    pub fn start_in(
        ns: &Netns,
        cgroup: Option<&Path>,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = Command::new("ip");
        if let Some(cgroup) = cgroup {
            use std::os::unix::process::CommandExt;
            let procs =
                std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
            // SAFETY: open/write/close are async-signal-safe; nothing else
            // runs between fork and exec. Writing "0" moves the writer.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(["netns", "exec", &ns.name, program])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut process = Self {
            child,
            ready: String::new(),
        };
        BufReader::new(stdout)
            .read_line(&mut process.ready)
            .context("reading its first line")?;
        if !process.ready.starts_with("listening") {
            bail!("{program} said {:?} instead of listening", process.ready);
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `Server` answered.
#[derive(Debug)]
pub struct Reply {
    pub server: String,
    pub peer_seen: SocketAddr,
    pub echo: Vec<u8>,
    pub local_addr: SocketAddr,
}

/// Connects from inside `ns` to `addr`, sends `payload`, and reads the reply.
pub fn request(ns: &Netns, addr: &str, payload: &[u8]) -> io::Result<Reply> {
    let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
    ns.run(|| {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let local_addr = conn.local_addr()?;
        conn.write_all(payload)?;
        match conn.shutdown(Shutdown::Write) {
            // The server's RST came first: the read below reports it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            other => other?,
        }
        let mut reader = BufReader::new(conn);
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let (server, peer) = header
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| io::Error::other(format!("bad reply header {header:?}")))?;
        let mut echo = Vec::new();
        reader.read_to_end(&mut echo)?;
        Ok(Reply {
            server: server.to_owned(),
            peer_seen: peer.parse().map_err(io::Error::other)?,
            echo,
            local_addr,
        })
    })
}

/// Minimal HTTP/1.1 GET over loopback (`ADDR/path`): (status code, body).
pub fn http_get(addr_path: &str) -> (u16, String) {
    let response = http_request(addr_path, &[]).expect("GET from the metrics endpoint");
    (response.status, response.body)
}

/// What [`http_request`] read.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// (name in lowercase, value), in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// HTTP/1.1 GET over loopback (`ADDR/path`) with extra request `headers` (an
/// `Accept` to negotiate the metrics format, for one). Reads a chunked body
/// too: Go servers such as Prometheus send larger answers that way.
pub fn http_request(addr_path: &str, headers: &[(&str, &str)]) -> io::Result<HttpResponse> {
    let (addr, path) = addr_path.split_at(
        addr_path
            .find('/')
            .ok_or_else(|| io::Error::other(format!("no path in {addr_path:?}")))?,
    );
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    conn.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = response[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).map_err(io::Error::other)?,
    })
}

/// The payload of a chunked HTTP/1.1 body (`SIZE\r\nDATA\r\n`... `0\r\n\r\n`).
fn dechunk(mut body: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| io::Error::other("truncated chunk size"))?;
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| io::Error::other("bad chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let data = body
            .get(eol + 2..eol + 2 + size)
            .ok_or_else(|| io::Error::other("truncated chunk"))?;
        out.extend_from_slice(data);
        body = body.get(eol + 4 + size..).unwrap_or_default();
    }
}

/// The value of the sample `name` (no labels) in a Prometheus text `body`.
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
}

/// Path of the agent binary `cargo xtask test` built.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("REDIRECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/redirector"
            ))
        })
}

/// The real agent, started with `redirector run ARGS` and stopped with SIGTERM.
/// The one launcher for the tests and the bench (`cargo xtask bench`).
pub struct Agent {
    child: Child,
    /// Where it writes what it serves and why (`redirector status` reads it).
    state_file: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr: they end once the agent has
    /// exited and its last line is in.
    readers: Vec<JoinHandle<()>>,
}

/// How [`Agent::launch`] runs the agent; the default is what [`Agent::start`]
/// does.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// The agent binary [default: [`agent_bin`]].
    pub bin: Option<PathBuf>,
    /// A program that execs the agent (see [`Agent::start_wrapped`]).
    pub wrapper: Vec<String>,
    /// `redirector run` arguments.
    pub args: Vec<String>,
    /// Namespaces to serve, one `--netns` each (paths need not be UTF-8).
    pub netns: Vec<PathBuf>,
    /// A directory that gets a copy of every line printed, stdout in
    /// `agent.log` and stderr in `agent.stderr.log` (appended), so a failed
    /// run can be read afterwards.
    pub log_dir: Option<PathBuf>,
    /// SIGTERM the agent when the thread that started it exits. The bench sets
    /// it so that no agent outlives a killed harness; tests leave it off, as
    /// they may start an agent on a helper thread and keep it after.
    pub die_with_parent: bool,
    /// How long to wait for `ready` [default: 20 s]. The bench's scale mode
    /// starts an agent that discovers a thousand namespaces before it is
    /// ready.
    pub ready_within: Option<Duration>,
}

fn collect(
    stream: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
    mut copy: Option<std::fs::File>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some(f) = copy.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            into.lock().expect("lock").push(line);
        }
    })
}

impl Agent {
    /// Waits (up to 3 s) until the agent reports at least `n` registered
    /// listeners. A listener in a cgroup that already has `sock_ops` (a
    /// live-store restarting in its pod) is registered in the kernel at
    /// listen(); the first one of a pod is registered by the agent from its
    /// bind event, milliseconds later: tests that connect right after a
    /// first listen() wait for it, as a querier waits for the ring.
    pub fn wait_registered(&self, n: u64) {
        let url = self.metrics_url("/metrics");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (code, body) = http_get(&url);
            if code == 200 && metric(&body, "redirector_listeners_registered") >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} listener(s) registered after 3 s: {:?}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's state file (what it serves and why).
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// Starts the agent and waits until it prints its `ready` line.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_wrapped(&[], args)
    }

    /// Like [`Agent::start`], with the agent run by `wrapper` (a program that
    /// execs it, such as `nsenter -t PID -m --` to start it in another mount
    /// namespace): the child is then still the agent itself.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Result<Self> {
        Self::launch(&AgentOptions {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..AgentOptions::default()
        })
    }

    /// Starts the agent as `opts` says and waits until it prints its `ready`
    /// line.
    pub fn launch(opts: &AgentOptions) -> Result<Self> {
        let bin = opts.bin.clone().unwrap_or_else(agent_bin);
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("run").args(&opts.args);
        for ns in &opts.netns {
            cmd.arg("--netns").arg(ns);
        }
        // A free port of its own, so tests never collide on the default 9464.
        if !opts.args.iter().any(|a| a == "--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        if opts.die_with_parent {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let copy = |name: &str| -> Result<Option<std::fs::File>> {
            let Some(dir) = &opts.log_dir else {
                return Ok(None);
            };
            let path = dir.join(name);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            Ok(Some(file))
        };
        let (stdout_copy, stderr_copy) = (copy("agent.log")?, copy("agent.stderr.log")?);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(
                child.stdout.take().context("stdout")?,
                stdout.clone(),
                stdout_copy,
            ),
            collect(
                child.stderr.take().context("stderr")?,
                stderr.clone(),
                stderr_copy,
            ),
        ];
        let socket = opts
            .args
            .iter()
            .position(|a| a == "--flows-socket")
            .and_then(|i| opts.args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(redirector::flows::sub::DEFAULT_FLOWS_SOCKET));
        let mut agent = Self {
            state_file: redirector::config::settings::state_file(&socket),
            child,
            stdout,
            stderr,
            readers,
        };
        let within = opts.ready_within.unwrap_or(Duration::from_secs(20));
        let deadline = Instant::now() + within;
        loop {
            if agent.status().iter().any(|l| l.starts_with("ready")) {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                thread::sleep(Duration::from_millis(50));
                bail!(
                    "agent exited with {status} before ready; stderr: {}",
                    agent.stderr().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready after {within:?}; stderr: {}",
                    agent.stderr().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `ADDR/path` of the agent's HTTP endpoint, from the address it printed.
    pub fn metrics_url(&self, path: &str) -> String {
        let line = self
            .status()
            .into_iter()
            .find(|l| l.starts_with("metrics on http://"))
            .expect("agent prints its metrics address");
        let addr = line
            .trim_start_matches("metrics on http://")
            .split('/')
            .next()
            .expect("addr")
            .to_owned();
        format!("{addr}{path}")
    }

    /// What it wrote on stdout: flow records only (without --flow-log).
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// What the agent says about itself (`attached ...`, `ready: ...`, the exit
    /// summary): the messages of its log lines on stderr, without the
    /// `TIME LEVEL target: ` of the text format (see [`log_message`]).
    pub fn status(&self) -> Vec<String> {
        self.stderr()
            .iter()
            .map(|l| log_message(l).to_owned())
            .collect()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lock").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no cleanup of any kind), wait for exit, and return everything
    /// printed.
    pub fn kill(mut self) -> Result<Stopped> {
        self.child.kill()?;
        let status = self.child.wait()?;
        self.drain();
        Ok(Stopped {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// SIGTERM, wait for exit, and return the exit status and everything printed.
    pub fn stop(mut self) -> Result<Stopped> {
        let status = self.terminate()?;
        self.drain();
        Ok(Stopped {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// Waits (at most 2 s) until the reader threads have read the exited
    /// agent's last lines, its exit summary among them. Bounded: a process the
    /// agent started could hold the pipes open.
    fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        bail!("agent ignored SIGTERM for 10 s and was killed")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

pub struct Stopped {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Stopped {
    /// A kernel counter from the agent's exit summary (`counters: name=value ...`).
    pub fn counter(&self, name: &str) -> u64 {
        let line = self
            .counters()
            .unwrap_or_else(|| panic!("no counters line in agent output {:?}", self.stderr));
        counter_in(line, name).unwrap_or_else(|| panic!("no counter {name} in {line:?}"))
    }

    /// The agent's exit summary line, the one with `counters:`.
    pub fn counters(&self) -> Option<&str> {
        self.stderr
            .iter()
            .find(|l| l.contains("counters:"))
            .map(String::as_str)
    }
}

/// The message of one line of the agent's text log (`2025-01-01T00:00:00.000000Z
/// INFO redirector::commands::run: ready: ...` gives `ready: ...`); any other
/// line as it is.
pub fn log_message(line: &str) -> &str {
    let mut words = line.split_whitespace();
    let (Some(time), Some(level)) = (words.next(), words.next()) else {
        return line;
    };
    if !time.ends_with('Z') || !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level) {
        return line;
    }
    let Some(at) = line.find(level) else {
        return line;
    };
    match line[at + level.len()..].trim_start().split_once(": ") {
        Some((target, message)) if !target.contains(' ') => message,
        _ => line,
    }
}

/// `name=N` from the agent's exit summary line.
pub fn counter_in(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Kernel run-time statistics for every BPF program, on while this lives
/// (BPF_ENABLE_STATS: an fd instead of the global sysctl, so they switch
/// themselves off even if the process dies).
pub struct RunStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunStats {
    pub fn enable() -> Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(Self { _fd: fd })
    }
}

/// One of redirector's loaded programs, with its run-time statistics (which
/// only grow while a [`RunStats`] is alive).
#[derive(Clone, Debug)]
pub struct ProgStats {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// Every loaded redirector program (any agent's: its name starts with
/// `PROG_PREFIX`), with its run-time statistics.
pub fn run_stats() -> Vec<ProgStats> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| {
            let name = p.name_as_str()?;
            name.starts_with(redirector_common::PROG_PREFIX)
                .then(|| ProgStats {
                    id: p.id(),
                    name: name.to_owned(),
                    run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: p.run_count(),
                })
        })
        .collect()
}

/// How many times redirector's programs ran, and for how long (ns), in all.
pub fn redirector_program_runs() -> (u64, u64) {
    run_stats()
        .iter()
        .fold((0, 0), |(n, t), p| (n + p.run_count, t + p.run_time_ns))
}

/// Ids of the loaded BPF programs that belong to redirector (any agent's).
pub fn redirector_program_ids() -> HashSet<u32> {
    run_stats().into_iter().map(|p| p.id).collect()
}

/// Waits (up to 5 s: program fds are released asynchronously after a process
/// exits) until none of `ids` is loaded; returns those still loaded.
pub fn wait_unloaded(ids: &HashSet<u32>) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u32> = redirector_program_ids()
            .intersection(ids)
            .copied()
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Ids of the sk_lookup programs attached to the namespace `ns`.
pub fn sk_lookup_programs(ns: &Netns) -> Vec<u32> {
    let file = std::fs::File::open(ns.path()).expect("open netns file");
    redirector::sys::prog_query(file.as_fd(), redirector::sys::BPF_SK_LOOKUP)
        .expect("BPF_PROG_QUERY")
}

/// Ids of the sock_ops programs attached to this process's cgroup (where the
/// agent attaches its own for the tests' in-process live-stores) and to the
/// cgroup v2 root (`--sock-ops-cgroup root`).
pub fn sock_ops_programs() -> Vec<u32> {
    let root = redirector::bpf::cgroup::cgroup2_mount().expect("a cgroup2 mount");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| root.join(p.trim_start_matches('/')))
        .unwrap_or_else(|| root.clone());
    let mut ids = Vec::new();
    for dir in [&root, &own] {
        let fd = std::fs::File::open(dir).expect("open a cgroup");
        for id in redirector::sys::prog_query(fd.as_fd(), redirector::sys::BPF_CGROUP_SOCK_OPS)
            .expect("BPF_PROG_QUERY")
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// `redirector ARGS` to completion: (exit code, stdout, stderr).
pub fn redirector(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run redirector");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes pinned state (`redirector detach`) at the start and end of a test,
/// even when it fails.
pub struct PinCleanup;

impl PinCleanup {
    // Not `Default`: it changes the machine's state.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        redirector(&["detach"]);
        Self
    }
}

impl Drop for PinCleanup {
    fn drop(&mut self) {
        redirector(&["detach"]);
    }
}

/// `v4` as a dual-stack socket reports it (`::ffff:a.b.c.d`) or plain.
pub fn same_ip(seen: &SocketAddr, expected: &str) -> bool {
    seen.ip().to_canonical().to_string() == expected
}

/// A querier namespace `q` and a live-store namespace `l` joined by veth (both
/// address families): the topology every integration test starts from.
pub struct Topology {
    pub q: Netns,
    pub l: Netns,
}

impl Topology {
    // Not `Default`: it creates namespaces, which is no default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let q = Netns::new("q").expect("querier netns");
        let l = Netns::new("l").expect("live-store netns");
        veth(&q, &l).expect("veth between querier and live-store");
        Self { q, l }
    }

    /// The agent serving `l`, with `extra` arguments.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        let path = self.l.path();
        let mut args = vec!["--netns", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Agent::start(&args).expect("agent starts")
    }
}

/// A querier namespace `q` and a live-store namespace `l` joined by [`veth`],
/// and the flow log of the agents it starts for `l`; the log goes on drop.
pub struct FlowSetup {
    pub q: Netns,
    pub l: Netns,
    pub log: PathBuf,
}

impl FlowSetup {
    // Not `Default`: it creates namespaces, which is no default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let Topology { q, l } = Topology::new();
        let log = std::env::temp_dir().join(format!("{}.flows", l.name));
        let _ = std::fs::remove_file(&log);
        Self { q, l, log }
    }

    /// An agent serving `l` that writes its flow records to `log`.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--netns".to_owned(),
            self.l.path().display().to_string(),
            "--flow-log".to_owned(),
            self.log.display().to_string(),
            "--metrics-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&refs).expect("agent starts")
    }

    /// The flow log's records (written with `--flow-format json`).
    pub fn json_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .expect("flow log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

impl Drop for FlowSetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// SO_LINGER {on, 0}: closing `conn` then sends a RST instead of a FIN.
pub fn reset_on_close(conn: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a correctly sized struct.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes every `LISTENERS` entry of the namespace with `netns_cookie`, in
/// every redirector agent's map, behind the agents' backs (what an operator's
/// `bpftool map delete` would do). Returns how many entries went.
pub fn delete_registrations(netns_cookie: u64) -> usize {
    use redirector::sys::{map_delete, map_keys};
    let mut deleted = 0;
    for info in aya::maps::loaded_maps().filter_map(|m| m.ok()) {
        if info.name_as_str() != Some(redirector_common::MAP_LISTENERS) {
            continue;
        }
        let Ok(map) = aya::maps::MapData::from_id(info.id()) else {
            continue;
        };
        let fd = map.fd().as_fd();
        let keys: Vec<redirector_common::ListenerKey> = map_keys(fd).unwrap_or_default();
        for key in keys.iter().filter(|k| k.netns_cookie == netns_cookie) {
            if map_delete(fd, key).is_ok() {
                deleted += 1;
            }
        }
    }
    deleted
}

/// Where `cargo xtask test` tells the tests its Go live-store is.
pub const GO_LIVE_STORE_ENV: &str = "REDIRECTOR_TEST_GO_LIVE_STORE";

/// The real Go live-store `cargo xtask test` builds (tests/go/live-store.go):
/// from `GO_LIVE_STORE_ENV`, else target/go.
pub fn go_live_store_bin() -> PathBuf {
    let bin = std::env::var_os(GO_LIVE_STORE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/go/live-store"
            ))
        });
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask test` builds the Go live-store",
        bin.display()
    );
    bin
}

/// Polls `f` every 10 ms until it holds or `within` has passed; whether it
/// held (asked once more at the deadline).
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    f()
}
