//! `redirector run`'s one layering rule, end to end through the binary and
//! `--dry-run` (which loads and attaches nothing and needs no privileges):
//! command line > environment > redirector.yaml > default, for every kind of
//! setting, and the agent's own log format (`--log-format`) from any layer.

use std::process::{Command, Output};

use redirector_tests::{agent_bin, log_message, ADVERTISE, LISTEN};

/// `run --dry-run --config FILE ARGS` with `env`, in a clean environment of
/// REDIRECTOR_* variables.
fn dry_run(file: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = std::env::temp_dir().join(format!(
        "rdt-layers-{}-{}",
        std::process::id(),
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "-")
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("redirector.yaml");
    std::fs::write(&path, file).expect("write redirector.yaml");
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--dry-run", "--config"])
        .arg(&path)
        .args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("REDIRECTOR_") && k != "REDIRECTOR_BIN" {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("NODE_NAME").env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run --dry-run");
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn settings(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--dry-run prints JSON")
}

const FILE: &str = "\
discover: true
listener_grace: 5
resync_interval: 7
flow_ring_bytes: 8192
serve_target: [live-store, all]
sock_ops_cgroup: root
pin: true
metrics_addr: 127.0.0.1:9999
log_format: json
";

#[test]
fn the_file_sets_what_flags_and_environment_leave_out() {
    let s = settings(&dry_run(FILE, &[], &[]));
    assert_eq!(s["discover"], true);
    assert_eq!(s["listener_grace_secs"], 5);
    assert_eq!(s["resync_interval_secs"], 7);
    assert_eq!(s["flow_ring_bytes"], 8192);
    assert_eq!(s["serve_targets"], serde_json::json!(["live-store", "all"]));
    assert_eq!(s["sock_ops_cgroup"], "root");
    assert_eq!(s["pin"], true);
    assert_eq!(s["metrics_addr"], "127.0.0.1:9999");
    assert_eq!(s["log_format"], "json");
    // Not in the file: the default.
    assert_eq!(s["flows_socket"], "/run/redirector/flows.sock");
    assert_eq!(
        s["redirects"],
        serde_json::json!([{"advertise_port": ADVERTISE, "listen_port": LISTEN}])
    );
}

#[test]
fn environment_wins_over_the_file_and_flags_over_the_environment() {
    let env = [
        ("REDIRECTOR_RESYNC_INTERVAL", "9"),
        ("REDIRECTOR_FLOW_RING_BYTES", "16384"),
        ("REDIRECTOR_PIN", "0"),
        ("REDIRECTOR_SERVE_TARGET", "any"),
        ("REDIRECTOR_LOG_FORMAT", "text"),
    ];
    let s = settings(&dry_run(FILE, &[], &env));
    assert_eq!(s["resync_interval_secs"], 9);
    assert_eq!(s["flow_ring_bytes"], 16384);
    assert_eq!(s["pin"], false);
    assert_eq!(s["serve_targets"], serde_json::json!(["any"]));
    assert_eq!(s["log_format"], "text");
    assert_eq!(s["listener_grace_secs"], 5, "left to the file");

    let s = settings(&dry_run(
        FILE,
        &[
            "--resync-interval",
            "11",
            "--flow-ring-bytes",
            "4096",
            "--pin",
            "--log-format",
            "json",
        ],
        &env,
    ));
    assert_eq!(s["resync_interval_secs"], 11);
    assert_eq!(s["flow_ring_bytes"], 4096);
    assert_eq!(s["pin"], true);
    assert_eq!(s["log_format"], "json");
    assert_eq!(
        s["serve_targets"],
        serde_json::json!(["any"]),
        "the environment's"
    );
}

/// A setting the file gets wrong is one log line naming the file, line and
/// column, in the log format of the layers that did resolve it (here the
/// environment's JSON).
#[test]
fn a_bad_key_is_one_line_with_its_position_in_the_chosen_log_format() {
    let out = dry_run(
        "resync_interval: 7\nflow_ring_bytes: 1000\n",
        &[],
        &[("REDIRECTOR_LOG_FORMAT", "json")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let line: serde_json::Value = serde_json::from_str(err.trim()).expect("a JSON log line");
    assert_eq!(line["level"], "ERROR");
    let message = line["message"].as_str().expect("message");
    assert!(
        message.contains("redirector.yaml:2:18: flow_ring_bytes: `1000` is not a valid ring size"),
        "{message}"
    );

    // Text, without colour when stderr is not a terminal.
    let out = dry_run("bogus: 1\n", &[], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('\u{1b}'), "{err:?}");
    let message = log_message(err.trim());
    assert!(
        message.contains("redirector.yaml:1:1: unknown field `bogus`"),
        "{err}"
    );
}

#[test]
fn log_messages_are_read_from_text_log_lines() {
    assert_eq!(
        log_message(
            "2025-01-01T00:00:00.000000Z  INFO redirector::commands::run: ready: redirecting in 1 network namespace(s)"
        ),
        "ready: redirecting in 1 network namespace(s)"
    );
    assert_eq!(
        log_message("adopted sk_lookup in netns /proc/1/ns/net"),
        "adopted sk_lookup in netns /proc/1/ns/net"
    );
}
