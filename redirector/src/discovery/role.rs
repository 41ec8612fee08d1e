//! Which Tempo component a process is: every Tempo component listens for gRPC
//! on 9095, so a listener on the listen port alone does not make a live-store.
//!
//! Tempo takes its target from `-target=NAME` on the command line (what the
//! tempo-distributed chart runs: `-target=live-store`), else from `target:`
//! in the file of `-config.file`, else runs `all`. The file is read through
//! /proc/PID/root, so a path inside the container's filesystem works.

use std::fmt;

use super::podfs::{self, sanitize, PodFileError};

/// The most of a pod-controlled string (target, path) shown in logs and status.
const MAX_SHOWN: usize = 128;

/// Tempo's own default when neither flag nor file names a target.
const TEMPO_DEFAULT_TARGET: &str = "all";

/// The target `--serve-target` matches by default.
pub const LIVE_STORE: &str = "live-store";
/// `--serve-target any`: every process with a listener on a listen port.
pub const ANY: &str = "any";

/// What a process runs as, and where that was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub target: String,
    pub source: Source,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    ConfigFile(String),
    /// Tempo was started without naming a target.
    TempoDefault,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Both strings come from the process: escaped and capped for logs and
        // terminals.
        let target = sanitize(&self.target, MAX_SHOWN);
        match &self.source {
            Source::CommandLine => write!(f, "-target={target} on its command line"),
            Source::ConfigFile(p) => {
                write!(f, "target: {target} in {}", sanitize(p, MAX_SHOWN))
            }
            Source::TempoDefault => write!(f, "Tempo's default target {target}"),
        }
    }
}

/// The Tempo role of process `pid`, `None` if it is not a Tempo process we
/// can read (exited, or no target flag, config file or `tempo` binary). Reads
/// what the process controls (see `podfs`): run it off the agent's loop.
/// `refused` learns why a config file named on the command line was not read.
pub fn of_pid(pid: i32, refused: &dyn Fn(&str, PodFileError)) -> Option<Role> {
    let args = podfs::cmdline(pid).ok()?;
    of_args(&args, |path| match podfs::read(pid, path) {
        Ok(text) => Some(text),
        Err(e) => {
            refused(path, e);
            None
        }
    })
}

/// [`of_pid`] on a command line; `read` returns a config file's text.
pub fn of_args(args: &[String], read: impl Fn(&str) -> Option<String>) -> Option<Role> {
    if let Some(target) = flag(args, "target") {
        return Some(Role {
            target,
            source: Source::CommandLine,
        });
    }
    if let Some(path) = flag(args, "config.file") {
        if let Some(target) = read(&path).and_then(|text| target_in(&text)) {
            return Some(Role {
                target,
                source: Source::ConfigFile(path),
            });
        }
    }
    // A Tempo binary with neither runs every component, live-store included.
    let binary = args.first()?;
    let name = binary.rsplit('/').next().unwrap_or(binary);
    (name == "tempo").then(|| Role {
        target: TEMPO_DEFAULT_TARGET.to_owned(),
        source: Source::TempoDefault,
    })
}

/// Go's flag package: `-name=v`, `--name=v`, `-name v`, `--name v`; the last
/// one wins.
fn flag(args: &[String], name: &str) -> Option<String> {
    let mut found = None;
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let Some(rest) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            continue;
        };
        if let Some(value) = rest.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            found = Some(value.to_owned());
        } else if rest == name {
            found = iter.next().cloned();
        }
    }
    found
}

/// The top-level `target:` of a Tempo config file, by a line scan: only this
/// one key is needed, and a YAML parser would hold every event of a hostile
/// file in memory (a 256 KiB flow sequence is millions of them). A top-level
/// key starts at column 0; nested keys and block scalars are indented.
fn target_in(text: &str) -> Option<String> {
    for line in text.lines() {
        let Some(rest) = ["target:", "\"target\":", "'target':"]
            .iter()
            .find_map(|key| line.strip_prefix(key))
        else {
            continue;
        };
        // `target:x` is not the key `target`.
        if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
            continue;
        }
        let value = match rest.find(" #") {
            Some(comment) => &rest[..comment],
            None => rest,
        }
        .trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
            .unwrap_or(value);
        // YAML forbids a key twice (Tempo refuses such a file): the first wins.
        return (!unquoted.is_empty()).then(|| unquoted.to_owned());
    }
    None
}

