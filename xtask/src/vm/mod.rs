//! `cargo xtask test --kernel VERSION` / `--kernels LIST|all`: the privileged
//! integration tests inside a QEMU guest booted with another kernel, so the
//! programs meet the verifiers, helpers and defaults of the kernels our users
//! run, not only this machine's.
//!
//! Per kernel: the pinned Debian package is fetched and unpacked into
//! `target/kernels/` (`kernels`), an initramfs is assembled with busybox, the
//! host tools, the needed modules and the binaries (`cpio`, `modules`,
//! `guest`, `payload`), and QEMU boots it; the guest's init (`init.sh`) runs
//! the tests and reports on the serial console (`qemu`). Kernels below the
//! minimum run a refusal check instead of the tests. QEMU itself is a pinned
//! backport unpacked beside the kernels (`emulator`: the host's 7.2 crashes
//! guests that patch their own text).
//!
//! Nothing here loads a BPF program on the host: everything privileged runs
//! inside the guest.

mod cpio;
mod debs;
mod emulator;
mod guest;
mod kernels;
mod modules;
mod payload;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use kernels::{Expect, Kernel};
use qemu::Report;

/// A guest that has not powered off by then is stuck. A full run takes about
/// 2 minutes under TCG on these machines.
const GUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Runs the matrix on `kernels` (series such as `6.1`, `6.12`, `5.10`, release
/// names, or `all`; comma-separated lists work too), with an optional libtest
/// name filter. `env`: programs the tests find through an environment variable
/// (name, host path); the guest gets them at the same path, variable set.
/// Prints one summary line per kernel and a closing `kernels: N passed, M
/// failed` line; fails if any kernel fails.
pub fn run_matrix(
    root: &Path,
    kernels: &[&str],
    filter: Option<&str>,
    env: &[(&str, PathBuf)],
) -> Result<()> {
    let selected = kernels::select(kernels)?;
    crate::setup::ensure_vm_tools()?;
    let payload = payload::build(root, env)?;
    let target = target_dir(root)?;
    let cache = target.join("kernels");
    let work = target.join("vm");
    let emulator = emulator::fetch(&cache)?;
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let mut outcomes = Vec::new();
    for kernel in selected {
        let outcome = run_one(kernel, root, &payload, &emulator, &cache, &work, filter)
            .unwrap_or_else(|e| Outcome::broken(kernel, format!("{e:#}")));
        println!("{}", outcome.summary);
        outcomes.push(outcome);
    }

    println!();
    for o in &outcomes {
        println!("{}", o.summary);
    }
    let passed: u32 = outcomes.iter().map(|o| o.passed).sum();
    let failed: u32 = outcomes.iter().map(|o| o.failed).sum();
    println!("kernels: {passed} passed, {failed} failed");
    let bad: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.release)
        .collect();
    if !bad.is_empty() {
        bail!(
            "kernel matrix failed on {} (console logs in {})",
            bad.join(", "),
            work.display()
        );
    }
    Ok(())
}

/// One kernel's result.
struct Outcome {
    release: &'static str,
    ok: bool,
    /// Tests (or refusal checks) that passed and failed.
    passed: u32,
    failed: u32,
    summary: String,
}

impl Outcome {
    fn broken(kernel: &Kernel, why: String) -> Self {
        Self {
            release: kernel.release(),
            ok: false,
            passed: 0,
            failed: 1,
            summary: format!("kernel {}: FAILED: {why}", kernel.release()),
        }
    }
}

fn run_one(
    kernel: &'static Kernel,
    root: &Path,
    payload: &payload::Payload,
    emulator: &emulator::Emulator,
    cache: &Path,
    work: &Path,
    filter: Option<&str>,
) -> Result<Outcome> {
    let unpacked = kernels::fetch(kernel, cache)?;
    let mods = modules::resolve(&unpacked.modules, &modules::WANTED, &modules::OPTIONAL)?;
    let plan = match kernel.expect {
        Expect::Supported => guest::Plan::Tests {
            binaries: &payload.tests,
            filter,
        },
        Expect::Refused => guest::Plan::Refusal,
    };
    let dir = work.join(kernel.release());
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initramfs = dir.join("initramfs.cpio");
    guest::build(&initramfs, root, payload, &mods, &plan)?;
    let log = dir.join("console.log");
    eprintln!(
        "xtask: booting {} ({}={}) under QEMU TCG; console in {}",
        kernel.release(),
        kernel.deb.package,
        kernel.deb.version,
        log.display()
    );
    let label = format!("[{}]", kernel.series);
    let report = qemu::run(&qemu::Boot {
        emulator,
        vmlinuz: &unpacked.vmlinuz,
        initramfs: &initramfs,
        log: &log,
        label: &label,
        timeout: GUEST_TIMEOUT,
    })?;
    Ok(match kernel.expect {
        Expect::Supported => judge_tests(kernel, &payload.tests, &report),
        Expect::Refused => judge_refusal(kernel, &report),
    })
}

/// Why a guest ended without finishing its plan, if it did.
fn stopped_early(report: &Report) -> Option<String> {
    let why = if report.timed_out {
        format!("no end after {} s: killed", GUEST_TIMEOUT.as_secs())
    } else if let Some(e) = &report.error {
        format!("guest init: {e}")
    } else if report.booted.is_none() {
        "the guest never reached its init".to_owned()
    } else if !report.done {
        "the guest stopped before the end (panic?)".to_owned()
    } else {
        return None;
    };
    let tail = report.tail.join("\n    ");
    Some(format!("{why}; last console lines:\n    {tail}"))
}

