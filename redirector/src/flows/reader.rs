//! Reads flow records from the kernel's ring buffer and writes them out, one
//! line each, until told to stop.

use std::{
    fs::OpenOptions,
    io::{self, IsTerminal, Write},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use redirector_common::FlowEvent;
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    config::settings::{usage, Settings},
    flows::log::{self, FlowFormat, Recorder},
    flows::sub::Hub,
};

/// Longest a flow record waits in the ring when the kernel does not wake us.
const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub type FlowOut = Box<dyn Write + Send>;

pub fn open_output(s: &Settings) -> Result<(FlowOut, FlowFormat)> {
    match &s.flow_log {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| usage(format!("cannot open flow log {}: {e}", path.display())))?;
            Ok((
                Box::new(io::BufWriter::new(file)),
                s.flow_format.unwrap_or(FlowFormat::Json),
            ))
        }
        None => {
            let default = if io::stdout().is_terminal() {
                FlowFormat::Text
            } else {
                FlowFormat::Json
            };
            Ok((Box::new(io::stdout()), s.flow_format.unwrap_or(default)))
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
    let mut written = 0u64;
    // The kernel only wakes us when the ring is a quarter full; the timer
    // bounds how late a record can be in quieter times.
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                written += drain(guard.get_inner_mut(), &recorder, format, &mut out, &hub)?;
                guard.clear_ready();
                false
            }
            _ = tick.tick() => {
                written += drain(ring.get_mut(), &recorder, format, &mut out, &hub)?;
                false
            }
            _ = stop.changed() => true,
        };
        if stopping {
            written += drain(ring.get_mut(), &recorder, format, &mut out, &hub)?;
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

fn drain(
    ring: &mut RingBuf<MapData>,
    recorder: &Recorder,
    format: FlowFormat,
    out: &mut FlowOut,
    hub: &Hub,
) -> Result<u64> {
    let mut n = 0;
    while let Some(item) = ring.next() {
        let Some(event) = decode(&item) else {
            continue;
        };
        if let Some(record) = recorder.record(&event) {
            log::write_line(out, format, &record).context("writing a flow record")?;
            // After the log line: subscribers see what the log says.
            hub.publish(record);
            n += 1;
        }
    }
    if n > 0 {
        out.flush().context("flushing flow records")?;
    }
    Ok(n)
}

#[cfg(test)]
mod cost {
    //! `flow_cost`: N synthetic kernel records through decode, format, write
    //! (to /dev/null, as `--flow-log FILE --flow-format json` writes) and
    //! publish. Run under callgrind for instructions per record:
    //! `valgrind --tool=callgrind --toggle-collect='*cost*measure*' <test binary>
    //! --ignored --exact flows::reader::cost::flow_cost --test-threads=1`.
    use super::*;
    use crate::{discovery::listeners::Owner, flows::log::NsInfo};
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
    use redirector_common::{AF_INET, END_FIN, EVENT_CLOSE, EVENT_OPEN};
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    const N: usize = 100_000;

    fn records() -> Vec<Vec<u8>> {
        (0..N)
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
                // SAFETY: test only; FlowEvent is plain integers.
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

    #[inline(never)]
    fn feed(
        items: &[Vec<u8>],
        recorder: &Recorder,
        out: &mut FlowOut,
        hub: &Hub,
        batch: usize,
    ) -> u64 {
        let mut n = 0;
        for chunk in items.chunks(batch) {
            for item in chunk {
                let Some(event) = decode(item) else {
                    continue;
                };
                if let Some(record) = recorder.record(&event) {
                    log::write_line(out, FlowFormat::Json, &record).expect("write");
                    hub.publish(record);
                    n += 1;
                }
            }
            out.flush().expect("flush");
        }
        n
    }

    /// What callgrind counts (`--toggle-collect='*cost*measure*'`).
    #[inline(never)]
    fn measure(items: &[Vec<u8>], recorder: &Recorder, out: &mut FlowOut, hub: &Hub) -> u64 {
        feed(items, recorder, out, hub, 256)
    }

    #[test]
    #[ignore = "a cost harness, for callgrind"]
    fn flow_cost() {
        let items = records();
        let recorder = Recorder {
            namespaces: Arc::new(Mutex::new(HashMap::from([(
                4099,
                NsInfo {
                    name: "/var/run/netns/live-store-0".to_owned(),
                    listener: Some(Owner {
                        pid: 4242,
                        comm: "tempo".to_owned(),
                    }),
                },
            )]))),
            clock_offset_ns: 1_700_000_000_000_000_000,
        };
        let file = OpenOptions::new()
            .append(true)
            .open("/dev/null")
            .expect("/dev/null");
        let mut out: FlowOut = Box::new(io::BufWriter::new(file));
        let hub = Hub::new(
            Hub::capacity_for_ring(redirector_common::DEFAULT_FLOW_RING_BYTES),
            Counter::default(),
            Gauge::default(),
        );
        // Warm up (history full, buffers grown), then the measured run.
        feed(&items, &recorder, &mut out, &hub, 256);
        let n = measure(&items, &recorder, &mut out, &hub);
        assert_eq!(n, N as u64);
    }
}
