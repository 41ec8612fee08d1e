//! The command line: `--help` is the manual, so every flag says what it maps
//! to. Each subcommand owns its arguments (`commands::*`); this file names the
//! subcommands, parses, sets up logging and the runtime, dispatches, and maps
//! the outcome to an exit status (see `error`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{commands, config::settings::Settings, error, telemetry::logging};

#[derive(Parser, Debug)]
#[command(
    name = "redirector",
    version,
    about = "Sidecar-proxy semantics for Grafana Tempo live-stores, in the kernel",
    long_about = "Sidecar-proxy semantics for Grafana Tempo live-stores, in the kernel.\n\n\
        Tempo lets a live-store listen on `server.grpc_listen_port` (default 9095) and advertise \
        `live_store.ring.instance_port` (e.g. 12345) in the live-store ring, so queriers dial the \
        advertised port and a sidecar proxy forwards to the real one. redirector removes the proxy: \
        an sk_lookup program hands connections for the advertised port straight to the live-store's \
        listening socket, with no userspace copy and the querier's real address intact."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the programs and redirect until SIGINT/SIGTERM. Without --pin,
    /// everything is detached on exit; with --pin it stays and the next agent adopts it.
    #[command(after_help = "Examples:\n  \
        redirector run                                   # 12345 -> 9095 in this network namespace\n  \
        redirector run --advertise-port 12345 --listen-port 9095 --netns /var/run/netns/live-store-0\n  \
        redirector run --tempo-config /etc/tempo/tempo.yaml --discover --pin\n  \
        redirector run --config /etc/redirector/redirector.yaml")]
    Run(Box<commands::run::args::RunArgs>),
    /// Show what is served: namespaces, ports, whether a live-store listener is
    /// registered, counters. Reads the pinned state, so it works while an agent
    /// runs with --pin and after it stopped. Changes nothing.
    #[command(after_help = "Examples:\n  redirector status\n  redirector status --output json")]
    Status(commands::status::StatusArgs),
    /// Remove everything a --pin agent left attached and pinned under
    /// /sys/fs/bpf/redirector, and say what was removed.
    #[command(
        after_help = "Examples:\n  redirector detach\n  redirector detach --wait   # deploy/uninstall.yaml: every node, then stay up"
    )]
    Detach(commands::status::DetachArgs),
    /// Probe what this node needs (privileges, kernel, BTF, sk_lookup, sock_ops,
    /// cgroup v2, bpffs) and print PASS/FAIL with a fix for each. Changes nothing.
    /// Exit code 0 when everything passes, 3 otherwise.
    ///
    /// With --tempo-ring, check Tempo's live-store ring instead: for every
    /// live-store whose address is on this node, whether redirector serves its
    /// namespace (pinned state), whether the ring advertises a redirected port,
    /// and whether its listener is registered. Exit 1 when the ring cannot be read.
    #[command(
        after_help = "Examples:\n  redirector check\n  redirector check --output json\n  \
        redirector check --tempo-ring http://tempo-distributor:3200/live-store/ring"
    )]
    Check(commands::check::CheckArgs),
    /// Follow a running agent's flow records, like `hubble observe`.
    ///
    /// Connects to the agent's --flows-socket, keeps the records that match the
    /// filters, and prints them as the agent's flow log does. Records missed
    /// because this command read too slowly are counted on stderr, never
    /// dropped silently. Exits 1 when the agent stops.
    #[command(after_help = "Examples:\n  \
        redirector flows                                  # every record, as it happens\n  \
        redirector flows --event close --output json      # closed connections with their bytes\n  \
        redirector flows --client 10.42.0.0/16 --netns live-store-0\n  \
        redirector flows --event refused --last 20        # the last 20 refusals the agent kept, then exit")]
    Flows(commands::flows::FlowsArgs),
    /// Print a completion script for SHELL on stdout.
    #[command(after_help = "Examples:\n  \
        redirector completions bash > /etc/bash_completion.d/redirector\n  \
        redirector completions zsh > \"${fpath[1]}/_redirector\"\n  \
        redirector completions fish > ~/.config/fish/completions/redirector.fish")]
    Completions(commands::manual::CompletionsArgs),
    /// Print the manual page (roff) on stdout, or write one page per command
    /// into DIR (`cargo xtask build` writes target/man).
    #[command(hide = true)]
    Man(commands::manual::ManArgs),
}

