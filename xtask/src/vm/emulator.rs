//! The QEMU that boots the matrix's guests: pinned, from bookworm-backports,
//! unpacked under `target/kernels/` like the kernels.
//!
//! Not the host's: Debian 12's QEMU 7.2 has a TCG bug (fixed in 8.1 by
//! "accel/tcg: Always lock pages before translation") that runs a stale
//! translation of kernel text the guest is patching. A 2-vCPU guest then hits
//! the int3 of a half-patched jump label (a static key flipped by attaching
//! or detaching a BPF program on one vCPU while the other connects) and
//! panics: seen once in CI as `RIP: tcp_connect+0x5c`, the same oops the MPTCP
//! selftests met in netif_rx_internal.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::debs::{self, Deb};

const VERSION: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";

const DEBS: [Deb; 2] = [
    Deb {
        package: "qemu-system-x86",
        version: VERSION,
        suite: "bookworm-backports",
        arch: "amd64",
    },
    // The option ROMs of this version (linuxboot_dma.bin boots `-kernel`).
    Deb {
        package: "qemu-system-data",
        version: VERSION,
        suite: "bookworm-backports",
        arch: "all",
    },
];

pub struct Emulator {
    pub binary: PathBuf,
    /// Firmware directories, searched in order (`-L`): this version's data,
    /// then the host's SeaBIOS (qemu-system-x86's dependency), which this
    /// version's data links to.
    pub data_dirs: Vec<PathBuf>,
}

/// Downloads (once) and unpacks (once) the pinned QEMU under `cache`. Its
/// shared libraries are the host's: the host's qemu-system-x86 (setup's
/// VM tools) pulled them in, and the backport links against the same ones.
pub fn fetch(cache: &Path) -> Result<Emulator> {
    let dir = debs::unpacked(&DEBS, cache, &format!("qemu_{VERSION}"))?;
    let binary = dir.join("usr/bin/qemu-system-x86_64");
    if !binary.is_file() {
        bail!(
            "{} has no usr/bin/qemu-system-x86_64: remove it and retry",
            dir.display()
        );
    }
    Ok(Emulator {
        binary,
        data_dirs: vec![dir.join("usr/share/qemu"), "/usr/share/seabios".into()],
    })
}
