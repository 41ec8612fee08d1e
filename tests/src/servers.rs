//! In-process servers and server processes inside a namespace, opened the way
//! real live-stores open their listeners.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::Netns;

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
    /// Listens on `addr` inside `ns` (`[::]:PORT` is dual-stack, like Go's `:PORT`).
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
