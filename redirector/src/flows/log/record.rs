//! A flow record with owned strings ([`FlowRecord`]): what [`Recorder`] makes
//! of a kernel record, what subscribers get as JSON, and what `redirector
//! flows` turns back into lines.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use redirector_common::{
    FlowEvent, END_ABORTED, END_FIN, END_RST, EVENT_CLOSE, EVENT_OPEN, EVENT_REFUSED, EVENT_UPDATE,
};
use serde::{Deserialize, Deserializer, Serialize};

use super::fields::{ip, HasFields, Key, Value};
use crate::sys::owners::Owner;

/// One of the names the agent writes (an event, an end). An alias, not
/// `&'static str` spelled out, so serde does not take it as borrowed from the
/// input it reads.
pub type Name = &'static str;

/// One flow record. The formats write its fields in `fields`' order, which
/// is also this struct's (serde's), so its JSON is the same either way; the
/// same struct reads a record back (`redirector flows`), its names mapped to
/// the ones the agent writes.
#[derive(Serialize, Deserialize, Debug)]
pub struct FlowRecord {
    #[serde(deserialize_with = "event_from_wire")]
    pub event: Name,
    pub time: String,
    pub netns: String,
    pub netns_cookie: u64,
    /// `namespace/name` of the live-store's pod, where known (`--kube`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub client_addr: String,
    pub client_port: u16,
    pub local_addr: String,
    pub advertise_port: u16,
    pub listen_port: u16,
    /// The accepted socket's cookie: the same in a flow's open and close
    /// records (none for a refused connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<u64>,
    /// The live-store process holding the listener, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener_comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srtt_us: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "end_from_wire"
    )]
    pub end: Option<Name>,
}

fn event_from_wire<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    Ok(event_named(&String::deserialize(d)?))
}

fn end_from_wire<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'static str>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.as_deref().map(end_named))
}

/// Every string is looked at for escapes: a record from the wire may hold
/// anything.
impl HasFields for FlowRecord {
    fn value(&self, key: Key) -> Option<Value<'_>> {
        Some(match key {
            Key::Event => Value::str(self.event),
            Key::Time => Value::str(&self.time),
            Key::Netns => Value::str(&self.netns),
            Key::NetnsCookie => Value::Uint(self.netns_cookie),
            Key::Pod => Value::str(self.pod.as_deref()?),
            Key::ClientAddr => Value::str(&self.client_addr),
            Key::ClientPort => Value::Uint(self.client_port.into()),
            Key::LocalAddr => Value::str(&self.local_addr),
            Key::AdvertisePort => Value::Uint(self.advertise_port.into()),
            Key::ListenPort => Value::Uint(self.listen_port.into()),
            Key::FlowId => Value::Uint(self.flow_id?),
            Key::ListenerPid => Value::Int(self.listener_pid?.into()),
            Key::ListenerComm => Value::str(self.listener_comm.as_deref()?),
            Key::DurationMs => Value::Ms(self.duration_ms?),
            Key::BytesReceived => Value::Uint(self.bytes_received?),
            Key::BytesSent => Value::Uint(self.bytes_sent?),
            Key::SrttUs => Value::Uint(self.srtt_us?.into()),
            Key::Retransmits => Value::Uint(self.retransmits?.into()),
            Key::End => Value::str(self.end?),
        })
    }
}

/// What records say about a served namespace.
#[derive(Clone, Debug, Default)]
pub struct NsInfo {
    pub name: String,
    pub listener: Option<Owner>,
    /// `namespace/name` of the Kubernetes pod it belongs to (`--kube`).
    pub pod: Option<String>,
}

/// Builds records: knows the namespaces and the clock offset.
pub struct Recorder {
    /// Namespace cookie -> what we know of it; the agent keeps it current.
    pub namespaces: Arc<Mutex<HashMap<u64, NsInfo>>>,
    pub clock_offset_ns: i128,
}

impl Recorder {
    pub fn record(&self, e: &FlowEvent) -> Option<FlowRecord> {
        let event = event_name(e.kind)?;
        let time = UNIX_EPOCH + Duration::from_nanos(unix_ns(e, self.clock_offset_ns));
        let close = e.kind == EVENT_CLOSE;
        // An update carries the counters so far; only a close has an end.
        let counted = close || e.kind == EVENT_UPDATE;
        let info = self
            .namespaces
            .lock()
            .ok()
            .and_then(|n| n.get(&e.netns_cookie).cloned())
            .unwrap_or_else(|| NsInfo {
                name: format!("cookie:{}", e.netns_cookie),
                ..NsInfo::default()
            });
        let listener = info.listener.filter(|_| has_listener(e));
        Some(FlowRecord {
            event,
            time: humantime::format_rfc3339_micros(time).to_string(),
            netns: info.name,
            netns_cookie: e.netns_cookie,
            pod: info.pod,
            client_addr: ip(e.family, e.remote_ip).to_string(),
            client_port: e.remote_port,
            local_addr: ip(e.family, e.local_ip).to_string(),
            advertise_port: e.local_port,
            listen_port: e.listen_port,
            flow_id: flow_id(e),
            listener_pid: listener.as_ref().map(|o| o.pid),
            listener_comm: listener.map(|o| o.comm),
            duration_ms: counted.then(|| e.duration_ns as f64 / 1e6),
            bytes_received: counted.then_some(e.bytes_received),
            bytes_sent: counted.then_some(e.bytes_sent),
            srtt_us: counted.then_some(e.srtt_us),
            retransmits: counted.then_some(e.retransmits),
            end: close.then(|| end_name(e.end)),
        })
    }
}

/// The record's `event`; `None` for a kind this agent does not know.
pub(super) fn event_name(kind: u8) -> Option<&'static str> {
    match kind {
        EVENT_OPEN => Some("open"),
        EVENT_CLOSE => Some("close"),
        EVENT_UPDATE => Some("update"),
        EVENT_REFUSED => Some("refused"),
        _ => None,
    }
}

/// A record read back (`redirector flows`): the wire's `event` as the name
/// [`event_name`] gives it, "unknown" for any other.
pub fn event_named(wire: &str) -> &'static str {
    [EVENT_OPEN, EVENT_CLOSE, EVENT_UPDATE, EVENT_REFUSED]
        .into_iter()
        .filter_map(event_name)
        .find(|name| *name == wire)
        .unwrap_or("unknown")
}

/// The wire's `end` as the name [`end_name`] gives it, "unknown" for any other.
pub fn end_named(wire: &str) -> &'static str {
    [END_FIN, END_RST, END_ABORTED]
        .into_iter()
        .map(end_name)
        .find(|name| *name == wire)
        .unwrap_or("unknown")
}

pub(super) fn end_name(end: u8) -> &'static str {
    match end {
        END_FIN => "fin",
        END_RST => "rst",
        END_ABORTED => "aborted",
        _ => "unknown",
    }
}

/// Unix time of the record, in nanoseconds: 0 for a time before 1970, and
/// truncated to 64 bits.
pub(super) fn unix_ns(e: &FlowEvent, clock_offset_ns: i128) -> u64 {
    (e.ts_ns as i128 + clock_offset_ns).max(0) as u128 as u64
}

/// Whether the record names the namespace's listener: a refused connection
/// found none.
pub(super) fn has_listener(e: &FlowEvent) -> bool {
    e.kind != EVENT_REFUSED
}

/// A flow's id: its accepted socket's cookie (a refused connection has none).
pub(super) fn flow_id(e: &FlowEvent) -> Option<u64> {
    (e.kind != EVENT_REFUSED && e.socket_cookie != 0).then_some(e.socket_cookie)
}
