//! Whole-machine CPU accounting from /proc/stat: every path's cost counts,
//! whichever process or softirq context it lands in (proxies, the kernel's
//! network stack, the agent, conntrack).

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    busy: u64,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse(&stat).context("no aggregate cpu line in /proc/stat")
    }

    /// CPU-seconds spent (all cores together) between `self` and `later`.
    pub fn busy_secs_until(&self, later: &CpuTimes) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / clock_ticks()
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
    Some(CpuTimes { busy: total - idle })
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
