//! `run`'s arguments: every setting's flag, environment variable and
//! redirector.yaml key (one field each), its default (stated once), and their
//! resolution, flag > environment > file > default, into the [`Settings`] the
//! agent runs with.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use redirector_common::{DEFAULT_ADVERTISE_PORT, DEFAULT_LISTEN_PORT};
use serde::Deserialize;

use crate::{
    bpf::{Redirect, SamePort},
    config::{
        self,
        settings::{
            KubeSettings, Settings, DEFAULT_LISTENER_GRACE_SECS, DEFAULT_METRICS_ADDR,
            DEFAULT_RESYNC_SECS,
        },
        values,
    },
    discovery::role,
    error::usage,
    flows::log::FlowFormat,
    sys::netns::SELF_NETNS,
    telemetry::logging::LogFormat,
};

crate::config::layers::run_settings! {
    /// Every setting of `run`, defined once: its flag, its environment variable
    /// and its redirector.yaml key (the flag's name with `_`) come from one
    /// field. A flag wins over its environment variable, which wins over the
    /// `--config` file, which wins over the default ([`resolve`]).
    /// The same struct reads the file, strictly: an unknown key is an error.
    #[derive(Args, Debug, Clone, Default, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RunArgs {
        /// redirector.yaml: the settings of these flags as keys with `_`
        /// (`flow_ring_bytes: 65536`), and `redirects`, a list of
        /// {advertise_port, listen_port}. Flags and environment variables win
        /// over it. Unknown keys are errors.
        #[arg(long, env = "REDIRECTOR_CONFIG", value_name = "YAML")]
        #[serde(skip)]
        pub config: Option<PathBuf>,

        /// Port pairs to redirect (redirector.yaml only: a list of
        /// {advertise_port, listen_port}); no two share an advertise port.
        #[arg(skip)]
        #[serde(default, deserialize_with = "crate::config::redirect_list")]
        pub redirects: Vec<Redirect>,

        /// Port queriers dial: Tempo's `live_store.ring.instance_port`. With
        /// --listen-port, the one redirect (`redirects` and --tempo-config are
        /// then not read).
        #[arg(long, env = "REDIRECTOR_ADVERTISE_PORT", value_name = "PORT", value_parser = config::parse_port)]
        #[serde(default, deserialize_with = "crate::config::opt_port")]
        pub advertise_port: Option<u16>,

        /// Port the live-store listens on: Tempo's `server.grpc_listen_port`.
        #[arg(long, env = "REDIRECTOR_LISTEN_PORT", value_name = "PORT", value_parser = config::parse_port)]
        #[serde(default, deserialize_with = "crate::config::opt_port")]
        pub listen_port: Option<u16>,

        /// Take a redirect from Tempo's own config file: `server.grpc_listen_port`
        /// (default 9095) and `live_store.ring.instance_port` (required), in
        /// addition to `redirects`.
        #[arg(
            long,
            env = "REDIRECTOR_TEMPO_CONFIG",
            value_name = "TEMPO_YAML",
            conflicts_with_all = ["advertise_port", "listen_port"]
        )]
        #[serde(default)]
        pub tempo_config: Option<PathBuf>,

        /// Check Tempo's live-store ring every --tempo-ring-interval (on a thread of its own) and
        /// export the result as redirector_ring_* metrics: the URL of any Tempo
        /// component that serves it, e.g. http://tempo-distributor:3200/live-store/ring.
        #[arg(long, env = "REDIRECTOR_TEMPO_RING", value_name = "URL")]
        #[serde(default, deserialize_with = "crate::config::values::opt_from_str")]
        pub tempo_ring: Option<crate::ring::RingUrl>,

        /// With --tempo-ring, seconds between ring checks.
        #[arg(long, env = "REDIRECTOR_TEMPO_RING_INTERVAL", value_name = "SECS", value_parser = values::parse_interval)]
        #[serde(default, deserialize_with = "crate::config::values::opt_interval")]
        pub tempo_ring_interval: Option<u64>,

        /// Network namespace to serve, as a path: /proc/PID/ns/net or /var/run/netns/NAME.
        /// Repeat for several live-stores. Default (without --discover or --kube):
        /// the agent's own.
        #[arg(
            long = "netns",
            value_name = "PATH",
            env = "REDIRECTOR_NETNS",
            value_delimiter = ','
        )]
        #[serde(default)]
        pub netns: Vec<PathBuf>,

        /// Serve every network namespace where a Tempo live-store listens on a listen
        /// port (with hostPID: every live-store pod on the node), from the moment it
        /// calls listen(); stop serving a namespace when it disappears or its
        /// live-store stays down.
        #[arg(long, env = "REDIRECTOR_DISCOVER", value_name = "BOOL", value_parser = env_bool(), num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        #[serde(default)]
        pub discover: Option<bool>,

        /// Serve the live-store pods of this node that the Kubernetes API selects
        /// (label selector --kube-labels, on node $NODE_NAME), from their sandbox's
        /// start, before the live-store's first socket: the DaemonSet's mode.
        /// Needs get/list/watch on pods (the ClusterRole in deploy/daemonset.yaml).
        /// Excludes --discover.
        #[arg(long, env = "REDIRECTOR_KUBE", value_name = "BOOL", value_parser = env_bool(), num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        #[serde(default)]
        pub kube: Option<bool>,

        /// With --kube, the label selector of live-store pods (the default is
        /// the tempo-distributed chart's live-store labels).
        #[arg(long, env = "REDIRECTOR_KUBE_LABELS", value_name = "SELECTOR")]
        #[serde(default)]
        pub kube_labels: Option<String>,

        /// With --kube, only pods in these Kubernetes namespaces (default: all).
        #[arg(
            long,
            env = "REDIRECTOR_KUBE_NAMESPACES",
            value_name = "NAMESPACE",
            value_delimiter = ','
        )]
        #[serde(default)]
        pub kube_namespaces: Vec<String>,

        /// With --kube, this node's name (the DaemonSet sets NODE_NAME from the
        /// downward API, fieldRef spec.nodeName): only its pods are watched.
        #[arg(long, env = crate::discovery::kube::watch::NODE_NAME_ENV, value_name = "NAME")]
        #[serde(default)]
        pub node_name: Option<String>,

        /// With --kube, the cgroup holding kubelet's pod cgroups (kubepods.slice
        /// or kubepods), absolute or under the cgroup v2 mount (default: found
        /// under the mount).
        #[arg(long, env = "REDIRECTOR_KUBE_CGROUP_ROOT", value_name = "PATH")]
        #[serde(default)]
        pub kube_cgroup_root: Option<PathBuf>,

        /// With --kube, a kubeconfig file instead of the pod's ServiceAccount.
        #[arg(long, env = "REDIRECTOR_KUBECONFIG", value_name = "PATH")]
        #[serde(default)]
        pub kubeconfig: Option<PathBuf>,

        /// With --discover, the Tempo targets served: a process counts when its
        /// `-target=` flag (or `target:` in its -config.file) names one of these.
        /// `live-store,all` also serves single-binary Tempo; `any` serves every
        /// process listening on a listen port.
        #[arg(
            long,
            value_name = "TARGET",
            env = "REDIRECTOR_SERVE_TARGET",
            value_delimiter = ','
        )]
        #[serde(default)]
        pub serve_target: Vec<String>,

        /// Where `redir_sockops` (listener registration, flow records) runs: `pod`
        /// attaches it to each served live-store's pod cgroup, so other pods'
        /// connections run none of redirector's programs; `root` attaches it to
        /// the cgroup v2 root (every connection of the node pays for it), for hosts
        /// whose live-stores do not run in a cgroup of their own.
        #[arg(long, env = "REDIRECTOR_SOCK_OPS_CGROUP", value_enum)]
        #[serde(default, deserialize_with = "crate::config::values::opt_value_enum")]
        pub sock_ops_cgroup: Option<crate::bpf::sockops::Scope>,

        /// Seconds between resyncs: every served namespace's listeners checked
        /// against the kernel (spread over the interval), and, with --discover,
        /// /proc scanned for live-stores the listen events missed. New listeners
        /// are found at once by a listen() hook; this is the safety net.
        #[arg(long, env = "REDIRECTOR_RESYNC_INTERVAL", value_name = "SECS", value_parser = values::parse_interval)]
        #[serde(default, deserialize_with = "crate::config::values::opt_interval")]
        pub resync_interval: Option<u64>,

        /// With --discover, only namespaces of processes whose cgroup path contains
        /// this (or matches it as a glob with `*`/`?`), e.g. `*tempo*live-store*`.
        #[arg(long, env = "REDIRECTOR_CGROUP_PATTERN")]
        #[serde(default, deserialize_with = "crate::config::values::opt_pattern")]
        pub cgroup_pattern: Option<String>,

        /// With --discover, seconds a served namespace may have no listener before
        /// it is dropped (a live-store restarting in place keeps its namespace).
        #[arg(long, env = "REDIRECTOR_LISTENER_GRACE", value_name = "SECS")]
        #[serde(default, deserialize_with = "crate::config::values::opt_secs")]
        pub listener_grace: Option<u64>,

        /// Pin programs, links and maps under /sys/fs/bpf/redirector so redirects keep
        /// working while the agent restarts or is upgraded; the next agent adopts them.
        #[arg(long, env = "REDIRECTOR_PIN", value_name = "BOOL", value_parser = env_bool(), num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        #[serde(default)]
        pub pin: Option<bool>,

        /// Leave MPTCP on in served namespaces. By default the agent sets the
        /// namespace's net.mptcp.enabled=0 when it starts serving it, so a Go
        /// live-store (Go >= 1.24 listens with MPTCP by default) listens with plain
        /// TCP, which the kernel can redirect; it restores the old value when it
        /// stops serving the namespace.
        #[arg(long, env = "REDIRECTOR_KEEP_MPTCP", value_name = "BOOL", value_parser = env_bool(), num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        #[serde(default)]
        pub keep_mptcp: Option<bool>,

        /// Flow record format: `text` for people, `json` or `logfmt` (one record per
        /// line) for Loki, Vector or promtail. Default: text on a terminal, json otherwise.
        #[arg(long, env = "REDIRECTOR_FLOW_FORMAT", value_enum)]
        #[serde(default, deserialize_with = "crate::config::values::opt_value_enum")]
        pub flow_format: Option<FlowFormat>,

        /// Append flow records to this file instead of stdout.
        #[arg(long, env = "REDIRECTOR_FLOW_LOG", value_name = "PATH")]
        #[serde(default)]
        pub flow_log: Option<PathBuf>,

        /// Prometheus /metrics, /healthz and /readyz. `[::]:PORT` is every IPv6
        /// and IPv4 address (0.0.0.0 on a node without IPv6). Port 0 picks a
        /// free port (logged).
        #[arg(long, env = "REDIRECTOR_METRICS_ADDR", value_name = "ADDR")]
        #[serde(default)]
        pub metrics_addr: Option<std::net::SocketAddr>,

        /// Unix socket where `redirector flows` follows the flow records (mode 0600:
        /// records carry queriers' addresses, so not on the metrics port).
        #[arg(long, env = "REDIRECTOR_FLOWS_SOCKET", value_name = "PATH")]
        #[serde(default)]
        pub flows_socket: Option<PathBuf>,

        /// Size of the kernel's flow record ring buffer in bytes: a power of two, at
        /// least 4096. A record takes 112 bytes; a full ring drops (and counts) records.
        #[arg(long, env = "REDIRECTOR_FLOW_RING_BYTES", value_name = "BYTES", value_parser = values::parse_ring_bytes)]
        #[serde(default, deserialize_with = "crate::config::values::opt_ring_bytes")]
        pub flow_ring_bytes: Option<u32>,

        /// Seconds between the update records of a long-lived redirected flow
        /// (`event: update`, its byte counters so far, written on an ACK of new
        /// data once the last record is this old); 0: open and close records only.
        #[arg(long, env = "REDIRECTOR_FLOW_UPDATE_INTERVAL", value_name = "SECS")]
        #[serde(default)]
        pub flow_update_interval: Option<u64>,

        /// The agent's own log on stderr: `text` for people, `json` (one object
        /// per line) for log collectors. Coloured only on a terminal. Flow records
        /// are not log lines: see --flow-format.
        #[arg(long, env = "REDIRECTOR_LOG_FORMAT", value_enum)]
        #[serde(default, deserialize_with = "crate::config::values::opt_value_enum")]
        pub log_format: Option<LogFormat>,

        /// Read and check the configuration (flags, environment, --config,
        /// --tempo-config), print what `run` would do as JSON, and exit: nothing
        /// is loaded or attached, and no privileges are needed.
        #[arg(long)]
        #[serde(skip)]
        pub dry_run: bool,
    }
}