/// The command line as `--help`, the manual and completions show it: [`Cli`]
/// with `run`'s defaults. Values are taken without them ([`parse_from`]): what
/// the command line and environment leave out falls to the `--config` file.
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    Cli::command().mut_subcommand("run", commands::run::args::with_defaults)
}

/// Parses `argv`: help, version and errors as [`command`] renders them (with
/// the defaults), the values without the defaults.
pub fn parse_from<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    command().try_get_matches_from(&argv)?;
    Cli::try_parse_from(argv)
}

/// The whole `redirector` command.
pub fn main() -> ExitCode {
    let cli = match parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        // Help and version go to stdout as clap renders them.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line that names the problem; `--help` has the rest.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            eprintln!("redirector: {}", first.trim());
            return ExitCode::from(2);
        }
    };
    // `run` logs in the format its settings say (flag, environment or
    // redirector.yaml), so they are resolved before anything is logged; a
    // setting that does not resolve is logged in the format of the flag or
    // environment, if any.
    let (dispatch, logs) = match cli.command {
        Command::Run(args) => {
            let dry_run = args.dry_run;
            let early = args.log_format.unwrap_or_default();
            match commands::run::args::resolve(*args) {
                Ok(settings) => {
                    logging::init(settings.log_format);
                    (Dispatch::Run(dry_run, Box::new(settings)), true)
                }
                Err(e) => {
                    logging::init(early);
                    tracing::error!("{e:#}");
                    return error::exit_code(&e);
                }
            }
        }
        other => {
            logging::init(logging::LogFormat::Text);
            (Dispatch::Other(other), false)
        }
    };
    // Two workers: the agent's loop (`run`) may spend milliseconds in the
    // kernel (a program load, a sock_diag dump of a pod's listeners) while
    // /healthz, scrapes and flow delivery go on on the other.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            if logs {
                tracing::error!("starting the async runtime: {e}");
            } else {
                eprintln!("redirector: error: starting the async runtime: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match dispatch {
            Dispatch::Run(dry_run, settings) => commands::run::run(*settings, dry_run).await,
            // Resolved above: `run` never reaches this arm.
            Dispatch::Other(Command::Run(args)) => {
                let dry_run = args.dry_run;
                commands::run::run(commands::run::args::resolve(*args)?, dry_run).await
            }
            Dispatch::Other(Command::Status(args)) => commands::status::main(args),
            Dispatch::Other(Command::Detach(args)) => commands::status::detach_main(args).await,
            Dispatch::Other(Command::Check(args)) => commands::check::main(args),
            Dispatch::Other(Command::Flows(args)) => commands::flows::follow(args).await,
            Dispatch::Other(Command::Completions(args)) => {
                commands::manual::completions(args, command())
            }
            Dispatch::Other(Command::Man(args)) => commands::manual::man(args, command()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The agent's last line is a log line like the others; the other
        // commands' errors follow their output, for people and scripts.
        Err(e) if logs => {
            tracing::error!("{e:#}");
            error::exit_code(&e)
        }
        Err(e) => {
            eprintln!("redirector: error: {e:#}");
            error::exit_code(&e)
        }
    }
}

/// What `main` runs once logging is set up: `run` with its settings resolved.
enum Dispatch {
    Run(bool, Box<Settings>),
    Other(Command),
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::commands::run::args::RunArgs;

    fn origin() -> &'static Path {
        Path::new("redirector.yaml")
    }

    fn parse(text: &str, origin: &Path) -> crate::config::Result<RunArgs> {
        crate::config::parse(text, origin)
    }

    fn err(text: &str) -> String {
        parse(text, origin()).unwrap_err().to_string()
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// A `run` flag without a redirector.yaml key is a setting the ConfigMap
    /// cannot hold: every flag but these is a key of the file's schema.
    #[test]
    fn every_run_flag_is_a_config_key() {
        // `--config` names the file itself; `--dry-run` is an action of this
        // invocation, not a setting of the agent. `--help` is clap's.
        const NOT_KEYS: [&str; 3] = ["config", "dry_run", "help"];
        let cmd = command();
        let run = cmd
            .get_subcommands()
            .find(|c| c.get_name() == "run")
            .expect("a run subcommand");
        let mut checked = 0;
        for arg in run.get_arguments() {
            let id = arg.get_id().as_str();
            if NOT_KEYS.contains(&id) {
                continue;
            }
            // No value is "not set" for every key; an unknown key fails as such.
            match parse(&format!("{id}:\n"), origin()) {
                Ok(cfg) => assert_eq!(cfg, RunArgs::default(), "{id}"),
                Err(e) => panic!("--{} has no redirector.yaml key {id}: {e}", arg.get_id()),
            }
            checked += 1;
        }
        assert!(checked >= 25, "{checked} flags");
        for id in NOT_KEYS.iter().filter(|id| **id != "help") {
            assert!(
                run.get_arguments().any(|a| a.get_id() == *id),
                "{id} is allowed as no key but is no flag"
            );
            let e = err(&format!("{id}:\n"));
            assert!(e.contains(&format!("unknown field `{id}`")), "{e}");
        }
    }

    /// Command line and environment over the file over the defaults, key by
    /// key; a list given on the command line replaces the file's.
    #[test]
    fn flags_win_over_the_file_key_by_key() {
        use {Cli, Command};
        let dir = std::env::temp_dir().join(format!("redirector-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("redirector.yaml");
        std::fs::write(
            &path,
            "discover: true\nlistener_grace: 5\nresync_interval: 7\nflow_ring_bytes: 8192\n\
             netns: [/proc/1/ns/net]\npin: true\nlog_format: json\n",
        )
        .unwrap();
        let resolve = |extra: &[&str]| {
            let mut argv = vec!["redirector", "run", "--config", path.to_str().unwrap()];
            argv.extend_from_slice(extra);
            let Command::Run(args) = parse_from(argv).unwrap().command else {
                panic!("not run");
            };
            crate::commands::run::args::resolve(*args).unwrap()
        };
        let file = resolve(&[]);
        let flags = resolve(&[
            "--resync-interval",
            "9",
            "--flow-ring-bytes",
            "4096",
            "--netns",
            "/proc/2/ns/net",
            "--pin=false",
            "--log-format",
            "text",
        ]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(file.discover && file.pin);
        assert_eq!(file.listener_grace.as_secs(), 5);
        assert_eq!(file.resync_interval.as_secs(), 7);
        assert_eq!(file.flow_ring_bytes, 8192);
        assert_eq!(file.netns, [PathBuf::from("/proc/1/ns/net")]);
        assert_eq!(file.log_format, crate::telemetry::logging::LogFormat::Json);
        // What the flags leave alone stays the file's; the defaults come last.
        assert!(flags.discover && !flags.pin);
        assert_eq!(flags.listener_grace.as_secs(), 5);
        assert_eq!(flags.resync_interval.as_secs(), 9);
        assert_eq!(flags.flow_ring_bytes, 4096);
        assert_eq!(flags.netns, [PathBuf::from("/proc/2/ns/net")]);
        assert_eq!(flags.log_format, crate::telemetry::logging::LogFormat::Text);
        assert_eq!(
            flags.metrics_addr.to_string(),
            crate::config::settings::DEFAULT_METRICS_ADDR
        );
        // Without a file, the plain derive parse resolves to the same defaults
        // `--help` shows.
        let Command::Run(args) = <Cli as clap::Parser>::try_parse_from(["redirector", "run"])
            .unwrap()
            .command
        else {
            panic!("not run");
        };
        let defaults = crate::commands::run::args::resolve(*args).unwrap();
        let shown: std::collections::BTreeMap<&str, String> =
            crate::commands::run::args::run_defaults()
                .into_iter()
                .collect();
        assert_eq!(
            shown["flow_ring_bytes"],
            defaults.flow_ring_bytes.to_string()
        );
        assert_eq!(
            shown["resync_interval"],
            defaults.resync_interval.as_secs().to_string()
        );
        assert_eq!(shown["metrics_addr"], defaults.metrics_addr.to_string());
        assert_eq!(shown["serve_target"], defaults.serve_targets.join(","));
        assert_eq!(
            shown["flows_socket"],
            defaults.flows_socket.display().to_string()
        );
        assert_eq!(
            shown["advertise_port"],
            defaults.redirects[0].advertise_port.to_string()
        );
    }

    /// `--help` shows each default once, from `run_defaults`.
    #[test]
    fn help_shows_the_defaults() {
        let mut cmd = command();
        let run = cmd.find_subcommand_mut("run").expect("a run subcommand");
        let help = run.render_long_help().to_string();
        for (id, value) in crate::commands::run::args::run_defaults() {
            assert!(
                help.contains(&format!("[default: {value}]")),
                "{id}: [default: {value}] not in --help"
            );
        }
    }
}
