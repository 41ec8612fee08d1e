//! The agent's pinned state under `/sys/fs/bpf/redirector/` (with `--pin`):
//! what lets redirects outlive the agent process and a new agent adopt them.
//!
//! ```text
//! /sys/fs/bpf/redirector/
//!   build-<hash>/             which kernel object made this state (a directory
//!                             as a marker: bpffs holds no regular files)
//!   maps/<MAP>                every shared map
//!   links/sock_ops-<cgroup>   one sock_ops link per served pod cgroup (by id)
//!   links/sock_ops            or, with --sock-ops-cgroup root, the one on the root
//!   links/sk_lookup-<cookie>  one sk_lookup link per served namespace
//! ```
//!
//! `layout` owns every path under the root; `link` is a link the agent holds
//! (and may pin); `watch` repairs and reports the pinned state while a `--pin`
//! agent runs.

mod layout;
mod link;
mod watch;

pub use layout::{PinLayout, PinnedNetns};
pub use link::Link;
pub use watch::{PinProblem, PinWatch};

/// Where bpffs must be mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where an agent started with `--pin` keeps its programs, links and maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/redirector";

/// Why pinned state cannot be seen from here, if it cannot: `ip netns exec`
/// mounts a fresh /sys for the command, hiding the host's bpffs, so a pinned
/// agent looks absent. Said wherever "nothing pinned" would mislead.
pub fn bpffs_hidden() -> Option<String> {
    match crate::sys::is_bpffs(std::path::Path::new(BPFFS)) {
        Ok(true) => None,
        _ => Some(format!(
            "bpffs is not mounted at {BPFFS} in this mount namespace, so no pinned agent can be \
             seen from here (`ip netns exec` mounts a fresh /sys): run the command without \
             `ip netns exec` (it finds the namespaces itself), or enter only the network \
             namespace with `nsenter --net=/var/run/netns/NAME`, which keeps the mounts"
        )),
    }
}
