//! Reads flow records from the kernel's ring buffer and writes them out, one
//! line each, until told to stop. Two records per redirected connection make
//! this the agent's hot path: each drain renders into one reused buffer and
//! goes out in one write.

use std::{
    fs::OpenOptions,
    io::{self, IsTerminal, Write},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{ring_buf::RingBufItem, Map, MapData, RingBuf};
use redirector_common::FlowEvent;
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    flows::log::{FlowFormat, Ns, Recorder, Renderer},
    flows::sub::Hub,
};

/// Longest a flow record waits in the ring when the kernel does not wake us.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes of lines collected before one write: a full ring (thousands of
/// records) then goes out in a few large writes, not one huge buffer.
const WRITE_BATCH: usize = 256 * 1024;

pub type FlowOut = Box<dyn Write + Send>;

/// `--flow-log` names a file the agent cannot append to.
#[derive(Debug, thiserror::Error)]
#[error("cannot open flow log {}: {err}", path.display())]
pub struct FlowLogError {
    pub path: std::path::PathBuf,
    err: io::Error,
}

pub fn open_output(
    flow_log: Option<&Path>,
    flow_format: Option<FlowFormat>,
) -> Result<(FlowOut, FlowFormat)> {
    match flow_log {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| FlowLogError {
                    path: path.to_owned(),
                    err,
                })?;
            // Unbuffered: the reader hands over whole batches of lines, each
            // in one write.
            Ok((Box::new(file), flow_format.unwrap_or(FlowFormat::Json)))
        }
        None => {
            let default = if io::stdout().is_terminal() {
                FlowFormat::Text
            } else {
                FlowFormat::Json
            };
            Ok((Box::new(io::stdout()), flow_format.unwrap_or(default)))
        }
    }
}

/// Reads flow records until told to stop, then drains what is left. Returns the
/// number of records written.
pub async fn read(
    ring: MapData,
    recorder: Recorder,
    format: FlowFormat,
    mut out: FlowOut,
    mut stop: watch::Receiver<bool>,
    hub: std::sync::Arc<Hub>,
) -> Result<u64> {
    let ring = RingBuf::try_from(Map::RingBuf(ring)).context("FLOW_EVENTS ring buffer")?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until the
    // AsyncFd (which owns the RingBuf) is dropped.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the flow ring buffer: {e}"))?;
    let mut batch = Batch::new(format);
    let mut written = 0u64;
    // The kernel only wakes us when the ring is a quarter full; the timer
    // bounds how late a record can be in quieter times.
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                written += drain(guard.get_inner_mut(), &recorder, &mut batch, &mut out, &hub)?;
                guard.clear_ready();
                false
            }
            _ = tick.tick() => {
                written += drain(ring.get_mut(), &recorder, &mut batch, &mut out, &hub)?;
                false
            }
            _ = stop.changed() => true,
        };
        if stopping {
            written += drain(ring.get_mut(), &recorder, &mut batch, &mut out, &hub)?;
            return Ok(written);
        }
    }
}

/// One record as the kernel wrote it into the ring; `None` for anything
/// shorter. Any bit pattern is a valid `FlowEvent` (plain integers), so
/// whatever the bytes say, decoding cannot fail further.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: at least size_of::<FlowEvent>() bytes (checked), every bit
    // pattern valid; the ring gives no alignment guarantee, hence unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Where records come from: the kernel's ring, or a test's records.
pub trait Source {
    type Item<'a>: std::ops::Deref<Target = [u8]>
    where
        Self: 'a;
    fn next(&mut self) -> Option<Self::Item<'_>>;
}

impl Source for RingBuf<MapData> {
    type Item<'a> = RingBufItem<'a>;
    fn next(&mut self) -> Option<RingBufItem<'_>> {
        RingBuf::next(self)
    }
}