/// Whether `role` is one `--serve-target` asks for (`any` matches every
/// process, Tempo or not, and is checked by the caller). Tempo's `all` runs a
/// live-store too, and a list may name any target.
pub fn matches(targets: &[String], role: Option<&Role>) -> bool {
    if targets.iter().any(|t| t == ANY) {
        return true;
    }
    let Some(role) = role else { return false };
    // Tempo accepts a comma-separated list of targets in one flag.
    role.target
        .split(',')
        .any(|t| targets.iter().any(|want| want == t.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn no_file(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn target_from_every_flag_spelling() {
        for cmd in [
            "/tempo -target=live-store -config.file=/conf/tempo.yaml",
            "/tempo --target=live-store",
            "/tempo -target live-store",
            "/tempo --target live-store",
            "/tempo -target=querier -target=live-store",
        ] {
            let role = of_args(&args(cmd), no_file).expect(cmd);
            assert_eq!(role.target, "live-store", "{cmd}");
            assert_eq!(role.source, Source::CommandLine);
        }
    }

    #[test]
    fn target_from_the_config_file_then_tempos_default() {
        let read = |p: &str| {
            (p == "/conf/tempo.yaml")
                .then(|| "server:\n  grpc_listen_port: 9095\ntarget: live-store\n".to_owned())
        };
        let role = of_args(&args("/tempo -config.file=/conf/tempo.yaml"), read).expect("role");
        assert_eq!(role.target, "live-store");
        assert_eq!(role.source, Source::ConfigFile("/conf/tempo.yaml".into()));
        assert!(role
            .to_string()
            .contains("target: live-store in /conf/tempo.yaml"));
        // The command line wins over the file, as in Tempo.
        let role = of_args(
            &args("/tempo -config.file=/conf/tempo.yaml -target=querier"),
            read,
        )
        .expect("role");
        assert_eq!(role.target, "querier");
        let role = of_args(&args("/usr/bin/tempo"), no_file).expect("role");
        assert_eq!(
            (role.target.as_str(), role.source),
            ("all", Source::TempoDefault)
        );
        assert_eq!(of_args(&args("/usr/sbin/nginx -g daemon"), no_file), None);
    }

    #[test]
    fn target_from_a_top_level_key_only() {
        let t = |text: &str| target_in(text);
        assert_eq!(t("target: live-store\n").as_deref(), Some("live-store"));
        assert_eq!(
            t("a: 1\ntarget: 'live-store' # pod\n").as_deref(),
            Some("live-store")
        );
        assert_eq!(t("\"target\": \"querier\"").as_deref(), Some("querier"));
        assert_eq!(t("server:\n  target: live-store\n"), None);
        assert_eq!(t("targets: live-store\n"), None);
        assert_eq!(t("target:\n"), None);
        assert_eq!(t("target: a\ntarget: b\n").as_deref(), Some("a"));
    }

    /// A flow sequence of a million elements at the file cap: a YAML parser
    /// would need hundreds of MiB for its events; the scan needs nothing.
    #[test]
    fn target_scan_of_an_event_bomb() {
        let mut text = String::from("x: [");
        while text.len() < podfs::FILE_CAP as usize - 64 {
            text.push_str("1,");
        }
        text.push_str("1]\ntarget: live-store\n");
        assert_eq!(target_in(&text).as_deref(), Some("live-store"));
    }

    #[test]
    fn serve_target_matching() {
        let live = |t: &str| Role {
            target: t.into(),
            source: Source::CommandLine,
        };
        let default = vec![LIVE_STORE.to_owned()];
        assert!(matches(&default, Some(&live("live-store"))));
        assert!(!matches(&default, Some(&live("querier"))));
        assert!(!matches(&default, Some(&live("all"))));
        assert!(matches(&default, Some(&live("distributor,live-store"))));
        assert!(!matches(&default, None));
        let wide = vec!["live-store".to_owned(), "all".to_owned()];
        assert!(matches(&wide, Some(&live("all"))));
        assert!(matches(&[ANY.to_owned()], None));
    }
}
