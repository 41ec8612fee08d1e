//! Everything that talks to the BPF subsystem: what a redirect is, the
//! embedded object and its build id, loading and attaching the programs (`datapath`), the live-store
//! listener registry, where `sock_ops` runs (`sockops`), pinned state, the
//! cgroup v2 mount, and feature probes.

pub mod datapath;
pub mod pins;
pub mod probe;
mod redirect;
pub mod registry;
pub mod sockops;

pub use redirect::{Redirect, SamePort};
