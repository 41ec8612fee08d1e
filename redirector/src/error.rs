//! Exit statuses: what a failure means for the operator, decided once from
//! the typed errors of the subsystems (found anywhere in the error's chain),
//! so a subsystem never needs to know how the command line reports it.

use std::process::ExitCode;

use crate::{
    bpf::probe::Missing,
    config,
    flows::reader::FlowLogError,
    sys::{netns, MissingCapabilities},
};

/// The command's own verdicts, where no subsystem error says it.
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
pub fn exit_status(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(fatal) = cause.downcast_ref::<Fatal>() {
            return match fatal {
                Fatal::Usage(_) => 2,
                Fatal::Environment(_) => 3,
            };
        }
        // Every configuration error is the operator's to fix.
        if cause.is::<config::Error>() || cause.is::<FlowLogError>() {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<netns::Error>() {
            return match e {
                // A path the operator gave that is no namespace.
                netns::Error::Vanished { .. } | netns::Error::NotANamespace { .. } => 2,
                netns::Error::Io { .. } => 1,
            };
        }
        if cause.is::<Missing>() || cause.is::<MissingCapabilities>() {
            return 3;
        }
    }
    1
}

/// [`exit_status`] as the process's exit code.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    ExitCode::from(exit_status(err))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn each_subsystem_error_has_its_status_even_under_context() {
        use anyhow::Context as _;
        let cases: Vec<(anyhow::Error, u8)> = vec![
            (anyhow::anyhow!("a map update failed"), 1),
            (config::Error::Invalid("x".into()).into(), 2),
            (
                Err::<(), _>(netns::Error::Vanished {
                    path: PathBuf::from("/proc/1/ns/net"),
                })
                .context("serving it")
                .unwrap_err(),
                2,
            ),
            (
                netns::Error::Io {
                    path: PathBuf::from("/proc/1/ns/net"),
                    doing: "entering",
                    err: std::io::Error::from_raw_os_error(libc::ENOMEM),
                }
                .into(),
                1,
            ),
            (Fatal::Environment("no bpffs".into()).into(), 3),
            (MissingCapabilities(vec![("CAP_BPF", "load")]).into(), 3),
        ];
        for (err, status) in cases {
            assert_eq!(exit_status(&err), status, "{err:#}");
        }
    }
}
