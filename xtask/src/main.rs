//! `cargo xtask setup|build|run|test`: the project's own build driver. Every
//! command first makes sure the machine has what it needs (idempotently), so a
//! fresh clone on a fresh machine needs nothing else.

mod bench;
mod bootstrap;
mod demo;
mod fuzz;
mod golang;
mod kube;
mod setup;
mod toolchain;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test redirector")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: the eBPF toolchain, bpf-linker, iproute2, bpffs.
    Setup,
    /// Build the release artifact, target/<host triple>/release/redirector: the
    /// kernel programs inside, static (glibc), stripped, with its GNU build id;
    /// its manual pages in target/man.
    Build,
    /// Build and run the agent: 12345 -> 9095 in a network namespace of its own
    /// (`redirector-run`, with a live-store stand-in on 9095 and a client dialing
    /// 12345), until Ctrl-C; this machine's own namespace is left alone.
    /// Arguments after `--` go to `redirector run` (see `redirector run --help`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: the bootstrap check (without a filter), unit tests, the privileged integration tests on this
    /// kernel (as root, one at a time, since they share kernel state such as the
    /// root cgroup), the benchmark smoke run, then the kernel matrix: the
    /// integration tests in QEMU guests booted with Debian's 6.1 and 6.12
    /// kernels, and the refusal on 5.10.
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
        /// Instead of on this machine, run the integration tests in a QEMU VM
        /// booted with this kernel: 6.1, 6.12, or 5.10 (below the minimum:
        /// checks that the agent refuses it).
        #[arg(long, value_name = "VERSION", conflicts_with = "kernels")]
        kernel: Option<String>,
        /// Like --kernel, one VM after the other: a comma-separated list, or `all`.
        #[arg(long, value_name = "LIST|all")]
        kernels: Option<String>,
        /// Skip the kernel matrix (QEMU guests) after the host tests: a quicker
        /// local loop. CI and the plain command run it.
        #[arg(long, conflicts_with_all = ["kernel", "kernels"])]
        no_vm: bool,
        /// Instead of the tests, run the fuzzers (cargo-fuzz, nightly) on the
        /// config readers and the flow record decoder, each for --fuzz-seconds.
        #[arg(long, conflicts_with_all = ["kernel", "kernels", "no_vm"])]
        fuzz: bool,
        /// How long each fuzz target runs.
        #[arg(long, default_value_t = 60, requires = "fuzz")]
        fuzz_seconds: u32,
    },
    /// Check that `cargo xtask` builds and runs on a machine without the eBPF
    /// toolchain: a clean copy of the tree, its own target directory, the
    /// toolchain hidden in a private mount namespace (root). `cargo xtask test`
    /// runs it first.
    BootstrapCheck {
        /// Check this commit instead of the work tree.
        #[arg(long)]
        rev: Option<String>,
    },
    /// Benchmark redirector against direct, nftables and sidecar proxies, in
    /// namespaces on this machine: `--quick` (< 1 min) or full (minutes).
    Bench(bench::BenchArgs),
    /// Build (once) and start a real Kubernetes API server (1.20, from Debian's
    /// source) with etcd on loopback, with RBAC; prints a kubeconfig; until Ctrl-C.
    KubeApi,
    /// A pod of `bench --scale` (started by the bench itself): listens,
    /// says so, answers every connection with its name.
    #[command(name = bench::scale::POD_COMMAND, hide = true)]
    ScalePod {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => {
            // No bpffs needed to build (nor possible in a container build).
            setup::ensure_toolchain()?;
            build(&root)
        }
        Cmd::Run { args } => {
            setup::ensure()?;
            build(&root)?;
            let bin = agent_artifact(root.as_path());
            let status = demo::run(&bin, &args)?;
            if !status.success() {
                bail!("the agent exited with {status}");
            }
            Ok(())
        }
        Cmd::Test {
            filter,
            kernel,
            kernels,
            no_vm,
            fuzz,
            fuzz_seconds,
        } => {
            if fuzz {
                setup::ensure_toolchain()?;
                return fuzz::run(&root, fuzz_seconds);
            }
            if let Some(list) = kernel.or(kernels) {
                // No host bpffs needed: nothing is loaded on this kernel.
                setup::ensure_toolchain()?;
                let go_live_store = golang::build_live_store(&root)?;
                return vm::run_matrix(
                    &root,
                    &[list.as_str()],
                    filter.as_deref(),
                    &[(golang::LIVE_STORE_ENV, go_live_store)],
                );
            }
            // Before anything installs or builds: a green run must also mean
            // that a new machine can start.
            if filter.is_none() {
                bootstrap::check(&root, None)?;
            }
            setup::ensure()?;
            build(&root)?;
            cmd(cargo(&root).args([
                "test",
                "--release",
                "-p",
                "redirector",
                "-p",
                "redirector-common",
                "-p",
                "xtask",
            ]))?;
            let go_live_store = golang::build_live_store(&root)?;
            // `run --kube` is tested against a real etcd + kube-apiserver
            // (tests/tests/kube*.rs): built once into target/kube (~5 min).
            kube::ensure_binaries(&root)?;
            let mut integration = cargo(&root);
            integration
                .args(["test", "--release", "-p", "redirector-tests", "--"])
                .arg("--test-threads=1")
                .env("REDIRECTOR_BIN", agent_artifact(&root))
                .env(golang::LIVE_STORE_ENV, &go_live_store)
                .env(
                    "REDIRECTOR_TEST_KUBERNETES_VALIDATE",
                    setup::kubernetes_validate()?,
                )
                .env("REDIRECTOR_TEST_HADOLINT", setup::hadolint()?);
            if let Some(f) = &filter {
                integration.arg(f);
            }
            let tested = cmd(&mut integration);
            // The test binaries move themselves out of the cgroup v2 root into
            // one of their own (redirector_tests::TEST_CGROUP); empty now.
            if let Some(mount) = bench::cpu::cgroup2_mount() {
                let _ = std::fs::remove_dir(mount.join(redirector_tests::TEST_CGROUP));
            }
            tested?;
            // After the host tests, so its agents never overlap the integration
            // tests (which assert that no redirector program is loaded).
            bench::run(&root, bench::BenchArgs::smoke())?;
            if no_vm {
                eprintln!("xtask: --no-vm: the kernel matrix was not run");
                return Ok(());
            }
            // The kernels our users run (6.1, 6.12) and the refusal below the
            // minimum (5.10), each in a QEMU guest: nothing loads on this kernel.
            vm::run_matrix(
                &root,
                &["all"],
                filter.as_deref(),
                &[(golang::LIVE_STORE_ENV, go_live_store)],
            )
        }
        Cmd::BootstrapCheck { rev } => bootstrap::check(&root, rev.as_deref()),
        Cmd::Bench(args) => bench::main(&root, args),
        Cmd::KubeApi => kube::kube_api(&root),
        Cmd::ScalePod { args } => bench::scale::pod_main(&args),
    }
}

