//! The pinned state while a `--pin` agent runs: deleted pins made again
//! from the agent's own fds, other changes reported (log and metrics).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::AsFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use redirector_common::SHARED_MAPS;

use super::{Link, PinLayout};
use crate::sys;

/// What can be wrong with the pinned state while a `--pin` agent runs: the
/// `problem` label of `redirector_pinned_state_problems`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PinProblem {
    /// bpffs is no longer mounted where the pins live.
    BpffsUnmounted,
    /// An entry this agent did not make: reported, left alone.
    ForeignEntry,
    /// One of this agent's pin paths holds another object: reported, left
    /// alone (it may be another agent's).
    Replaced,
    /// A missing pin could not be made again.
    RepairFailed,
}

impl PinProblem {
    pub const ALL: [PinProblem; 4] = [
        PinProblem::BpffsUnmounted,
        PinProblem::ForeignEntry,
        PinProblem::Replaced,
        PinProblem::RepairFailed,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            PinProblem::BpffsUnmounted => "bpffs_unmounted",
            PinProblem::ForeignEntry => "foreign_entry",
            PinProblem::Replaced => "replaced",
            PinProblem::RepairFailed => "repair_failed",
        }
    }
}

/// Watches a `--pin` agent's pinned state from its maintenance tick: a pin
/// deleted behind its back (`rm`, a remounted bpffs) would make the programs
/// detach when the agent exits and leave the next agent nothing to adopt, so it
/// is made again from the fds the agent holds. What the agent did not make is
/// reported and left alone; nothing here ever stops the agent.
#[derive(Default)]
pub struct PinWatch {
    /// Each shared map: a handle opened from its pin once startup is done (the
    /// fd to pin it again from) and its id (what the pin must hold).
    maps: Vec<(&'static str, MapData, u32)>,
    /// Startup (adoption, the sweep of stale pins) is over: from now on
    /// anything unexpected under the pin root is a change made by someone else.
    armed: bool,
    /// Problems found by the last pass: each is logged when it appears and
    /// when it is gone, not every second.
    reported: BTreeMap<Key, String>,
    metrics: PinMetrics,
    /// Link pins checked to hold this agent's link, by the pin file's inode.
    verified: std::collections::HashMap<PathBuf, u64>,
}

#[derive(Clone)]
struct PinMetrics {
    repairs: Counter,
    problems: Family<Vec<(String, String)>, Gauge>,
}

impl Default for PinMetrics {
    fn default() -> Self {
        let metrics = PinMetrics {
            repairs: Counter::default(),
            problems: Family::default(),
        };
        for kind in PinProblem::ALL {
            metrics
                .problems
                .get_or_create(&vec![("problem".to_owned(), kind.label().to_owned())])
                .set(0);
        }
        metrics
    }
}

impl PinWatch {
    /// The watch's metrics, for the agent's /metrics (a `--pin` agent's only).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "pin_repairs",
            "Pins under /sys/fs/bpf/redirector made again from the agent's own fds after they were removed (deleted, or bpffs remounted)",
            self.metrics.repairs.clone(),
        );
        r.register(
            "pinned_state_problems",
            "Problems with the pinned state now, by problem (bpffs_unmounted, foreign_entry, replaced, repair_failed)",
            self.metrics.problems.clone(),
        );
    }
}

/// A problem: its kind and the path it is about.
type Key = (PinProblem, PathBuf);

/// One pass over the pinned state.
#[derive(Default)]
struct Pass {
    repaired: Vec<String>,
    /// Each problem, with the message that explains it.
    problems: BTreeMap<Key, String>,
}

impl Pass {
    fn problem(&mut self, kind: PinProblem, path: &Path, message: String) {
        self.problems.insert((kind, path.to_owned()), message);
    }
}

