//! nginx: a `stream` proxy to the live-store, the way a sidecar runs it (2
//! workers, access log on); the access log is the proof.

use std::{fs, path::Path};

use anyhow::Result;

use super::{need, proxy_dir, spawn, ChildGuard, Env, PathUnderTest, Proof, Running};
use crate::bench::topology::{ADVERTISE_PORT, LISTEN_PORT};

pub const NAME: &str = "nginx";

const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub struct Nginx;

impl PathUnderTest for Nginx {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("nginx stream proxy_pass 127.0.0.1:{LISTEN_PORT} (access log on)")
    }

    fn available(&self, _agent: &Path) -> std::result::Result<(), String> {
        need("nginx", "nginx not installed")?;
        if Path::new(STREAM_MODULE).exists() {
            Ok(())
        } else {
            Err("libnginx-mod-stream not installed".into())
        }
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let (dir, conf) = proxy_dir(env, NAME, "nginx.conf", config)?;
        let mut cmd = env.topo.l.command("nginx");
        cmd.arg("-p").arg(&dir).arg("-c").arg(&conf);
        cmd.args(["-g", "daemon off;"]);
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
        "# Written by cargo xtask bench: a sidecar-style stream proxy.
load_module {STREAM_MODULE};
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
stream {{
    log_format basic '$remote_addr $upstream_addr $bytes_received $bytes_sent $session_time';
    access_log {d}/access.log basic;
    upstream live_store {{ server 127.0.0.1:{LISTEN_PORT}; }}
    server {{
        listen {ADVERTISE_PORT} reuseport backlog=4096;
        proxy_pass live_store;
        tcp_nodelay on;
        # A querier's half-close reaches the live-store (which answers after
        # reading to the end, as tests/go does) instead of ending the session.
        proxy_half_close on;
    }}
}}
"
    )
}

struct Started {
    child: ChildGuard,
    dir: std::path::PathBuf,
}

impl Running for Started {
    fn stop(self: Box<Self>) -> Result<Proof> {
        let Started { child, dir } = *self;
        // nginx writes its last sessions' log lines as it exits.
        drop(child);
        let log = dir.join("access.log");
        let n = fs::read_to_string(&log).unwrap_or_default().lines().count() as u64;
        // Truncate so the next slot's proof counts only its own sessions.
        let _ = fs::write(&log, "");
        Ok(Proof::new(
            NAME,
            n,
            format!("nginx access log: {n} sessions"),
        ))
    }
}
