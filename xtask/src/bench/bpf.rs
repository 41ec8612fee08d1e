//! Redirector's programs in the kernel: the sk_lookup program's own cost
//! (BPF_PROG_TEST_RUN, sk_lookup support since Linux 5.13, runs the loaded
//! `redir_lookup` N times on a synthetic lookup and reports the mean ns per
//! run), and the kernel's run-time statistics of every program (aya's
//! `enable_stats` and `ProgramInfo::run_time`/`run_count`).

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{bail, Context, Result};
use redirector::sys::bpf::prog_test_run;
use serde::Serialize;

pub use redirector_tests::{PROG_SK_LOOKUP, PROG_SOCK_OPS};

use super::topology::{ADVERTISE_PORT, LIVE_STORE_V4, QUERIER_V4};

/// `struct bpf_sk_lookup` (uapi/linux/bpf.h), the context BPF_PROG_TEST_RUN
/// runs an sk_lookup program on.
#[repr(C)]
#[derive(Default)]
struct SkLookupCtx {
    cookie: u64,
    family: u32,
    protocol: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    remote_port: u16,
    _pad: u16,
    local_ip4: u32,
    local_ip6: [u32; 4],
    local_port: u32,
    ingress_ifindex: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgCost {
    pub case: String,
    pub ns_per_run: f64,
    pub retval: u32,
    pub repeat: u32,
    /// Program runs in total (repeat x attempts).
    pub runs: u64,
}

/// Runs the first loaded `redir_lookup` instance on a lookup for the
/// advertised port (the redirect path) and for another port (the pass-through
/// path every other new connection in the namespace takes).
pub fn measure(repeat: u32, runs: usize) -> Result<Vec<ProgCost>> {
    // Several instances may be loaded (other agents on the machine); any
    // sk_lookup instance that accepts a test run will do, they are the same code.
    let candidates: Vec<_> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| p.name_as_str() == Some(PROG_SK_LOOKUP))
        .collect();
    let mut errors = Vec::new();
    let mut chosen = None;
    for info in &candidates {
        let fd = info.fd().context("program fd")?;
        match test_run(fd.as_fd(), ADVERTISE_PORT, 1) {
            Ok(_) => {
                chosen = Some(fd);
                break;
            }
            Err(e) => errors.push(format!(
                "id {} type {:?}: {e:#}",
                info.id(),
                info.program_type()
            )),
        }
    }
    let Some(fd) = chosen else {
        bail!(
            "no loaded {PROG_SK_LOOKUP} accepts a test run ({} found): {}",
            candidates.len(),
            errors.join("; ")
        );
    };
    let mut out = Vec::new();
    for (case, port) in [
        ("redirect (dst port 12345)", ADVERTISE_PORT),
        ("pass (dst port 80)", 80),
    ] {
        let mut best = f64::INFINITY;
        let mut retval = 0;
        // The minimum over a few runs: the program's cost without interrupts.
        let mut repeat = repeat;
        for _ in 0..runs.max(1) {
            let (r, ns) = loop {
                match test_run(fd.as_fd(), port, repeat) {
                    // Seen on 6.18 for large repeat counts: retry with fewer runs.
                    Err(e) if repeat > 10_000 => {
                        eprintln!("bench: BPF_PROG_TEST_RUN x{repeat}: {e:#}; retrying with fewer");
                        repeat /= 10;
                    }
                    other => break other?,
                }
            };
            retval = r;
            best = best.min(ns);
        }
        out.push(ProgCost {
            case: case.into(),
            ns_per_run: best,
            retval,
            repeat,
            runs: u64::from(repeat) * runs.max(1) as u64,
        });
    }
    Ok(out)
}

fn test_run(prog: BorrowedFd<'_>, port: u16, repeat: u32) -> Result<(u32, f64)> {
    let ctx = SkLookupCtx {
        family: libc::AF_INET as u32,
        protocol: libc::IPPROTO_TCP as u32,
        remote_ip4: u32::from_ne_bytes(QUERIER_V4.octets()),
        remote_port: 40000u16.to_be(),
        local_ip4: u32::from_ne_bytes(LIVE_STORE_V4.octets()),
        local_port: port as u32,
        ..Default::default()
    };
    let run = prog_test_run(prog, &ctx, repeat)
        .with_context(|| format!("BPF_PROG_TEST_RUN on {PROG_SK_LOOKUP}"))?;
    Ok((run.retval, run.duration_ns as f64))
}

/// Run-time statistics of redirector's programs: one definition, shared with
/// the integration tests.
pub use redirector_tests::{run_stats, ProgStats, RunStats};

/// Ids of redirector's programs loaded now (any agent's): taken before an
/// agent starts, for [`new_programs`].
pub use redirector_tests::redirector_program_ids as program_ids;

/// Ids of redirector's programs loaded since `before` was taken: a new
/// agent's own.
pub fn new_programs(before: &std::collections::HashSet<u32>) -> Vec<u32> {
    program_ids().difference(before).copied().collect()
}

/// (run time ns, runs) of the programs in `ids` named `name` between two
/// [`run_stats`] snapshots (a program missing from `before` counts from 0).
pub fn delta(before: &[ProgStats], after: &[ProgStats], ids: &[u32], name: &str) -> (u64, u64) {
    after
        .iter()
        .filter(|p| p.name == name && ids.contains(&p.id))
        .map(|p| {
            let b = before.iter().find(|q| q.id == p.id);
            (
                p.run_time_ns - b.map_or(0, |q| q.run_time_ns).min(p.run_time_ns),
                p.run_count - b.map_or(0, |q| q.run_count).min(p.run_count),
            )
        })
        .fold((0, 0), |acc, (t, c)| (acc.0 + t, acc.1 + c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_layouts() {
        // sizeof(struct bpf_sk_lookup) is 72 on every arch the kernel builds for.
        assert_eq!(std::mem::size_of::<SkLookupCtx>(), 72);
        assert_eq!(std::mem::offset_of!(SkLookupCtx, local_port), 60);
    }
}
