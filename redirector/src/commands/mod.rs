//! The subcommands, one file each, each owning its arguments: `run` (the
//! agent), `status` and `detach`, `check` (its `--tempo-ring` output in
//! `ring`), `flows`, and the generated `completions` and manual pages; `table`
//! is the PASS/FAIL table `check` prints. `cli` names them and dispatches.

pub mod check;
pub mod flows;
pub mod manual;
pub mod ring;
pub mod run;
pub mod status;
pub mod table;

/// `--output` of `status` and `check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Table,
    /// For scripts.
    Json,
}
