//! Fixtures for the privileged integration tests: network namespaces joined by
//! veth pairs, named servers that say who answered and whom they saw, and the
//! real agent binary run as a child process. Every fixture undoes itself on
//! drop, so a failing test leaves no namespace, process or program behind.
//!
//! One module per job; everything is re-exported here, so a test needs only
//! `use redirector_tests::*`.

pub mod kube_api;
pub mod netns;

mod agent;
mod bpf;
mod clients;
mod flows;
mod host;
mod metrics;
mod servers;
mod timing;
mod topology;

pub use agent::*;
pub use bpf::*;
pub use clients::*;
pub use flows::*;
pub use host::*;
pub use metrics::*;
pub use netns::Netns;
pub use servers::*;
pub use timing::*;
pub use topology::*;