/// Lines rendered since the last write, and the buffers kept between drains
/// so that rendering allocates nothing once they have grown.
pub struct Batch {
    format: FlowFormat,
    renderer: Renderer,
    /// Lines in the log's format, written at once.
    out: Vec<u8>,
    /// Subscribers' JSON lines when the log is in another format (else the
    /// log's own lines serve); where each line ends.
    json: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    pub fn new(format: FlowFormat) -> Self {
        Self {
            format,
            renderer: Renderer::default(),
            out: Vec::with_capacity(WRITE_BATCH + 4096),
            json: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// Writes the lines collected so far in one write, then hands their JSON
    /// to subscribers: they see what the log says, once it says it.
    fn write(&mut self, out: &mut FlowOut, hub: &Hub) -> io::Result<()> {
        if self.ends.is_empty() {
            return Ok(());
        }
        out.write_all(&self.out)?;
        let json = match self.format {
            FlowFormat::Json => &self.out,
            _ => &self.json,
        };
        let mut start = 0;
        hub.publish(self.ends.iter().map(|&end| {
            let line = &json[start..end];
            start = end;
            line
        }));
        self.out.clear();
        self.json.clear();
        self.ends.clear();
        Ok(())
    }
}

/// Writes every record waiting in `ring`, a batch at a time, and flushes.
fn drain(
    ring: &mut impl Source,
    recorder: &Recorder,
    batch: &mut Batch,
    out: &mut FlowOut,
    hub: &Hub,
) -> Result<u64> {
    let mut n = 0;
    loop {
        let more = {
            // Borrowed for the whole batch: one lock, no name copied. A
            // poisoned table is as good as none: records then name the cookie.
            let names = recorder.namespaces.lock();
            let names = names.as_deref().ok();
            // Records come in runs from one namespace: one lookup per run.
            let mut last: Option<(u64, Option<Ns>)> = None;
            loop {
                if batch.out.len() >= WRITE_BATCH {
                    break true;
                }
                let Some(item) = ring.next() else {
                    break false;
                };
                let Some(event) = decode(&item) else {
                    continue;
                };
                // Copied out: the kernel may have the ring space back now.
                drop(item);
                let ns = match last {
                    Some((cookie, ns)) if cookie == event.netns_cookie => ns,
                    _ => {
                        let ns = names.and_then(|t| t.get(&event.netns_cookie)).map(Ns::new);
                        last = Some((event.netns_cookie, ns));
                        ns
                    }
                };
                let off = recorder.clock_offset_ns;
                if !batch
                    .renderer
                    .render(&mut batch.out, batch.format, &event, ns, off)
                {
                    continue;
                }
                let json = match batch.format {
                    FlowFormat::Json => &batch.out,
                    _ => {
                        let r = &mut batch.renderer;
                        r.render(&mut batch.json, FlowFormat::Json, &event, ns, off);
                        &batch.json
                    }
                };
                batch.ends.push(json.len());
                n += 1;
            }
        };
        batch.write(out, hub).context("writing flow records")?;
        if !more {
            break;
        }
    }
    if n > 0 {
        out.flush().context("flushing flow records")?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    //! `flow_cost` is a cost harness: N synthetic kernel records through
    //! decode, render, write (to /dev/null, as `--flow-log FILE --flow-format
    //! json` writes) and publish. Under callgrind it gives instructions per
    //! record: `valgrind --tool=callgrind --toggle-collect='*tests*measure*'
    //! <test binary> --ignored --exact flows::reader::tests::flow_cost
    //! --test-threads=1`, then Ir / 100000.
    use super::*;
    use crate::{flows::log::NsInfo, sys::owners::Owner};
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
    use redirector_common::{AF_INET, END_FIN, EVENT_CLOSE, EVENT_OPEN};
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    const N: usize = 100_000;

    /// Records as the kernel writes them: opens and closes, alternately.
    fn records(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let e = FlowEvent {
                    kind: if i % 2 == 0 { EVENT_OPEN } else { EVENT_CLOSE },
                    end: END_FIN,
                    family: AF_INET,
                    local_port: 12345,
                    remote_port: 30000 + (i / 2 % 30000) as u16,
                    listen_port: 9095,
                    _pad: 0,
                    srtt_us: 53,
                    netns_cookie: 4099,
                    socket_cookie: i as u64 / 2,
                    ts_ns: 1_000_000_000_000 + i as u64 * 37_123,
                    duration_ns: 431_234 + i as u64,
                    bytes_received: 5,
                    bytes_sent: 10,
                    retransmits: 0,
                    _pad2: 0,
                    remote_ip: [u32::from_be_bytes([198, 18, 0, 1]).to_be(), 0, 0, 0],
                    local_ip: [u32::from_be_bytes([198, 18, 0, 2]).to_be(), 0, 0, 0],
                };
                // SAFETY: test only; FlowEvent is plain integers, no padding
                // the compiler adds (its size is asserted).
                unsafe {
                    std::slice::from_raw_parts(
                        (&e as *const FlowEvent).cast::<u8>(),
                        std::mem::size_of::<FlowEvent>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }

    struct Records<'r>(std::slice::Iter<'r, Vec<u8>>);

    impl Source for Records<'_> {
        type Item<'a>
            = &'a [u8]
        where
            Self: 'a;
        fn next(&mut self) -> Option<&[u8]> {
            self.0.next().map(Vec::as_slice)
        }
    }

    fn recorder() -> Recorder {
        Recorder {
            namespaces: Arc::new(Mutex::new(HashMap::from([(
                4099,
                NsInfo {
                    name: "/var/run/netns/live-store-0".to_owned(),
                    listener: Some(Owner {
                        pid: 4242,
                        comm: "tempo".to_owned(),
                    }),
                    pod: None,
                },
            )]))),
            clock_offset_ns: 1_700_000_000_000_000_000,
        }
    }

    fn hub() -> Hub {
        Hub::new(
            Hub::capacity_for_ring(redirector_common::DEFAULT_FLOW_RING_BYTES),
            Counter::default(),
            Gauge::default(),
        )
    }

    /// Drains of `per_drain` records each, as ring wakeups would bring them.
    fn feed(
        items: &[Vec<u8>],
        recorder: &Recorder,
        batch: &mut Batch,
        out: &mut FlowOut,
        hub: &Hub,
        per_drain: usize,
    ) -> u64 {
        items
            .chunks(per_drain)
            .map(|chunk| {
                drain(&mut Records(chunk.iter()), recorder, batch, out, hub).expect("drain")
            })
            .sum()
    }

    /// What callgrind counts (`--toggle-collect='*tests*measure*'`).
    #[inline(never)]
    fn measure(
        items: &[Vec<u8>],
        recorder: &Recorder,
        batch: &mut Batch,
        out: &mut FlowOut,
        hub: &Hub,
    ) -> u64 {
        feed(items, recorder, batch, out, hub, 256)
    }

    #[test]
    #[ignore = "a cost harness, for callgrind"]
    fn flow_cost() {
        let items = records(N);
        let recorder = recorder();
        let file = OpenOptions::new()
            .append(true)
            .open("/dev/null")
            .expect("/dev/null");
        let mut out: FlowOut = Box::new(file);
        let hub = hub();
        let mut batch = Batch::new(FlowFormat::Json);
        // Warm up (history full, buffers grown), then the measured run.
        feed(&items, &recorder, &mut batch, &mut out, &hub, 256);
        let n = measure(&items, &recorder, &mut batch, &mut out, &hub);
        assert_eq!(n, N as u64);
    }

    /// Keeps the size of each write and what was written.
    #[derive(Clone, Default)]
    struct Counted(Arc<Mutex<(Vec<usize>, Vec<u8>)>>);

    impl Write for Counted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut c = self.0.lock().expect("lock");
            c.0.push(buf.len());
            c.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_drain_writes_once_per_batch_and_publishes_the_json_lines() {
        let recorder = recorder();
        let mut items = records(3000);
        // Too short to be a record, and a kind this agent does not know:
        // neither is written nor counted.
        items.insert(10, vec![0; 20]);
        let mut unknown = items[0].clone();
        unknown[0] = 9;
        items.insert(20, unknown);
        for format in [FlowFormat::Json, FlowFormat::Text, FlowFormat::Logfmt] {
            let counted = Counted::default();
            let mut out: FlowOut = Box::new(counted.clone());
            let hub = hub();
            let mut batch = Batch::new(format);
            let n = drain(
                &mut Records(items.iter()),
                &recorder,
                &mut batch,
                &mut out,
                &hub,
            )
            .expect("drain");
            assert_eq!(n, 3000);
            let (writes, written) = counted.0.lock().expect("lock").clone();
            // ~300 bytes a line: a few batches of WRITE_BATCH, each one write.
            assert!(writes.len() > 1, "{format:?} {writes:?}");
            let (last, full) = writes.split_last().expect("writes");
            assert!(
                *last > 0 && *last < WRITE_BATCH + 4096,
                "{format:?} {writes:?}"
            );
            for w in full {
                assert!(
                    (WRITE_BATCH..WRITE_BATCH + 4096).contains(w),
                    "{format:?} {writes:?}"
                );
            }
            assert_eq!(written.iter().filter(|&&b| b == b'\n').count(), 3000);

            // The log's own lines, one by one, as the reference path renders them.
            let mut want = Vec::new();
            let mut json = Vec::new();
            for item in &items {
                let Some(record) = decode(item).and_then(|e| recorder.record(&e)) else {
                    continue;
                };
                crate::flows::log::write_line(&mut want, format, &record).expect("line");
                crate::flows::log::write_line(&mut json, FlowFormat::Json, &record).expect("json");
            }
            assert_eq!(written, want, "{format:?}");
            // Subscribers keep the JSON lines whatever the log's format.
            let (_, kept, ends) = hub.subscribe().expect("open");
            assert_eq!(ends.len(), crate::flows::sub::HISTORY);
            assert!(json.ends_with(&kept), "{format:?}");
        }
    }
}