impl PinWatch {
    /// Starts watching: called once the agent's startup is done, when every
    /// pin under `layout` is the agent's own.
    pub fn arm(&mut self, layout: &PinLayout) {
        self.maps.clear();
        for name in SHARED_MAPS {
            let path = layout.map(name);
            let opened = MapData::from_pin(&path).and_then(|m| {
                let id = m.info()?.id();
                Ok((m, id))
            });
            match opened {
                Ok((map, id)) => self.maps.push((name, map, id)),
                Err(e) => tracing::warn!(
                    "pinned map {} is not watched (it cannot be re-pinned if deleted): {e}",
                    path.display()
                ),
            }
        }
        self.armed = true;
    }

    /// One check, from the maintenance tick: repairs deleted pins, logs what
    /// changed since the last check, and updates the metrics.
    pub fn check<'a>(
        &mut self,
        layout: &PinLayout,
        build: &str,
        links: impl IntoIterator<Item = &'a Link>,
    ) {
        if !self.armed {
            return;
        }
        let links: Vec<&Link> = links.into_iter().collect();
        let pass = self.pass(layout, build, &links);
        let metrics = &self.metrics;
        if !pass.repaired.is_empty() {
            metrics.repairs.inc_by(pass.repaired.len() as u64);
            tracing::warn!(
                "pinned state under {} was changed behind the agent's back; pinned again from the agent's own fds: {}",
                layout.root.display(),
                pass.repaired.join(", ")
            );
        }
        for (key, message) in &pass.problems {
            if !self.reported.contains_key(key) {
                tracing::warn!("{message}");
            }
        }
        for key @ (kind, path) in self.reported.keys() {
            if !pass.problems.contains_key(key) {
                tracing::info!(
                    "pinned state problem resolved ({}): {}",
                    kind.label(),
                    path.display()
                );
            }
        }
        for kind in PinProblem::ALL {
            let n = pass.problems.keys().filter(|(k, _)| *k == kind).count();
            metrics
                .problems
                .get_or_create(&vec![("problem".to_owned(), kind.label().to_owned())])
                .set(n as i64);
        }
        self.reported = pass.problems;
    }

    fn pass(&mut self, layout: &PinLayout, build: &str, links: &[&Link]) -> Pass {
        let mut pass = Pass::default();
        let mount = layout.root.parent().unwrap_or(&layout.root);
        if !sys::is_bpffs(mount).unwrap_or(false) {
            // Nothing can be pinned until it is back; the fds keep the
            // programs attached meanwhile.
            pass.problem(
                PinProblem::BpffsUnmounted,
                mount,
                format!(
                    "bpffs is no longer mounted at {m}: the pinned state is out of reach; redirects go on while this agent runs but would end with it; mount it again (mount -t bpf bpf {m}) and the agent pins everything again within a second",
                    m = mount.display()
                ),
            );
            return pass;
        }
        // `redirector detach` while the agent runs detaches its sock_ops links
        // and removes every pin, directories included: that is the operator
        // tearing the state down (readiness says the programs are gone), not
        // damage to repair. Only looked at when the directories went, so a
        // node of a thousand pods pays nothing for it each second.
        let torn_down = !layout.root.join("links").is_dir()
            && links.iter().any(|l| {
                sys::link_info(l.fd.as_fd())
                    .is_ok_and(|i| i.kind != sys::BPF_LINK_TYPE_NETNS && !link_attached(&i))
            });
        if torn_down {
            return pass;
        }
        let marker = layout.build_marker(build);
        for dir in [
            layout.root.join("maps"),
            layout.root.join("links"),
            marker.clone(),
        ] {
            if dir.is_dir() {
                continue;
            }
            match fs::create_dir_all(&dir) {
                Ok(()) => pass.repaired.push(format!("directory {}", dir.display())),
                Err(e) => pass.problem(
                    PinProblem::RepairFailed,
                    &dir,
                    format!("cannot make {} again: {e}", dir.display()),
                ),
            }
        }
        for (name, map, id) in &self.maps {
            let path = layout.map(name);
            match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => match map.pin(&path) {
                    Ok(()) => pass.repaired.push(format!("map {name}")),
                    Err(e) => pass.problem(
                        PinProblem::RepairFailed,
                        &path,
                        format!("cannot pin map {name} again at {}: {e}", path.display()),
                    ),
                },
                Err(e) => pass.problem(
                    PinProblem::RepairFailed,
                    &path,
                    format!("cannot inspect {}: {e}", path.display()),
                ),
                Ok(_) => match MapInfo::from_pin(&path) {
                    Ok(info) if info.id() == *id => {}
                    found => pass.problem(
                        PinProblem::Replaced,
                        &path,
                        format!(
                            "{} holds {}, not this agent's map {name} (id {id}); left alone, but the next agent would adopt it: `redirector detach` and restart the agent",
                            path.display(),
                            found.map_or("no BPF map".to_owned(), |i| format!("map id {}", i.id()))
                        ),
                    ),
                },
            }
        }
        for link in links {
            let Some(path) = &link.pin else { continue };
            let meta = fs::symlink_metadata(path);
            // The same pin file this agent checked before: still its link.
            // One stat per link and second, not a BPF lookup.
            if let Ok(m) = &meta {
                if self.verified.get(path) == Some(&m.ino()) {
                    continue;
                }
            }
            // A link no longer attached (detached by `redirector detach` while
            // the agent runs) is not pinned again: readiness reports it, and a
            // pin of it would only hand the next agent a dead link.
            let Ok(ours) = sys::link_info(link.fd.as_fd()) else {
                continue;
            };
            if !link_attached(&ours) {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            match meta {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match sys::obj_pin(link.fd.as_fd(), path) {
                        Ok(()) => pass.repaired.push(format!("link {name}")),
                        Err(e) => pass.problem(
                            PinProblem::RepairFailed,
                            path,
                            format!("cannot pin link {name} again at {}: {e}", path.display()),
                        ),
                    }
                }
                Err(e) => pass.problem(
                    PinProblem::RepairFailed,
                    path,
                    format!("cannot inspect {}: {e}", path.display()),
                ),
                Ok(m) => match sys::obj_get(path).and_then(|fd| sys::link_info(fd.as_fd())) {
                    Ok(info) if info.id == ours.id => {
                        self.verified.insert(path.clone(), m.ino());
                    }
                    found => pass.problem(
                        PinProblem::Replaced,
                        path,
                        format!(
                            "{} holds {}, not this agent's link (id {}); left alone, but the next agent would adopt it: `redirector detach` and restart the agent",
                            path.display(),
                            found.map_or("no BPF link".to_owned(), |i| format!("link id {}", i.id)),
                            ours.id
                        ),
                    ),
                },
            }
        }
        // Pins of links this agent no longer holds (namespaces it stopped
        // serving) are forgotten, so the map follows the served set.
        self.verified
            .retain(|path, _| links.iter().any(|l| l.pin.as_ref() == Some(path)));
        let mut expected_links = BTreeSet::new();
        for link in links {
            if let Some(name) = link.pin.as_ref().and_then(|p| p.file_name()) {
                expected_links.insert(name.to_string_lossy().into_owned());
            }
        }
        let marker_name = format!("build-{build}");
        let expected: [(PathBuf, BTreeSet<String>); 3] = [
            (
                layout.root.clone(),
                ["maps", "links", marker_name.as_str()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            (
                layout.root.join("maps"),
                SHARED_MAPS.iter().map(|s| s.to_string()).collect(),
            ),
            (layout.root.join("links"), expected_links),
        ];
        for (dir, allowed) in &expected {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if allowed.contains(e.file_name().to_string_lossy().as_ref()) {
                    continue;
                }
                let path = e.path();
                pass.problem(
                    PinProblem::ForeignEntry,
                    &path,
                    format!(
                        "{} is not part of this agent's pinned state; left alone (`redirector detach` removes it with the rest)",
                        path.display()
                    ),
                );
            }
        }
        pass
    }
}

/// Whether a link still attaches its program: a netns link reports its
/// namespace's inode, a cgroup link its cgroup's id, and both read 0 once
/// detached (the same word of `bpf_link_info`; cgroup ids start at 1).
fn link_attached(info: &sys::LinkInfo) -> bool {
    info.netns_ino != 0
}
