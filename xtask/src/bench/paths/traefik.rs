//! Traefik: a TCP router sidecar, measured when on `PATH` (not packaged for
//! Debian); no counter is read, so its proof is unverified.

use std::path::Path;

use anyhow::Result;

use super::{need, proxy_dir, spawn, Env, PathUnderTest, Running, Unverified};
use crate::bench::topology::{ADVERTISE_PORT, LISTEN_PORT};

pub const NAME: &str = "traefik";

pub struct Traefik;

impl PathUnderTest for Traefik {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("Traefik TCP router to 127.0.0.1:{LISTEN_PORT}")
    }

    fn available(&self, _agent: &Path) -> std::result::Result<(), String> {
        need(
            "traefik",
            "traefik not on PATH (not packaged for Debian; cannot be installed here)",
        )
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let (dir, dynamic) = proxy_dir(env, NAME, "dynamic.yaml", |_| config())?;
        let mut cmd = env.topo.l.command("traefik");
        cmd.arg(format!("--entrypoints.rdb.address=:{ADVERTISE_PORT}"))
            .arg(format!("--providers.file.filename={}", dynamic.display()));
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
        r#"# Written by cargo xtask bench.
tcp:
  routers:
    live-store:
      entryPoints: [rdb]
      rule: "HostSNI(`*`)"
      service: live-store
  services:
    live-store:
      loadBalancer:
        servers:
        - address: "127.0.0.1:{LISTEN_PORT}"
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_names_the_port() {
        let address = format!("- address: \"127.0.0.1:{}\"\n", super::LISTEN_PORT);
        assert!(super::config().contains(&address));
    }
}
