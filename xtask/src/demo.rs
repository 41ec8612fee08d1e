//! `cargo xtask run`: the agent's main job on a network namespace of its own,
//! so trying it changes nothing on the developer's machine (the agent turns
//! MPTCP off in what it serves, and a host-wide `sk_lookup` on 12345 would
//! steer the host's own connections). In that namespace: a live-store
//! stand-in listening on 9095, and a client that dials 12345 every two
//! seconds and prints who answered. Ctrl-C stops the agent, then everything
//! goes, the namespace too.

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use redirector_tests::{ADVERTISE, LISTEN};

/// The namespace `cargo xtask run` makes (and removes, or removes at its next
/// start if it was killed).
pub const NETNS: &str = "redirector-run";

/// A network namespace under /var/run/netns, removed on drop.
struct Namespace;

impl Namespace {
    fn create() -> Result<Self> {
        // Left by a run that was killed.
        let _ = ip(&["netns", "del", NETNS]);
        ip(&["netns", "add", NETNS])?;
        let ns = Self;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", NETNS]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip (iproute2)")?;
    if !status.success() {
        bail!("ip {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `f` on a thread of its own that has entered the namespace.
fn in_namespace(stop: Arc<AtomicBool>, f: fn(Arc<AtomicBool>)) -> Result<thread::JoinHandle<()>> {
    let file = File::open(Path::new("/var/run/netns").join(NETNS))
        .with_context(|| format!("opening network namespace {NETNS}"))?;
    Ok(thread::spawn(move || {
        // SAFETY: setns(2) on this thread only, with an fd it holds open.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "xtask: entering {NETNS}: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        f(stop)
    }))
}

/// The stand-in live-store: answers each connection with who it is and the
/// peer it saw.
fn live_store(stop: Arc<AtomicBool>) {
    let listener = match TcpListener::bind(("::", LISTEN)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("xtask: the live-store stand-in cannot listen on [::]:{LISTEN}: {e}");
            return;
        }
    };
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                let _ = conn.set_nonblocking(false);
                let _ = writeln!(conn, "live-store on :{LISTEN} saw {peer}");
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The client: dials the advertised port, as a querier does.
fn client(stop: Arc<AtomicBool>) {
    thread::sleep(Duration::from_secs(2));
    while !stop.load(Ordering::Relaxed) {
        let addr = ("127.0.0.1", ADVERTISE);
        match TcpStream::connect(addr) {
            Ok(mut conn) => {
                let mut answer = String::new();
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.read_to_string(&mut answer);
                eprintln!(
                    "xtask: client {} -> 127.0.0.1:{ADVERTISE}: {}",
                    conn.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                    answer.trim()
                );
            }
            Err(e) => eprintln!("xtask: client -> 127.0.0.1:{ADVERTISE}: {e}"),
        }
        thread::sleep(Duration::from_secs(2));
    }
}

/// A cgroup of its own for this process (its live-store stand-in, client
/// and the agent it starts), as a pod has: the agent runs `sock_ops` in the
/// live-store's cgroup for its flow records, never in the cgroup v2 root.
/// Moved back and removed on drop. None if already in a cgroup of its own.
struct OwnCgroup {
    mount: PathBuf,
}

impl OwnCgroup {
    fn enter() -> Option<Self> {
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        if !own.lines().any(|l| l == "0::/") {
            return None;
        }
        let mount = fs::read_to_string("/proc/self/mountinfo")
            .ok()?
            .lines()
            .find_map(|l| {
                let (fields, fs_type) = l.split_once(" - ")?;
                fs_type
                    .starts_with("cgroup2 ")
                    .then(|| fields.split(' ').nth(4).map(PathBuf::from))
                    .flatten()
            })?;
        let dir = mount.join(NETNS);
        fs::create_dir_all(&dir).ok()?;
        fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).ok()?;
        Some(Self { mount })
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = fs::write(
            self.mount.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = fs::remove_dir(self.mount.join(NETNS));
    }
}

/// Ctrl-C reaches the whole foreground process group: the agent stops on it;
/// this process only waits for the agent, then cleans up. A handler (not
/// SIG_IGN, which the agent would inherit) that does nothing.
fn survive_sigint() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: installs an async-signal-safe handler that does nothing.
    unsafe { libc::signal(libc::SIGINT, nothing as *const () as libc::sighandler_t) };
}

/// The main job in its own namespace; `args`, if any, go to `redirector run`
/// after the namespace's `--netns`.
pub fn run(agent: &Path, args: &[String]) -> Result<ExitStatus> {
    let _ns = Namespace::create()?;
    let _cgroup = OwnCgroup::enter();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = [
        in_namespace(stop.clone(), live_store)?,
        in_namespace(stop.clone(), client)?,
    ];
    let path = format!("/var/run/netns/{NETNS}");
    eprintln!(
        "xtask: serving network namespace {NETNS} only (this machine's own is left alone): a \
         live-store stand-in on :{LISTEN}, a client dialing :{ADVERTISE} every 2 s; Ctrl-C stops"
    );
    eprintln!(
        "xtask: running {} run --netns {path} {}",
        agent.display(),
        args.join(" ")
    );
    survive_sigint();
    let status = Command::new(agent)
        .arg("run")
        .args(["--netns", &path])
        .args(args)
        .status()
        .with_context(|| format!("starting {}", agent.display()))?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(status)
}
