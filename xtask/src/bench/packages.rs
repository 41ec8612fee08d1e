//! Installs the Debian packages the proxy paths need, idempotently, without
//! leaving system daemons running: the harness runs nginx and HAProxy itself,
//! with its own configuration, inside the live-store namespace.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command};

use anyhow::{Context, Result};

const PACKAGES: [&str; 4] = ["nginx", "libnginx-mod-stream", "haproxy", "nftables"];
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Pids of processes whose command name is `comm`.
fn running(comm: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == comm)
                .unwrap_or(false)
        })
        .collect()
}

/// Returns notes on what was done or is still missing; a failed install is not
/// an error (those paths are reported as unavailable).
pub fn ensure() -> Vec<String> {
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Vec::new();
    }
    let mut notes = vec![format!("installing {}", missing.join(" "))];
    let services = ["nginx", "haproxy"];
    let before: Vec<bool> = services.iter().map(|s| !running(s).is_empty()).collect();
    // Debian's policy-rc.d hook: exit 101 forbids maintainer scripts to start
    // daemons. Only ever created (and removed) by us if none exists.
    let policy = !Path::new(POLICY_RC_D).exists()
        && fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask bench: no daemons during install\nexit 101\n",
        )
        .is_ok()
        && fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755)).is_ok();
    let result = apt(&missing);
    if policy {
        let _ = fs::remove_file(POLICY_RC_D);
    }
    if let Err(e) = result {
        notes.push(format!("apt-get failed: {e:#}"));
    }
    for (svc, was_running) in services.iter().zip(before) {
        if !was_running && !running(svc).is_empty() {
            let _ = Command::new("service").args([svc, "stop"]).output();
            notes.push(format!("stopped the {svc} service the package started"));
        }
    }
    notes
}

fn apt(pkgs: &[&str]) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        anyhow::ensure!(
            status.success(),
            "apt-get {} failed: {status}",
            args.join(" ")
        );
        Ok(())
    };
    run(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    run(&args)
}