/// `run`'s defaults, stated once: `cli::command` shows them in `--help`, the
/// manual and completions, and [`resolve`] applies the same constants
/// where no layer sets the setting.
pub fn run_defaults() -> Vec<(&'static str, String)> {
    use crate::config::settings as s;
    use redirector_common as c;
    fn word(v: Option<clap::builder::PossibleValue>) -> String {
        v.map(|p| p.get_name().to_owned()).unwrap_or_default()
    }
    vec![
        ("advertise_port", c::DEFAULT_ADVERTISE_PORT.to_string()),
        ("listen_port", c::DEFAULT_LISTEN_PORT.to_string()),
        (
            "tempo_ring_interval",
            crate::ring::DEFAULT_INTERVAL_SECS.to_string(),
        ),
        (
            "kube_labels",
            crate::discovery::kube::watch::DEFAULT_LABELS.to_owned(),
        ),
        (
            "serve_target",
            crate::discovery::role::LIVE_STORE.to_owned(),
        ),
        (
            "sock_ops_cgroup",
            word(clap::ValueEnum::to_possible_value(
                &crate::bpf::sockops::Scope::default(),
            )),
        ),
        ("resync_interval", s::DEFAULT_RESYNC_SECS.to_string()),
        ("listener_grace", s::DEFAULT_LISTENER_GRACE_SECS.to_string()),
        ("metrics_addr", s::DEFAULT_METRICS_ADDR.to_owned()),
        (
            "flows_socket",
            crate::flows::sub::DEFAULT_FLOWS_SOCKET.to_owned(),
        ),
        ("flow_ring_bytes", c::DEFAULT_FLOW_RING_BYTES.to_string()),
        (
            "flow_update_interval",
            c::DEFAULT_FLOW_UPDATE_SECS.to_string(),
        ),
        (
            "log_format",
            word(clap::ValueEnum::to_possible_value(&LogFormat::default())),
        ),
    ]
}

