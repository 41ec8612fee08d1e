//! The subcommands, one file each: `run` (the agent), `status` and `detach`,
//! `check`, `flows`, and the generated `completions` and manual pages.

pub mod check;
pub mod flows;
pub mod logging;
pub mod manual;
pub mod ring;
pub mod run;
pub mod status;
pub mod table;

use std::process::ExitCode;

/// The whole `redirector` command: parse, set up logging and the runtime,
/// dispatch, and map the outcome to an exit status (see `error`).
pub fn main() -> ExitCode {
    let cli = match crate::cli::parse_from(std::env::args_os()) {
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
    let (command, logs) = match cli.command {
        crate::cli::Command::Run(args) => {
            let dry_run = args.dry_run;
            let early = args.log_format.unwrap_or_default();
            match crate::config::settings::resolve(*args) {
                Ok(settings) => {
                    logging::init(settings.log_format);
                    (Dispatch::Run(dry_run, Box::new(settings)), true)
                }
                Err(e) => {
                    logging::init(early);
                    tracing::error!("{e:#}");
                    return crate::error::exit_code(&e);
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
        let command = match command {
            Dispatch::Run(dry_run, settings) => return run::run(*settings, dry_run).await,
            Dispatch::Other(command) => command,
        };
        match command {
            crate::cli::Command::Run(args) => {
                let dry_run = args.dry_run;
                run::run(crate::config::settings::resolve(*args)?, dry_run).await
            }
            crate::cli::Command::Status { output, state_file } => {
                let layout = crate::bpf::pins::PinLayout::default();
                let mut report = status::collect(&layout)?;
                report.agent = status::agent_state(&state_file);
                print!("{}", status::render(&report, output)?);
                Ok(())
            }
            crate::cli::Command::Detach { wait } => {
                run::check_privileges()?;
                print!(
                    "{}",
                    status::detach(&crate::bpf::pins::PinLayout::default())?
                );
                if wait {
                    use std::io::Write as _;
                    println!("detached; waiting for SIGTERM");
                    let _ = std::io::stdout().flush();
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Ok(())
            }
            crate::cli::Command::Flows(args) => flows::follow(args).await,
            crate::cli::Command::Completions { shell } => manual::completions(shell),
            crate::cli::Command::Man { out_dir } => manual::man(out_dir.as_deref()),
            crate::cli::Command::Check {
                output,
                tempo_ring: Some(url),
            } => {
                run::check_privileges()?;
                let report = crate::ring::check(&url)?;
                print!("{}", ring::render(&report, output));
                if report.ok {
                    Ok(())
                } else {
                    Err(crate::error::Fatal::Environment(
                        "some live-stores of this node are not redirected (see above)".into(),
                    )
                    .into())
                }
            }
            crate::cli::Command::Check {
                output,
                tempo_ring: None,
            } => {
                let checks = check::run_checks();
                match output {
                    crate::cli::Output::Table => print!("{}", check::render_table(&checks)),
                    crate::cli::Output::Json => println!("{}", check::render_json(&checks)),
                }
                if check::all_passed(&checks) {
                    Ok(())
                } else {
                    Err(
                        crate::error::Fatal::Environment("some checks failed (see above)".into())
                            .into(),
                    )
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The agent's last line is a log line like the others; the other
        // commands' errors follow their output, for people and scripts.
        Err(e) if logs => {
            tracing::error!("{e:#}");
            crate::error::exit_code(&e)
        }
        Err(e) => {
            eprintln!("redirector: error: {e:#}");
            crate::error::exit_code(&e)
        }
    }
}

/// What `main` runs once logging is set up: `run` with its settings resolved.
enum Dispatch {
    Run(bool, Box<crate::config::settings::Settings>),
    Other(crate::cli::Command),
}
