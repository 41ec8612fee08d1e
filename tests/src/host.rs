//! The test process's own footing on the machine: the cgroup it runs in, the
//! pods' cgroups it makes, and how many files it may hold.

use std::path::PathBuf;

use anyhow::{Context, Result};

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
        let moved = redirector::sys::cgroup::cgroup2_mount().and_then(|mount| {
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
        let path = redirector::sys::cgroup::cgroup2_mount()?.join(rel);
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
