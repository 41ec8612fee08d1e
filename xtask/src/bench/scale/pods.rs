//! The scale mode's pods: a network namespace each (made here with
//! unshare(2), held by an fd: when the bench dies the kernel removes it with
//! the last process inside, so nothing is left to clean up by name), a cgroup
//! v2 "pod" directory with a "container" child, and one small process inside
//! both listening on the listen port, with Tempo's `-target=NAME` on its
//! command line as the agent's discovery sees it.
//!
//! The process is this xtask binary's hidden `scale-pod` command, not
//! live-store-standin: the stand-in's accept thread polls every 2 ms, which
//! at a thousand pods would keep both of this machine's cores busy and drown
//! the agent's own CPU figures. A scale pod blocks in accept(2).

use std::{
    ffi::CString,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::bench::topology::LISTEN_PORT;

/// The cgroup directory every pod of the scale mode lives under; also the
/// agent's `--cgroup-pattern`, so it never discovers anyone else's namespace
/// on this shared machine.
pub const CGROUP_DIR: &str = "redirector-bench-scale";

/// Tempo's role flag of a pod, as its command line carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    LiveStore,
    Querier,
}

impl Role {
    pub fn target(self) -> &'static str {
        match self {
            Role::LiveStore => "live-store",
            Role::Querier => "querier",
        }
    }
}

/// A network namespace with loopback up, alive while this fd is open (or a
/// process is inside).
pub struct PodNetns {
    fd: OwnedFd,
}

impl PodNetns {
    /// A fresh namespace, made on a short-lived thread of its own so the
    /// caller stays where it is.
    pub fn create() -> Result<Self> {
        std::thread::spawn(|| -> Result<Self> {
            // SAFETY: unshare(2) of the network namespace affects this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            }
            loopback_up()?;
            let file = File::open("/proc/thread-self/ns/net").context("open own netns")?;
            Ok(Self { fd: file.into() })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }

    /// Another fd for the same namespace (for a thread that probes it).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone().context("dup netns fd")?,
        })
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> Result<()> {
        // SAFETY: setns(2) on the calling thread with a valid netns fd.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `ip link set lo up` in the calling thread's namespace (SIOCSIFFLAGS).
fn loopback_up() -> Result<()> {
    // SAFETY: a datagram socket for the ioctls, closed by OwnedFd; ifreq is
    // zeroed and carries a NUL-terminated name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            bail!("SIOCGIFFLAGS lo: {}", std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            bail!("SIOCSIFFLAGS lo: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The cgroup v2 directories of the run's pods; removed (children first) on
/// drop, once their processes are gone.
pub struct Cgroups {
    root: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroups {
    pub fn create() -> Result<Self> {
        let mount = crate::bench::cpu::cgroup2_mount().context("no cgroup2 mount")?;
        let root = mount.join(CGROUP_DIR);
        remove_tree(&root);
        std::fs::create_dir_all(&root).with_context(|| format!("mkdir {}", root.display()))?;
        Ok(Self {
            made: vec![root.clone()],
            root,
        })
    }

    /// `<root>/pod<uid>/ctr`, the container's cgroup, the pod's named as
    /// kubelet names it (so the agent attaches `sock_ops` to the pod, as on a
    /// node). The uid's last group is the pod name's bytes.
    pub fn container(&mut self, pod: &str) -> Result<PathBuf> {
        let tail: u64 = pod
            .bytes()
            .fold(0u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
            & 0xffff_ffff_ffff;
        let dir = self
            .root
            .join(format!("pod0f1e2d3c-4b5a-4978-8796-{tail:012x}"));
        let ctr = dir.join("ctr");
        std::fs::create_dir_all(&ctr).with_context(|| format!("mkdir {}", ctr.display()))?;
        self.made.push(dir);
        self.made.push(ctr.clone());
        Ok(ctr)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.made.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Empty cgroup directories left by a run that died (its processes went with
/// it: they get SIGTERM when the bench dies).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// One pod's listening process.
pub struct Pod {
    pub name: String,
    pub role: Role,
    pub netns: PodNetns,
    child: Child,
}

impl Pod {
    /// Starts the pod's process (`program scale-pod ...`) in `ctr` and
    /// `netns`: it joins both between fork and exec, so it listens already
    /// in its container's cgroup. Call from a thread that outlives the pod:
    /// the process gets SIGTERM when that thread exits. Returns once it has
    /// said that it listens, with the moment that line arrived.
    pub fn start(
        program: &Path,
        name: String,
        role: Role,
        netns: PodNetns,
        ctr: &Path,
    ) -> Result<(Self, Instant)> {
        let mut pod = Self::spawn(program, name, role, netns, ctr)?;
        let listened = pod.wait_listening()?;
        Ok((pod, listened))
    }

    /// [`Pod::start`] without waiting: spawning many before reading their
    /// first lines lets them start in parallel.
    pub fn spawn(
        program: &Path,
        name: String,
        role: Role,
        netns: PodNetns,
        ctr: &Path,
    ) -> Result<Self> {
        let procs = CString::new(ctr.join("cgroup.procs").as_os_str().as_bytes())?;
        let ns_fd = netns.fd.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.arg(POD_COMMAND)
            .arg(format!("0.0.0.0:{LISTEN_PORT}"))
            .arg(&name)
            .arg(format!("-target={}", role.target()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls (prctl, open, write, close,
        // setns) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writer itself into the cgroup.
                let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if wrote != 1 || libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting pod {name}"))?;
        Ok(Self {
            name,
            role,
            netns,
            child,
        })
    }

    /// Reads the pod's first line (`listening on ...`, printed right after
    /// listen(2)); returns when it arrived.
    pub fn wait_listening(&mut self) -> Result<Instant> {
        let stdout = self.child.stdout.take().context("pod stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .with_context(|| format!("reading pod {}", self.name))?;
        let at = Instant::now();
        if !line.starts_with("listening") {
            bail!("pod {} said {line:?} instead of listening", self.name);
        }
        Ok(at)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Every pod of a run: all are killed (by pid, SIGKILL) before any is
/// waited for, so a thousand go in one go.
#[derive(Default)]
pub struct Pods(pub Vec<Pod>);

impl Drop for Pods {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.child.kill();
        }
        for p in &mut self.0 {
            let _ = p.child.wait();
        }
    }
}

/// The hidden xtask command a pod runs.
pub const POD_COMMAND: &str = "scale-pod";

/// `xtask scale-pod ADDR NAME [-target=ROLE]`: listens on ADDR, prints
/// `listening on ADDR`, and answers every connection with `NAME\n`.
pub fn pod_main(args: &[String]) -> Result<()> {
    let (Some(addr), Some(name)) = (args.first(), args.get(1)) else {
        bail!("usage: xtask {POD_COMMAND} ADDR NAME [-target=ROLE]");
    };
    let addr: SocketAddr = addr.parse().context("pod address")?;
    let (listener, _) = redirector_tests::listen(addr, redirector_tests::ListenOpts::default())
        .with_context(|| format!("listen on {addr}"))?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    let answer = format!("{name}\n");
    // A failed accept or write concerns that one connection only.
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(answer.as_bytes());
    }
    Ok(())
}
