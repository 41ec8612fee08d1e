//! What the guest runs, built on the host: the agent and the integration test
//! binaries (plus the helper binaries they start), found through cargo's
//! machine-readable build output rather than guessed paths.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Integration test binaries the guest does not run: `deploy` checks the
/// manifests in deploy/, which does not depend on the kernel; `observability`
/// runs promtool and a Prometheus server, which the guest does not carry (the
/// metrics it checks are the same on every kernel); `kube` and `kube_watch`
/// run etcd and kube-apiserver (~150 MB the guest does not carry): what they
/// rely on in the kernel (socket storage, sock_ops, sk_lookup, inotify on
/// cgroupfs) is what the other suites and `kube_sandbox` run in the guest.
const NOT_IN_VM: [&str; 4] = ["deploy", "observability", "kube", "kube_watch"];

/// Runs first: if the programs do not load, this says so soonest.
const FIRST: &str = "datapath";

pub struct Payload {
    pub agent: PathBuf,
    /// (name, path): [`FIRST`], then the others by name.
    pub tests: Vec<(String, PathBuf)>,
    /// Binaries of the test package that the tests start themselves.
    pub helpers: Vec<PathBuf>,
    /// Other programs the tests find through an environment variable (name,
    /// path), such as a live-store built outside cargo.
    pub env: Vec<(String, PathBuf)>,
}

impl Payload {
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.agent.as_path())
            .chain(self.tests.iter().map(|(_, p)| p.as_path()))
            .chain(self.helpers.iter().map(PathBuf::as_path))
            .chain(self.env.iter().map(|(_, p)| p.as_path()))
    }
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    target: Option<Target>,
    profile: Option<Profile>,
    executable: Option<PathBuf>,
    manifest_path: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// An executable cargo built.
struct Artifact {
    name: String,
    kind: Vec<String>,
    /// A libtest harness (`cargo test`), not the target's own binary.
    harness: bool,
    path: PathBuf,
    manifest: PathBuf,
}

impl Artifact {
    fn is(&self, kind: &str) -> bool {
        self.kind.iter().any(|k| k == kind)
    }
}

/// Builds the agent and the test binaries; `env` is passed through as
/// [`Payload::env`].
pub fn build(root: &Path, env: &[(&str, PathBuf)]) -> Result<Payload> {
    // The release artifact, as `cargo xtask build` builds it.
    let agent = artifacts_of(crate::artifact_build(root))?
        .into_iter()
        .find(|a| a.name == "redirector" && a.is("bin") && !a.harness)
        .map(|a| a.path)
        .context("cargo built no redirector binary")?;
    let tests_manifest = root.join("tests/Cargo.toml");
    let built: Vec<Artifact> = artifacts(
        root,
        &["test", "--release", "-p", "redirector-tests", "--no-run"],
    )?
    .into_iter()
    .filter(|a| a.manifest == tests_manifest)
    .collect();
    let mut tests: Vec<(String, PathBuf)> = built
        .iter()
        .filter(|a| a.is("test") && a.harness && !NOT_IN_VM.contains(&a.name.as_str()))
        .map(|a| (a.name.clone(), a.path.clone()))
        .collect();
    tests.sort_by_key(|(name, _)| (name != FIRST, name.clone()));
    if tests.is_empty() {
        bail!("cargo built no integration test binary in tests/");
    }
    let helpers = built
        .into_iter()
        .filter(|a| a.is("bin") && !a.harness)
        .map(|a| a.path)
        .collect();
    Ok(Payload {
        agent,
        tests,
        helpers,
        env: env
            .iter()
            .map(|(name, path)| ((*name).to_owned(), path.clone()))
            .collect(),
    })
}

/// Runs `cargo ARGS --message-format=json-render-diagnostics` (diagnostics
/// still reach the terminal) and returns the executables it reports.
fn artifacts(root: &Path, args: &[&str]) -> Result<Vec<Artifact>> {
    let mut c = crate::cargo(root);
    c.args(args);
    artifacts_of(c)
}

/// [`artifacts`] of a cargo command already given its arguments.
fn artifacts_of(mut c: std::process::Command) -> Result<Vec<Artifact>> {
    c.arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = c.output().with_context(|| format!("starting {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", out.status);
    }
    parse_artifacts(&String::from_utf8_lossy(&out.stdout))
}

fn parse_artifacts(json_lines: &str) -> Result<Vec<Artifact>> {
    let mut found = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let m: Message = serde_json::from_str(line).context("cargo's JSON output")?;
        if m.reason != "compiler-artifact" {
            continue;
        }
        if let (Some(t), Some(p), Some(path), Some(manifest)) =
            (m.target, m.profile, m.executable, m.manifest_path)
        {
            found.push(Artifact {
                name: t.name,
                kind: t.kind,
                harness: p.test,
                path,
                manifest,
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_read_from_cargo_json() {
        let out = r#"{"reason":"compiler-artifact","target":{"name":"flows","kind":["test"]},"profile":{"test":true},"executable":"/t/release/deps/flows-1","manifest_path":"/r/tests/Cargo.toml"}
{"reason":"compiler-artifact","target":{"name":"live-store-standin","kind":["bin"]},"profile":{"test":false},"executable":"/t/release/live-store-standin","manifest_path":"/r/tests/Cargo.toml"}
{"reason":"compiler-artifact","target":{"name":"redirector_tests","kind":["lib"]},"profile":{"test":false},"executable":null,"manifest_path":"/r/tests/Cargo.toml"}
{"reason":"build-finished","success":true}"#;
        let found = parse_artifacts(out).expect("parse");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].name, "flows");
        assert!(found[0].harness && found[0].is("test"));
        assert!(!found[1].harness && found[1].is("bin"));
        assert_eq!(
            found[1].path,
            PathBuf::from("/t/release/live-store-standin")
        );
        assert_eq!(found[1].manifest, PathBuf::from("/r/tests/Cargo.toml"));
    }
}
