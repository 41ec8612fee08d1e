//! What the fault scenarios share: live-store stand-ins that speak like the
//! real Go one (a listener thread, or a process killed with SIGKILL), and
//! the querier's loads (connection attempts, one thread each, every attempt
//! kept; and a SYN flood).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::bench::topology::{live_store_cpu, pin_current_thread, Netns, LISTEN_PORT, QUERIER_CPU};

/// Moves the calling thread into the network namespace at `path`: what
/// `Netns::enter` does, for a `'static` thread that cannot borrow the `Netns`.
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
pub struct Listener {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub listened: Instant,
}

impl Listener {
    pub fn start(ns: &Netns) -> Result<Self> {
        // std binds with SO_REUSEADDR and listens before returning; [::] is
        // dual-stack, like Go's ":PORT".
        let listener = ns.try_run(|| {
            TcpListener::bind(("::", LISTEN_PORT))
                .with_context(|| format!("bind [::]:{LISTEN_PORT}"))
        })?;
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
    pub fn stop(mut self) {
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
pub struct Attempt {
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

/// A querier load on a thread of its own in the querier namespace: back to
/// back, or paced at `pace` per connection; every attempt is kept.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Attempt>>>,
}

impl Load {
    pub fn start(
        ns: &Netns,
        target: SocketAddr,
        pace: Option<Duration>,
        cpu: Option<usize>,
    ) -> Self {
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

    pub fn stop(self) -> Result<Vec<Attempt>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    }
}

/// Non-blocking connect() attempts to `target` from `ns`, back to back on
/// `QUERIER_CPU`, for `dur`; each socket is closed at once (its SYN is out).
/// Returns the number of attempts.
pub fn flood(ns: &Netns, target: SocketAddr, dur: Duration) -> Result<u64> {
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

/// The real Go live-store (tests/go), or the tests' stand-in: a process in
/// the live-store namespace on the live-store CPU, killed with SIGKILL.
pub struct LiveStoreProcess {
    child: Child,
}

impl LiveStoreProcess {
    /// Starts it and returns once it said it listens (after listen()).
    pub fn start(ns: &Netns, program: &Path) -> Result<(Self, Instant)> {
        let mut cmd = ns.command(&program.display().to_string());
        cmd.arg(format!("[::]:{LISTEN_PORT}"))
            .arg("live-store")
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

    pub fn kill(mut self) {
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
pub fn live_store_program(root: &Path, notes: &mut Vec<String>) -> Option<PathBuf> {
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
