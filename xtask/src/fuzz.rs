//! `cargo xtask test --fuzz [--fuzz-seconds N]`: libFuzzer (cargo-fuzz) on what
//! the agent reads from outside, each target for a bounded time with a memory
//! limit: redirector.yaml, Tempo's config file, and flow records from the
//! kernel ring (redirector/fuzz/). A panic, a leak past the limit or a timeout
//! fails the run and leaves the input in redirector/fuzz/artifacts/.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::cmd;

const CARGO_FUZZ_VERSION: &str = "0.13.2";
const TARGETS: [&str; 3] = ["redirector_yaml", "tempo_config", "flow_record"];
/// libFuzzer's limit: an input that makes the process grow past it is a failure.
const RSS_LIMIT_MB: u32 = 1024;
/// Bigger than any real config; the agent refuses files over 4 MiB before parsing.
const MAX_LEN: u32 = 65536;

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo fuzz ...` with rustup's nightly (`$CARGO` is the stable toolchain's
/// own binary, which does not understand `+nightly`).
fn cargo_fuzz() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"]);
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo-fuzz")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if !installed {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        cmd(cargo().args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    // The sanitizers need a nightly compiler (rustup's; rust-src is not needed).
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !nightly {
        bail!("fuzzing needs rustup's nightly toolchain (cargo-fuzz builds with -Zsanitizer=address): `rustup toolchain install nightly`");
    }
    Ok(())
}

/// Seeds: the configurations the project ships, so the fuzzer starts from
/// real files.
fn seed(root: &Path, target: &str, corpus: &Path) -> Result<()> {
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds: Vec<(&str, String)> = match target {
        "tempo_config" => vec![
            (
                "tempo-config.yaml",
                fs::read_to_string(root.join("deploy/tempo-config.yaml"))?,
            ),
            (
                "tempo-live-store.yaml",
                fs::read_to_string(root.join("tests/testdata/tempo-live-store.yaml"))?,
            ),
        ],
        "redirector_yaml" => vec![(
            "redirector.yaml",
            format!(
                "redirects:\n  - advertise_port: {}\n    listen_port: {}\ncgroup_pattern: kubepods\nflow_format: json\npin: true\n",
                redirector_tests::ADVERTISE,
                redirector_tests::LISTEN
            ),
        )],
        _ => Vec::new(),
    };
    for (name, text) in seeds {
        fs::write(corpus.join(name), text)?;
    }
    Ok(())
}

pub fn run(root: &Path, seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = root.join("redirector/fuzz");
    cmd(cargo_fuzz()
        .current_dir(root)
        .args(["build", "-O", "--fuzz-dir"])
        .arg(&fuzz_dir))?;
    let mut summary = Vec::new();
    for target in TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        seed(root, target, &corpus)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let out = cargo_fuzz()
            .current_dir(root)
            .args(["run", "-O", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg("-timeout=10")
            .output()
            .with_context(|| format!("running the {target} fuzzer"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        // libFuzzer's last status line: "#N DONE cov: .. rss: NMb" / "Done N runs in S second(s)".
        let done = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("no summary")
            .to_owned();
        let rss = log
            .lines()
            .rev()
            .find_map(|l| l.split("rss: ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "fuzzer {target} failed (input kept in {}):\n{}",
                fuzz_dir.join("artifacts").join(target).display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        summary.push(format!("fuzz {target}: {done}, peak rss {rss}, no failure"));
    }
    for line in &summary {
        println!("{line}");
    }
    Ok(())
}
