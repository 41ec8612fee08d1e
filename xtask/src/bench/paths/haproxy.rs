//! HAProxy: `mode tcp` to the live-store, 2 threads; the frontend's session
//! count from its stats socket is the proof.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{need, proxy_dir, spawn, ChildGuard, Env, PathUnderTest, Proof, Running};
use crate::bench::topology::{ADVERTISE_PORT, LISTEN_PORT};

pub const NAME: &str = "haproxy";

pub struct Haproxy;

impl PathUnderTest for Haproxy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("HAProxy mode tcp to 127.0.0.1:{LISTEN_PORT}")
    }

    fn available(&self, _agent: &Path) -> std::result::Result<(), String> {
        need("haproxy", "haproxy not installed")
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let (dir, conf) = proxy_dir(env, NAME, "haproxy.cfg", config)?;
        let mut cmd = env.topo.l.command("haproxy");
        cmd.arg("-f").arg(&conf).arg("-db");
        let child = spawn(NAME, cmd, &dir)?;
        Ok(Box::new(Started { child, dir }))
    }

    fn proxy(&self) -> bool {
        true
    }
}

fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# Written by cargo xtask bench: a sidecar-style TCP proxy.
global
    maxconn 8000
    nbthread 2
    stats socket {d}/haproxy.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend advertised
    bind :{ADVERTISE_PORT}
    default_backend live_store
backend live_store
    server ls 127.0.0.1:{LISTEN_PORT}
"
    )
}

struct Started {
    child: ChildGuard,
    dir: std::path::PathBuf,
}

impl Running for Started {
    fn stop(self: Box<Self>) -> Result<Proof> {
        // Its counters must be read while it runs.
        let stats = sessions(&self.dir.join("haproxy.sock"));
        drop(self.child);
        let n = stats?;
        Ok(Proof::new(
            NAME,
            n,
            format!("haproxy `show stat` frontend stot={n}"),
        ))
    }
}

/// Total sessions of HAProxy's frontend, from `show stat` on its stats socket.
fn sessions(sock: &Path) -> Result<u64> {
    let mut s = UnixStream::connect(sock).context("haproxy stats socket")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"show stat\n")?;
    let mut csv = String::new();
    s.read_to_string(&mut csv)?;
    parse_stot(&csv).context("no FRONTEND row in haproxy stats")
}

/// `stot` (column 8) of the FRONTEND row of HAProxy's CSV stats.
fn parse_stot(csv: &str) -> Option<u64> {
    csv.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > 7 && f[1] == "FRONTEND")
        .and_then(|f| f[7].parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frontend_sessions() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin\nadvertised,FRONTEND,,,0,3,20000,17,100\n";
        assert_eq!(parse_stot(csv), Some(17));
    }
}
