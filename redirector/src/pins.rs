//! The agent's pinned state under `/sys/fs/bpf/redirector/` (with `--pin`):
//! what lets redirects outlive the agent process and a new agent adopt them.
//!
//! ```text
//! /sys/fs/bpf/redirector/
//!   build-<hash>/             which kernel object made this state (a directory
//!                             as a marker: bpffs holds no regular files)
//!   maps/<MAP>                every shared map
//!   links/sock_ops            the sock_ops link on the cgroup v2 root
//!   links/sk_lookup-<cookie>  one sk_lookup link per served namespace
//! ```

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::sys;

pub const PIN_ROOT: &str = "/sys/fs/bpf/redirector";
const SK_LOOKUP_PREFIX: &str = "sk_lookup-";

#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl Default for PinLayout {
    fn default() -> Self {
        Self {
            root: PathBuf::from(PIN_ROOT),
        }
    }
}

/// A pinned sk_lookup link found on disk.
pub struct PinnedNetns {
    pub cookie: u64,
    pub info: Option<sys::LinkInfo>,
}

impl PinLayout {
    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn sock_ops_link(&self) -> PathBuf {
        self.root.join("links/sock_ops")
    }

    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{SK_LOOKUP_PREFIX}{cookie}"))
    }

    fn build_marker(&self, build: &str) -> PathBuf {
        self.root.join(format!("build-{build}"))
    }

    /// The build marker found on disk, if any.
    pub fn pinned_build(&self) -> Option<String> {
        fs::read_dir(&self.root).ok()?.flatten().find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("build-")
                .map(str::to_owned)
        })
    }

    /// Creates the directories and marks them as made by `build`.
    pub fn prepare(&self, build: &str) -> Result<()> {
        for dir in [
            self.root.join("maps"),
            self.root.join("links"),
            self.build_marker(build),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    pub fn pinned_netns(&self) -> Vec<PinnedNetns> {
        let Ok(entries) = fs::read_dir(self.root.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let cookie = e
                    .file_name()
                    .to_str()?
                    .strip_prefix(SK_LOOKUP_PREFIX)?
                    .parse()
                    .ok()?;
                let info = sys::obj_get(&e.path())
                    .ok()
                    .and_then(|fd| sys::link_info(fd.as_fd()).ok());
                Some(PinnedNetns { cookie, info })
            })
            .collect()
    }

    /// Detaches every pinned link and removes all pinned state; returns what
    /// was removed, for the operator.
    pub fn remove_all(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        if !self.exists() {
            return Ok(removed);
        }
        // Links first, so nothing runs against maps that are going away. A link
        // is detached when its last reference (this pin) goes.
        let links = self.root.join("links");
        if let Ok(entries) = fs::read_dir(&links) {
            for e in entries.flatten() {
                let path = e.path();
                let what = describe_link(&path);
                // Detach explicitly: an agent still running holds the link's fd too,
                // and removing the pin alone would leave the program attached.
                if let Ok(fd) = sys::obj_get(&path) {
                    if let Err(err) = sys::link_detach(fd.as_fd()) {
                        tracing::warn!("detaching {}: {err}", path.display());
                    }
                }
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(format!("link {} ({what})", path.display()));
            }
        }
        let maps = self.root.join("maps");
        if let Ok(entries) = fs::read_dir(&maps) {
            for e in entries.flatten() {
                let path = e.path();
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(format!("map {}", path.display()));
            }
        }
        fs::remove_dir_all(&self.root)
            .with_context(|| format!("removing {}", self.root.display()))?;
        removed.push(format!("directory {}", self.root.display()));
        Ok(removed)
    }
}

fn describe_link(path: &Path) -> String {
    match sys::obj_get(path).and_then(|fd| sys::link_info(fd.as_fd())) {
        Ok(info) if info.kind == sys::BPF_LINK_TYPE_NETNS && info.netns_ino == 0 => {
            format!("link id {}, its namespace is gone", info.id)
        }
        Ok(info) if info.kind == sys::BPF_LINK_TYPE_NETNS => {
            format!(
                "link id {}, program id {}, net:[{}]",
                info.id, info.prog_id, info.netns_ino
            )
        }
        Ok(info) => format!("link id {}, program id {}", info.id, info.prog_id),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// A link the agent holds: the fd, and the pin that keeps it after exit (if any).
pub struct Link {
    pub fd: OwnedFd,
    pub pin: Option<PathBuf>,
    pub prog_id: u32,
}

impl Link {
    /// Pins the link at `path` (replacing a stale pin there).
    pub fn pin(&mut self, path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing stale pin {}", path.display()))
            }
        }
        sys::obj_pin(self.fd.as_fd(), path)
            .with_context(|| format!("pinning link at {}", path.display()))?;
        self.pin = Some(path.to_owned());
        Ok(())
    }

    /// Adopts the link pinned at `path`, if it is there and still attached.
    pub fn adopt(path: &Path) -> Option<Link> {
        let fd = sys::obj_get(path).ok()?;
        let info = sys::link_info(fd.as_fd()).ok()?;
        if info.kind == sys::BPF_LINK_TYPE_NETNS && info.netns_ino == 0 {
            // Its namespace is gone: the pin is stale.
            let _ = fs::remove_file(path);
            return None;
        }
        Some(Link {
            fd,
            pin: Some(path.to_owned()),
            prog_id: info.prog_id,
        })
    }

    /// Detaches now, pinned or not.
    pub fn remove(self) {
        if let Some(pin) = &self.pin {
            if let Err(e) = fs::remove_file(pin) {
                tracing::warn!("removing pin {}: {e}", pin.display());
            }
        }
        // Dropping the last fd releases the link.
    }
}
