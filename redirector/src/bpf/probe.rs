//! Kernel feature probes: does this kernel have everything the agent uses?
//! Each probe asks the kernel itself (loads a two-instruction program, creates
//! a one-entry map, makes the system call) instead of comparing version
//! numbers, because vendor kernels backport features (RHEL 9's 5.14 has
//! pieces of 5.15+). A missing feature becomes one line that names it and the
//! first mainline release that has it, so `run` can refuse before it loads,
//! attaches or pins anything.
//!
//! The probes load nothing that stays: every probe program and map is closed
//! before the probe returns. They need the privileges the agent needs anyway
//! (CAP_BPF, or root); a probe that cannot decide (EPERM, say) does not count
//! as missing, so the real load reports the real error.

use std::{fmt, io};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use crate::sys;

/// A kernel feature the agent uses.
#[derive(Debug)]
pub struct Feature {
    /// How an operator would search for it.
    pub name: &'static str,
    /// The first mainline release that has it.
    pub since: (u32, u32),
    probe: fn() -> io::Result<bool>,
}

impl Feature {
    /// Asks the kernel: `Ok(false)` when the feature is missing, `Err` when
    /// the probe itself could not run.
    pub fn probe(&self) -> io::Result<bool> {
        (self.probe)()
    }
}

/// The oldest mainline kernel with every feature in `FEATURES`.
pub const MIN_KERNEL: (u32, u32) = {
    let mut min = (0, 0);
    let mut i = 0;
    while i < FEATURES.len() {
        let since = FEATURES[i].since;
        if since.0 > min.0 || (since.0 == min.0 && since.1 > min.1) {
            min = since;
        }
        i += 1;
    }
    min
};

/// Everything the agent needs, oldest first.
pub const FEATURES: [Feature; 10] = [
    // For registering live-store listeners as they start listening.
    Feature {
        name: "sock_ops programs",
        since: (4, 13),
        probe: || program(ProgramType::SockOps),
    },
    // For registering a listener from the kernel.
    Feature {
        name: "bpf_sock_hash_update in sock_ops programs",
        since: (4, 18),
        probe: || helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    },
    // For registering listeners that existed before the agent.
    Feature {
        name: "pidfd_getfd",
        since: (5, 6),
        probe: pidfd_getfd,
    },
    // For the LISTENERS map.
    Feature {
        name: "socket hash maps with socket-cookie values",
        since: (5, 7),
        probe: sockhash_with_cookie_values,
    },
    // For flow records.
    Feature {
        name: "BPF ring buffer maps",
        since: (5, 8),
        probe: || map(MapType::RingBuf),
    },
    // For steering connections on the advertised port.
    Feature {
        name: "sk_lookup programs",
        since: (5, 9),
        probe: || program(ProgramType::SkLookup),
    },
    // For handing a connection to the live-store's listener.
    Feature {
        name: "bpf_sk_assign in sk_lookup programs",
        since: (5, 9),
        probe: || helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
    },
    // For flow records of steered connections.
    Feature {
        name: "BPF ring buffer helpers in sk_lookup programs",
        since: (5, 9),
        probe: || helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_ringbuf_reserve),
    },
    // For identifying the network namespaces it serves.
    Feature {
        name: "SO_NETNS_COOKIE",
        since: (5, 14),
        probe: so_netns_cookie,
    },
    // For keying listeners by network namespace.
    Feature {
        name: "bpf_get_netns_cookie in sock_ops programs",
        since: (5, 15),
        probe: || helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    },
];

/// The features this kernel lacks, as one error line.
#[derive(Debug)]
pub struct Missing(pub Vec<&'static Feature>);

impl Missing {
    /// The release that has every missing feature: what to upgrade to.
    pub fn needs(&self) -> (u32, u32) {
        self.0.iter().map(|f| f.since).max().unwrap_or((0, 0))
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self
            .0
            .iter()
            .map(|feat| format!("{} (Linux {}.{})", feat.name, feat.since.0, feat.since.1))
            .collect();
        let (major, minor) = self.needs();
        write!(
            f,
            "this kernel lacks {}: upgrade the node to Linux {major}.{minor} or newer",
            list.join(", ")
        )
    }
}

impl std::error::Error for Missing {}

/// Every feature with its probe's answer, in [`FEATURES`] order (for `check`).
pub fn probe_all() -> Vec<(&'static Feature, io::Result<bool>)> {
    FEATURES.iter().map(|f| (f, f.probe())).collect()
}

/// Ok when no probe found a feature missing. Probes that could not decide
/// are left to the real load, which reports its own error.
pub fn require() -> Result<(), Missing> {
    let missing: Vec<&'static Feature> = probe_all()
        .into_iter()
        .filter(|(_, answer)| matches!(answer, Ok(false)))
        .map(|(f, _)| f)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Missing(missing))
    }
}

