//! From a socket's cgroup id (sock_diag, or the listen event) to the cgroup
//! `sock_ops` is attached to: the live-store's pod.
//!
//! A cgroup v2 id is the inode number of its directory, whatever cgroup or
//! PID namespace the agent runs in, so ids are resolved by walking the
//! mounted hierarchy (once, and again only when an id is unknown) rather than
//! through /proc/PID/cgroup paths, which are relative to the reader's cgroup
//! namespace.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use procfs_core::{FromRead, ProcessCGroup, ProcessCGroups};

/// A walk of the whole hierarchy costs milliseconds on a node with a
/// thousand pods: an unknown id (a cgroup removed meanwhile) may not trigger
/// one more often than this.
const MIN_WALK_INTERVAL: Duration = Duration::from_millis(50);

pub struct CgroupIndex {
    mount: PathBuf,
    by_id: HashMap<u64, PathBuf>,
    last_walk: Option<Instant>,
}

impl CgroupIndex {
    pub fn new(mount: PathBuf) -> Self {
        Self {
            mount,
            by_id: HashMap::new(),
            last_walk: None,
        }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The directory of cgroup `id`: known, or the cgroup of one of `hint`'s
    /// processes (read from /proc/PID/cgroup, checked by inode), or found by
    /// walking the hierarchy again.
    pub fn path_of(&mut self, id: u64, hint: &[i32]) -> Option<PathBuf> {
        if id == 0 {
            return None;
        }
        match self.by_id.get(&id) {
            Some(p) if p.is_dir() => return Some(p.clone()),
            // Removed (its pod went): ids are never reused, so forget it.
            Some(_) => {
                self.by_id.remove(&id);
            }
            None => {}
        }
        for pid in hint {
            let cgroups = of_pid(*pid);
            let Some(rel) = unified(&cgroups) else {
                continue;
            };
            let path = self.mount.join(rel.trim_start_matches('/'));
            // A path relative to another cgroup namespace names another
            // directory, or none: only an inode match counts.
            if fs::metadata(&path).is_ok_and(|m| m.ino() == id) {
                self.by_id.insert(id, path.clone());
                return Some(path);
            }
        }
        // Walked a moment ago and not there (a cgroup already removed): the
        // next resync looks again, rather than walking once per listener.
        if self
            .last_walk
            .is_some_and(|t| t.elapsed() < MIN_WALK_INTERVAL)
        {
            return None;
        }
        self.walk();
        self.by_id.get(&id).cloned()
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        self.by_id.clear();
        let mut stack = vec![self.mount.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            self.by_id.insert(meta.ino(), dir.clone());
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                // Cgroups are the directories; the files are their controls.
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }

    /// Where `sock_ops` should run for a listener in cgroup `path`: the
    /// nearest ancestor that is a Kubernetes pod cgroup (so a container
    /// restarted in the same pod is covered from its first listen()), else
    /// the listener's own cgroup. `None` for the hierarchy's root: attaching
    /// there would tax every connection of the node.
    pub fn scope_of(&self, path: &Path) -> Option<PathBuf> {
        let rel = path.strip_prefix(&self.mount).ok()?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        let mut pod = None;
        let mut at = self.mount.clone();
        for part in rel.components() {
            at.push(part);
            if is_pod_cgroup(&part.as_os_str().to_string_lossy()) {
                pod = Some(at.clone());
            }
        }
        Some(pod.unwrap_or_else(|| path.to_owned()))
    }
}

/// The cgroups of process `pid`, from /proc/PID/cgroup (written by the
/// kernel, not the pod); empty once the process has exited.
pub fn of_pid(pid: i32) -> Vec<ProcessCGroup> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|text| parse(&text))
        .unwrap_or_default()
}

/// /proc/PID/cgroup's lines (`hierarchy:controllers:path`), parsed by
/// procfs; nothing if the kernel wrote something else.
fn parse(text: &str) -> Vec<ProcessCGroup> {
    ProcessCGroups::from_read(text.as_bytes()).map_or_else(|_| Vec::new(), |c| c.0)
}

