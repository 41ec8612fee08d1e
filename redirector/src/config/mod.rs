//! Configuration files: Tempo's own config (read for two ports, everything else
//! ignored) and redirector's `redirector.yaml` (strict: a typo is an error, not a
//! silently ignored setting).
//!
//! Every error here is the operator's to fix, so each one is a single line that
//! starts with `FILE:LINE:COLUMN:` where yaml_serde knows the position, and is a
//! [`Fatal::Usage`] (exit code 2).

pub mod layers;
mod pattern;
mod port;
pub mod settings;
mod tempo;

pub use pattern::cgroup_pattern_matches;
pub(crate) use port::{opt_port, redirect_list};
pub use port::{Redirect, SamePort};
pub use tempo::{parse_tempo, tempo_ports, TempoPorts, TEMPO_DEFAULT_GRPC_LISTEN_PORT};

use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use anyhow::Result;
use serde::{de, Deserialize, Deserializer};

use crate::error::usage;
#[cfg(test)]
use crate::flows::log::FlowFormat;

/// redirector's own `redirector.yaml`: the settings of `redirector run`, one
/// key per flag (see [`crate::cli::RunArgs`], where each is defined), and
/// `redirects`. Every key is optional; a flag or environment variable given
/// wins over it, and `settings::resolve` decides what an absent one means.
pub type FileConfig = crate::cli::RunArgs;

/// Reads and validates `redirector.yaml` at `path`.
pub fn load(path: &Path) -> Result<FileConfig> {
    parse(&read(path)?, path)
}

/// [`load`] on text already read; `origin` names it in errors. An empty file (or
/// one with only comments) is the all-defaults config.
pub fn parse(text: &str, origin: &Path) -> Result<FileConfig> {
    let cfg: Option<FileConfig> = yaml_serde::from_str(text).map_err(|e| yaml_error(origin, &e))?;
    Ok(cfg.unwrap_or_default())
}

/// The redirects a config asks for: its `redirects` list plus, when
/// `tempo_config` is set, the pair read from that Tempo file. Errors if the Tempo
/// file's advertise port is already in the list with another listen port.
pub fn resolve_redirects(cfg: &FileConfig) -> Result<Vec<Redirect>> {
    let mut out = cfg.redirects.clone();
    if let Some(tempo) = &cfg.tempo_config {
        let ports = tempo_ports(tempo)?;
        let spec = Redirect {
            advertise_port: ports.advertise_port,
            listen_port: ports.listen_port,
        };
        match out
            .iter()
            .find(|r| r.advertise_port == spec.advertise_port)
        {
            // Saying the same thing twice (list and Tempo file) is harmless.
            Some(r) if *r == spec => {}
            Some(r) => {
                return Err(usage(format!(
                    "advertise port {} goes to listen port {} in `redirects` but to {} in tempo_config {}: \
                     one advertise port can only go to one listener",
                    spec.advertise_port,
                    r.listen_port,
                    spec.listen_port,
                    tempo.display()
                )))
            }
            None => out.push(spec),
        }
    }
    Ok(out)
}

/// Larger than any real redirector.yaml or Tempo config: a bigger file (or
/// /dev/zero) is refused before it can take the node's memory.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

pub(crate) fn read(path: &Path) -> Result<String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| usage(format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(usage(format!(
            "{} is larger than {} MiB, more than any configuration file: refused",
            path.display(),
            MAX_CONFIG_BYTES >> 20
        )));
    }
    Ok(text)
}

/// `FILE:LINE:COLUMN: message`, one line. yaml_serde appends ` at line L column C`
/// to its own message (and libyaml may add a context); the location moves to the
/// front where editors and humans look for it.
fn yaml_error(origin: &Path, err: &yaml_serde::Error) -> anyhow::Error {
    let mut msg = err.to_string();
    let prefix = match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(i) = msg.find(&suffix) {
                msg.replace_range(i..i + suffix.len(), "");
            }
            format!("{}:{}:{}", origin.display(), loc.line(), loc.column())
        }
        None => origin.display().to_string(),
    };
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    usage(format!("{prefix}: {msg}"))
}

