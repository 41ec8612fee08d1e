//! Which toolchain can build the eBPF crate. Shared by xtask (what to install)
//! and redirector's build.rs (what to run), which includes this file by path.

use std::{
    path::Path,
    process::{Command, Stdio},
};

/// Debian's rustc-web compiler and the prebuilt `core` of libstd-rust-web-dev-bpf.
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

/// A rustup nightly with the rust-src component (`-Z build-std=core` works).
pub fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    out.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

pub fn debian_available() -> bool {
    Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_BPF_CORE).is_dir()
}
