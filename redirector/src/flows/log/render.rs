//! The agent's hot path (two records per redirected connection): kernel
//! records written straight into a byte buffer, with no [`FlowRecord`] in
//! between, so nothing is allocated once the buffer has grown and no
//! namespace name is copied.
//!
//! [`FlowRecord`]: super::FlowRecord

use std::{
    io::Write as _,
    time::{Duration, UNIX_EPOCH},
};

use redirector_common::{FlowEvent, EVENT_CLOSE, EVENT_UPDATE};

use super::{
    fields::{HasFields, Key, Value},
    format::{self, json_plain},
    record::{end_name, event_name, flow_id, has_listener, unix_ns},
    FlowFormat, NsInfo,
};
use crate::sys::owners::Owner;

/// What records say about a namespace, looked at once per run of records
/// from it: names so rarely need JSON escapes that checking them for every
/// record would cost more than writing them.
#[derive(Clone, Copy)]
pub struct Ns<'a> {
    info: &'a NsInfo,
    name_plain: bool,
    comm_plain: bool,
    pod_plain: bool,
}

impl<'a> Ns<'a> {
    pub fn new(info: &'a NsInfo) -> Self {
        Self {
            info,
            name_plain: json_plain(&info.name),
            comm_plain: info.listener.as_ref().is_none_or(|o| json_plain(&o.comm)),
            pod_plain: info.pod.as_deref().is_none_or(json_plain),
        }
    }
}

/// Renders kernel records into a byte buffer, in any format. The lines are
/// byte for byte those [`write_line`] writes of [`Recorder::record`]'s
/// record (the tests compare them); `write_line` stays for records that
/// arrive as JSON (`redirector flows`).
///
/// [`write_line`]: super::write_line
/// [`Recorder::record`]: super::Recorder::record
#[derive(Default)]
pub struct Renderer {
    /// The last whole second rendered and its `YYYY-MM-DDTHH:MM:SS`: records
    /// come in bursts, so the calendar arithmetic runs about once a second.
    second: Option<(u64, [u8; 19])>,
}

impl Renderer {
    /// Appends `e` as one line in `format`; false (nothing appended) for a
    /// kind of record this agent does not know. `ns` is what the agent knows
    /// of the record's namespace, if anything.
    pub fn render(
        &mut self,
        out: &mut Vec<u8>,
        format: FlowFormat,
        e: &FlowEvent,
        ns: Option<Ns<'_>>,
        clock_offset_ns: i128,
    ) -> bool {
        let Some(event) = event_name(e.kind) else {
            return false;
        };
        let r = Fields {
            event,
            time: self.time(unix_ns(e, clock_offset_ns)),
            e,
            ns,
            owner: ns
                .and_then(|n| n.info.listener.as_ref())
                .filter(|_| has_listener(e)),
            close: e.kind == EVENT_CLOSE,
            counted: e.kind == EVENT_CLOSE || e.kind == EVENT_UPDATE,
        };
        format::line(out, format, &r);
        true
    }

    /// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`, as `humantime::format_rfc3339_micros`.
    fn time(&mut self, unix_ns: u64) -> [u8; 27] {
        let (secs, nanos) = (unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
        let prefix = match self.second {
            Some((s, p)) if s == secs => p,
            _ => {
                let p = calendar(secs);
                self.second = Some((secs, p));
                p
            }
        };
        let mut t = *b"0000-00-00T00:00:00.000000Z";
        t[..19].copy_from_slice(&prefix);
        let mut micros = nanos / 1_000;
        for d in t[20..26].iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        t
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` after the epoch. humantime refuses only
/// years past 9999, which u64 nanoseconds never reach.
fn calendar(secs: u64) -> [u8; 19] {
    let mut buf = [b'0'; 20];
    let mut w: &mut [u8] = &mut buf;
    let _ = write!(
        w,
        "{}",
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
    );
    let mut prefix = [0; 19];
    prefix.copy_from_slice(&buf[..19]);
    prefix
}

/// One kernel record's fields, borrowed.
struct Fields<'a> {
    event: &'static str,
    time: [u8; 27],
    e: &'a FlowEvent,
    ns: Option<Ns<'a>>,
    owner: Option<&'a Owner>,
    /// A close record: it has an end.
    close: bool,
    /// A close or update record: it has the flow's counters.
    counted: bool,
}

/// Names come with what [`Ns`] found out about their escapes; everything
/// else the agent writes itself and never needs escaping.
impl HasFields for Fields<'_> {
    #[inline(always)]
    fn value(&self, key: Key) -> Option<Value<'_>> {
        let e = self.e;
        let name = |s, json_plain| Value::Str { s, json_plain };
        Some(match key {
            Key::Event => Value::Word(self.event.as_bytes()),
            Key::Time => Value::Word(&self.time),
            Key::Netns => match self.ns {
                Some(ns) => name(&ns.info.name, ns.name_plain),
                None => Value::Cookie(e.netns_cookie),
            },
            Key::NetnsCookie => Value::Uint(e.netns_cookie),
            Key::Pod => {
                let ns = self.ns?;
                name(ns.info.pod.as_deref()?, ns.pod_plain)
            }
            Key::ClientAddr => Value::Ip(e.family, e.remote_ip),
            Key::ClientPort => Value::Uint(e.remote_port.into()),
            Key::LocalAddr => Value::Ip(e.family, e.local_ip),
            Key::AdvertisePort => Value::Uint(e.local_port.into()),
            Key::ListenPort => Value::Uint(e.listen_port.into()),
            Key::FlowId => Value::Uint(flow_id(e)?),
            Key::ListenerPid => Value::Int(self.owner?.pid.into()),
            Key::ListenerComm => name(&self.owner?.comm, self.ns.is_some_and(|ns| ns.comm_plain)),
            Key::DurationMs if self.counted => Value::Ms(e.duration_ns as f64 / 1e6),
            Key::BytesReceived if self.counted => Value::Uint(e.bytes_received),
            Key::BytesSent if self.counted => Value::Uint(e.bytes_sent),
            Key::SrttUs if self.counted => Value::Uint(e.srtt_us.into()),
            Key::Retransmits if self.counted => Value::Uint(e.retransmits.into()),
            Key::End if self.close => Value::Word(end_name(e.end).as_bytes()),
            Key::DurationMs
            | Key::BytesReceived
            | Key::BytesSent
            | Key::SrttUs
            | Key::Retransmits
            | Key::End => return None,
        })
    }
}
