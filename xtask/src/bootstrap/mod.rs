//! The bootstrap check (`cargo xtask bootstrap-check`, and the first step of
//! `cargo xtask test`): a clean copy of the tree must build and run `cargo xtask`
//! with the eBPF toolchain hidden. CI machines have that toolchain installed, so
//! without this check a green run says nothing about a new machine.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

const SCRIPT: &str = include_str!("check.sh");

/// Runs the check on the work tree, or on commit `rev` of the repository.
pub fn check(root: &Path, rev: Option<&str>) -> Result<()> {
    eprintln!(
        "xtask: bootstrap check: `cargo xtask --help` from a clean copy, eBPF toolchain hidden"
    );
    // A private mount namespace: the hiding mounts vanish with the script.
    let status = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            SCRIPT,
            "check.sh",
        ])
        .arg(root)
        .args(rev)
        .status()
        .context("running unshare(1) (util-linux) for the bootstrap check")?;
    if !status.success() {
        bail!("the bootstrap check failed ({status}): a new machine could not run `cargo xtask`");
    }
    Ok(())
}