pub(crate) fn opt_pattern<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    match s {
        // An empty substring matches every cgroup, which is never what a pattern is for.
        Some(s) if s.trim().is_empty() => Err(de::Error::custom(
            "cgroup_pattern is empty: give a substring or a glob with * and ?, or remove the key",
        )),
        s => Ok(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Fatal;

    fn origin() -> &'static Path {
        Path::new("redirector.yaml")
    }

    fn err(text: &str) -> String {
        let e = parse(text, origin()).unwrap_err();
        assert!(
            matches!(e.downcast_ref::<Fatal>(), Some(Fatal::Usage(_))),
            "not a usage error: {e:#}"
        );
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s}");
        s
    }

    fn tempo_err(text: &str) -> String {
        let e = parse_tempo(text, Path::new("tempo.yaml")).unwrap_err();
        assert!(
            matches!(e.downcast_ref::<Fatal>(), Some(Fatal::Usage(_))),
            "not a usage error: {e:#}"
        );
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s}");
        s
    }

    /// A live-store's config as a Tempo deployment would have it: many sections
    /// redirector must not care about.
    const REALISTIC_TEMPO: &str = r#"
target: live-store
multitenancy_enabled: true
stream_over_http_enabled: true

server:
  http_listen_port: 3200
  grpc_listen_port: 9095
  log_level: info
  log_format: logfmt
  grpc_server_max_recv_msg_size: 16777216
  grpc_server_max_send_msg_size: 16777216

memberlist:
  abort_if_cluster_join_fails: false
  bind_port: 7946
  join_members:
    - dns+tempo-gossip-ring.tempo.svc.cluster.local:7946

distributor:
  receivers:
    otlp:
      protocols:
        grpc:
          endpoint: 0.0.0.0:4317
        http:
          endpoint: 0.0.0.0:4318
  ring:
    kvstore:
      store: memberlist

ingester:
  lifecycler:
    ring:
      replication_factor: 3
      kvstore:
        store: memberlist
    tokens_file_path: /var/tempo/tokens.json

live_store:
  ring:
    instance_port: 12345   # the sidecar's port: queriers dial this
    instance_addr: ${POD_IP}
    kvstore:
      store: memberlist
    heartbeat_timeout: 1m
  complete_block_timeout: 15m
  query_blocks: 3

querier:
  frontend_worker:
    frontend_address: tempo-query-frontend-discovery.tempo.svc.cluster.local:9095
  max_concurrent_queries: 20

compactor:
  compaction:
    block_retention: 336h

metrics_generator:
  processor:
    service_graphs:
      dimensions: [http.method]
  storage:
    path: /var/tempo/wal
    remote_write:
      - url: http://prometheus:9090/api/v1/write
        send_exemplars: true

storage:
  trace:
    backend: s3
    s3:
      bucket: tempo-traces
      endpoint: s3.eu-west-1.amazonaws.com
      region: eu-west-1
    wal:
      path: /var/tempo/wal
    pool:
      max_workers: 400
      queue_depth: 20000

overrides:
  defaults:
    ingestion:
      rate_limit_bytes: 15000000
      burst_size_bytes: 20000000
    metrics_generator:
      processors: [service-graphs, span-metrics]
  per_tenant_override_config: /runtime-config/overrides.yaml

usage_report:
  reporting_enabled: false
