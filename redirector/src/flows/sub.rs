//! Flow records for subscribers (`redirector flows`): the agent publishes every
//! record it decodes to whoever is connected to a Unix socket on the node.
//!
//! Not the metrics port: the DaemonSet binds that on 0.0.0.0, and records carry
//! queriers' addresses. The socket is mode 0600, so only root on the node (or in
//! the agent's pod) can read them.
//!
//! Protocol, one JSON object per line (NDJSON):
//!
//! ```text
//! client -> agent   {"last":N}          optional, first line: replay up to N kept records
//! agent  -> client  {"event":...}       a flow record, exactly the agent's JSON log line
//! agent  -> client  {"live":true}       after the replay: every record from here on is new
//! agent  -> client  {"lost":N}          this subscriber read too slowly and missed N records
//! agent  -> client  {"error":"..."}     the request was not understood; the agent hangs up
//! ```
//!
//! A subscriber never slows the agent or its flow log: records go through a
//! broadcast channel the flow reader never waits on; a subscriber that falls
//! behind by more than the channel holds misses the oldest ones and is told how
//! many (and `redirector_flow_subscriber_records_lost_total` counts them).

use std::{
    collections::VecDeque,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
    task::JoinSet,
};

/// Where the agent listens for subscribers unless told otherwise.
pub const DEFAULT_FLOWS_SOCKET: &str = "/run/redirector/flows.sock";

/// Records kept for `{"last":N}` (`redirector flows --last N`): JSON lines of
/// ~300 bytes each, so a few hundred KiB.
pub const HISTORY: usize = 1024;

/// How long the agent waits for a subscriber's request line before streaming
/// with the defaults (a client such as `nc -U` may send nothing).
const REQUEST_WAIT: Duration = Duration::from_millis(500);

/// How long a stopping agent lets subscribers take what was published last.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Bytes of records a subscriber task collects before one write.
const WRITE_BATCH: usize = 64 * 1024;

/// A subscriber's request.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Replay up to this many of the records kept before streaming new ones.
    #[serde(default)]
    pub last: usize,
}

/// A line from the agent that is not a record.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Notice {
    Live(bool),
    Lost(u64),
    Error(String),
}

impl Notice {
    pub fn line(&self) -> String {
        // A one-key object; serializing it cannot fail.
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// One record: its JSON line, newline included.
type Line = Arc<[u8]>;

type Subscription = broadcast::Receiver<Line>;

/// Fans records out to subscribers and keeps the most recent ones.
pub struct Hub {
    inner: Mutex<Inner>,
    lost: Counter,
    subscribers: Gauge,
}

struct Inner {
    /// Kept JSON lines; the oldest's buffer takes the newest line, so keeping
    /// records allocates nothing once the history is full.
    history: VecDeque<Vec<u8>>,
    /// None once the agent stops: subscribers then end after the last record.
    tx: Option<broadcast::Sender<Line>>,
}

impl Hub {
    /// `capacity`: records a subscriber may fall behind before it misses some.
    pub fn new(capacity: usize, lost: Counter, subscribers: Gauge) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            inner: Mutex::new(Inner {
                history: VecDeque::with_capacity(HISTORY),
                tx: Some(tx),
            }),
            lost,
            subscribers,
        }
    }

    /// Records that fit in a flow ring of `ring_bytes`: one drain of a full ring
    /// then never outruns a subscriber that keeps up between drains.
    pub fn capacity_for_ring(ring_bytes: u32) -> usize {
        let record = std::mem::size_of::<redirector_common::FlowEvent>() + 8;
        (ring_bytes as usize / record).clamp(256, 65_536)
    }