/// The cgroup v2 path among `cgroups` (the `0::PATH` line).
pub fn unified(cgroups: &[ProcessCGroup]) -> Option<&str> {
    cgroups
        .iter()
        .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
        .map(|c| c.pathname.as_str())
}

/// The Kubernetes pod a cgroup v2 path (as in /proc/PID/cgroup) belongs to:
/// the path of its pod cgroup, `None` outside any pod.
pub fn pod_of(path: &str) -> Option<&str> {
    let mut end = None;
    let mut at = 0;
    for part in path.split('/') {
        at += part.len();
        if is_pod_cgroup(part) {
            end = Some(at);
        }
        at += 1;
    }
    end.map(|e| &path[..e])
}

/// Kubelet names a pod's cgroup after the pod UID: `pod<uid>` with the
/// cgroupfs driver, `kubepods-<qos>-pod<uid_with_underscores>.slice` with the
/// systemd driver.
pub fn is_pod_cgroup(name: &str) -> bool {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let Some(at) = name.rfind("pod") else {
        return false;
    };
    if at > 0 && !name[..at].ends_with('-') {
        return false;
    }
    let uid = &name[at + 3..];
    uid.len() == 36
        && uid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-' || c == '_',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_pid_cgroup() {
        let v1_and_v2 = "12:pids:/kubepods/pod1\n1:name=systemd:/x\n0::/a:b/c\n";
        let cgroups = parse(v1_and_v2);
        assert_eq!(cgroups.len(), 3);
        assert_eq!(cgroups[0].controllers, ["pids"]);
        assert_eq!(cgroups[1].pathname, "/x");
        // The path is everything after the second colon.
        assert_eq!(unified(&cgroups), Some("/a:b/c"));
        assert_eq!(unified(&parse("3:cpu,cpuacct:/k\n")), None);
        assert!(parse("garbage\n").is_empty());
        assert!(parse("").is_empty());

        // Ours, as the kernel writes it: the same path as the `0::` line.
        let text = fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let line = text.lines().find_map(|l| l.strip_prefix("0::"));
        let me = of_pid(std::process::id() as i32);
        assert_eq!(unified(&me), line);
        assert_eq!(me.len(), text.lines().count());
        assert!(of_pid(i32::MAX).is_empty(), "no such process");
    }

    #[test]
    fn pod_of_a_container_cgroup() {
        let uid = "pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let path = format!("/kubepods/burstable/{uid}/ctr");
        assert_eq!(
            pod_of(&path),
            Some(format!("/kubepods/burstable/{uid}").as_str())
        );
        assert_eq!(pod_of("/system.slice/ssh.service"), None);
        assert_eq!(pod_of("/"), None);
    }

    #[test]
    fn recognises_pod_cgroups_of_both_kubelet_drivers() {
        assert!(is_pod_cgroup("pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
        assert!(is_pod_cgroup(
            "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"
        ));
        assert!(!is_pod_cgroup("kubepods-burstable.slice"));
        assert!(!is_pod_cgroup(
            "cri-containerd-0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0.scope"
        ));
        assert!(!is_pod_cgroup("tempo.service"));
        assert!(!is_pod_cgroup("ipod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
    }

    #[test]
    fn scope_is_the_pod_above_a_container_or_the_cgroup_itself() {
        let index = CgroupIndex::new(PathBuf::from("/sys/fs/cgroup"));
        let pod = "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        let ctr = format!("{pod}/cri-containerd-abc.scope");
        assert_eq!(index.scope_of(Path::new(&ctr)), Some(PathBuf::from(pod)));
        assert_eq!(index.scope_of(Path::new(pod)), Some(PathBuf::from(pod)));
        let svc = Path::new("/sys/fs/cgroup/system.slice/tempo.service");
        assert_eq!(index.scope_of(svc), Some(svc.to_owned()));
        assert_eq!(index.scope_of(Path::new("/sys/fs/cgroup")), None);
        assert_eq!(index.scope_of(Path::new("/elsewhere")), None);
    }
}