fn timing(report: &Report) -> String {
    match report.booted {
        Some(b) => format!(
            "boot {:.1} s, total {:.0} s",
            b.as_secs_f64(),
            report.wall.as_secs_f64()
        ),
        None => format!("total {:.0} s", report.wall.as_secs_f64()),
    }
}

fn judge_tests(kernel: &Kernel, suite: &[(String, PathBuf)], report: &Report) -> Outcome {
    let (mut passed, mut failed, mut ok) = (0, 0, true);
    let mut parts = Vec::new();
    for (name, _) in suite {
        let Some(block) = report.block(name) else {
            ok = false;
            parts.push(format!("{name} not run"));
            continue;
        };
        let secs = block
            .secs()
            .map(|s| format!(" in {s:.0} s"))
            .unwrap_or_default();
        match block.counts() {
            // Everything filtered out: nothing to say.
            Some((0, 0, _)) if block.rc == Some(0) => {}
            Some((p, f, _)) => {
                passed += p;
                failed += f;
                let mut part = format!("{name} {p} passed");
                if f > 0 {
                    part.push_str(&format!(", {f} failed ({})", block.failures().join(", ")));
                }
                parts.push(part + &secs);
            }
            None => parts.push(format!("{name}: no test result (crashed?)")),
        }
        if block.rc != Some(0) || block.counts().is_none() {
            ok = false;
        }
    }
    if parts.is_empty() {
        parts.push("no test matched".to_owned());
    }
    let mut summary = format!(
        "kernel {}: {} ({})",
        kernel.release(),
        parts.join(", "),
        timing(report)
    );
    if let Some(why) = stopped_early(report) {
        ok = false;
        summary.push_str(&format!(": {why}"));
    }
    if !ok && failed == 0 {
        failed = 1;
    }
    Outcome {
        release: kernel.release(),
        ok,
        passed,
        failed,
        summary,
    }
}

/// What a refusal must look like: `check` exits 3; each `run` exits 3 with a
/// single line on stderr that names a kernel version; nothing is left loaded
/// or pinned after any of them.
fn judge_refusal(kernel: &Kernel, report: &Report) -> Outcome {
    let mut problems = Vec::new();
    let mut checks = 0;
    let mut expect = |good: bool, problem: String| {
        checks += 1;
        if !good {
            problems.push(problem);
        }
    };
    match report.block("check") {
        Some(b) => expect(b.rc == Some(3), format!("check exited {:?}, not 3", b.rc)),
        None => expect(false, "check did not run".into()),
    }
    for run in REFUSED_RUNS {
        match report.block(run) {
            Some(b) => {
                expect(b.rc == Some(3), format!("{run} exited {:?}, not 3", b.rc));
                expect(
                    b.lines.len() == 1 && names_a_version(&b.lines[0]),
                    format!(
                        "{run}: stderr is not one line naming a kernel version: {:?}",
                        b.lines
                    ),
                );
            }
            None => expect(false, format!("{run} did not run")),
        }
    }
    if report.leftovers.is_empty() {
        expect(false, "no leftover check".into());
    }
    for (progs, pins) in &report.leftovers {
        expect(
            progs == "0" && pins == "0",
            format!("left behind: {progs} program(s), {pins} pin(s)"),
        );
    }
    if let Some(why) = stopped_early(report) {
        expect(false, why);
    }
    let failed = problems.len() as u32;
    let summary = if problems.is_empty() {
        let line = report
            .block(REFUSED_RUNS[0])
            .and_then(|b| b.lines.first())
            .cloned()
            .unwrap_or_default();
        format!(
            "kernel {}: refused as expected: {line} ({})",
            kernel.release(),
            timing(report)
        )
    } else {
        format!(
            "kernel {}: refusal FAILED: {} ({})",
            kernel.release(),
            problems.join("; "),
            timing(report)
        )
    };
    Outcome {
        release: kernel.release(),
        ok: problems.is_empty(),
        passed: checks - failed,
        failed,
        summary,
    }
}

/// The guest's refusal blocks (init.sh): `run --netns NS` and `run --discover`.
const REFUSED_RUNS: [&str; 2] = ["run", "run-discover"];

/// "needs Linux 5.15" and the like: digits, a dot, digits.
fn names_a_version(line: &str) -> bool {
    let b = line.as_bytes();
    (1..b.len().saturating_sub(1))
        .any(|i| b[i] == b'.' && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit())
}

/// The workspace's target directory (CARGO_TARGET_DIR and config respected).
fn target_dir(root: &Path) -> Result<PathBuf> {
    #[derive(Deserialize)]
    struct Metadata {
        target_directory: PathBuf,
    }
    let out = crate::cargo(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let m: Metadata = serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    Ok(m.target_directory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_line_must_name_a_version() {
        assert!(names_a_version(
            "redirector: error: this kernel lacks bpf_get_netns_cookie in sock_ops (Linux 5.15)"
        ));
        assert!(!names_a_version(
            "redirector: error: Protocol not available (os error 92)"
        ));
    }
}