fn program(ty: ProgramType) -> io::Result<bool> {
    is_program_supported(ty).map_err(io::Error::other)
}

fn helper(ty: ProgramType, helper: BpfHelper) -> io::Result<bool> {
    // A kernel without the program type cannot have the helper for it.
    if !program(ty)? {
        return Ok(false);
    }
    is_helper_supported(ty, helper).map_err(io::Error::other)
}

fn map(ty: MapType) -> io::Result<bool> {
    is_map_supported(ty).map_err(io::Error::other)
}

/// `pidfd_getfd` of a descriptor no process has (`i32::MAX`, past any fd
/// table) through a pidfd of this process (which it may always ptrace):
/// EBADF where the system call exists, ENOSYS where not.
/// No descriptor is copied. A kernel without `pidfd_open` (5.3) has no
/// `pidfd_getfd` (5.6) either.
fn pidfd_getfd() -> io::Result<bool> {
    let pidfd = match sys::pidfd_open(std::process::id() as i32) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(false),
        Err(e) => return Err(e),
    };
    syscall_exists(
        rustix::process::pidfd_getfd(&pidfd, i32::MAX, rustix::process::PidfdGetfdFlags::empty())
            .map(drop),
    )
}

/// Whether a system call called with an invalid argument exists.
fn syscall_exists(result: rustix::io::Result<()>) -> io::Result<bool> {
    match result {
        // Cannot happen for an invalid descriptor; exists all the same.
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOSYS) => Ok(false),
        Err(rustix::io::Errno::BADF | rustix::io::Errno::INVAL) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// `getsockopt(SO_NETNS_COOKIE)`: ENOPROTOOPT before 5.14.
fn so_netns_cookie() -> io::Result<bool> {
    match sys::current_netns_cookie() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A one-entry socket hash whose values are 8 bytes (socket cookies, as
/// LISTENERS has): older kernels accept only 4-byte (fd) values (EINVAL).
/// The map is closed, and so gone, before the probe returns.
fn sockhash_with_cookie_values() -> io::Result<bool> {
    match sys::bpf::map_create(sys::bpf::BPF_MAP_TYPE_SOCKHASH, 4, 8, 1) {
        Ok(_map) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ENOSYS says the call is missing, EBADF/EINVAL that it exists, anything
    /// else (seccomp's EPERM) is an error of the probe, not an answer.
    #[test]
    fn syscall_probe_reads_the_errno() {
        use rustix::io::Errno;
        assert!(!syscall_exists(Err(Errno::NOSYS)).expect("answer"));
        assert!(syscall_exists(Err(Errno::BADF)).expect("answer"));
        assert!(syscall_exists(Err(Errno::INVAL)).expect("answer"));
        assert!(syscall_exists(Ok(())).expect("answer"));
        let e = syscall_exists(Err(Errno::PERM)).expect_err("no answer");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    /// This machine's kernel (>= 5.6) has pidfd_getfd.
    #[test]
    fn pidfd_getfd_probe_finds_the_call() {
        assert!(pidfd_getfd().expect("probe"));
    }

    /// This machine's kernel (>= 5.7) takes 8-byte socket hash values. The
    /// probe creates a map only, loads no program, and the map is gone when
    /// it returns; without CAP_BPF it cannot decide (EPERM).
    #[test]
    fn sockhash_probe_finds_cookie_values() {
        match sockhash_with_cookie_values() {
            Ok(found) => assert!(found),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }

    #[test]
    fn features_are_listed_oldest_first() {
        assert!(FEATURES.windows(2).all(|w| w[0].since <= w[1].since));
    }

    #[test]
    fn a_refusal_is_one_line_naming_features_and_the_release_to_upgrade_to() {
        let m = Missing(vec![&FEATURES[8], &FEATURES[9]]);
        let line = m.to_string();
        assert_eq!(
            line,
            "this kernel lacks SO_NETNS_COOKIE (Linux 5.14), bpf_get_netns_cookie in sock_ops \
             programs (Linux 5.15): upgrade the node to Linux 5.15 or newer"
        );
        assert_eq!(line.lines().count(), 1);
        assert_eq!(m.needs(), (5, 15));
    }
}
