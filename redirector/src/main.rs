mod agent;
mod cgroup;
mod check;
mod cli;
mod config;
mod datapath;
mod discover;
mod error;
mod flowlog;
mod flowreader;
mod flows;
mod flowsub;
mod listeners;
mod manual;
mod netns;
mod pins;
mod probe;
mod registry;
mod ring;
mod settings;
mod sockdiag;
mod status;
mod sys;
mod telemetry;

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redirector: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Run(args) => agent::run(args).await,
            cli::Command::Status { output } => {
                let layout = pins::PinLayout::default();
                let report = status::collect(&layout)?;
                print!("{}", status::render(&report, output)?);
                Ok(())
            }
            cli::Command::Detach => {
                agent::check_privileges()?;
                print!("{}", status::detach(&pins::PinLayout::default())?);
                Ok(())
            }
            cli::Command::Flows(args) => flows::follow(args).await,
            cli::Command::Completions { shell } => manual::completions(shell),
            cli::Command::Man { out_dir } => manual::man(out_dir.as_deref()),
            cli::Command::Check {
                output,
                tempo_ring: Some(url),
            } => {
                agent::check_privileges()?;
                let report = ring::check(&url)?;
                print!("{}", ring::render(&report, output));
                if report.ok {
                    Ok(())
                } else {
                    Err(error::Fatal::Environment(
                        "some live-stores of this node are not redirected (see above)".into(),
                    )
                    .into())
                }
            }
            cli::Command::Check {
                output,
                tempo_ring: None,
            } => {
                let checks = check::run_checks();
                match output {
                    cli::Output::Table => print!("{}", check::render_table(&checks)),
                    cli::Output::Json => println!("{}", check::render_json(&checks)),
                }
                if check::all_passed(&checks) {
                    Ok(())
                } else {
                    Err(error::Fatal::Environment("some checks failed (see above)".into()).into())
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirector: error: {e:#}");
            error::exit_code(&e)
        }
    }
}
