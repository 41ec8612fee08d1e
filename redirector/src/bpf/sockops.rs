//! Where `redir_sockops` runs.
//!
//! An accepted socket belongs to its listener's cgroup (`sk_clone_lock`
//! copies it; request sockets answer through their listener), so attaching
//! the program to each served live-store's pod cgroup gives it every
//! redirected connection and nothing else: connections of other pods run
//! none of redirector's programs. The cgroup v2 root, which taxes every
//! connection of the node, is only used when the operator asks for it
//! (`--sock-ops-cgroup root`), for hosts whose live-stores do not run in a
//! cgroup of their own.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    bpf::pins::{Link, PinLayout},
    sys,
};

/// `--sock-ops-cgroup`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each served live-store's pod cgroup (its own cgroup outside Kubernetes).
    #[default]
    Pod,
    /// The cgroup v2 root: every connection of the node runs the program.
    Root,
}

/// One cgroup the program is attached to.
pub struct Attached {
    pub path: PathBuf,
    pub cgroup_id: u64,
    pub link: Link,
    pub adopted: bool,
    /// The network namespaces (cookies) whose listeners live here.
    users: BTreeSet<u64>,
}

pub struct SockOps {
    pub scope: Scope,
    prog: OwnedFd,
    pub prog_id: u32,
    pub attached: Vec<Attached>,
}

impl SockOps {
    /// With `Scope::Root`, attaches (or adopts) the program on `root` at once.
    pub fn new(
        scope: Scope,
        prog: OwnedFd,
        prog_id: u32,
        root: &Path,
        pins: Option<&PinLayout>,
    ) -> Result<Self> {
        let mut s = Self {
            scope,
            prog,
            prog_id,
            attached: Vec::new(),
        };
        if scope == Scope::Root {
            s.attach(root, None, pins)?;
        }
        Ok(s)
    }

    /// Makes sure the program runs in `cgroup` for namespace `user`; returns
    /// whether it was attached (or adopted) now. In root scope, a no-op.
    pub fn ensure(
        &mut self,
        cgroup: &Path,
        user: u64,
        pins: Option<&PinLayout>,
    ) -> Result<Option<&Attached>> {
        if self.scope == Scope::Root {
            return Ok(None);
        }
        if let Some(i) = self.attached.iter().position(|a| a.path == cgroup) {
            self.attached[i].users.insert(user);
            return Ok(None);
        }
        let i = self.attach(cgroup, Some(user), pins)?;
        Ok(Some(&self.attached[i]))
    }

    fn attach(
        &mut self,
        cgroup: &Path,
        user: Option<u64>,
        pins: Option<&PinLayout>,
    ) -> Result<usize> {
        let dir = fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(&dir.metadata()?);
        let pin_path = pins.map(|l| match self.scope {
            Scope::Root => l.sock_ops_link(),
            Scope::Pod => l.sock_ops_cgroup_link(cgroup_id),
        });
        let adopted = pin_path.as_deref().and_then(Link::adopt);
        let is_adopted = adopted.is_some();
        let link = match adopted {
            Some(link) => link,
            None => {
                let fd = sys::link_create(self.prog.as_fd(), dir.as_fd(), sys::BPF_CGROUP_SOCK_OPS)
                    .with_context(|| {
                        format!("attaching sock_ops to cgroup {}", cgroup.display())
                    })?;
                let mut link = Link {
                    fd,
                    pin: None,
                    prog_id: self.prog_id,
                };
                if let Some(path) = &pin_path {
                    link.pin(path)?;
                }
                link
            }
        };
        self.attached.push(Attached {
            path: cgroup.to_owned(),
            cgroup_id,
            link,
            adopted: is_adopted,
            users: user.into_iter().collect(),
        });
        Ok(self.attached.len() - 1)
    }

    /// Namespace `user` is no longer served: detaches from the cgroups only
    /// it used. Returns their paths.
    pub fn release(&mut self, user: u64) -> Vec<PathBuf> {
        for a in &mut self.attached {
            a.users.remove(&user);
        }
        self.prune()
    }

    /// Detaches from cgroups no served namespace uses any more, and drops
    /// links whose cgroup was removed (its pod went; the kernel detached
    /// them). A cgroup stays attached while its namespace is served, listener
    /// or not: a live-store restarting in its pod is registered by `sock_ops`
    /// at listen(), in the kernel, before any connection can find it missing.
    pub fn prune(&mut self) -> Vec<PathBuf> {
        if self.scope == Scope::Root {
            return Vec::new();
        }
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        for a in self.attached.drain(..) {
            // A cgroup link reads cgroup id 0 once detached. One detached
            // while its cgroup is still there was detached by an operator
            // (`redirector detach`): kept, so readiness and the pin watch see it.
            let detached = sys::link_info(a.link.fd.as_fd()).is_ok_and(|i| i.netns_ino == 0);
            if a.users.is_empty() || (detached && !a.path.exists()) {
                gone.push(a.path.clone());
                a.link.remove();
            } else {
                kept.push(a);
            }
        }
        self.attached = kept;
        gone
    }

    /// The cgroups the program runs in for namespace `user`: one source for
    /// `status` and for "a listen() there is registered in the kernel".
    pub fn cgroups_of(&self, user: u64) -> impl Iterator<Item = &Path> {
        self.attached
            .iter()
            .filter(move |a| a.users.contains(&user))
            .map(|a| a.path.as_path())
    }

    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.attached.iter().map(|a| &a.link)
    }
}
