//! The subcommands, one file each, each owning its arguments: `run` (the
//! agent), `status` and `detach`, `check`, `flows`, and the generated
//! `completions` and manual pages. `cli` names them and dispatches.

pub mod check;
pub mod flows;
pub mod manual;
pub mod run;
pub mod status;

/// `--output` of `status` and `check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Table,
    /// For scripts.
    Json,
}
