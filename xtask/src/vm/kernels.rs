//! The kernels of the matrix: exact Debian packages, fetched with apt into
//! `target/kernels/` and unpacked there with `dpkg -x`. Nothing is installed on
//! the host, and the host's own apt configuration is left alone: apt runs with a
//! private sources list, list directory and cache under `target/kernels/apt/`,
//! pointing at the same Debian mirror the host already uses.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

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
    pub package: &'static str,
    /// Pinned, so that a run is reproducible.
    pub version: &'static str,
    /// The suite that carries that version (`*-security` lives in Debian's
    /// security archive, every other suite in the main one).
    pub suite: &'static str,
    pub expect: Expect,
}

/// The newest cloud kernels of each series that Debian's archive had when they
/// were pinned (`apt-cache madison`): the security suites carry the newest.
/// Debian 12 runs 6.1 (and offers 6.12); bullseye's 5.10 is below our minimum.
pub const KERNELS: [Kernel; 3] = [
    Kernel {
        series: "6.1",
        package: "linux-image-6.1.0-57-cloud-amd64",
        version: "6.1.192-3",
        suite: "bookworm-security",
        expect: Expect::Supported,
    },
    Kernel {
        series: "6.12",
        package: "linux-image-6.12.117+deb12-cloud-amd64",
        version: "6.12.117-1~deb12u1",
        suite: "bookworm-security",
        expect: Expect::Supported,
    },
    Kernel {
        series: "5.10",
        package: "linux-image-5.10.0-46-cloud-amd64",
        version: "5.10.262-1",
        suite: "bullseye-security",
        expect: Expect::Refused,
    },
];

impl Kernel {
    /// `uname -r` inside the guest, and the directory name under /lib/modules.
    pub fn release(&self) -> &'static str {
        self.package
            .strip_prefix("linux-image-")
            .unwrap_or(self.package)
    }

    fn deb_name(&self) -> String {
        // apt-get download escapes an epoch's colon in the file name.
        format!(
            "{}_{}_amd64.deb",
            self.package,
            self.version.replace(':', "%3a")
        )
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
                .find(|k| k.series == name || k.release() == name || k.package == name)
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
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let deb = cache.join(kernel.deb_name());
    if !deb.is_file() {
        download(kernel, cache)?;
    }
    let dir = cache.join(format!("{}_{}", kernel.package, kernel.version));
    if !dir.is_dir() {
        // Unpack beside and rename, so an interrupted unpack is never taken
        // for a complete one.
        let partial = cache.join(format!(".{}_{}.partial", kernel.package, kernel.version));
        if partial.exists() {
            fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        crate::cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    }
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

fn download(kernel: &Kernel, cache: &Path) -> Result<()> {
    let apt = PrivateApt::new(&cache.join("apt"), kernel)?;
    eprintln!(
        "xtask: downloading {}={} ({})",
        kernel.package, kernel.version, kernel.suite
    );
    crate::cmd(apt.command("apt-get").args(["-q", "update"]))?;
    let pinned = format!("{}={}", kernel.package, kernel.version);
    let status = apt
        .command("apt-get")
        .args(["-q", "download", &pinned])
        .current_dir(cache)
        .status()
        .context("running apt-get download")?;
    if !status.success() || !cache.join(kernel.deb_name()).is_file() {
        bail!(
            "could not download {pinned} from {}. Versions there now: {}. Update the pin in xtask/src/vm/kernels.rs",
            kernel.suite,
            apt.versions(kernel).unwrap_or_else(|e| format!("unknown ({e:#})"))
        );
    }
    Ok(())
}

/// apt with its own sources, lists and cache: the host's configuration, its
/// package lists and its upgrade choices stay as they are.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path, kernel: &Kernel) -> Result<Self> {
        let mirror = HostMirror::find(kernel.suite)?;
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let signed_by = mirror
            .signed_by
            .map(|k| format!(" [signed-by={k}]"))
            .unwrap_or_default();
        let line = format!("deb{signed_by} {} {} main\n", mirror.uri, kernel.suite);
        fs::write(dir.join("sources.list"), line).context("writing the private sources.list")?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut c = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("sources.list.d")),
            ("Dir::Etc::Preferences", "/dev/null".into()),
            ("Dir::Etc::PreferencesParts", d("sources.list.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            // Package lists only: no translations or AppStream metadata.
            ("Acquire::Languages", "none".into()),
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".into(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
                "false".into(),
            ),
            // The download lands in target/, which apt's _apt user may not write.
            ("APT::Sandbox::User", "root".into()),
        ] {
            c.arg("-o").arg(format!("{key}={value}"));
        }
        c
    }

    /// The versions of this kernel series the suite offers now (for the error).
    fn versions(&self, kernel: &Kernel) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["search", "--names-only"])
            .arg(format!("^linux-image-{}.*-cloud-amd64$", kernel.series))
            .output()
            .context("running apt-cache search")?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names.join(" "))
    }
}

