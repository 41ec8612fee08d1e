//! Command line: `--help` is the manual, so every flag says what it maps to.

use std::path::PathBuf;

use crate::flows::log::FlowFormat;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(
    name = "redirector",
    version,
    about = "Sidecar-proxy semantics for Grafana Tempo live-stores, in the kernel",
    long_about = "Sidecar-proxy semantics for Grafana Tempo live-stores, in the kernel.\n\n\
        Tempo lets a live-store listen on `server.grpc_listen_port` (default 9095) and advertise \
        `live_store.ring.instance_port` (e.g. 12345) in the live-store ring, so queriers dial the \
        advertised port and a sidecar proxy forwards to the real one. redirector removes the proxy: \
        an sk_lookup program hands connections for the advertised port straight to the live-store's \
        listening socket, with no userspace copy and the querier's real address intact."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the programs and redirect until SIGINT/SIGTERM. Without --pin,
    /// everything is detached on exit; with --pin it stays and the next agent adopts it.
    #[command(after_help = "Examples:\n  \
        redirector run                                   # 12345 -> 9095 in this network namespace\n  \
        redirector run --advertise-port 12345 --listen-port 9095 --netns /var/run/netns/live-store-0\n  \
        redirector run --tempo-config /etc/tempo/tempo.yaml --discover --pin\n  \
        redirector run --config /etc/redirector/redirector.yaml")]
    Run(Box<RunArgs>),
    /// Show what is served: namespaces, ports, whether a live-store listener is
    /// registered, counters. Reads the pinned state, so it works while an agent
    /// runs with --pin and after it stopped. Changes nothing.
    #[command(after_help = "Examples:\n  redirector status\n  redirector status --output json")]
    Status {
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The running agent's state file (next to its --flows-socket): what it
        /// serves and why.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/run/redirector/agent.json"
        )]
        state_file: std::path::PathBuf,
    },
    /// Remove everything a --pin agent left attached and pinned under
    /// /sys/fs/bpf/redirector, and say what was removed.
    #[command(
        after_help = "Examples:\n  redirector detach\n  redirector detach --wait   # deploy/uninstall.yaml: every node, then stay up"
    )]
    Detach {
        /// After removing, stay running until SIGTERM: the uninstall
        /// DaemonSet's pods (deploy/uninstall.yaml) must not exit.
        #[arg(long)]
        wait: bool,
    },
    /// Probe what this node needs (privileges, kernel, BTF, sk_lookup, sock_ops,
    /// cgroup v2, bpffs) and print PASS/FAIL with a fix for each. Changes nothing.
    /// Exit code 0 when everything passes, 3 otherwise.
    ///
    /// With --tempo-ring, check Tempo's live-store ring instead: for every
    /// live-store whose address is on this node, whether redirector serves its
    /// namespace (pinned state), whether the ring advertises a redirected port,
    /// and whether its listener is registered. Exit 1 when the ring cannot be read.
    #[command(
        after_help = "Examples:\n  redirector check\n  redirector check --output json\n  \
        redirector check --tempo-ring http://tempo-distributor:3200/live-store/ring"
    )]
    Check {
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The live-store ring page of any Tempo component that serves it
        /// (distributor, querier): http://HOST:3200/live-store/ring. Plain http only.
        // No environment variable: the agent's REDIRECTOR_TEMPO_RING must not
        // turn a plain `check` in its pod into a ring check.
        #[arg(long, value_name = "URL")]
        tempo_ring: Option<crate::ring::RingUrl>,
    },
    /// Follow a running agent's flow records, like `hubble observe`.
    ///
    /// Connects to the agent's --flows-socket, keeps the records that match the
    /// filters, and prints them as the agent's flow log does. Records missed
    /// because this command read too slowly are counted on stderr, never
    /// dropped silently. Exits 1 when the agent stops.
    #[command(after_help = "Examples:\n  \
        redirector flows                                  # every record, as it happens\n  \
        redirector flows --event close --output json      # closed connections with their bytes\n  \
        redirector flows --client 10.42.0.0/16 --netns live-store-0\n  \
        redirector flows --event refused --last 20        # the last 20 refusals the agent kept, then exit")]
    Flows(FlowsArgs),
    /// Print a completion script for SHELL on stdout.
    #[command(after_help = "Examples:\n  \
        redirector completions bash > /etc/bash_completion.d/redirector\n  \
        redirector completions zsh > \"${fpath[1]}/_redirector\"\n  \
        redirector completions fish > ~/.config/fish/completions/redirector.fish")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout, or write one page per command
    /// into DIR (`cargo xtask build` writes target/man).
    #[command(hide = true)]
    Man {
        /// Write redirector.1 and redirector-COMMAND.1 here instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `redirector flows`: filters apply on this side, so any combination works.
#[derive(Args, Debug)]
pub struct FlowsArgs {
    /// The running agent's socket (its --flows-socket).
    #[arg(
        long,
        env = "REDIRECTOR_FLOWS_SOCKET",
        value_name = "PATH",
        default_value = crate::flows::sub::DEFAULT_FLOWS_SOCKET
    )]
    pub flows_socket: PathBuf,

    /// Only records whose namespace (as in the `netns` field: the path the agent
    /// serves, e.g. /proc/PID/ns/net) contains this. Repeat for any of several.
    #[arg(long, value_name = "SUBSTRING")]
    pub netns: Vec<String>,

    /// Only records of this live-store pod (`--kube`): its name, or
    /// namespace/name. Repeat for any of several.
    #[arg(long, value_name = "POD")]
    pub pod: Vec<String>,

    /// Only records of live-store pods in this Kubernetes namespace (`--kube`).
    /// Repeat for any of several.
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Vec<String>,

    /// Only records of this querier address or network, e.g. 10.42.3.7,
    /// 10.42.0.0/16, fd00::/64. Repeat for any of several.
    #[arg(long, value_name = "IP[/PREFIX]", value_parser = crate::commands::flows::parse_client)]
    pub client: Vec<crate::commands::flows::ClientNet>,

    /// Only these events. Repeat for several.
    #[arg(long, value_enum, value_name = "EVENT")]
    pub event: Vec<crate::commands::flows::EventKind>,

    /// `text` (the agent's text log lines), `json` (its JSON lines, byte for
    /// byte) or `logfmt`.
    #[arg(short, long, value_enum, default_value_t = FlowFormat::Text)]
    pub output: FlowFormat,

    /// First print the last N matching records of those the agent keeps (its
    /// latest 1024), then exit, unless --follow.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,

    /// Keep printing new records as they come: the default without --last.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

