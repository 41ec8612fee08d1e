//! Failures the caller branches on: each maps to a documented exit code.

use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The command line or configuration asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// The node cannot run the agent as it is: privileges, kernel, mounts.
    #[error("{0}")]
    Environment(String),
}

/// A usage error (exit status 2) with `msg` as its one line.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Fatal::Usage(msg.into()).into()
}

/// 0 success, 1 runtime failure, 2 invalid usage (also clap's), 3 missing
/// privileges or kernel features.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    match err.downcast_ref::<Fatal>() {
        Some(Fatal::Usage(_)) => ExitCode::from(2),
        Some(Fatal::Environment(_)) => ExitCode::from(3),
        None => ExitCode::from(1),
    }
}