/// The Debian mirror the host's apt already uses, so the kernels come from the
/// same place as every other package.
#[derive(Debug, PartialEq, Eq)]
struct HostMirror {
    uri: String,
    signed_by: Option<String>,
}

impl HostMirror {
    fn find(suite: &str) -> Result<Self> {
        let mut texts = Vec::new();
        let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
        if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
            let mut parts: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            parts.sort();
            files.extend(parts);
        }
        for f in files {
            let name = f.to_string_lossy().into_owned();
            // Only what apt itself reads (not *.disabled and the like).
            if name.ends_with(".list") || name.ends_with(".sources") {
                if let Ok(text) = fs::read_to_string(&f) {
                    texts.push((name.ends_with(".sources"), text));
                }
            }
        }
        let keyring = Path::new(DEBIAN_KEYRING)
            .is_file()
            .then(|| DEBIAN_KEYRING.to_owned());
        Self::from_sources(suite, &texts, keyring).with_context(|| {
            format!(
                "no Debian archive for {suite} in /etc/apt/sources.list{{,.d}}: add the Debian mirror this machine uses"
            )
        })
    }

    /// The mirror of the archive that carries `suite`, from `texts`: (is
    /// deb822, content) of each sources file, in apt's order.
    fn from_sources(
        suite: &str,
        texts: &[(bool, String)],
        default_keyring: Option<String>,
    ) -> Option<Self> {
        let security = suite.ends_with("-security");
        let entries: Vec<(String, Option<String>)> = texts
            .iter()
            .flat_map(|(deb822, text)| {
                if *deb822 {
                    deb822_entries(text)
                } else {
                    one_line_entries(text)
                }
            })
            .map(|(uri, signed_by)| (uri.trim_end_matches('/').to_owned(), signed_by))
            .collect();
        let find = |path: &str| {
            entries
                .iter()
                .find(|(uri, _)| uri.ends_with(path))
                .map(|(uri, signed_by)| Self {
                    uri: uri.clone(),
                    signed_by: signed_by.clone().or_else(|| default_keyring.clone()),
                })
        };
        if !security {
            return find("/debian");
        }
        // Mirrors serve the security archive beside the main one.
        find("/debian-security").or_else(|| {
            find("/debian").map(|main| Self {
                uri: format!("{}-security", main.uri),
                ..main
            })
        })
    }
}

const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// (URI, Signed-By) of every `Types: deb` stanza of a deb822 `.sources` file.
fn deb822_entries(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if !enabled || !is_deb {
            continue;
        }
        let signed_by = field("Signed-By").filter(|s| s.starts_with('/'));
        for uri in field("URIs").unwrap_or_default().split_whitespace() {
            out.push((uri.to_owned(), signed_by.clone()));
        }
    }
    out
}

/// (URI, signed-by) of every `deb [options] URI suite...` line.
fn one_line_entries(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']').unwrap_or(("", r)),
            None => ("", rest),
        };
        let signed_by = options
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_owned);
        if let Some(uri) = rest.split_whitespace().next() {
            out.push((uri.to_owned(), signed_by));
        }
    }
    out
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
            KERNELS[0].deb_name(),
            "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"
        );
    }

    #[test]
    fn host_mirror_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n\
                      Signed-By: /k.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security/\n\
                      Suites: bookworm-security\nComponents: main\n";
        let texts = vec![(true, deb822.to_owned())];
        assert_eq!(
            HostMirror::from_sources("bookworm-backports", &texts, None),
            Some(HostMirror {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/k.gpg".into())
            })
        );
        assert_eq!(
            HostMirror::from_sources("bullseye-security", &texts, Some("/d.gpg".into())),
            Some(HostMirror {
                uri: "http://mirror.example/debian-security".into(),
                signed_by: Some("/d.gpg".into())
            })
        );
        let list = "# comment\ndeb-src http://m/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/s.gpg] http://m/debian-security bookworm-security main\n";
        let texts = vec![(false, list.to_owned())];
        assert_eq!(
            HostMirror::from_sources("bookworm-backports", &texts, None),
            None
        );
        assert_eq!(
            HostMirror::from_sources("bullseye-security", &texts, None),
            Some(HostMirror {
                uri: "http://m/debian-security".into(),
                signed_by: Some("/s.gpg".into())
            })
        );
        // Only the main archive configured: the security one sits beside it.
        let texts = vec![(false, "deb http://m/debian/ bookworm main\n".to_owned())];
        assert_eq!(
            HostMirror::from_sources("bookworm-security", &texts, None),
            Some(HostMirror {
                uri: "http://m/debian-security".into(),
                signed_by: None
            })
        );
    }
}
