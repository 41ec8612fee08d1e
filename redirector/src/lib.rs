//! redirector: Tempo live-store connections steered in the kernel.
//!
//! Module map, in layers from the operator down to the kernel. Data flows one
//! way: a module imports only from the layers below its own (`layers.rs`
//! checks every import), and each subsystem has its own error type.
//! - `cli`: parses, sets up logging and the runtime, dispatches, exits.
//! - `commands/`: one file (or folder) per subcommand, each owning its
//!   arguments; `run/` resolves its arguments into settings, then starts,
//!   serves and stops the agent.
//! - `error`: exit statuses, from the subsystems' typed errors.
//! - `agent/`: the owner of the served set, kept current from bind events,
//!   verdicts, process exits, pods and the resync.
//! - `config/`: the settings the agent runs with (`settings`), and the files
//!   they come from (redirector.yaml's value rules, Tempo's config);
//!   `config::Error`.
//! - `telemetry/`: the agent's log, /metrics, /healthz, /readyz; `ring/`: the
//!   Tempo live-store ring check.
//! - `bpf/`: what a redirect is, the kernel object, loading and attaching it,
//!   the listener registry, pinned state, feature probes (`probe::Missing`);
//!   `discovery/`: which namespaces have a live-store (processes, or the
//!   Kubernetes API and pod cgroups: `discovery/kube/`); `flows/`: flow
//!   records from the kernel ring to the log and subscribers.
//! - `sys/`: the kernel facade: system calls std and aya 0.14 do not wrap,
//!   network namespaces (`netns::Error`), sock_diag, cgroups, socket owners.

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