/// `run` as `--help`, the manual and completions show it: with
/// [`run_defaults`] as each argument's default. The values are parsed without
/// them, so that what the command line leaves out falls to the file.
pub fn with_defaults(run: clap::Command) -> clap::Command {
    run_defaults().into_iter().fold(run, |run, (id, value)| {
        run.mut_arg(id, |a| a.default_value(value))
    })
}

/// Boolean flags read from the environment the way people write them:
/// 1/0, true/false, yes/no, on/off (clap's default takes true/false only).
fn env_bool() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

/// Merges flags and environment over the `--config` file over the defaults,
/// and validates.
pub fn resolve(args: RunArgs) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => RunArgs::default(),
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
        let listed = config::resolve_redirects(&args.redirects, args.tempo_config.as_deref())?;
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
        flows_socket,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    fn origin() -> &'static Path {
        Path::new("redirector.yaml")
    }

    fn parse(text: &str, origin: &Path) -> config::Result<RunArgs> {
        config::parse(text, origin)
    }

    fn load(path: &Path) -> config::Result<RunArgs> {
        config::load(path)
    }

    fn err(text: &str) -> String {
        let e = parse(text, origin()).unwrap_err();
        assert!(
            matches!(e, config::Error::Invalid(_)),
            "not an invalid config: {e:#}"
        );
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s}");
        s
    }

    #[test]
    fn unreadable_files_name_path_and_os_error() {
        let path = Path::new("/nonexistent/redirector-test/tempo.yaml");
        for e in [
            config::tempo_ports(path).unwrap_err(),
            load(path).unwrap_err(),
        ] {
            assert!(matches!(e, config::Error::Read { .. }), "{e}");
            let s = e.to_string();
            assert!(s.contains("/nonexistent/redirector-test/tempo.yaml"), "{s}");
            assert!(s.contains("No such file or directory"), "{s}");
        }
    }

    #[test]
    fn tempo_ports_reads_a_file() {
        let dir =
            std::env::temp_dir().join(format!("redirector-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tempo.yaml");
        std::fs::write(&path, crate::config::tests::REALISTIC_TEMPO).unwrap();
        let p = config::tempo_ports(&path).unwrap();
        std::fs::write(
            dir.join("redirector.yaml"),
            format!(
                "tempo_config: {}\nredirects:\n  - {{advertise_port: 12346, listen_port: 9096}}\n",
                path.display()
            ),
        )
        .unwrap();
        let cfg = load(&dir.join("redirector.yaml")).unwrap();
        let all = config::resolve_redirects(&cfg.redirects, cfg.tempo_config.as_deref()).unwrap();
        std::fs::write(
            dir.join("conflict.yaml"),
            format!(
                "tempo_config: {}\nredirects:\n  - {{advertise_port: 12345, listen_port: 9096}}\n",
                path.display()
            ),
        )
        .unwrap();
        let conflict = {
            let cfg = load(&dir.join("conflict.yaml")).unwrap();
            config::resolve_redirects(&cfg.redirects, cfg.tempo_config.as_deref())
        };
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((p.listen_port, p.advertise_port), (9095, 12345));
        assert_eq!(
            all,
            vec![
                Redirect {
                    advertise_port: 12346,
                    listen_port: 9096
                },
                Redirect {
                    advertise_port: 12345,
                    listen_port: 9095
                },
            ]
        );
        let e = conflict.unwrap_err().to_string();
        assert!(
            e.contains("advertise port 12345 goes to listen port 9096"),
            "{e}"
        );
    }

    #[test]
    fn full_config() {
        let cfg = parse(
            r#"
# redirector.yaml
redirects:
  - advertise_port: 12345
    listen_port: 9095
  - {advertise_port: 12346, listen_port: 9096}
netns: [/var/run/netns/live-store-0, /proc/4242/ns/net]
discover: true
cgroup_pattern: "*tempo-live-store*"
pin: true
flow_format: logfmt
flow_log: /var/log/redirector/flows.log
metrics_addr: 0.0.0.0:9464
flows_socket: /run/redirector/flows.sock
tempo_config: /etc/tempo/tempo.yaml
tempo_ring: http://tempo-distributor:3200/live-store/ring
"#,
            origin(),
        )
        .unwrap();
        assert_eq!(
            cfg,
            RunArgs {
                redirects: vec![
                    Redirect {
                        advertise_port: 12345,
                        listen_port: 9095
                    },
                    Redirect {
                        advertise_port: 12346,
                        listen_port: 9096
                    },
                ],
                netns: vec![
                    PathBuf::from("/var/run/netns/live-store-0"),
                    PathBuf::from("/proc/4242/ns/net")
                ],
                discover: Some(true),
                cgroup_pattern: Some("*tempo-live-store*".into()),
                pin: Some(true),
                keep_mptcp: None,
                flow_format: Some(FlowFormat::Logfmt),
                flow_log: Some(PathBuf::from("/var/log/redirector/flows.log")),
                metrics_addr: Some("0.0.0.0:9464".parse().unwrap()),
                flows_socket: Some(PathBuf::from("/run/redirector/flows.sock")),
                tempo_config: Some(PathBuf::from("/etc/tempo/tempo.yaml")),
                tempo_ring: Some(
                    crate::ring::RingUrl::parse("http://tempo-distributor:3200/live-store/ring")
                        .unwrap()
                ),
                ..RunArgs::default()
            }
        );
        for (text, want) in [("text", FlowFormat::Text), ("json", FlowFormat::Json)] {
            let cfg = parse(&format!("flow_format: {text}\n"), origin()).unwrap();
            assert_eq!(cfg.flow_format, Some(want));
        }
    }

    #[test]
    fn empty_config_is_all_defaults() {
        for text in ["", "\n", "# nothing yet\n", "---\n"] {
            assert_eq!(
                parse(text, origin()).unwrap(),
                RunArgs::default(),
                "{text:?}"
            );
        }
        assert_eq!(
            parse("redirects:\nnetns:\n", origin()).unwrap(),
            RunArgs::default()
        );
    }

    #[test]
    fn unknown_field_is_an_error_with_position() {
        let e = err("pin: true\ndiscover: false\nfoo: 1\n");
        assert!(
            e.starts_with("redirector.yaml:3:1: unknown field `foo`, expected one of `redirects`"),
            "{e}"
        );
        let e =
            err("redirects:\n  - advertise_port: 12345\n    listen_port: 9095\n    listen: 1\n");
        assert!(
            e.starts_with("redirector.yaml:4:5: redirects[0]: unknown field `listen`, expected `advertise_port` or `listen_port`"),
            "{e}"
        );
    }

    #[test]
    fn type_errors_have_positions() {
        let e = err("pin: maybe\n");
        assert!(
            e.starts_with(
                "redirector.yaml:1:6: pin: invalid type: string \"maybe\", expected a boolean"
            ),
            "{e}"
        );
        let e = err("flow_format: xml\n");
        assert!(e.starts_with("redirector.yaml:1:14: flow_format: unknown variant `xml`, expected one of `text`, `json`, `logfmt`"), "{e}");
        let e = err("metrics_addr: 9464\n");
        assert!(e.starts_with("redirector.yaml:1:15: metrics_addr:"), "{e}");
        let e = err("netns: /var/run/netns/a\n");
        assert!(
            e.starts_with("redirector.yaml:1:8: netns: invalid type"),
            "{e}"
        );
        let e = err("cgroup_pattern: \"\"\n");
        assert!(e.contains("cgroup_pattern is empty"), "{e}");
        let e = err("- 1\n");
        assert!(e.starts_with("redirector.yaml:1:1:"), "{e}");
    }

    #[test]
    fn redirect_ports_are_validated() {
        let e = err("redirects:\n  - advertise_port: 0\n    listen_port: 9095\n");
        assert!(
            e.starts_with(
                "redirector.yaml:2:21: redirects[0].advertise_port: port 0 is out of range"
            ),
            "{e}"
        );
        let e = err("redirects:\n  - {advertise_port: 12345, listen_port: 65536}\n");
        assert!(
            e.contains("redirects[0].listen_port: port 65536 is out of range"),
            "{e}"
        );
        let e = err("redirects:\n  - {advertise_port: twelve, listen_port: 9095}\n");
        assert!(
            e.contains("redirects[0].advertise_port: `twelve` is not a port number"),
            "{e}"
        );
        let e = err("redirects:\n  - {advertise_port: 12345}\n");
        assert!(
            e.contains("redirects[0]: missing field `listen_port`"),
            "{e}"
        );
    }

    #[test]
    fn equal_ports_in_a_redirect_is_an_error() {
        let e = err("redirects:\n  - {advertise_port: 12345, listen_port: 9095}\n  - advertise_port: 9096\n    listen_port: 9096\n");
        assert!(
            e.starts_with(
                "redirector.yaml:3:5: redirects[1]: advertise_port and listen_port are both 9096"
            ),
            "{e}"
        );
    }

    #[test]
    fn duplicate_advertise_ports_are_an_error() {
        let e = err("redirects:\n  - {advertise_port: 12345, listen_port: 9095}\n  - {advertise_port: 12345, listen_port: 9096}\n");
        assert!(
            e.starts_with(
                "redirector.yaml:3:5: redirects[1]: advertise_port 12345 appears more than once"
            ),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_is_one_line_with_position() {
        let e = err("pin: true\n  discover: [\n");
        assert!(e.starts_with("redirector.yaml:"), "{e}");
        let parts: Vec<&str> = e.splitn(4, ':').collect();
        assert!(parts[1].parse::<usize>().is_ok(), "{e}");
        assert!(parts[2].parse::<usize>().is_ok(), "{e}");
        assert!(
            !parts[3].contains(" at line "),
            "location left in the message: {e}"
        );
    }

    /// The shipped deployment files must satisfy the real schema, not only the
    /// copy of it in tests/tests/deploy.rs.
    #[test]
    fn deploy_files_are_valid() {
        let tempo = config::parse_tempo(
            include_str!("../../../../deploy/tempo-config.yaml"),
            Path::new("deploy/tempo-config.yaml"),
        )
        .unwrap();
        let manifests = include_str!("../../../../deploy/daemonset.yaml");
        let embedded: Vec<String> = yaml_serde::Deserializer::from_str(manifests)
            .map(|doc| yaml_serde::Value::deserialize(doc).unwrap())
            .filter(|doc| doc.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap"))
            .filter_map(|doc| {
                doc.get("data")?
                    .get("redirector.yaml")?
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(embedded.len(), 1);
        let cfg = parse(&embedded[0], Path::new("ConfigMap redirector.yaml")).unwrap();
        assert!(cfg.redirects.contains(&Redirect {
            advertise_port: tempo.advertise_port,
            listen_port: tempo.listen_port,
        }));
    }

    /// The keys the flags had no key for until the settings were defined once,
    /// and every other flag's: each reads as its flag does.
    #[test]
    fn every_setting_has_its_key() {
        use crate::bpf::sockops::Scope;
        let cfg = parse(
            r#"
advertise_port: 12346
listen_port: 9096
tempo_ring_interval: 5
kube: false
kube_labels: app=live-store
kube_namespaces: [tempo, tempo-2]
node_name: node-1
kube_cgroup_root: /sys/fs/cgroup/kubepods.slice
kubeconfig: /etc/kubeconfig
serve_target: [live-store, all]
sock_ops_cgroup: root
resync_interval: 10
listener_grace: 0
keep_mptcp: true
flow_ring_bytes: 65536
log_format: json
"#,
            origin(),
        )
        .unwrap();
        assert_eq!(
            cfg,
            RunArgs {
                advertise_port: Some(12346),
                listen_port: Some(9096),
                tempo_ring_interval: Some(5),
                kube: Some(false),
                kube_labels: Some("app=live-store".into()),
                kube_namespaces: vec!["tempo".into(), "tempo-2".into()],
                node_name: Some("node-1".into()),
                kube_cgroup_root: Some(PathBuf::from("/sys/fs/cgroup/kubepods.slice")),
                kubeconfig: Some(PathBuf::from("/etc/kubeconfig")),
                serve_target: vec!["live-store".into(), "all".into()],
                sock_ops_cgroup: Some(Scope::Root),
                resync_interval: Some(10),
                listener_grace: Some(0),
                keep_mptcp: Some(true),
                flow_ring_bytes: Some(65536),
                log_format: Some(LogFormat::Json),
                ..RunArgs::default()
            }
        );
    }

    #[test]
    fn new_keys_are_checked_as_their_flags_are() {
        let e = err("flow_ring_bytes: 1000\n");
        assert!(
            e.starts_with("redirector.yaml:1:18: flow_ring_bytes: `1000` is not a valid ring size"),
            "{e}"
        );
        let e = err("resync_interval: 0\n");
        assert!(
            e.starts_with("redirector.yaml:1:18: resync_interval: 0 is not an interval"),
            "{e}"
        );
        let e = err("listener_grace: -1\n");
        assert!(e.contains("listener_grace: -1 is negative"), "{e}");
        let e = err("sock_ops_cgroup: node\n");
        assert!(
            e.starts_with("redirector.yaml:1:18: sock_ops_cgroup: unknown variant `node`, expected one of `pod`, `root`"),
            "{e}"
        );
        let e = err("log_format: logfmt\n");
        assert!(
            e.contains("log_format: unknown variant `logfmt`, expected one of `text`, `json`"),
            "{e}"
        );
        let e = err("tempo_ring: https://tempo:3200/live-store/ring\n");
        assert!(
            e.starts_with("redirector.yaml:1:13: tempo_ring: `https://tempo:3200/live-store/ring`: https is not supported"),
            "{e}"
        );
        let e = err("advertise_port: 0\n");
        assert!(e.contains("advertise_port: port 0 is out of range"), "{e}");
        let e = err("discover: yes please\n");
        assert!(
            e.starts_with("redirector.yaml:1:11: discover: invalid type"),
            "{e}"
        );
    }
}
