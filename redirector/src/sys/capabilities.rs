//! The Linux capabilities the agent needs, and which of them the calling
//! thread lacks (capget(2) through `caps`: no /proc needed).

use std::io;

use caps::{CapSet, Capability, CapsHashSet};

/// Linux capabilities the agent needs, with the name an operator reads (as
/// `caps` and the kernel spell it) and the reason.
pub const REQUIRED_CAPABILITIES: [(Capability, &str, &str); 4] = [
    (
        Capability::CAP_BPF,
        "CAP_BPF",
        "load eBPF programs and maps",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        "attach sk_lookup to network namespaces and sock_ops to the cgroup",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "enter other network namespaces (setns) and pin to bpffs",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE",
        "copy a live-store's existing listening socket (pidfd_getfd)",
    ),
];

/// The required capabilities missing from the calling thread's effective set.
pub fn missing_capabilities() -> io::Result<Vec<(&'static str, &'static str)>> {
    let effective = caps::read(None, CapSet::Effective)
        .map_err(|e| io::Error::other(format!("reading the effective capabilities: {e}")))?;
    Ok(missing_from(&effective))
}

/// The agent cannot run as it is: these capabilities are missing (exit 3).
#[derive(Debug, thiserror::Error)]
#[error(
    "missing capabilities {}: run as root or grant them ({})",
    .0.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
    .0.iter().map(|(n, why)| format!("{n} to {why}")).collect::<Vec<_>>().join("; ")
)]
pub struct MissingCapabilities(pub Vec<(&'static str, &'static str)>);

/// Ok when the calling thread has every required capability; else the
/// missing ones, each with what it is for.
pub fn require_capabilities() -> anyhow::Result<()> {
    let missing = missing_capabilities()?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities(missing).into())
    }
}

/// The required capabilities not in `effective`.
fn missing_from(effective: &CapsHashSet) -> Vec<(&'static str, &'static str)> {
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|(cap, _, _)| !effective.contains(cap))
        .map(|&(_, name, why)| (name, why))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use procfs_core::FromRead;

    use super::*;

    /// capget(2) through `caps` says what the kernel's own /proc/thread-self/status
    /// says (CapEff, parsed by procfs), for the capabilities `caps` knows.
    #[test]
    fn effective_capabilities_match_proc_status() {
        let status = procfs_core::process::Status::from_read(
            File::open("/proc/thread-self/status").expect("status"),
        )
        .expect("parse");
        let known = caps::all().iter().fold(0u64, |m, c| m | c.bitmask());
        let effective = caps::read(None, CapSet::Effective).expect("capget");
        let bits = effective.iter().fold(0u64, |m, c| m | c.bitmask());
        assert_eq!(bits, status.capeff & known);
        let missing = missing_capabilities().expect("capget");
        for (cap, name, _) in REQUIRED_CAPABILITIES {
            let has = status.capeff & (1u64 << cap.index()) != 0;
            assert_eq!(missing.iter().any(|(n, _)| *n == name), !has, "{name}");
        }
    }

    #[test]
    fn missing_capabilities_are_named_in_order() {
        let none = CapsHashSet::default();
        let names: Vec<_> = missing_from(&none).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "CAP_BPF",
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE"
            ]
        );
        let all: CapsHashSet = REQUIRED_CAPABILITIES.iter().map(|(c, _, _)| *c).collect();
        assert!(missing_from(&all).is_empty());
        let some: CapsHashSet = [Capability::CAP_BPF, Capability::CAP_SYS_PTRACE].into();
        let names: Vec<_> = missing_from(&some).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
        assert_eq!(
            MissingCapabilities(missing_from(&some)).to_string(),
            "missing capabilities CAP_NET_ADMIN, CAP_SYS_ADMIN: run as root or grant them \
             (CAP_NET_ADMIN to attach sk_lookup to network namespaces and sock_ops to the cgroup; \
             CAP_SYS_ADMIN to enter other network namespaces (setns) and pin to bpffs)"
        );
        // The names operators read are the kernel's (and caps') own.
        for (cap, name, _) in REQUIRED_CAPABILITIES {
            assert_eq!(cap.to_string(), name);
        }
        // The bits are the uapi's (include/uapi/linux/capability.h).
        let bits: Vec<u8> = REQUIRED_CAPABILITIES
            .iter()
            .map(|(c, _, _)| c.index())
            .collect();
        assert_eq!(bits, [39, 12, 21, 19]);
    }
}
