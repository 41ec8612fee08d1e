//! The sk_lookup program's own cost: BPF_PROG_TEST_RUN (sk_lookup support since
//! Linux 5.13) runs the loaded `redir_lookup` program N times in the kernel on
//! a synthetic lookup and reports the mean ns per run.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::topology::{ADVERTISE_PORT, LIVE_STORE_V4, QUERIER_V4};

pub const PROG_SK_LOOKUP: &str = "redir_lookup";

/// `struct bpf_sk_lookup` (uapi/linux/bpf.h), as BPF_PROG_TEST_RUN takes it.
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

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

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
        match test_run(fd.as_fd().as_raw_fd(), ADVERTISE_PORT, 1) {
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
                match test_run(fd.as_fd().as_raw_fd(), port, repeat) {
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

fn test_run(fd: i32, port: u16, repeat: u32) -> Result<(u32, f64)> {
    let ctx = SkLookupCtx {
        family: libc::AF_INET as u32,
        protocol: libc::IPPROTO_TCP as u32,
        remote_ip4: u32::from_ne_bytes(QUERIER_V4.octets()),
        remote_port: 40000u16.to_be(),
        local_ip4: u32::from_ne_bytes(LIVE_STORE_V4.octets()),
        local_port: port as u32,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        repeat,
        ctx_size_in: std::mem::size_of::<SkLookupCtx>() as u32,
        ctx_in: &ctx as *const SkLookupCtx as u64,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a correctly laid out, fully initialised attr whose
    // ctx_in pointer stays valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "BPF_PROG_TEST_RUN on {PROG_SK_LOOKUP}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok((attr.retval, attr.duration as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_layouts() {
        // sizeof(struct bpf_sk_lookup) is 72 on every arch the kernel builds for.
        assert_eq!(std::mem::size_of::<SkLookupCtx>(), 72);
        assert_eq!(std::mem::offset_of!(SkLookupCtx, local_port), 60);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
/// Offsets in `struct bpf_prog_info` (uapi; fields are only ever appended).
const INFO_ID: usize = 4;
const INFO_RUN_TIME_NS: usize = 192;
const INFO_RUN_CNT: usize = 200;

/// Kernel run-time statistics for every BPF program, on while this lives
/// (BPF_ENABLE_STATS: an fd instead of the global sysctl, so they switch
/// themselves off even if the bench dies).
pub struct RunStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunStats {
    pub fn enable() -> Result<Self> {
        // `attr.enable_stats.type = BPF_STATS_RUN_TIME (0)`.
        let mut attr = [0u8; 8];
        // SAFETY: bpf(2) with a zeroed attr of the documented size; the
        // returned fd is checked and owned at once.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        if fd < 0 {
            bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by the kernel and nothing else owns it.
        Ok(Self {
            _fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) },
        })
    }
}

/// (id, name, run_time_ns, run_cnt) of redirector's programs.
pub fn run_stats() -> Vec<(u32, String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            if name != PROG_SK_LOOKUP && name != PROG_SOCK_OPS {
                return None;
            }
            let fd = p.fd().ok()?;
            let mut info = [0u8; 256];
            #[repr(C)]
            struct InfoAttr {
                bpf_fd: u32,
                info_len: u32,
                info: u64,
            }
            let mut attr = InfoAttr {
                bpf_fd: fd.as_fd().as_raw_fd() as u32,
                info_len: info.len() as u32,
                info: info.as_mut_ptr() as u64,
            };
            // SAFETY: bpf(2) writes at most info_len bytes into `info`, which
            // outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_OBJ_GET_INFO_BY_FD,
                    &mut attr as *mut InfoAttr,
                    std::mem::size_of::<InfoAttr>() as u32,
                )
            };
            if rc != 0 {
                return None;
            }
            let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap_or([0; 4]));
            let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap_or([0; 8]));
            Some((
                u32_at(INFO_ID),
                name,
                u64_at(INFO_RUN_TIME_NS),
                u64_at(INFO_RUN_CNT),
            ))
        })
        .collect()
}

pub const PROG_SOCK_OPS: &str = "redir_sockops";

/// Per-program cost in real traffic: one workload with run-time stats on.
#[derive(Clone, Debug, Serialize)]
pub struct ProgProfile {
    pub program: String,
    pub workload: String,
    pub runs: u64,
    pub ns_per_run: f64,
    pub runs_per_op: f64,
    pub ns_per_op: f64,
}

/// Differences of `run_stats()` snapshots for the programs in `ids`.
pub fn profile(
    before: &[(u32, String, u64, u64)],
    after: &[(u32, String, u64, u64)],
    ids: &[u32],
    workload: &str,
    ops: u64,
) -> Vec<ProgProfile> {
    let mut out: Vec<ProgProfile> = Vec::new();
    for (id, name, t1, c1) in after.iter().filter(|a| ids.contains(&a.0)) {
        let (t0, c0) = before
            .iter()
            .find(|b| b.0 == *id)
            .map(|b| (b.2, b.3))
            .unwrap_or((0, 0));
        let (dt, dc) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
        match out.iter_mut().find(|p| p.program == *name) {
            Some(p) => {
                p.runs += dc;
                p.ns_per_op += dt as f64;
            }
            None => out.push(ProgProfile {
                program: name.clone(),
                workload: workload.into(),
                runs: dc,
                ns_per_run: 0.0,
                runs_per_op: 0.0,
                // Total ns for now; divided below.
                ns_per_op: dt as f64,
            }),
        }
    }
    for p in &mut out {
        let total = p.ns_per_op;
        p.ns_per_run = if p.runs > 0 {
            total / p.runs as f64
        } else {
            0.0
        };
        p.runs_per_op = p.runs as f64 / ops.max(1) as f64;
        p.ns_per_op = total / ops.max(1) as f64;
    }
    out
}
