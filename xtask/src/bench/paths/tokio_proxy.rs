//! tokio-proxy: the simplest possible sidecar. Accepts on the advertised
//! port, dials the live-store, and `copy_bidirectional`s between them on 2
//! tokio workers, counting connections.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{net::TcpStream, runtime::Runtime};

use super::{Env, PathUnderTest, Proof, Running};
use crate::bench::topology::{runtime_in, ADVERTISE_PORT, LISTEN_PORT};

pub const NAME: &str = "tokio-proxy";

pub struct TokioProxy;

impl PathUnderTest for TokioProxy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("tokio copy_bidirectional to 127.0.0.1:{LISTEN_PORT}")
    }

    fn available(&self, _agent: &Path) -> std::result::Result<(), String> {
        Ok(())
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let ls = &env.topo.l;
        let listener = ls.try_run(|| {
            std::net::TcpListener::bind(("::", ADVERTISE_PORT))
                .with_context(|| format!("bind [::]:{ADVERTISE_PORT}"))
        })?;
        listener.set_nonblocking(true)?;
        let rt = runtime_in(ls, 2, "rdb-tokio-proxy", None)?;
        let handled = Arc::new(AtomicU64::new(0));
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let count = handled.clone();
        rt.spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = down.set_nodelay(true);
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", LISTEN_PORT)).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
            }
        });
        Ok(Box::new(Started {
            rt: Some(rt),
            handled,
        }))
    }

    fn proxy(&self) -> bool {
        true
    }

    fn required(&self) -> bool {
        true
    }
}

struct Started {
    rt: Option<Runtime>,
    handled: Arc<AtomicU64>,
}

impl Started {
    fn shutdown(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Running for Started {
    fn stop(mut self: Box<Self>) -> Result<Proof> {
        self.shutdown();
        let n = self.handled.load(Ordering::Relaxed);
        Ok(Proof::new(
            NAME,
            n,
            format!("proxy's own counter: {n} connections"),
        ))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.shutdown();
    }
}