fn build(root: &Path) -> Result<()> {
    cmd(&mut artifact_build(root))?;
    let bin = agent_artifact(root);
    eprintln!("xtask: the agent is {}", bin.display());
    // The manual comes from the binary's own clap definitions, so it cannot
    // drift from `--help`: redirector.1 plus one page per command.
    let man = root.join("target/man");
    cmd(Command::new(&bin).arg("man").arg("--out-dir").arg(&man))?;
    eprintln!("xtask: manual pages in {}", man.display());
    Ok(())
}

/// The Rust target the release artifact is built for: this machine's.
fn artifact_target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

/// The release artifact [`artifact_build`] leaves, in cargo's target
/// directory (CARGO_TARGET_DIR if set).
pub(crate) fn agent_artifact(root: &Path) -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    target_dir
        .join(artifact_target())
        .join("release/redirector")
}

/// What the release artifact is linked with: glibc and libgcc statically
/// (`+crt-static`; the image needs no libc and the binary runs on any
/// distribution), no symbol table, and a GNU build id to match crash reports
/// and profiles to the build. glibc's getaddrinfo, which the Kubernetes client
/// and the ring check use, stays whole in a static binary: its `files` and
/// `dns` sources are part of libc.a since glibc 2.34, so it needs no NSS
/// module at run time (the image has none).
const ARTIFACT_RUSTFLAGS: [&str; 3] = [
    "-Ctarget-feature=+crt-static",
    "-Cstrip=symbols",
    "-Clink-arg=-Wl,--build-id=sha1",
];

/// `cargo build` of the release artifact. The target is named even though it
/// is the host's: then the flags apply to the agent and its dependencies only,
/// not to build scripts and proc-macros (which cannot be linked statically),
/// and the static build has a directory of its own instead of replacing the
/// dynamic one a plain `cargo build --release` writes. The user's RUSTFLAGS
/// are kept, before ours.
pub(crate) fn artifact_build(root: &Path) -> Command {
    let mut flags: Vec<String> = match std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        Ok(encoded) => encoded
            .split('\x1f')
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => std::env::var("RUSTFLAGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };
    flags.extend(ARTIFACT_RUSTFLAGS.map(str::to_owned));
    let mut c = cargo(root);
    c.args(["build", "--release", "-p", "redirector", "--target"])
        .arg(artifact_target())
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    c
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root);
    c
}

pub(crate) fn cmd(c: &mut Command) -> Result<()> {
    let status = c.status().with_context(|| format!("starting {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