    /// Keeps `lines` (each a record's JSON line, newline included) and hands
    /// them to every subscriber; never waits. With nobody subscribed (the
    /// usual case) that is a copy into the history and nothing else.
    pub fn publish<'a>(&self, lines: impl IntoIterator<Item = &'a [u8]>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let Inner { history, tx } = &mut *inner;
        // Subscribing takes this lock, so nobody joins before we are done.
        let tx = tx.as_ref().filter(|tx| tx.receiver_count() > 0);
        for line in lines {
            let mut kept = match history.len() {
                HISTORY => history.pop_front().unwrap_or_default(),
                _ => Vec::new(),
            };
            kept.clear();
            kept.extend_from_slice(line);
            history.push_back(kept);
            if let Some(tx) = tx {
                // Err only means every subscriber has left meanwhile.
                let _ = tx.send(Line::from(line));
            }
        }
    }

    /// A receiver and the records kept so far, taken together so that replay
    /// and live records neither overlap nor leave a gap.
    pub(crate) fn subscribe(&self) -> Option<(Subscription, Vec<u8>, Vec<usize>)> {
        let inner = self.inner.lock().ok()?;
        let rx = inner.tx.as_ref()?.subscribe();
        let mut lines = Vec::with_capacity(inner.history.iter().map(Vec::len).sum());
        let mut ends = Vec::with_capacity(inner.history.len());
        for line in &inner.history {
            lines.extend_from_slice(line);
            ends.push(lines.len());
        }
        Some((rx, lines, ends))
    }

    /// Ends every subscription once its receiver has taken what is left.
    fn close(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.tx = None;
        }
    }
}

/// The listening socket and its subscribers; [`Server::shutdown`] ends them.
pub struct Server {
    path: PathBuf,
    /// (dev, inode) of the socket file we created: removed on exit only if the
    /// path still names it (a newer agent may have taken the path over).
    file_id: (u64, u64),
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    hub: Arc<Hub>,
}

impl Server {
    /// Listens on `path` (mode 0600, its directory created if missing) and
    /// serves subscribers from `hub`. A socket left at `path` by an earlier
    /// agent, running or not, is replaced: the newest agent serves the path.
    pub fn start(path: &Path, hub: Arc<Hub>) -> Result<Self> {
        let (listener, file_id) = bind(path)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept(listener, hub.clone(), stop_rx));
        Ok(Self {
            path: path.to_owned(),
            file_id,
            stop,
            task,
            hub,
        })
    }

    /// Stops accepting, lets each subscriber take the records published so far
    /// (for up to a second), and removes the socket file if it is still ours.
    pub async fn shutdown(self) {
        self.hub.close();
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file_id)
            .unwrap_or(false)
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds a fresh socket next to `path`, makes it 0600, then renames it over
/// `path`: no moment where others could connect, and an old socket at `path`
/// is replaced in one step.
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64))> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Ok(m) = fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !m.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: remove it or choose another --flows-socket",
                path.display()
            );
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flows.sock".to_owned());
    let temp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_file(&temp);
    let listener = std::os::unix::net::UnixListener::bind(&temp)
        .with_context(|| format!("binding {}", temp.display()))?;
    let placed = fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", temp.display()))
        .and_then(|()| {
            fs::rename(&temp, path)
                .with_context(|| format!("moving {} to {}", temp.display(), path.display()))
        });
    if let Err(e) = placed {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    let m = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok((UnixListener::from_std(listener)?, (m.dev(), m.ino())))
}

async fn accept(listener: UnixListener, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let mut subscribers = JoinSet::new();
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    subscribers.spawn(subscriber(stream, hub.clone()));
                }
                Err(e) => {
                    tracing::warn!("accepting a flow subscriber: {e}");
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished subscribers as they go.
            Some(_) = subscribers.join_next(), if !subscribers.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let flushed = tokio::time::timeout(FLUSH_WAIT, async {
        while subscribers.join_next().await.is_some() {}
    })
    .await;
    if flushed.is_err() {
        subscribers.abort_all();
    }
}

