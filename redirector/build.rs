//! Builds the kernel programs (`redirector-ebpf`) and hands the object to the
//! agent, which embeds it: one binary is all a DaemonSet image needs (static,
//! as `cargo xtask build` links the release artifact).
//!
//! Two toolchains can build `bpfel-unknown-none` code:
//! - a nightly rustup toolchain with `rust-src` (`-Z build-std=core`), the usual
//!   aya setup on a developer laptop;
//! - Debian's `rustc-web` with `libstd-rust-web-dev-bpf`, which ships a prebuilt
//!   `core` for the BPF targets (what `cargo xtask setup` installs).
//!
//! `REDIRECTOR_BPF_TOOLCHAIN=nightly|debian` forces one; otherwise the first that
//! is present wins. Both need `bpf-linker` on PATH.
//!
//! Without the `bpf-object` feature (on by default) nothing is built and the
//! embedded object is empty: xtask and the test fixtures link this library for
//! its constants and system calls, and must compile before `cargo xtask setup`
//! has installed the toolchain.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

#[path = "../xtask/src/toolchain.rs"]
mod toolchain;
use toolchain::{debian_available, nightly_has_rust_src, DEBIAN_BPF_CORE, DEBIAN_RUSTC};

const TARGET: &str = "bpfel-unknown-none";

enum Toolchain {
    Nightly,
    Debian,
}

fn pick_toolchain() -> Result<Toolchain> {
    match env::var("REDIRECTOR_BPF_TOOLCHAIN").as_deref() {
        Ok("nightly") => return Ok(Toolchain::Nightly),
        Ok("debian") => return Ok(Toolchain::Debian),
        Ok(other) => bail!("REDIRECTOR_BPF_TOOLCHAIN={other}: expected `nightly` or `debian`"),
        Err(_) => {}
    }
    if debian_available() {
        Ok(Toolchain::Debian)
    } else if nightly_has_rust_src() {
        Ok(Toolchain::Nightly)
    } else {
        bail!(
            "no toolchain can build the eBPF programs: need Debian's rustc-web + libstd-rust-web-dev-bpf \
             ({DEBIAN_RUSTC} and {DEBIAN_BPF_CORE}) or a nightly toolchain with rust-src, plus bpf-linker. \
             `cargo xtask setup` (as root) installs them; `cargo xtask build` installs and builds."
        )
    }
}

fn main() {
    if let Err(e) = build() {
        // A plain message, not a backtrace: this is what a new user reads first.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?).join("redirector.bpf.o");
    if env::var_os("CARGO_FEATURE_BPF_OBJECT").is_none() {
        std::fs::write(&out, b"").context("writing the empty kernel object")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("workspace root")?.to_owned();
    for watched in [
        "redirector-ebpf/src",
        "redirector-ebpf/Cargo.toml",
        "redirector-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=REDIRECTOR_BPF_TOOLCHAIN");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("xtask/src/toolchain.rs").display()
    );

    // A target dir of its own: the outer cargo holds the lock on the main one,
    // and the eBPF build uses a different compiler.
    let target_dir = root.join("target/bpf");
    let mut cmd = Command::new("cargo");
    // Variables of the outer build that must not leak into the inner one.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    match pick_toolchain()? {
        Toolchain::Debian => {
            cmd.env("RUSTC", DEBIAN_RUSTC)
                .env("RUSTC_BOOTSTRAP", "1")
                .arg("build");
        }
        Toolchain::Nightly => {
            cmd.args(["+nightly", "build", "-Z", "build-std=core"]);
        }
    }
    // BTF in the object: the kernel takes socket storage maps (LISTEN_MARKS)
    // only in the BTF form, and bpf-linker writes BTF only when asked.
    // BPF CPU v3, pinned: v4 instructions (bswap, sign-extending loads, ...)
    // need Linux 6.6, and the 6.1 verifier refuses them; the LLVM default may
    // move (a test checks the object: datapath.rs `object_tests`).
    cmd.env(
        "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
        "-C link-arg=--btf -C target-cpu=v3",
    );
    cmd.current_dir(&root)
        .args([
            "--release",
            "--package",
            "redirector-ebpf",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd.status().context("running cargo for the eBPF crate")?;
    if !status.success() {
        bail!("building redirector-ebpf failed ({status}); `cargo xtask setup` installs the toolchain");
    }
    let object = target_dir.join(TARGET).join("release/redirector-ebpf");
    let linked = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    std::fs::write(&out, strip(&linked)?).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The object as the kernel needs it: BTF (the map definitions in `.maps`
/// refer to it) without `.BTF.ext` and DWARF. `.BTF.ext` gives each function
/// its BTF, and the prebuilt core's memset/memcpy (subprograms the programs
/// call) have none, so the verifier would refuse the programs ("number of
/// funcs in func_info doesn't match number of subprogs"); DWARF is 90% of the
/// object and no loader reads it.
fn strip(linked: &[u8]) -> Result<Vec<u8>> {
    let mut elf = object::build::elf::Builder::read(linked)
        .map_err(|e| anyhow::anyhow!("reading the linked eBPF object: {e}"))?;
    let mut dropped = Vec::new();
    for section in elf.sections.iter_mut() {
        let name: &[u8] = &section.name;
        if name == b".BTF.ext" || name.starts_with(b".debug") {
            section.delete = true;
            dropped.push(section.id());
        }
    }
    // And their relocations.
    for section in elf.sections.iter_mut() {
        if section
            .sh_info_section
            .is_some_and(|s| dropped.contains(&s))
        {
            section.delete = true;
        }
    }
    // bpf-linker names sections from the symbol string table; a rewritten
    // object needs a table of its own for them.
    if !elf
        .sections
        .iter()
        .any(|s| matches!(s.data, object::build::elf::SectionData::SectionString))
    {
        let names = elf.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = object::build::elf::SectionData::SectionString;
    }
    // Symbols in them go with them (write() deletes orphans).
    let mut out = Vec::new();
    elf.write(&mut out)
        .map_err(|e| anyhow::anyhow!("writing the stripped eBPF object: {e}"))?;
    Ok(out)
}
