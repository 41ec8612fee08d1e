//! Exact Debian packages fetched with apt into a cache under `target/` and
//! unpacked there with `dpkg -x`: the matrix's kernels and its emulator.
//! Nothing is installed on the host, and the host's own apt configuration is
//! left alone: apt runs with a private sources list, list directory and cache,
//! pointing at the same Debian mirror the host already uses.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// One pinned package: pinned so that a run is reproducible.
#[derive(Clone, Copy, Debug)]
pub struct Deb {
    pub package: &'static str,
    pub version: &'static str,
    /// The suite that carries that version (`*-security` lives in Debian's
    /// security archive, every other suite in the main one).
    pub suite: &'static str,
    /// `amd64`, or `all` for architecture-independent data.
    pub arch: &'static str,
}

impl Deb {
    pub fn file_name(&self) -> String {
        // apt-get download escapes an epoch's colon in the file name.
        format!(
            "{}_{}_{}.deb",
            self.package,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

/// Downloads (once) and unpacks (once) `debs` into one directory under
/// `cache`, named `name`, and returns it.
pub fn unpacked(debs: &[Deb], cache: &Path, name: &str) -> Result<PathBuf> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let dir = cache.join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    for deb in debs {
        if !cache.join(deb.file_name()).is_file() {
            download(deb, cache)?;
        }
    }
    // Unpack beside and rename, so an interrupted unpack is never taken for a
    // complete one.
    let partial = cache.join(format!(".{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    for deb in debs {
        crate::cmd(
            Command::new("dpkg")
                .arg("-x")
                .arg(cache.join(deb.file_name()))
                .arg(&partial),
        )?;
    }
    fs::rename(&partial, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    Ok(dir)
}

fn download(deb: &Deb, cache: &Path) -> Result<()> {
    let apt = PrivateApt::new(&cache.join("apt"), deb.suite)?;
    eprintln!(
        "xtask: downloading {}={} ({})",
        deb.package, deb.version, deb.suite
    );
    crate::cmd(apt.command("apt-get").args(["-q", "update"]))?;
    let pinned = format!("{}={}", deb.package, deb.version);
    let status = apt
        .command("apt-get")
        .args(["-q", "download", &pinned])
        .current_dir(cache)
        .status()
        .context("running apt-get download")?;
    if !status.success() || !cache.join(deb.file_name()).is_file() {
        bail!(
            "could not download {pinned} from {}. Offered there now: {}. Update the pin in xtask/src/vm/",
            deb.suite,
            apt.offered(deb.package)
                .unwrap_or_else(|e| format!("unknown ({e:#})"))
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
    fn new(dir: &Path, suite: &str) -> Result<Self> {
        let mirror = HostMirror::find(suite)?;
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let signed_by = mirror
            .signed_by
            .map(|k| format!(" [signed-by={k}]"))
            .unwrap_or_default();
        let line = format!("deb{signed_by} {} {suite} main\n", mirror.uri);
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

    /// The packages matching `pattern` (a regex) that the suite offers now,
    /// with their versions (for the error when a pin is gone).
    fn offered(&self, pattern: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["madison"])
            .arg(pattern)
            .output()
            .context("running apt-cache madison")?;
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                l.split('|')
                    .take(2)
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join("=")
            })
            .collect();
        lines.sort();
        Ok(lines.join(" "))
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
