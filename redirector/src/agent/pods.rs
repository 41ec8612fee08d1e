//! `--kube`: the served set follows the Kubernetes API, not the processes.
//!
//! The API says which pods of this node are live-stores before any of their
//! containers starts (`discovery::kube::watch`); the pod's cgroup and its
//! sandbox process, hence its network namespace, are found the moment they
//! exist (`discovery::kube::sandbox`). The namespace is served then, with
//! MPTCP off and `sock_ops` on the pod cgroup, while only the sandbox runs:
//! the live-store's first socket is a plain TCP one, registered at listen()
//! in the kernel, and its first connection is redirected.
//!
//! A pod stays served while the API lists it and its sandbox lives, through
//! container restarts; the API being unreachable changes nothing served.

use std::{collections::HashMap, path::PathBuf};

use super::{Agent, Origin};
use crate::discovery::{
    kube::{
        sandbox::{LocatorEvent, Sandbox},
        watch::{PodEvent, PodInfo},
    },
    podfs::sanitize,
};
use crate::sys::netns::Netns;

/// What the loop asks of the sandbox locator after an API event.
#[derive(Debug, PartialEq, Eq)]
pub enum Look {
    For(String),
    Stop(String),
}

/// A pod the API selected.
pub struct Pod {
    pub info: PodInfo,
    /// Its namespace's cookie once its sandbox was found and served.
    pub cookie: Option<u64>,
}

impl Pod {
    /// `namespace/name`, escaped and capped for logs and status.
    pub fn label(&self) -> String {
        label(&self.info)
    }
}

fn label(info: &PodInfo) -> String {
    format!(
        "{}/{}",
        sanitize(&info.namespace, 253),
        sanitize(&info.name, 253)
    )
}

/// The pods selected, by UID.
#[derive(Default)]
pub struct Pods {
    pub by_uid: HashMap<String, Pod>,
    /// The API is reachable: set by a list, cleared by a watch error.
    pub synced: bool,
}

impl Agent {
    /// An event of the Pod watch. Returns what the locator should look for
    /// or stop looking for.
    pub fn on_pod_event(&mut self, event: PodEvent) -> Vec<Look> {
        let mut looks = Vec::new();
        match event {
            PodEvent::Applied(info) => self.pod_applied(info, &mut looks),
            PodEvent::Deleted(info) => self.pod_gone(&info.uid, "deleted from the API", &mut looks),
            PodEvent::Synced { scope, pods } => {
                self.pods.synced = true;
                let listed: std::collections::HashSet<&str> =
                    pods.iter().map(|p| p.uid.as_str()).collect();
                // Served pods in this list's scope that it no longer has were
                // deleted while the watch was down.
                let stale: Vec<String> = self
                    .pods
                    .by_uid
                    .values()
                    .filter(|p| scope.as_ref().is_none_or(|ns| *ns == p.info.namespace))
                    .filter(|p| !listed.contains(p.info.uid.as_str()))
                    .map(|p| p.info.uid.clone())
                    .collect();
                for uid in stale {
                    self.pod_gone(&uid, "no longer listed by the API", &mut looks);
                }
                for info in pods {
                    self.pod_applied(info, &mut looks);
                }
            }
            PodEvent::Error(e) => {
                if self.pods.synced {
                    tracing::warn!(
                        "Kubernetes API: {}; {} pod(s) stay served until it answers again",
                        sanitize(&e, 512),
                        self.pods
                            .by_uid
                            .values()
                            .filter(|p| p.cookie.is_some())
                            .count()
                    );
                }
                self.pods.synced = false;
            }
        }
        self.dirty = true;
        looks
    }

    fn pod_applied(&mut self, info: PodInfo, looks: &mut Vec<Look>) {
        match self.pods.by_uid.get_mut(&info.uid) {
            Some(pod) => pod.info = info,
            None => {
                tracing::info!(
                    "pod {} (uid {}) selected: serving it from its sandbox on",
                    label(&info),
                    sanitize(&info.uid, 64)
                );
                looks.push(Look::For(info.uid.clone()));
                self.pods
                    .by_uid
                    .insert(info.uid.clone(), Pod { info, cookie: None });
            }
        }
    }

    fn pod_gone(&mut self, uid: &str, why: &str, looks: &mut Vec<Look>) {
        let Some(pod) = self.pods.by_uid.remove(uid) else {
            return;
        };
        looks.push(Look::Stop(uid.to_owned()));
        if let Some(cookie) = pod.cookie {
            self.drop_namespace(cookie, &format!("pod {} {why}", pod.label()));
        }
    }

    /// An event of the sandbox locator.
    pub fn on_sandbox(&mut self, event: LocatorEvent) {
        match event {
            LocatorEvent::CgroupReady {
                pod_uid, cgroup, ..
            } => {
                if let Some(pod) = self.pods.by_uid.get(&pod_uid) {
                    tracing::debug!("pod {}: cgroup {}", pod.label(), cgroup.display());
                }
            }
            LocatorEvent::Found(sandbox) => self.serve_sandbox(sandbox),
            LocatorEvent::Gone { pod_uid } => {
                let cookie = self
                    .pods
                    .by_uid
                    .get_mut(&pod_uid)
                    .and_then(|p| p.cookie.take());
                if let Some(cookie) = cookie {
                    self.drop_namespace(cookie, "its pod cgroup was removed");
                }
            }
        }
        self.dirty = true;
    }

    /// Serves a selected pod's sandbox namespace before its containers
    /// start: `sock_ops` on the pod cgroup, the redirects, MPTCP off, then
    /// `sk_lookup`.
    fn serve_sandbox(&mut self, sandbox: Sandbox) {
        let Some(pod) = self.pods.by_uid.get(&sandbox.pod_uid) else {
            return;
        };
        let label = pod.label();
        let path = PathBuf::from(format!("/proc/{}/ns/net", sandbox.pid));
        let netns = match Netns::open(&path) {
            Ok(n) if n.inode() == sandbox.netns_ino => n,
            // The sandbox exited since: its replacement is reported anew.
            Ok(_) | Err(_) => return,
        };
        let cookie = netns.cookie;
        if pod.cookie == Some(cookie) {
            return;
        }
        // A new sandbox (kubelet recreated it): the old namespace went with
        // the old one.
        if let Some(old) = pod.cookie {
            self.drop_namespace(old, &format!("pod {label} has a new sandbox"));
        }
        if self.origins.contains_key(&cookie) {
            return;
        }
        let ino = sandbox.netns_ino;
        // sock_ops first: from the moment sk_lookup redirects, a listen() in
        // the pod is registered in the kernel as it happens.
        if let Err(e) = self.datapath.attach_sock_ops(&sandbox.cgroup, cookie) {
            tracing::warn!(
                "pod {label}: sock_ops on {}: {e:#} (its first listener is registered from its bind instead, milliseconds later; no flow records)",
                sandbox.cgroup.display()
            );
        }
        if let Err(e) = self.serve(netns, &[sandbox.pid]) {
            tracing::warn!("serving pod {label} (net:[{ino}]): {e:#}");
            self.datapath.release_sock_ops(cookie);
            return;
        }
        tracing::info!(
            "serving pod {label} in net:[{ino}] (sandbox pid {})",
            sandbox.pid
        );
        self.origins.insert(
            cookie,
            Origin::Pod {
                ino,
                uid: sandbox.pod_uid.clone(),
                label,
            },
        );
        if let Some(pod) = self.pods.by_uid.get_mut(&sandbox.pod_uid) {
            pod.cookie = Some(cookie);
        }
        self.watch(cookie, sandbox.pid);
    }
}
