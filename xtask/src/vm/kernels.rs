//! The kernels of the matrix: exact Debian packages, unpacked under
//! `target/kernels/` (see `debs`); nothing is installed on the host.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::debs::{self, Deb};

/// What the guest is expected to show on a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The integration tests pass.
    Supported,
    /// Below the minimum: `check` and `run` refuse cleanly (exit 3, one line,
    /// nothing left attached).
    Refused,
}

pub struct Kernel {
    /// What `--kernel` takes: the upstream series.
    pub series: &'static str,
    pub deb: Deb,
    pub expect: Expect,
}

/// The newest cloud kernels of each series that Debian's archive had when they
/// were pinned (`apt-cache madison`): the security suites carry the newest.
/// Debian 12 runs 6.1 (and offers 6.12); bullseye's 5.10 is below our minimum.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        series: "6.1",
        deb: Deb {
            package: "linux-image-6.1.0-57-cloud-amd64",
            version: "6.1.192-3",
            suite: "bookworm-security",
            arch: "amd64",
        },
        expect: Expect::Supported,
    },
    Kernel {
        series: "6.12",
        deb: Deb {
            package: "linux-image-6.12.117+deb12-cloud-amd64",
            version: "6.12.117-1~deb12u1",
            suite: "bookworm-security",
            arch: "amd64",
        },
        expect: Expect::Supported,
    },
    Kernel {
        series: "5.10",
        deb: Deb {
            package: "linux-image-5.10.0-46-cloud-amd64",
            version: "5.10.262-1",
            suite: "bullseye-security",
            arch: "amd64",
        },
        expect: Expect::Refused,
    },
];

impl Kernel {
    /// `uname -r` inside the guest, and the directory name under /lib/modules.
    pub fn release(&self) -> &'static str {
        self.deb
            .package
            .strip_prefix("linux-image-")
            .unwrap_or(self.deb.package)
    }
}

/// `all`, or a series (`6.1`), a release (`6.1.0-57-cloud-amd64`) or a package name.
pub fn select(names: &[&str]) -> Result<Vec<&'static Kernel>> {
    let mut selected: Vec<&'static Kernel> = Vec::new();
    for name in names.iter().flat_map(|n| n.split(',')).map(str::trim) {
        let found: Vec<&'static Kernel> = if name == "all" {
            KERNELS.iter().collect()
        } else {
            let k = KERNELS
                .iter()
                .find(|k| k.series == name || k.release() == name || k.deb.package == name)
                .with_context(|| {
                    let known: Vec<&str> = KERNELS.iter().map(|k| k.series).collect();
                    format!(
                        "unknown kernel {name:?}: one of {}, or all",
                        known.join(", ")
                    )
                })?;
            vec![k]
        };
        for k in found {
            if !selected.iter().any(|s| std::ptr::eq(*s, k)) {
                selected.push(k);
            }
        }
    }
    if selected.is_empty() {
        bail!("no kernel selected");
    }
    Ok(selected)
}

/// An unpacked kernel package: the image to boot and its module tree.
pub struct Unpacked {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Downloads (once) and unpacks (once) the pinned package under `cache`.
pub fn fetch(kernel: &Kernel, cache: &Path) -> Result<Unpacked> {
    let name = format!("{}_{}", kernel.deb.package, kernel.deb.version);
    let dir = debs::unpacked(&[kernel.deb], cache, &name)?;
    let release = kernel.release();
    let unpacked = Unpacked {
        vmlinuz: dir.join(format!("boot/vmlinuz-{release}")),
        modules: dir.join(format!("lib/modules/{release}")),
    };
    if !unpacked.vmlinuz.is_file() || !unpacked.modules.is_dir() {
        bail!(
            "{} has no boot/vmlinuz-{release} or lib/modules/{release}: remove it and retry",
            dir.display()
        );
    }
    Ok(unpacked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_by_series_release_list_and_all() {
        let s = select(&["6.1"]).expect("6.1");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].series, "6.1");
        let s = select(&["6.12,5.10.0-46-cloud-amd64"]).expect("list");
        assert_eq!(
            s.iter().map(|k| k.series).collect::<Vec<_>>(),
            ["6.12", "5.10"]
        );
        assert_eq!(select(&["all", "6.1"]).expect("all").len(), KERNELS.len());
        assert!(select(&["4.19"]).is_err());
    }

    #[test]
    fn release_is_the_package_name_without_prefix() {
        assert_eq!(KERNELS[1].release(), "6.12.117+deb12-cloud-amd64");
        assert_eq!(
            KERNELS[0].deb.file_name(),
            "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"
        );
    }
}