crate::config::layers::run_settings! {
    /// Every setting of `run`, defined once: its flag, its environment variable
    /// and its redirector.yaml key (the flag's name with `_`) come from one
    /// field. A flag wins over its environment variable, which wins over the
    /// `--config` file, which wins over the default (`settings::resolve`).
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
        pub redirects: Vec<crate::config::Redirect>,

        /// Port queriers dial: Tempo's `live_store.ring.instance_port`. With
        /// --listen-port, the one redirect (`redirects` and --tempo-config are
        /// then not read).
        #[arg(long, env = "REDIRECTOR_ADVERTISE_PORT", value_name = "PORT", value_parser = parse_port)]
        #[serde(default, deserialize_with = "crate::config::opt_port")]
        pub advertise_port: Option<u16>,

        /// Port the live-store listens on: Tempo's `server.grpc_listen_port`.
        #[arg(long, env = "REDIRECTOR_LISTEN_PORT", value_name = "PORT", value_parser = parse_port)]
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

        /// Check Tempo's live-store ring every 30 s (a thread of its own) and
        /// export the result as redirector_ring_* metrics: the URL of any Tempo
        /// component that serves it, e.g. http://tempo-distributor:3200/live-store/ring.
        #[arg(long, env = "REDIRECTOR_TEMPO_RING", value_name = "URL")]
        #[serde(default, deserialize_with = "crate::config::layers::opt_from_str")]
        pub tempo_ring: Option<crate::ring::RingUrl>,

        /// Seconds between ring checks (for tests).
        #[arg(long, env = "REDIRECTOR_TEMPO_RING_INTERVAL", hide = true, value_name = "SECS", value_parser = parse_interval)]
        #[serde(default, deserialize_with = "crate::config::layers::opt_interval")]
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
        #[serde(default, deserialize_with = "crate::config::layers::opt_value_enum")]
        pub sock_ops_cgroup: Option<crate::bpf::sockops::Scope>,

        /// Seconds between resyncs: every served namespace's listeners checked
        /// against the kernel (spread over the interval), and, with --discover,
        /// /proc scanned for live-stores the listen events missed. New listeners
        /// are found at once by a listen() hook; this is the safety net.
        #[arg(long, env = "REDIRECTOR_RESYNC_INTERVAL", value_name = "SECS", value_parser = parse_interval)]
        #[serde(default, deserialize_with = "crate::config::layers::opt_interval")]
        pub resync_interval: Option<u64>,

        /// With --discover, only namespaces of processes whose cgroup path contains
        /// this (or matches it as a glob with `*`/`?`), e.g. `*tempo*live-store*`.
        #[arg(long, env = "REDIRECTOR_CGROUP_PATTERN")]
        #[serde(default, deserialize_with = "crate::config::opt_pattern")]
        pub cgroup_pattern: Option<String>,

        /// With --discover, seconds a served namespace may have no listener before
        /// it is dropped (a live-store restarting in place keeps its namespace).
        #[arg(long, env = "REDIRECTOR_LISTENER_GRACE", value_name = "SECS")]
        #[serde(default, deserialize_with = "crate::config::layers::opt_secs")]
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
        #[serde(default, deserialize_with = "crate::config::layers::opt_value_enum")]
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
        #[arg(long, env = "REDIRECTOR_FLOW_RING_BYTES", value_name = "BYTES", value_parser = parse_ring_bytes)]
        #[serde(default, deserialize_with = "crate::config::layers::opt_ring_bytes")]
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
        #[serde(default, deserialize_with = "crate::config::layers::opt_value_enum")]
        pub log_format: Option<crate::commands::logging::LogFormat>,

        /// Read and check the configuration (flags, environment, --config,
        /// --tempo-config), print what `run` would do as JSON, and exit: nothing
        /// is loaded or attached, and no privileges are needed.
        #[arg(long)]
        #[serde(skip)]
        pub dry_run: bool,
    }
}

