//! Whole-machine CPU accounting from /proc/stat: every path's cost counts,
//! whichever process or softirq context it lands in (proxies, the kernel's
//! network stack, the agent, conntrack).

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    busy: u64,
    own_usec: Option<u64>,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let mut t = parse(&stat).context("no aggregate cpu line in /proc/stat")?;
        t.own_usec = BENCH_CGROUP.get().and_then(|c| cgroup_usage_usec(c));
        Ok(t)
    }

    /// CPU-seconds spent (all cores together) between `self` and `later`.
    pub fn busy_secs_until(&self, later: &CpuTimes) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / clock_ticks()
    }

    /// CPU-seconds spent by the bench's own cgroup (client, live-store
    /// stand-in, proxies, agent, and the softirq work that runs in their
    /// context), or NaN without one. Unlike /proc/stat this leaves out
    /// whatever else the machine is doing (it is shared).
    pub fn own_secs_until(&self, later: &CpuTimes) -> f64 {
        match (self.own_usec, later.own_usec) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
            _ => f64::NAN,
        }
    }
}

static BENCH_CGROUP: OnceLock<PathBuf> = OnceLock::new();

fn cgroup_usage_usec(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// A cgroup v2 `rdb-<pid>` holding this process (and so every child it
/// starts), for CPU accounting; on drop the process moves back and the cgroup
/// is removed. Programs attached to the root cgroup (redirector's bind hooks,
/// and its sock_ops with `--sock-ops-cgroup root`) apply to it like to any
/// other descendant.
pub struct BenchCgroup {
    dir: PathBuf,
    home: PathBuf,
}

impl BenchCgroup {
    pub fn enter() -> Result<Self> {
        let root = cgroup2_mount().context("no cgroup2 mount")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 entry in /proc/self/cgroup")?;
        let home = root.join(rel.trim_start_matches('/'));
        let dir = root.join(format!("rdb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cg = Self { dir, home };
        std::fs::write(cg.dir.join("cgroup.procs"), std::process::id().to_string())
            .context("moving the bench into its cgroup")?;
        if cgroup_usage_usec(&cg.dir).is_none() {
            bail!("{} has no cpu.stat usage_usec", cg.dir.display());
        }
        let _ = BENCH_CGROUP.set(cg.dir.clone());
        Ok(cg)
    }
}

/// The live-store's "pod": a threaded child of the bench's cgroup. The
/// thread that creates the live-store's listening socket moves in first, so
/// the socket (and every connection it accepts) belongs to it while the load
/// generator's sockets do not, as a querier and a live-store are in different
/// pods: redirector attaches `sock_ops` there only.
const LIVE_STORE_CGROUP: &str = "live-store";

/// Moves the calling thread (only) into the live-store's cgroup.
pub fn enter_live_store_cgroup() -> Result<()> {
    let Some(bench) = BENCH_CGROUP.get() else {
        return Ok(());
    };
    let dir = bench.join(LIVE_STORE_CGROUP);
    if !dir.is_dir() {
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        std::fs::write(dir.join("cgroup.type"), "threaded")
            .with_context(|| format!("making {} threaded", dir.display()))?;
    }
    // SAFETY: gettid(2) has no preconditions.
    let tid = unsafe { libc::gettid() };
    std::fs::write(dir.join("cgroup.threads"), tid.to_string())
        .with_context(|| format!("moving thread {tid} into {}", dir.display()))
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.dir.join(LIVE_STORE_CGROUP));
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        // Fails while a child is still inside; children are stopped by then.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf(3) has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Busy jiffies from the aggregate `cpu` line: everything but idle and iowait.
fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is already included in user/nice, so it is left out of the sum.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        own_usec: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_excludes_idle_iowait_and_guest() {
        let stat = "cpu  100 5 50 1000 20 3 7 0 40 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse(stat).map(|c| c.busy), Some(100 + 5 + 50 + 3 + 7));
        assert!(parse("intr 1 2 3\n").is_none());
    }
}
