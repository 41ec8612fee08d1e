//! Envoy: a `tcp_proxy` sidecar, measured when on `PATH` (not packaged for
//! Debian); no counter is read, so its proof is unverified.

use std::path::Path;

use anyhow::Result;

use super::{need, proxy_dir, spawn, Env, PathUnderTest, Running, Unverified};
use crate::bench::topology::{ADVERTISE_PORT, LISTEN_PORT};

pub const NAME: &str = "envoy";

pub struct Envoy;

impl PathUnderTest for Envoy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("Envoy tcp_proxy to 127.0.0.1:{LISTEN_PORT}")
    }

    fn available(&self, _agent: &Path) -> std::result::Result<(), String> {
        need(
            "envoy",
            "envoy not on PATH (not packaged for Debian; cannot be installed here)",
        )
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let (dir, conf) = proxy_dir(env, NAME, "envoy.yaml", |_| config())?;
        let mut cmd = env.topo.l.command("envoy");
        cmd.arg("-c").arg(&conf).args(["--concurrency", "2"]);
        Ok(Box::new(Unverified {
            name: NAME,
            _child: spawn(NAME, cmd, &dir)?,
        }))
    }

    fn proxy(&self) -> bool {
        true
    }

    fn counts(&self) -> bool {
        false
    }
}

fn config() -> String {
    format!(
        r#"# Written by cargo xtask bench: a sidecar-style TCP proxy.
static_resources:
  listeners:
  - address: {{socket_address: {{address: 0.0.0.0, port_value: {ADVERTISE_PORT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: rdb
          cluster: live_store
  clusters:
  - name: live_store
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: live_store
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {LISTEN_PORT}}}}}}}
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_names_the_ports() {
        use super::{ADVERTISE_PORT, LISTEN_PORT};
        let c = super::config();
        assert!(
            c.contains(&format!(
                "- address: {{socket_address: {{address: 0.0.0.0, port_value: {ADVERTISE_PORT}}}}}\n"
            )),
            "{c}"
        );
        assert!(
            c.contains(&format!(
                "- endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {LISTEN_PORT}}}}}}}\n"
            )),
            "{c}"
        );
    }
}