/// `run`'s defaults, stated once: [`command`] shows them in `--help`, the
/// manual and completions, and `settings::resolve` applies the same constants
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
            word(clap::ValueEnum::to_possible_value(
                &crate::commands::logging::LogFormat::default(),
            )),
        ),
    ]
}

/// The command line as `--help`, the manual and completions show it: [`Cli`]
/// with `run`'s defaults. Values are taken without them ([`parse_from`]): what
/// the command line and environment leave out falls to the `--config` file.
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    Cli::command().mut_subcommand("run", |run| {
        run_defaults().into_iter().fold(run, |run, (id, value)| {
            run.mut_arg(id, |a| a.default_value(value))
        })
    })
}

/// Parses `argv`: help, version and errors as [`command`] renders them (with
/// the defaults), the values without the defaults.
pub fn parse_from<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    command().try_get_matches_from(&argv)?;
    Cli::try_parse_from(argv)
}

/// Seconds of an interval: at least 1. The flag and the redirector.yaml key
/// both check with this.
pub fn check_interval(secs: u64) -> Result<u64, String> {
    if secs == 0 {
        Err("0 is not an interval: at least 1 second".to_owned())
    } else {
        Ok(secs)
    }
}

fn parse_interval(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => check_interval(n),
        Err(_) => Err(format!("`{s}` is not a whole number of seconds")),
    }
}

/// The flow ring's size: a power of two of at least 4096 bytes. The flag and
/// the redirector.yaml key both check with this.
pub fn check_ring_bytes(n: u64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n) if n >= 4096 && n.is_power_of_two() => Ok(n),
        _ => Err(format!(
            "`{n}` is not a valid ring size: a power of two of at least 4096 bytes"
        )),
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => check_ring_bytes(n),
        Err(_) => Err(format!(
            "`{s}` is not a valid ring size: a power of two of at least 4096 bytes"
        )),
    }
}

/// A TCP port a client can connect to: 1-65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range: a TCP port is 1-65535")),
        Err(_) => Err(format!("`{s}` is not a port number: a TCP port is 1-65535")),
    }
}

/// Boolean flags read from the environment the way people write them:
/// 1/0, true/false, yes/no, on/off (clap's default takes true/false only).
fn env_bool() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_must_be_connectable() {
        assert_eq!(parse_port("9095"), Ok(9095));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert!(parse_port("0").unwrap_err().contains("out of range"));
        assert!(parse_port("65536").unwrap_err().contains("out of range"));
        assert!(parse_port("-1").unwrap_err().contains("not a port number"));
        assert!(parse_port("grpc")
            .unwrap_err()
            .contains("not a port number"));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
