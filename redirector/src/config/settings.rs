//! What `redirector run` does: the settings the agent runs with, once the
//! flags and environment, the `--config` file and the defaults are merged (in
//! that order of precedence, see `config::layers`; `run`'s arguments resolve
//! into these). Nothing here knows the command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    bpf::{sockops::Scope, Redirect},
    flows::log::FlowFormat,
    telemetry::logging::LogFormat,
};

/// This node only: a command run by hand opens nothing to the network. The
/// DaemonSet asks for `[::]:9464` (every address, dual-stack; `0.0.0.0` on a
/// node without IPv6, see `telemetry::serve`).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
pub const DEFAULT_LISTENER_GRACE_SECS: u64 = 60;
pub const DEFAULT_RESYNC_SECS: u64 = 30;

/// Where `--kube` finds its pods.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    pub labels: String,
    pub namespaces: Vec<String>,
    /// None: the pod's ServiceAccount (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// This node (`NODE_NAME`); checked when the agent starts.
    pub node: Option<String>,
    /// Where kubelet's pod cgroups are; None: looked for.
    pub cgroup_root: Option<PathBuf>,
}

/// Everything `run` needs, after flags, the config file and defaults are merged.
pub struct Settings {
    pub redirects: Vec<Redirect>,
    pub netns: Vec<PathBuf>,
    pub discover: bool,
    /// `--kube`: pods selected by the Kubernetes API.
    pub kube: Option<KubeSettings>,
    pub cgroup_pattern: Option<String>,
    /// Tempo targets discovery serves (`any`: every listener).
    pub serve_targets: Vec<String>,
    pub sock_ops_cgroup: Scope,
    pub resync_interval: Duration,
    pub listener_grace: Duration,
    pub pin: bool,
    pub keep_mptcp: bool,
    /// Tempo's live-store ring page, checked every `tempo_ring_interval`.
    pub tempo_ring: Option<crate::ring::RingUrl>,
    pub tempo_ring_interval: Duration,
    pub flow_format: Option<FlowFormat>,
    pub flow_log: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    pub flow_ring_bytes: u32,
    /// Between a long-lived flow's update records (zero: none).
    pub flow_update_interval: Duration,
    /// The agent's own log (stderr).
    pub log_format: LogFormat,
    /// Where `redirector flows` subscribers connect.
    pub flows_socket: PathBuf,
}

impl Settings {
    /// What `run` would do, for `run --dry-run`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "redirects": self.redirects.iter().map(|r| serde_json::json!({
                "advertise_port": r.advertise_port,
                "listen_port": r.listen_port,
            })).collect::<Vec<_>>(),
            "netns": self.netns,
            "discover": self.discover,
            "kube": self.kube.as_ref().map(|k| serde_json::json!({
                "labels": k.labels,
                "namespaces": k.namespaces,
                "kubeconfig": k.kubeconfig,
                "node": k.node,
                "cgroup_root": k.cgroup_root,
            })),
            "cgroup_pattern": self.cgroup_pattern,
            "serve_targets": self.serve_targets,
            "sock_ops_cgroup": self.sock_ops_cgroup,
            "resync_interval_secs": self.resync_interval.as_secs(),
            "listener_grace_secs": self.listener_grace.as_secs(),
            "pin": self.pin,
            "keep_mptcp": self.keep_mptcp,
            "tempo_ring": self.tempo_ring.as_ref().map(|u| u.to_string()),
            "tempo_ring_interval_secs": self.tempo_ring_interval.as_secs(),
            "flow_format": self.flow_format.map(|f| format!("{f:?}").to_lowercase()),
            "flow_log": self.flow_log,
            "metrics_addr": self.metrics_addr.to_string(),
            "flow_ring_bytes": self.flow_ring_bytes,
            "flow_update_interval_secs": self.flow_update_interval.as_secs(),
            "log_format": self.log_format,
            "flows_socket": self.flows_socket,
            "state_file": self.state_file(),
        })
    }

    /// What the agent serves and why, for `redirector status`: next to the
    /// flows socket.
    pub fn state_file(&self) -> PathBuf {
        state_file(&self.flows_socket)
    }

    pub fn listen_ports(&self) -> Vec<u16> {
        self.redirects.iter().map(|r| r.listen_port).collect()
    }
}

/// The agent's state file, in the directory of its flows socket
/// (/run/redirector/agent.json by default).
pub fn state_file(flows_socket: &std::path::Path) -> PathBuf {
    flows_socket.with_file_name(STATE_FILE_NAME)
}

const STATE_FILE_NAME: &str = "agent.json";