"#;

    #[test]
    fn realistic_tempo_config() {
        let p = parse_tempo(REALISTIC_TEMPO, Path::new("tempo.yaml")).unwrap();
        assert_eq!(
            p,
            TempoPorts {
                listen_port: 9095,
                advertise_port: 12345
            }
        );
    }

    #[test]
    fn tempo_listen_port_defaults_to_9095() {
        let p = parse_tempo(
            "server:\n  http_listen_port: 3200\nlive_store:\n  ring:\n    instance_port: 12345\n",
            Path::new("tempo.yaml"),
        )
        .unwrap();
        assert_eq!(p.listen_port, 9095);
        assert_eq!(p.advertise_port, 12345);
        // No server section at all, and an empty `grpc_listen_port:`.
        let p = parse_tempo(
            "live_store: {ring: {instance_port: 23456}}\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!((p.listen_port, p.advertise_port), (9095, 23456));
        let p = parse_tempo(
            "server:\n  grpc_listen_port:\nlive_store: {ring: {instance_port: 23456}}\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(p.listen_port, 9095);
    }

    #[test]
    fn tempo_custom_listen_port_and_quoted_numbers() {
        let p = parse_tempo(
            "server: {grpc_listen_port: 9096}\nlive_store: {ring: {instance_port: \"12346\"}}\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!((p.listen_port, p.advertise_port), (9096, 12346));
    }

    #[test]
    fn tempo_missing_instance_port_names_the_key() {
        for text in [
            "",
            "# only a comment\n",
            "server:\n  grpc_listen_port: 9095\n",
            "live_store:\n",
            "live_store:\n  ring:\n    kvstore: {store: memberlist}\n",
            "live_store:\n  ring:\n    instance_port:\n",
        ] {
            let e = tempo_err(text);
            assert!(
                e.starts_with("tempo.yaml: live_store.ring.instance_port is not set"),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn tempo_invalid_ports_name_key_value_and_position() {
        let e = tempo_err("live_store:\n  ring:\n    instance_port: 0\n");
        assert!(
            e.starts_with("tempo.yaml:3:20: live_store.ring.instance_port: port 0 is out of range"),
            "{e}"
        );
        let e = tempo_err("live_store:\n  ring:\n    instance_port: 70000\n");
        assert!(
            e.contains("live_store.ring.instance_port: port 70000 is out of range"),
            "{e}"
        );
        let e = tempo_err("live_store:\n  ring:\n    instance_port: grpc\n");
        assert!(
            e.contains("live_store.ring.instance_port: `grpc` is not a port number"),
            "{e}"
        );
        let e = tempo_err("live_store:\n  ring:\n    instance_port: -1\n");
        assert!(e.contains("port -1 is out of range"), "{e}");
        let e = tempo_err("live_store:\n  ring:\n    instance_port: 12.5\n");
        assert!(e.contains("`12.5` is not a port number"), "{e}");
        let e = tempo_err("live_store:\n  ring:\n    instance_port: [1]\n");
        assert!(
            e.contains("instance_port: invalid type: sequence, expected a TCP port number"),
            "{e}"
        );
        let e = tempo_err("live_store:\n  ring:\n    instance_port: true\n");
        assert!(e.contains("`true` is not a port number"), "{e}");
        let e = tempo_err(
            "server:\n  grpc_listen_port: ${GRPC_PORT}\nlive_store: {ring: {instance_port: 1}}\n",
        );
        assert!(e.starts_with("tempo.yaml:2:21: server.grpc_listen_port: `${GRPC_PORT}` is not a port number (environment placeholders"), "{e}");
    }

    #[test]
    fn tempo_equal_ports_is_an_error() {
        let e = tempo_err(
            "server: {grpc_listen_port: 9095}\nlive_store: {ring: {instance_port: 9095}}\n",
        );
        assert!(e.contains("both 9095"), "{e}");
    }

    #[test]
    fn tempo_syntax_error_has_a_position() {
        let e = tempo_err("server:\n  grpc_listen_port: 9095\n   bad: [\n");
        assert!(e.starts_with("tempo.yaml:"), "{e}");
        let pos: Vec<&str> = e.splitn(4, ':').collect();
        assert!(
            pos[1].parse::<usize>().is_ok() && pos[2].parse::<usize>().is_ok(),
            "{e}"
        );
    }

    #[test]
    fn unreadable_files_name_path_and_os_error() {
        let path = Path::new("/nonexistent/redirector-test/tempo.yaml");
        for e in [tempo_ports(path).unwrap_err(), load(path).unwrap_err()] {
            assert!(matches!(e.downcast_ref::<Fatal>(), Some(Fatal::Usage(_))));
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
        std::fs::write(&path, REALISTIC_TEMPO).unwrap();
        let p = tempo_ports(&path).unwrap();
        std::fs::write(
            dir.join("redirector.yaml"),
            format!(
                "tempo_config: {}\nredirects:\n  - {{advertise_port: 12346, listen_port: 9096}}\n",
                path.display()
            ),
        )
        .unwrap();
        let cfg = load(&dir.join("redirector.yaml")).unwrap();
        let all = resolve_redirects(&cfg).unwrap();
        std::fs::write(
            dir.join("conflict.yaml"),
            format!(
                "tempo_config: {}\nredirects:\n  - {{advertise_port: 12345, listen_port: 9096}}\n",
                path.display()
            ),
        )
        .unwrap();
        let conflict = resolve_redirects(&load(&dir.join("conflict.yaml")).unwrap());
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
            FileConfig {
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
                ..FileConfig::default()
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
                FileConfig::default(),
                "{text:?}"
            );
        }
        assert_eq!(
            parse("redirects:\nnetns:\n", origin()).unwrap(),
            FileConfig::default()
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
        let tempo = parse_tempo(
            include_str!("../../../deploy/tempo-config.yaml"),
            Path::new("deploy/tempo-config.yaml"),
        )
        .unwrap();
        let manifests = include_str!("../../../deploy/daemonset.yaml");
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
        use crate::commands::logging::LogFormat;
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
            FileConfig {
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
                ..FileConfig::default()
            }
        );
    }

    /// A `run` flag without a redirector.yaml key is a setting the ConfigMap
    /// cannot hold: every flag but these is a key of the file's schema.
    #[test]
    fn every_run_flag_is_a_config_key() {
        // `--config` names the file itself; `--dry-run` is an action of this
        // invocation, not a setting of the agent. `--help` is clap's.
        const NOT_KEYS: [&str; 3] = ["config", "dry_run", "help"];
        let cmd = crate::cli::command();
        let run = cmd
            .get_subcommands()
            .find(|c| c.get_name() == "run")
            .expect("a run subcommand");
        let mut checked = 0;
        for arg in run.get_arguments() {
            let id = arg.get_id().as_str();
            if NOT_KEYS.contains(&id) {
                continue;
            }
            // No value is "not set" for every key; an unknown key fails as such.
            match parse(&format!("{id}:\n"), origin()) {
                Ok(cfg) => assert_eq!(cfg, FileConfig::default(), "{id}"),
                Err(e) => panic!("--{} has no redirector.yaml key {id}: {e}", arg.get_id()),
            }
            checked += 1;
        }
        assert!(checked >= 25, "{checked} flags");
        for id in NOT_KEYS.iter().filter(|id| **id != "help") {
            assert!(
                run.get_arguments().any(|a| a.get_id() == *id),
                "{id} is allowed as no key but is no flag"
            );
            let e = err(&format!("{id}:\n"));
            assert!(e.contains(&format!("unknown field `{id}`")), "{e}");
        }
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

    /// Command line and environment over the file over the defaults, key by
    /// key; a list given on the command line replaces the file's.
    #[test]
    fn flags_win_over_the_file_key_by_key() {
        use crate::cli::{Cli, Command};
        let dir = std::env::temp_dir().join(format!("redirector-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("redirector.yaml");
        std::fs::write(
            &path,
            "discover: true\nlistener_grace: 5\nresync_interval: 7\nflow_ring_bytes: 8192\n\
             netns: [/proc/1/ns/net]\npin: true\nlog_format: json\n",
        )
        .unwrap();
        let resolve = |extra: &[&str]| {
            let mut argv = vec!["redirector", "run", "--config", path.to_str().unwrap()];
            argv.extend_from_slice(extra);
            let Command::Run(args) = crate::cli::parse_from(argv).unwrap().command else {
                panic!("not run");
            };
            super::settings::resolve(*args).unwrap()
        };
        let file = resolve(&[]);
        let flags = resolve(&[
            "--resync-interval",
            "9",
            "--flow-ring-bytes",
            "4096",
            "--netns",
            "/proc/2/ns/net",
            "--pin=false",
            "--log-format",
            "text",
        ]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(file.discover && file.pin);
        assert_eq!(file.listener_grace.as_secs(), 5);
        assert_eq!(file.resync_interval.as_secs(), 7);
        assert_eq!(file.flow_ring_bytes, 8192);
        assert_eq!(file.netns, [PathBuf::from("/proc/1/ns/net")]);
        assert_eq!(file.log_format, crate::commands::logging::LogFormat::Json);
        // What the flags leave alone stays the file's; the defaults come last.
        assert!(flags.discover && !flags.pin);
        assert_eq!(flags.listener_grace.as_secs(), 5);
        assert_eq!(flags.resync_interval.as_secs(), 9);
        assert_eq!(flags.flow_ring_bytes, 4096);
        assert_eq!(flags.netns, [PathBuf::from("/proc/2/ns/net")]);
        assert_eq!(flags.log_format, crate::commands::logging::LogFormat::Text);
        assert_eq!(
            flags.metrics_addr.to_string(),
            super::settings::DEFAULT_METRICS_ADDR
        );
        // Without a file, the plain derive parse resolves to the same defaults
        // `--help` shows.
        let Command::Run(args) = <Cli as clap::Parser>::try_parse_from(["redirector", "run"])
            .unwrap()
            .command
        else {
            panic!("not run");
        };
        let defaults = super::settings::resolve(*args).unwrap();
        let shown: std::collections::BTreeMap<&str, String> =
            crate::cli::run_defaults().into_iter().collect();
        assert_eq!(
            shown["flow_ring_bytes"],
            defaults.flow_ring_bytes.to_string()
        );
        assert_eq!(
            shown["resync_interval"],
            defaults.resync_interval.as_secs().to_string()
        );
        assert_eq!(shown["metrics_addr"], defaults.metrics_addr.to_string());
        assert_eq!(shown["serve_target"], defaults.serve_targets.join(","));
        assert_eq!(
            shown["flows_socket"],
            defaults.flows_socket.display().to_string()
        );
        assert_eq!(
            shown["advertise_port"],
            defaults.redirects[0].advertise_port.to_string()
        );
    }

    /// `--help` shows each default once, from `run_defaults`.
    #[test]
    fn help_shows_the_defaults() {
        let mut cmd = crate::cli::command();
        let run = cmd.find_subcommand_mut("run").expect("a run subcommand");
        let help = run.render_long_help().to_string();
        for (id, value) in crate::cli::run_defaults() {
            if id == "tempo_ring_interval" {
                continue; // hidden
            }
            assert!(
                help.contains(&format!("[default: {value}]")),
                "{id}: [default: {value}] not in --help"
            );
        }
    }

    #[test]
    fn cgroup_patterns() {
        let kube = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abcd.scope";
        assert!(cgroup_pattern_matches("pod1234", kube));
        assert!(!cgroup_pattern_matches("pod9999", kube));
        assert!(cgroup_pattern_matches("/kubepods.slice/*pod1234*", kube));
        assert!(cgroup_pattern_matches("*cri-containerd-????.scope", kube));
        assert!(!cgroup_pattern_matches("*cri-containerd-???.scope", kube));
        // A glob is anchored at both ends; a plain substring is not.
        assert!(!cgroup_pattern_matches("kubepods.slice*", kube));
        assert!(cgroup_pattern_matches("*", kube));
        assert!(cgroup_pattern_matches("*a*b*c*", "xaybzc"));
        assert!(!cgroup_pattern_matches("*a*b*c", "xaybzcd"));
    }
}
