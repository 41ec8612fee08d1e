//! A link the agent holds, pinned or not.

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::sys;

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
