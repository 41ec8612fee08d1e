//! redirector: Tempo live-store connections steered in the kernel.
//!
//! Module map, from the operator down to the kernel:
//! - `cli`, `commands/`: the command line and one file per subcommand
//!   (`run` sets the agent up and tears it down).
//! - `agent`: the served set, kept current from listen events, process exits
//!   and the resync; with `--kube`, from the pods the Kubernetes API selects.
//! - `config/`: redirector.yaml, Tempo's config file, and the settings `run`
//!   resolves from flags, files and defaults.
//! - `discovery/`: network namespaces, their listening sockets (sock_diag) and
//!   the processes that own them; which namespaces have a live-store (from
//!   processes, or from the Kubernetes API and pod cgroups: `discovery/kube/`).
//! - `bpf/`: the kernel object (build id), loading and attaching it, the
//!   listener registry, pinned state, cgroup lookup and feature probes.
//! - `flows/`: flow records from the kernel ring to the log and subscribers.
//! - `telemetry`: /metrics, /healthz, /readyz.
//! - `ring`: the Tempo live-store ring check.
//! - `sys`: the system calls std and aya 0.14 do not wrap.
//! - `error`: exit statuses.

pub mod agent;
pub mod bpf;
pub mod cli;
pub mod commands;
pub mod config;
pub mod discovery;
pub mod error;
pub mod flows;
#[cfg(test)]
mod layers;
pub mod ring;
pub mod sys;
pub mod telemetry;
