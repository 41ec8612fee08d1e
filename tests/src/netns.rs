//! Network namespaces for the integration tests and the benchmark: named after
//! the process (so concurrent runs never collide), deleted on drop (so a failed
//! run leaves nothing), with ways to run code and commands inside.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Every test namespace is `rdt-<pid>-<n>-<tag>`.
pub const TEST_PREFIX: &str = "rdt-";

/// Runs `ip ARGS` (iproute2), turning a failure into an error with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace `<prefix><pid>-<n>-<tag>` with loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A test namespace ([`TEST_PREFIX`]).
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_prefix(TEST_PREFIX, tag)
    }

    pub fn with_prefix(prefix: &str, tag: &str) -> Result<Self> {
        crate::enter_test_cgroup();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}{}-{n}-{tag}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Moves the calling thread into this namespace. Threads it creates later
    /// (tokio workers, for instance) inherit it; other threads are unaffected.
    pub fn enter(&self) -> Result<()> {
        let file = File::open(self.path()).with_context(|| format!("open {}", self.name))?;
        // SAFETY: setns(2) on the calling thread with a valid, open netns fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {}: {}", self.name, io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` to completion on a fresh thread inside this namespace; sockets
    /// it creates live here.
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread inside {} panicked", self.name))?
        })
    }

    /// [`Netns::try_run`] for tests: entering the namespace must work.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.try_run(|| Ok(f())).expect("run inside the namespace")
    }

    /// `ip netns exec <ns> program`: a command that runs inside this namespace.
    /// It gets SIGTERM if the process that started it dies, so nothing outlives it.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self
            .command("sysctl")
            .arg("-qw")
            .arg(format!("{key}={value}"))
            .output()
            .context("running sysctl")?;
        if !out.status.success() {
            bail!(
                "sysctl {key}={value} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Netns {
    /// A sysctl's value in this namespace (`/proc/sys/net` shows the namespace
    /// of the thread that reads it).
    pub fn sysctl_value(&self, path: &str) -> String {
        let owned = path.to_owned();
        self.run(move || std::fs::read_to_string(&owned))
            .unwrap_or_else(|e| panic!("reading {path} in {}: {e}", self.name))
            .trim()
            .to_owned()
    }

    /// The namespace's cookie, the key the kernel programs use for it.
    pub fn cookie(&self) -> u64 {
        self.run(redirector::sys::current_netns_cookie)
            .expect("SO_NETNS_COOKIE")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Joins `a` and `b` with a veth pair (`vq` in `a`, `vl` in `b`) and gives each
/// end its addresses (CIDR; IPv6 ones without duplicate address detection, so
/// they are usable at once).
pub fn veth(a: (&Netns, &[&str]), b: (&Netns, &[&str])) -> Result<()> {
    ip(&[
        "-n", &a.0.name, "link", "add", "vq", "type", "veth", "peer", "name", "vl", "netns",
        &b.0.name,
    ])?;
    for ((ns, addrs), dev) in [(a, "vq"), (b, "vl")] {
        for addr in addrs {
            let mut args = vec!["-n", ns.name.as_str(), "addr", "add", addr, "dev", dev];
            if addr.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
    }
    Ok(())
}

/// Deletes `<prefix><pid>-*` namespaces left by runs whose process is gone
/// (killed with SIGKILL, where no destructor runs).
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
