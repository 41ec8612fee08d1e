//! Shell completions and manual pages, generated from the clap definitions
//! (`cli::command`, passed in), so they never disagree with `--help`.

use std::{
    fs,
    io::{self, Write},
    path::PathBuf,
};

use anyhow::{Context, Result};

use crate::flows::sub::DEFAULT_FLOWS_SOCKET;

/// `redirector completions`.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `redirector man`.
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Write redirector.1 and redirector-COMMAND.1 here instead.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `redirector completions SHELL`: the script for `cmd` (the whole command
/// line, with its defaults) on stdout.
pub fn completions(args: CompletionsArgs, mut cmd: clap::Command) -> Result<()> {
    clap_complete::generate(args.shell, &mut cmd, "redirector", &mut io::stdout());
    Ok(())
}

/// `redirector man`: `redirector.1` on stdout, or with `out_dir` every page
/// (`redirector.1`, `redirector-run.1`, ...) written there.
pub fn man(args: ManArgs, cmd: clap::Command) -> Result<()> {
    // `help` is clap's, not a page of ours; build() names subcommands
    // `redirector-run` and so on, which the pages and their file names use.
    let mut cmd = cmd.disable_help_subcommand(true);
    let out_dir = args.out_dir.as_deref();
    cmd.build();
    let Some(dir) = out_dir else {
        let mut out = io::stdout().lock();
        return main_page(&cmd, &mut out).context("writing the manual page");
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let top = dir.join("redirector.1");
    let mut file = fs::File::create(&top).with_context(|| format!("creating {}", top.display()))?;
    main_page(&cmd, &mut file).with_context(|| format!("writing {}", top.display()))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        clap_mangen::Man::new(sub.clone())
            .generate_to(dir)
            .with_context(|| {
                format!(
                    "writing the page of {} into {}",
                    sub.get_name(),
                    dir.display()
                )
            })?;
    }
    Ok(())
}

/// clap_mangen's sections, plus what only the top page says: exit status,
/// environment and files.
fn main_page(cmd: &clap::Command, out: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    let tp = |out: &mut dyn Write, tag: &str, text: &str| {
        writeln!(out, ".TP\n{}\n{}", escape(tag), escape(text))
    };
    writeln!(out, ".SH \"EXIT STATUS\"")?;
    tp(out, "0", "Success.")?;
    tp(out, "1", "Runtime failure.")?;
    tp(
        out,
        "2",
        "Invalid usage or configuration: bad port, equal ports, missing or invalid namespace, bad YAML, missing instance_port.",
    )?;
    tp(
        out,
        "3",
        "The node cannot run the agent: missing capabilities, bpffs or kernel feature; a failed check.",
    )?;
    writeln!(out, ".SH ENVIRONMENT")?;
    tp(
        out,
        "REDIRECTOR_*",
        "Every flag of run has one: REDIRECTOR_ and the flag in capitals, e.g. REDIRECTOR_LISTEN_PORT, REDIRECTOR_NETNS (comma-separated). Flags override the --config file, which overrides the defaults.",
    )?;
    tp(
        out,
        "RUST_LOG",
        "Log level (default info); debug also forwards the kernel programs' messages.",
    )?;
    writeln!(out, ".SH FILES")?;
    tp(
        out,
        DEFAULT_FLOWS_SOCKET,
        "Where a running agent serves its flow records to redirector flows (mode 0600).",
    )?;
    tp(
        out,
        crate::bpf::pins::PIN_ROOT,
        "Programs, links and maps a --pin agent leaves attached; redirector status reads them, redirector detach removes them.",
    )?;
    tp(
        out,
        "redirector.yaml",
        "The --config file: redirects, namespaces, discovery, pinning, flow format, metrics address. Unknown keys are errors.",
    )?;
    man.render_version_section(out)
}

/// roff-safe text: backslashes doubled, dashes literal, and no line starting
/// with a control character.
fn escape(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    match s.starts_with(['.', '\'']) {
        true => format!("\\&{s}"),
        false => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_page_lists_every_command_and_the_exit_codes() {
        let mut cmd = crate::cli::command().disable_help_subcommand(true);
        cmd.build();
        let mut out = Vec::new();
        main_page(&cmd, &mut out).expect("renders");
        let page = String::from_utf8(out).expect("utf8");
        assert!(page.starts_with(".ie"), "{page}");
        assert!(page.contains(".TH redirector 1"), "{page}");
        for sub in ["run", "status", "detach", "check", "flows", "completions"] {
            assert!(
                page.contains(&format!("redirector\\-{sub}(1)")),
                "{sub}: {page}"
            );
        }
        assert!(
            !page.contains("redirector\\-man"),
            "the man command is hidden"
        );
        assert!(page.contains(".SH \"EXIT STATUS\""), "{page}");
        assert!(page.contains("/run/redirector/flows.sock"), "{page}");
    }

    #[test]
    fn escapes_roff() {
        assert_eq!(escape("a-b\\c"), "a\\-b\\ec");
        assert_eq!(escape(".hidden"), "\\&.hidden");
    }
}
