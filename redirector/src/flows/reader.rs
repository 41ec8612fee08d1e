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
