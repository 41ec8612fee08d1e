//! What `redirector run` does, resolved from its flags and environment, the
//! `--config` file and the defaults, in that order of precedence (see
//! `config::layers`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use redirector_common::{DEFAULT_ADVERTISE_PORT, DEFAULT_LISTEN_PORT};

use crate::{
    bpf::sockops::Scope,
    cli::RunArgs,
    config::{self, FileConfig},
    config::{Redirect, SamePort},
    discovery::netns::SELF_NETNS,
    discovery::role,
    flows::log::FlowFormat,
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
    pub log_format: crate::commands::logging::LogFormat,
    /// Where `redirector flows` subscribers connect.
    pub flows_socket: PathBuf,
    /// What the agent serves and why, for `redirector status`: next to the
    /// flows socket.
    pub state_file: PathBuf,
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
            "state_file": self.state_file,
        })
    }

    pub fn listen_ports(&self) -> Vec<u16> {
        self.redirects.iter().map(|r| r.listen_port).collect()
    }
}

pub use crate::error::usage;

/// The agent's state file, in the directory of its flows socket
/// (/run/redirector/agent.json by default).
pub fn state_file(flows_socket: &std::path::Path) -> PathBuf {
    flows_socket.with_file_name(STATE_FILE_NAME)
}

const STATE_FILE_NAME: &str = "agent.json";

/// Merges flags and environment over the `--config` file over the defaults,
/// and validates.
pub fn resolve(args: RunArgs) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => FileConfig::default(),
    };
    let args = args.over(file);
    let redirects: Vec<Redirect> = if args.advertise_port.is_some() || args.listen_port.is_some() {
        let flags = Redirect::new(
            args.advertise_port.unwrap_or(DEFAULT_ADVERTISE_PORT),
            args.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
        )
        .map_err(|SamePort(port)| {
            usage(format!(
                "--advertise-port and --listen-port (advertise_port, listen_port) are both {port}: the advertised port must differ from the port the live-store listens on"
            ))
        })?;
        vec![flags]
    } else {
        let listed = config::resolve_redirects(&args)?;
        if listed.is_empty() {
            vec![Redirect {
                advertise_port: DEFAULT_ADVERTISE_PORT,
                listen_port: DEFAULT_LISTEN_PORT,
            }]
        } else {
            listed
        }
    };
    let discover = args.discover.unwrap_or(false);
    let kube_on = args.kube.unwrap_or(false);
    if !kube_on
        && (args.kube_labels.is_some()
            || !args.kube_namespaces.is_empty()
            || args.kubeconfig.is_some()
            || args.kube_cgroup_root.is_some())
    {
        return Err(usage(
            "--kube-labels, --kube-namespaces, --kube-cgroup-root and --kubeconfig (kube_labels, kube_namespaces, kube_cgroup_root, kubeconfig) only apply with --kube (kube: true)"
                .to_owned(),
        ));
    }
    if kube_on && discover {
        return Err(usage(
            "--kube and --discover (kube: true, discover: true) exclude each other: the API selects the pods, or their processes do"
                .to_owned(),
        ));
    }
    let kube = kube_on.then(|| KubeSettings {
        labels: args
            .kube_labels
            .clone()
            .unwrap_or_else(|| crate::discovery::kube::watch::DEFAULT_LABELS.to_owned()),
        namespaces: args.kube_namespaces.clone(),
        kubeconfig: args.kubeconfig.clone(),
        node: args.node_name.clone(),
        cgroup_root: args.kube_cgroup_root.clone(),
    });
    let cgroup_pattern = args.cgroup_pattern;
    if !discover {
        for (set, what) in [
            (
                cgroup_pattern.is_some(),
                "--cgroup-pattern (cgroup_pattern)",
            ),
            (
                !args.serve_target.is_empty(),
                "--serve-target (serve_target)",
            ),
            (
                args.listener_grace.is_some(),
                "--listener-grace (listener_grace)",
            ),
        ] {
            if set {
                return Err(usage(format!(
                    "{what} only applies with --discover (discover: true)"
                )));
            }
        }
    }
    let serve_targets = if args.serve_target.is_empty() {
        vec![role::LIVE_STORE.to_owned()]
    } else {
        args.serve_target
            .iter()
            .map(|t| t.trim().to_owned())
            .collect()
    };
    if let Some(bad) = serve_targets.iter().find(|t| {
        t.is_empty()
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }) {
        return Err(usage(format!(
            "--serve-target (serve_target) {bad:?} is not a Tempo target name (e.g. live-store, all, or any)"
        )));
    }
    let mut netns = args.netns;
    if netns.is_empty() && !discover && kube.is_none() {
        netns.push(PathBuf::from(SELF_NETNS));
    }
    let flows_socket = args
        .flows_socket
        .unwrap_or_else(|| PathBuf::from(crate::flows::sub::DEFAULT_FLOWS_SOCKET));
    let metrics_addr = match args.metrics_addr {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR
            .parse()
            .context("default metrics address")?,
    };
    Ok(Settings {
        redirects,
        netns,
        discover,
        kube,
        cgroup_pattern,
        serve_targets,
        sock_ops_cgroup: args.sock_ops_cgroup.unwrap_or_default(),
        resync_interval: Duration::from_secs(args.resync_interval.unwrap_or(DEFAULT_RESYNC_SECS)),
        listener_grace: Duration::from_secs(
            args.listener_grace.unwrap_or(DEFAULT_LISTENER_GRACE_SECS),
        ),
        pin: args.pin.unwrap_or(false),
        keep_mptcp: args.keep_mptcp.unwrap_or(false),
        tempo_ring: args.tempo_ring,
        tempo_ring_interval: Duration::from_secs(
            args.tempo_ring_interval
                .unwrap_or(crate::ring::DEFAULT_INTERVAL_SECS),
        ),
        flow_format: args.flow_format,
        flow_log: args.flow_log,
        metrics_addr,
        flow_ring_bytes: args
            .flow_ring_bytes
            .unwrap_or(redirector_common::DEFAULT_FLOW_RING_BYTES),
        flow_update_interval: Duration::from_secs(
            args.flow_update_interval
                .unwrap_or(redirector_common::DEFAULT_FLOW_UPDATE_SECS),
        ),
        log_format: args.log_format.unwrap_or_default(),
        state_file: state_file(&flows_socket),
        flows_socket,
    })
}
