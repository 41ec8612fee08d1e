//! Configuration files: Tempo's own config (read for two ports, everything else
//! ignored) and redirector's `redirector.yaml` (strict: a typo is an error, not a
//! silently ignored setting).
//!
//! Every error here is the operator's to fix, so each one is a single line that
//! starts with `FILE:LINE:COLUMN:` where yaml_serde knows the position: an
//! [`Error`] (exit code 2).

pub mod layers;
mod port;
pub mod settings;
mod tempo;
pub mod values;

pub use port::{opt_port, parse_port, redirect_list};
pub use tempo::{parse_tempo, tempo_ports, TempoPorts};

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;

use crate::bpf::Redirect;

/// Why a configuration cannot be used: always the operator's to fix, in one
/// line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {err}", path.display())]
    Read { path: PathBuf, err: io::Error },
    #[error(
        "{} is larger than {} MiB, more than any configuration file: refused",
        path.display(),
        MAX_CONFIG_BYTES >> 20
    )]
    TooLarge { path: PathBuf },
    /// What the file says cannot be: `FILE:LINE:COLUMN: message` where the
    /// parser knows the position.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads and validates a YAML file at `path` as `T` (redirector.yaml as `run`'s
/// arguments define its keys).
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    parse(&read(path)?, path)
}

/// [`load`] on text already read; `origin` names it in errors. An empty file (or
/// one with only comments) is `T`'s default: every key left to the layers below.
pub fn parse<T: DeserializeOwned + Default>(text: &str, origin: &Path) -> Result<T> {
    let cfg: Option<T> = yaml_serde::from_str(text).map_err(|e| yaml_error(origin, &e))?;
    Ok(cfg.unwrap_or_default())
}

/// The redirects a config asks for: its `redirects` list plus, when
/// `tempo_config` is set, the pair read from that Tempo file. Errors if the Tempo
/// file's advertise port is already in the list with another listen port.
pub fn resolve_redirects(
    redirects: &[Redirect],
    tempo_config: Option<&Path>,
) -> Result<Vec<Redirect>> {
    let mut out = redirects.to_vec();
    if let Some(tempo) = tempo_config {
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
                return Err(Error::Invalid(format!(
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
    let cannot = |err| Error::Read {
        path: path.to_owned(),
        err,
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// `FILE:LINE:COLUMN: message`, one line. yaml_serde appends ` at line L column C`
/// to its own message (and libyaml may add a context); the location moves to the
/// front where editors and humans look for it.
fn yaml_error(origin: &Path, err: &yaml_serde::Error) -> Error {
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
    Error::Invalid(format!("{prefix}: {msg}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tempo_err(text: &str) -> String {
        let e = parse_tempo(text, Path::new("tempo.yaml")).unwrap_err();
        assert!(
            matches!(e, Error::Invalid(_)),
            "not an invalid config: {e:#}"
        );
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s}");
        s
    }

    /// A live-store's config as a Tempo deployment would have it: many sections
    /// redirector must not care about.
    pub(crate) const REALISTIC_TEMPO: &str = r#"
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
}
