//! The live-store stand-in: one listening socket on `[::]:LISTEN_PORT` in the
//! live-store namespace (dual-stack, like Go's `net.Listen("tcp", ":PORT")`),
//! so every path ends at the same socket, the one redirector hands
//! connections to. A connection that opens with the HTTP/2 preface goes to the
//! tonic gRPC server; anything else is echoed back (raw RR/CRR workloads).

use std::{
    net::TcpListener as StdListener,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    sync::{mpsc, oneshot},
};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{
    grpc::{LiveStoreService, CONN_WINDOW, STREAM_WINDOW},
    topology::{live_store_cpu, runtime_in, Netns, LISTEN_PORT},
};

pub struct LiveStore {
    rt: Option<Runtime>,
    accepted: Arc<AtomicU64>,
    _shutdown: oneshot::Sender<()>,
}

impl LiveStore {
    pub fn start(ns: &Netns) -> Result<Self> {
        Self::start_on(ns, LISTEN_PORT)
    }

    /// The same server on another `port` (the bystander workload's pod).
    pub fn start_on(ns: &Netns, port: u16) -> Result<Self> {
        let listener = ns
            .try_run(|| {
                // The live-store's socket in its "pod"; a bystander's stays
                // with the load generator, in no cgroup redirector serves.
                if port == LISTEN_PORT {
                    super::cpu::enter_live_store_cgroup()?;
                }
                StdListener::bind(("::", port)).with_context(|| format!("bind [::]:{port}"))
            })
            .with_context(|| format!("live-store listener in {}", ns.name))?;
        listener.set_nonblocking(true)?;
        // Two workers (a Go live-store has GOMAXPROCS threads), both on one CPU.
        let rt = runtime_in(ns, 2, "rdb-live-store", Some(live_store_cpu()))?;
        let accepted = Arc::new(AtomicU64::new(0));
        let (grpc_tx, grpc_rx) = mpsc::unbounded_channel::<std::io::Result<TcpStream>>();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(listener).context("tokio listener")?
        };
        rt.spawn(accept_loop(listener, grpc_tx, accepted.clone()));
        rt.spawn(async move {
            let served = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .add_service(LiveStoreService::new())
                .serve_with_incoming_shutdown(UnboundedReceiverStream::new(grpc_rx), async {
                    let _ = shutdown_rx.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("bench: gRPC server stopped: {e}");
            }
        });
        Ok(Self {
            rt: Some(rt),
            accepted,
            _shutdown: shutdown_tx,
        })
    }

    /// The count of connections accepted on the listen port so far (all
    /// paths end here), shared: direct's proof reads it.
    pub fn accepts(&self) -> Arc<AtomicU64> {
        self.accepted.clone()
    }
}

impl Drop for LiveStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    grpc: mpsc::UnboundedSender<std::io::Result<TcpStream>>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((conn, _peer)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let _ = conn.set_nodelay(true);
        let grpc = grpc.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 3];
            // Both kinds of client speak first: gRPC with "PRI * HTTP/2.0", echo
            // clients with their request.
            match conn.peek(&mut head).await {
                Ok(n) if n > 0 && head[..n] == b"PRI"[..n] => {
                    let _ = grpc.send(Ok(conn));
                }
                Ok(n) if n > 0 => echo(conn).await,
                _ => {}
            }
        });
    }
}

async fn echo(mut conn: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
