//! Every path under the pin root, and what is pinned there now.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::MapInfo;

use super::PIN_ROOT;
use crate::sys;

const SK_LOOKUP_PREFIX: &str = "sk_lookup-";
const SOCK_OPS_PREFIX: &str = "sock_ops-";

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

    /// The sock_ops link on the cgroup with id `cgroup_id` (pod scope).
    pub fn sock_ops_cgroup_link(&self, cgroup_id: u64) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{SOCK_OPS_PREFIX}{cgroup_id}"))
    }

    /// Pinned per-cgroup sock_ops links: (cgroup id, path).
    pub fn pinned_sock_ops(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.root.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let id = e
                    .file_name()
                    .to_str()?
                    .strip_prefix(SOCK_OPS_PREFIX)?
                    .parse()
                    .ok()?;
                Some((id, e.path()))
            })
            .collect()
    }

    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{SK_LOOKUP_PREFIX}{cookie}"))
    }

    pub(super) fn build_marker(&self, build: &str) -> PathBuf {
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
                // Something that is no BPF object (a directory or symlink someone
                // put here) has nothing to detach and just goes.
                let Ok(fd) = sys::obj_get(&path) else {
                    remove_entry(&path)?;
                    removed.push(format!("foreign entry {}", path.display()));
                    continue;
                };
                if let Err(err) = sys::link_detach(fd.as_fd()) {
                    tracing::warn!("detaching {}: {err}", path.display());
                }
                remove_entry(&path)?;
                removed.push(format!("link {} ({what})", path.display()));
            }
        }
        let maps = self.root.join("maps");
        if let Ok(entries) = fs::read_dir(&maps) {
            for e in entries.flatten() {
                let path = e.path();
                let what = if MapInfo::from_pin(&path).is_ok() {
                    "map"
                } else {
                    "foreign entry"
                };
                remove_entry(&path)?;
                removed.push(format!("{what} {}", path.display()));
            }
        }
        fs::remove_dir_all(&self.root)
            .with_context(|| format!("removing {}", self.root.display()))?;
        removed.push(format!("directory {}", self.root.display()));
        Ok(removed)
    }
}

/// Removes a pin, or whatever else sits at `path` (a directory, a symlink).
fn remove_entry(path: &Path) -> Result<()> {
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let removed = if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    removed.with_context(|| format!("removing {}", path.display()))
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