/// Counts a subscriber in the gauge for as long as it is connected.
struct Connected(Gauge);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn subscriber(stream: UnixStream, hub: Arc<Hub>) {
    // Subscribed at once, so nothing published from now on is missed even
    // while we wait for the request.
    let Some((mut rx, history, ends)) = hub.subscribe() else {
        return;
    };
    hub.subscribers.inc();
    let _connected = Connected(hub.subscribers.clone());
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    let request = match tokio::time::timeout(REQUEST_WAIT, read.read_line(&mut line)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!(
                    "bad request {:?}: {e}; expected {{\"last\":N}}",
                    line.trim()
                );
                let _ = write.write_all(Notice::Error(msg).line().as_bytes()).await;
                return;
            }
        },
        Err(_) => Request::default(),
    };
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    // The last `request.last` kept lines: from the end of the one before them.
    let skip = ends.len().saturating_sub(request.last);
    let from = skip.checked_sub(1).map_or(0, |i| ends[i]);
    buf.extend_from_slice(&history[from..]);
    buf.extend_from_slice(Notice::Live(true).line().as_bytes());
    drop(history);
    if write.write_all(&buf).await.is_err() {
        return;
    }
    let mut scratch = [0u8; 512];
    loop {
        buf.clear();
        tokio::select! {
            first = rx.recv() => {
                let mut next = first;
                // Take what is already waiting too: one write per batch.
                loop {
                    match next {
                        Ok(line) => buf.extend_from_slice(&line),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            hub.lost.inc_by(n);
                            buf.extend_from_slice(Notice::Lost(n).line().as_bytes());
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            // The agent is stopping: hand over the rest, then hang up.
                            let _ = write.write_all(&buf).await;
                            let _ = write.shutdown().await;
                            return;
                        }
                    }
                    if buf.len() >= WRITE_BATCH {
                        break;
                    }
                    next = match rx.try_recv() {
                        Ok(r) => Ok(r),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            Err(broadcast::error::RecvError::Lagged(n))
                        }
                        Err(broadcast::error::TryRecvError::Closed) => {
                            Err(broadcast::error::RecvError::Closed)
                        }
                        Err(broadcast::error::TryRecvError::Empty) => break,
                    };
                }
                // A slow reader blocks only this task; the receiver falls
                // behind meanwhile and reports what it missed.
                if write.write_all(&buf).await.is_err() {
                    return;
                }
            }
            // The client has nothing more to say; EOF or an error means it left.
            n = read.read(&mut scratch) => {
                if !matches!(n, Ok(k) if k > 0) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::log::{self, FlowFormat, FlowRecord};

    #[test]
    fn notices_are_one_key_objects() {
        assert_eq!(Notice::Live(true).line(), "{\"live\":true}\n");
        assert_eq!(Notice::Lost(37).line(), "{\"lost\":37}\n");
        assert_eq!(
            serde_json::from_str::<Notice>("{\"lost\":5}").expect("notice"),
            Notice::Lost(5)
        );
        assert_eq!(Notice::Error("x".into()).line(), "{\"error\":\"x\"}\n");
    }

    #[test]
    fn requests_are_strict() {
        assert_eq!(
            serde_json::from_str::<Request>("{}").expect("empty"),
            Request { last: 0 }
        );
        assert_eq!(
            serde_json::from_str::<Request>("{\"last\":20}").expect("last"),
            Request { last: 20 }
        );
        assert!(serde_json::from_str::<Request>("{\"lats\":20}").is_err());
    }

    /// A record's JSON line, as the agent publishes it.
    fn record(port: u16) -> Vec<u8> {
        let mut line = Vec::new();
        log::write_line(&mut line, FlowFormat::Json, &wire(port)).expect("json");
        line
    }

    fn wire(port: u16) -> FlowRecord {
        FlowRecord {
            event: "open",
            time: "2026-01-01T00:00:00.000000Z".into(),
            netns: "/var/run/netns/ls".into(),
            netns_cookie: 7,
            pod: None,
            client_addr: "198.18.0.1".into(),
            client_port: port,
            local_addr: "198.18.0.2".into(),
            advertise_port: 12345,
            listen_port: 9095,
            flow_id: None,
            listener_pid: None,
            listener_comm: None,
            duration_ms: None,
            bytes_received: None,
            bytes_sent: None,
            srtt_us: None,
            retransmits: None,
            end: None,
        }
    }

    fn port_of(line: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        v["client_port"].as_u64().expect("a record")
    }

    /// Replay, live records and the lost count, on a real socket. The test
    /// runtime has one thread, like the agent's: while `publish` runs, no
    /// subscriber task can, so a burst larger than the channel is a
    /// deterministic overrun.
    #[tokio::test]
    async fn subscribers_replay_follow_and_learn_what_they_missed() {
        let dir = std::env::temp_dir().join(format!("redirector-flowsub-{}", std::process::id()));
        let path = dir.join("flows.sock");
        let (lost, subscribers) = (Counter::default(), Gauge::default());
        let hub = Arc::new(Hub::new(4, lost.clone(), subscribers.clone()));
        for port in 1..=3 {
            hub.publish([record(port).as_slice()]);
        }
        let server = Server::start(&path, hub.clone()).expect("listens");
        let mode = fs::metadata(&path).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let stream = UnixStream::connect(&path).await.expect("connects");
        let (read, mut write) = stream.into_split();
        write.write_all(b"{\"last\":2}\n").await.expect("request");
        let mut lines = BufReader::new(read).lines();
        macro_rules! next {
            () => {
                lines.next_line().await.expect("read").expect("a line")
            };
        }
        assert_eq!(port_of(&next!()), 2);
        assert_eq!(port_of(&next!()), 3);
        assert_eq!(next!(), "{\"live\":true}");
        assert_eq!(subscribers.get(), 1);

        hub.publish([record(4).as_slice()]);
        assert_eq!(port_of(&next!()), 4);
        // 10 records at once into a channel of 4: the oldest 6 are missed.
        for port in 5..=14 {
            hub.publish([record(port).as_slice()]);
        }
        assert_eq!(next!(), "{\"lost\":6}");
        for port in 11..=14 {
            assert_eq!(port_of(&next!()), port);
        }
        assert_eq!(lost.get(), 6);

        // A stopping agent hands over the last records, then hangs up.
        hub.publish([record(15).as_slice()]);
        server.shutdown().await;
        assert_eq!(port_of(&next!()), 15);
        assert!(lines.next_line().await.expect("eof").is_none());
        assert!(!path.exists(), "the socket file goes with the agent");
        assert_eq!(subscribers.get(), 0);
        let _ = fs::remove_dir(&dir);
    }

    #[tokio::test]
    async fn a_bad_request_gets_an_error_line() {
        let dir =
            std::env::temp_dir().join(format!("redirector-flowsub-bad-{}", std::process::id()));
        let path = dir.join("flows.sock");
        let hub = Arc::new(Hub::new(4, Counter::default(), Gauge::default()));
        let server = Server::start(&path, hub).expect("listens");
        let mut stream = UnixStream::connect(&path).await.expect("connects");
        stream.write_all(b"{\"lats\":1}\n").await.expect("request");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("reply");
        assert!(reply.starts_with("{\"error\":\"bad request"), "{reply}");
        server.shutdown().await;
        let _ = fs::remove_dir(&dir);
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_left_alone() {
        let dir =
            std::env::temp_dir().join(format!("redirector-flowsub-file-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("flows.sock");
        fs::write(&path, "precious").expect("file");
        let e = bind(&path).expect_err("refuses").to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(fs::read_to_string(&path).expect("kept"), "precious");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn capacity_covers_a_full_ring() {
        assert_eq!(Hub::capacity_for_ring(16384), 256);
        assert_eq!(Hub::capacity_for_ring(1 << 20), (1 << 20) / 112);
        assert_eq!(Hub::capacity_for_ring(1 << 30), 65_536);
    }
}
