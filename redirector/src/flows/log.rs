//! Turns kernel flow records into log lines: `text` for people, `json` and
//! `logfmt` one record per line for Loki, Vector or promtail.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use clap::ValueEnum;
use redirector_common::{
    FlowEvent, AF_INET, END_ABORTED, END_FIN, END_RST, EVENT_CLOSE, EVENT_OPEN, EVENT_REFUSED,
    EVENT_UPDATE,
};
use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter as _};

use crate::discovery::listeners::Owner;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowFormat {
    Text,
    Json,
    Logfmt,
}

/// One flow record, in the field order every format uses.
#[derive(Serialize, Debug)]
pub struct FlowRecord {
    pub event: &'static str,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<&'static str>,
}

fn ip(family: u16, words: [u32; 4]) -> IpAddr {
    // The words hold the address in network byte order, as the kernel stores it.
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(words[0])))
    } else {
        let mut bytes = [0u8; 16];
        for (chunk, w) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
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
        let event = match e.kind {
            EVENT_OPEN => "open",
            EVENT_CLOSE => "close",
            EVENT_UPDATE => "update",
            EVENT_REFUSED => "refused",
            _ => return None,
        };
        let unix_ns = (e.ts_ns as i128 + self.clock_offset_ns).max(0) as u128;
        let time = UNIX_EPOCH + Duration::from_nanos(unix_ns as u64);
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
            // A refused connection found no listener.
            listener_pid: info
                .listener
                .as_ref()
                .filter(|_| e.kind != EVENT_REFUSED)
                .map(|o| o.pid),
            listener_comm: info
                .listener
                .filter(|_| e.kind != EVENT_REFUSED)
                .map(|o| o.comm),
            duration_ms: counted.then(|| e.duration_ns as f64 / 1e6),
            bytes_received: counted.then_some(e.bytes_received),
            bytes_sent: counted.then_some(e.bytes_sent),
            srtt_us: counted.then_some(e.srtt_us),
            retransmits: counted.then_some(e.retransmits),
            end: close.then_some(match e.end {
                END_FIN => "fin",
                END_RST => "rst",
                END_ABORTED => "aborted",
                _ => "unknown",
            }),
        })
    }
}

/// A flow's id: its accepted socket's cookie (a refused connection has none).
fn flow_id(e: &FlowEvent) -> Option<u64> {
    (e.kind != EVENT_REFUSED && e.socket_cookie != 0).then_some(e.socket_cookie)
}

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

/// Renders kernel records straight into a byte buffer, in any format: the
/// agent's hot path (two records per redirected connection), so nothing is
/// allocated once the buffer has grown and no namespace name is copied. The
/// lines are byte for byte those [`write_line`] renders from
/// [`Recorder::record`] (the tests compare them); `write_line` stays for
/// records that arrive as JSON (`redirector flows`).
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
        let event = match e.kind {
            EVENT_OPEN => "open",
            EVENT_CLOSE => "close",
            EVENT_UPDATE => "update",
            EVENT_REFUSED => "refused",
            _ => return false,
        };
        // As `Recorder::record` computes it, truncation included.
        let unix_ns = (e.ts_ns as i128 + clock_offset_ns).max(0) as u128 as u64;
        let r = Fields {
            event,
            time: self.time(unix_ns),
            e,
            ns,
            // A refused connection found no listener.
            owner: ns
                .and_then(|n| n.info.listener.as_ref())
                .filter(|_| e.kind != EVENT_REFUSED),
            close: e.kind == EVENT_CLOSE,
            counted: e.kind == EVENT_CLOSE || e.kind == EVENT_UPDATE,
        };
        match format {
            FlowFormat::Json => r.json(out),
            FlowFormat::Text => r.text(out),
            FlowFormat::Logfmt => r.logfmt(out),
        }
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

/// One record's fields, borrowed, for [`Renderer`].
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

// Writes into a Vec<u8> cannot fail, hence the ignored io::Results below.
fn put_u64(out: &mut Vec<u8>, v: u64) {
    let _ = CompactFormatter.write_u64(out, v);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    let _ = CompactFormatter.write_u32(out, v);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    let _ = CompactFormatter.write_u16(out, v);
}

/// As `ip(family, words)` displays it.
fn put_ip(out: &mut Vec<u8>, family: u16, words: [u32; 4]) {
    if family == AF_INET {
        // Built on the stack, then appended at once.
        let mut s = [0u8; 15];
        let mut n = 0;
        for (i, v) in words[0].to_ne_bytes().into_iter().enumerate() {
            if i > 0 {
                s[n] = b'.';
                n += 1;
            }
            if v >= 100 {
                s[n] = b'0' + v / 100;
                n += 1;
            }
            if v >= 10 {
                s[n] = b'0' + v / 10 % 10;
                n += 1;
            }
            s[n] = b'0' + v % 10;
            n += 1;
        }
        out.extend_from_slice(&s[..n]);
    } else {
        let _ = write!(out, "{}", ip(family, words));
    }
}

/// Whether serde_json writes `s` as it is between quotes: no control
/// character, `"` or `\`.
fn json_plain(s: &str) -> bool {
    !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A string as serde_json escapes it; `plain` as [`json_plain`] says.
fn put_json_str(out: &mut Vec<u8>, s: &str, plain: bool) {
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Whether `v` goes into a logfmt line as it is: no space, `=`, `"` or
/// control character (an empty value too, `key=`, as go-logfmt writes it).
fn logfmt_bare(v: &str) -> bool {
    !v.chars()
        .any(|c| c == ' ' || c == '=' || c == '"' || c.is_control())
}

/// `v` as a logfmt value, in pieces handed to `put`: bare if
/// [`logfmt_bare`], otherwise double-quoted with `\"`, `\\`, `\n`, `\t` and
/// `\r` escapes and any other control character as `\u00XX` (the escapes
/// go-logfmt's decoder, and so Loki's `| logfmt`, reads back).
fn logfmt_value(v: &str, mut put: impl FnMut(&str)) {
    if logfmt_bare(v) {
        put(v);
        return;
    }
    put("\"");
    // Runs of characters that need no escape are handed over whole.
    let mut start = 0;
    for (i, c) in v.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\t' => "\\t",
            '\r' => "\\r",
            c if c.is_control() => "",
            _ => continue,
        };
        put(&v[start..i]);
        if escape.is_empty() {
            // Control characters (Unicode's Cc) are all below U+00A0: two
            // hex digits after `\u00`.
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let code = c as usize;
            let buf = [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[code >> 4 & 0xf],
                HEX[code & 0xf],
            ];
            // ASCII, so always UTF-8.
            put(std::str::from_utf8(&buf).unwrap_or_default());
        } else {
            put(escape);
        }
        start = i + c.len_utf8();
    }
    put(&v[start..]);
    put("\"");
}

/// A free-form value as `logfmt` writes it ([`logfmt_value`]).
fn put_logfmt_str(out: &mut Vec<u8>, v: &str) {
    logfmt_value(v, |piece| out.extend_from_slice(piece.as_bytes()));
}

fn end_name(end: u8) -> &'static str {
    match end {
        END_FIN => "fin",
        END_RST => "rst",
        END_ABORTED => "aborted",
        _ => "unknown",
    }
}

impl Fields<'_> {
    /// The pod's `namespace/name` and whether it needs no JSON escapes.
    fn pod(&self) -> Option<(&str, bool)> {
        let ns = self.ns?;
        Some((ns.info.pod.as_deref()?, ns.pod_plain))
    }

    /// The namespace's name, or `cookie:N` when the agent does not know it;
    /// `name` writes a known name (escaped as the format wants).
    fn put_netns(&self, out: &mut Vec<u8>, name: fn(&mut Vec<u8>, Ns), quote: bool) {
        match self.ns {
            Some(ns) => name(out, ns),
            None => {
                if quote {
                    out.push(b'"');
                }
                out.extend_from_slice(b"cookie:");
                put_u64(out, self.e.netns_cookie);
                if quote {
                    out.push(b'"');
                }
            }
        }
    }

    fn json(&self, out: &mut Vec<u8>) {
        let e = self.e;
        out.extend_from_slice(b"{\"event\":\"");
        out.extend_from_slice(self.event.as_bytes());
        out.extend_from_slice(b"\",\"time\":\"");
        out.extend_from_slice(&self.time);
        out.extend_from_slice(b"\",\"netns\":");
        self.put_netns(
            out,
            |out, ns| put_json_str(out, &ns.info.name, ns.name_plain),
            true,
        );
        out.extend_from_slice(b",\"netns_cookie\":");
        put_u64(out, e.netns_cookie);
        if let Some((pod, plain)) = self.pod() {
            out.extend_from_slice(b",\"pod\":");
            put_json_str(out, pod, plain);
        }
        out.extend_from_slice(b",\"client_addr\":\"");
        put_ip(out, e.family, e.remote_ip);
        out.extend_from_slice(b"\",\"client_port\":");
        put_u16(out, e.remote_port);
        out.extend_from_slice(b",\"local_addr\":\"");
        put_ip(out, e.family, e.local_ip);
        out.extend_from_slice(b"\",\"advertise_port\":");
        put_u16(out, e.local_port);
        out.extend_from_slice(b",\"listen_port\":");
        put_u16(out, e.listen_port);
        if let Some(id) = flow_id(e) {
            out.extend_from_slice(b",\"flow_id\":");
            put_u64(out, id);
        }
        if let Some(o) = self.owner {
            out.extend_from_slice(b",\"listener_pid\":");
            let _ = CompactFormatter.write_i32(out, o.pid);
            out.extend_from_slice(b",\"listener_comm\":");
            let plain = self.ns.is_some_and(|ns| ns.comm_plain);
            put_json_str(out, &o.comm, plain);
        }
        if self.counted {
            out.extend_from_slice(b",\"duration_ms\":");
            // Always finite (a u64 over 1e6), so never serde_json's `null`.
            let _ = CompactFormatter.write_f64(out, e.duration_ns as f64 / 1e6);
            out.extend_from_slice(b",\"bytes_received\":");
            put_u64(out, e.bytes_received);
            out.extend_from_slice(b",\"bytes_sent\":");
            put_u64(out, e.bytes_sent);
            out.extend_from_slice(b",\"srtt_us\":");
            put_u32(out, e.srtt_us);
            out.extend_from_slice(b",\"retransmits\":");
            put_u32(out, e.retransmits);
        }
        if self.close {
            out.extend_from_slice(b",\"end\":\"");
            out.extend_from_slice(end_name(e.end).as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b"}\n");
    }

    fn text(&self, out: &mut Vec<u8>) {
        let e = self.e;
        out.extend_from_slice(&self.time);
        out.push(b' ');
        // `{:<7}`: every event name is ASCII and at most 7 long.
        out.extend_from_slice(self.event.as_bytes());
        out.extend(std::iter::repeat_n(b' ', 7 - self.event.len().min(7)));
        out.push(b' ');
        self.put_netns(
            out,
            |out, ns| {
                out.extend_from_slice(ns.info.pod.as_deref().unwrap_or(&ns.info.name).as_bytes())
            },
            false,
        );
        out.push(b' ');
        // Any family but IPv4 displays as IPv6, with colons: bracketed.
        let v6 = e.family != AF_INET;
        if v6 {
            out.push(b'[');
        }
        put_ip(out, e.family, e.remote_ip);
        if v6 {
            out.push(b']');
        }
        out.push(b':');
        put_u16(out, e.remote_port);
        out.extend_from_slice(b" -> :");
        put_u16(out, e.local_port);
        out.extend_from_slice(b" => :");
        put_u16(out, e.listen_port);
        if self.counted {
            let _ = write!(out, " {:.3}", e.duration_ns as f64 / 1e6);
            out.extend_from_slice(b"ms rx=");
            put_u64(out, e.bytes_received);
            out.extend_from_slice(b"B tx=");
            put_u64(out, e.bytes_sent);
            out.extend_from_slice(b"B srtt=");
            put_u32(out, e.srtt_us);
            out.extend_from_slice(b"us retrans=");
            put_u32(out, e.retransmits);
        }
        if self.close {
            out.extend_from_slice(b" end=");
            out.extend_from_slice(end_name(e.end).as_bytes());
        }
        out.push(b'\n');
    }

    /// Event names, times, addresses and end reasons never need quotes;
    /// namespace and process names may.
    fn logfmt(&self, out: &mut Vec<u8>) {
        let e = self.e;
        out.extend_from_slice(b"event=");
        out.extend_from_slice(self.event.as_bytes());
        out.extend_from_slice(b" time=");
        out.extend_from_slice(&self.time);
        out.extend_from_slice(b" netns=");
        self.put_netns(out, |out, ns| put_logfmt_str(out, &ns.info.name), false);
        out.extend_from_slice(b" netns_cookie=");
        put_u64(out, e.netns_cookie);
        if let Some((pod, _)) = self.pod() {
            out.extend_from_slice(b" pod=");
            put_logfmt_str(out, pod);
        }
        out.extend_from_slice(b" client_addr=");
        put_ip(out, e.family, e.remote_ip);
        out.extend_from_slice(b" client_port=");
        put_u16(out, e.remote_port);
        out.extend_from_slice(b" local_addr=");
        put_ip(out, e.family, e.local_ip);
        out.extend_from_slice(b" advertise_port=");
        put_u16(out, e.local_port);
        out.extend_from_slice(b" listen_port=");
        put_u16(out, e.listen_port);
        if let Some(id) = flow_id(e) {
            out.extend_from_slice(b" flow_id=");
            put_u64(out, id);
        }
        if let Some(o) = self.owner {
            out.extend_from_slice(b" listener_pid=");
            let _ = CompactFormatter.write_i32(out, o.pid);
            out.extend_from_slice(b" listener_comm=");
            put_logfmt_str(out, &o.comm);
        }
        if self.counted {
            out.extend_from_slice(b" duration_ms=");
            let _ = CompactFormatter.write_f64(out, e.duration_ns as f64 / 1e6);
            out.extend_from_slice(b" bytes_received=");
            put_u64(out, e.bytes_received);
            out.extend_from_slice(b" bytes_sent=");
            put_u64(out, e.bytes_sent);
            out.extend_from_slice(b" srtt_us=");
            put_u32(out, e.srtt_us);
            out.extend_from_slice(b" retransmits=");
            put_u32(out, e.retransmits);
        }
        if self.close {
            out.extend_from_slice(b" end=");
            out.extend_from_slice(end_name(e.end).as_bytes());
        }
        out.push(b'\n');
    }
}

/// Writes `record` as one line in `format`.
pub fn write_line(out: &mut impl Write, format: FlowFormat, record: &FlowRecord) -> io::Result<()> {
    match format {
        FlowFormat::Json => {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")
        }
        FlowFormat::Logfmt => writeln!(out, "{}", logfmt(record)),
        FlowFormat::Text => writeln!(out, "{}", text(record)),
    }
}

fn fields(record: &FlowRecord) -> Vec<(String, String)> {
    let value = serde_json::to_value(record).unwrap_or_default();
    let Some(map) = value.as_object() else {
        return Vec::new();
    };
    map.iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect()
}

/// `key=value` pairs, values quoted as [`logfmt_value`] says.
fn logfmt(record: &FlowRecord) -> String {
    let mut line = String::new();
    for (k, v) in fields(record) {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&k);
        line.push('=');
        logfmt_value(&v, |piece| line.push_str(piece));
    }
    line
}

fn text(r: &FlowRecord) -> String {
    let client = match r.client_addr.contains(':') {
        true => format!("[{}]:{}", r.client_addr, r.client_port),
        false => format!("{}:{}", r.client_addr, r.client_port),
    };
    let mut line = format!(
        "{} {:<7} {} {client} -> :{} => :{}",
        r.time,
        r.event,
        r.pod.as_deref().unwrap_or(&r.netns),
        r.advertise_port,
        r.listen_port
    );
    if let (Some(ms), Some(rx), Some(tx)) = (r.duration_ms, r.bytes_received, r.bytes_sent) {
        let _ = write!(
            line,
            " {ms:.3}ms rx={rx}B tx={tx}B srtt={}us retrans={}",
            r.srtt_us.unwrap_or(0),
            r.retransmits.unwrap_or(0)
        );
    }
    if let Some(end) = r.end {
        let _ = write!(line, " end={end}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u8) -> FlowEvent {
        FlowEvent {
            kind,
            end: END_RST,
            family: AF_INET,
            local_port: 12345,
            remote_port: 40000,
            listen_port: 9095,
            _pad: 0,
            srtt_us: 42,
            netns_cookie: 7,
            socket_cookie: 99,
            ts_ns: 1_000_000_000,
            duration_ns: 2_500_000,
            bytes_received: 10,
            bytes_sent: 20,
            retransmits: 1,
            _pad2: 0,
            remote_ip: [u32::from_be_bytes([198, 18, 0, 1]).to_be(), 0, 0, 0],
            local_ip: [u32::from_be_bytes([198, 18, 0, 2]).to_be(), 0, 0, 0],
        }
    }

    fn recorder() -> Recorder {
        Recorder {
            namespaces: Arc::new(Mutex::new(HashMap::from([(
                7,
                NsInfo {
                    name: "/var/run/netns/live store".to_owned(),
                    listener: Some(Owner {
                        pid: 42,
                        comm: "tempo".to_owned(),
                    }),
                    pod: None,
                },
            )]))),
            clock_offset_ns: 0,
        }
    }

    #[test]
    fn close_records_carry_every_field_in_json() {
        let r = recorder().record(&event(EVENT_CLOSE)).expect("known kind");
        let mut out = Vec::new();
        write_line(&mut out, FlowFormat::Json, &r).expect("write");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(v["client_addr"], "198.18.0.1");
        assert_eq!(v["local_addr"], "198.18.0.2");
        assert_eq!(v["client_port"], 40000);
        assert_eq!(v["bytes_received"], 10);
        assert_eq!(v["bytes_sent"], 20);
        assert_eq!(v["end"], "rst");
        assert_eq!(v["listener_pid"], 42);
        assert_eq!(v["listener_comm"], "tempo");
        assert_eq!(v["duration_ms"], 2.5);
        assert_eq!(v["time"], "1970-01-01T00:00:01.000000Z");
    }

    #[test]
    fn open_records_have_no_close_fields() {
        let r = recorder().record(&event(EVENT_OPEN)).expect("known kind");
        let line = logfmt(&r);
        assert!(line.starts_with("event=open "), "{line}");
        assert!(
            line.contains(r#"netns="/var/run/netns/live store""#),
            "{line}"
        );
        assert!(!line.contains("bytes_received"), "{line}");
    }

    /// The hot path renders exactly what the reference path (`record`, then
    /// `write_line`) does, in every format, for every kind of record, family,
    /// namespace name (quotes, controls, non-ASCII, empty), owner and value.
    #[test]
    fn the_renderer_writes_what_write_line_writes() {
        let names = [
            "/var/run/netns/live-store-0",
            "/var/run/netns/live store",
            "",
            "quo\"te\\back=eq",
            "tab\tnew\nline\u{1}\u{7f}",
            "é\u{301}\u{200b}",
        ];
        let mut table = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let listener = match i % 3 {
                0 => None,
                1 => Some(Owner {
                    pid: i as i32 * 1000 - 2000,
                    comm: "tempo".to_owned(),
                }),
                _ => Some(Owner {
                    pid: i32::MAX,
                    comm: name.to_string(),
                }),
            };
            table.insert(
                i as u64 + 1,
                NsInfo {
                    name: name.to_string(),
                    listener,
                    // Pods too, their names escaped as the namespace's.
                    pod: (i % 2 == 1).then(|| format!("tempo/{name}")),
                },
            );
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            // xorshift64*: varied, and the same every run.
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for offset in [
            0i128,
            1_700_000_000_123_456_789,
            -5_000_000_000,
            i128::from(u64::MAX),
        ] {
            let recorder = Recorder {
                namespaces: Arc::new(Mutex::new(table.clone())),
                clock_offset_ns: offset,
            };
            let mut renderer = Renderer::default();
            let mut ts = 1_000_000_000u64;
            for i in 0..20_000u64 {
                let r = next();
                let mut e = event([EVENT_OPEN, EVENT_CLOSE, EVENT_REFUSED, 0, 9][(r % 5) as usize]);
                e.end = (r >> 3) as u8 % 5;
                e.family = [AF_INET, AF_INET, 10, 0][(r >> 6) as usize % 4];
                e.netns_cookie = (r >> 8) % 8;
                e.remote_port = (r >> 16) as u16;
                e.local_port = (r >> 20) as u16;
                e.listen_port = (r >> 24) as u16;
                e.srtt_us = (r >> 32) as u32;
                e.retransmits = if i % 7 == 0 {
                    u32::MAX
                } else {
                    (r >> 40) as u32 % 4
                };
                // Seconds apart, the same second, or back in time; now and then huge.
                ts = match r % 4 {
                    0 => ts + (r >> 30) % 3_000_000_000,
                    1 => ts + (r >> 30) % 1000,
                    2 => ts.saturating_sub((r >> 30) % 2_000_000_000),
                    _ if i % 101 == 0 => next(),
                    _ => ts,
                };
                e.ts_ns = ts;
                e.duration_ns = match i % 6 {
                    0 => next(),
                    1 => 1500,
                    2 => 0,
                    _ => next() % 100_000_000_000,
                };
                e.bytes_received = next();
                e.bytes_sent = next() % 4096;
                e.socket_cookie = if i % 4 == 0 { 0 } else { next() };
                let mut words = || -> [u32; 4] { std::array::from_fn(|_| next() as u32) };
                e.remote_ip = if i % 9 == 0 { [0; 4] } else { words() };
                e.local_ip = if i % 5 == 0 {
                    [0, 0, u32::to_be(0xffff), 7]
                } else {
                    words()
                };
                let info = table.get(&e.netns_cookie);
                for format in [FlowFormat::Json, FlowFormat::Text, FlowFormat::Logfmt] {
                    let mut want = Vec::new();
                    if let Some(record) = recorder.record(&e) {
                        write_line(&mut want, format, &record).expect("write");
                    }
                    let mut got = Vec::new();
                    let known = renderer.render(&mut got, format, &e, info.map(Ns::new), offset);
                    assert_eq!(known, !want.is_empty());
                    assert_eq!(
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&want),
                        "{format:?} {e:?}"
                    );
                }
            }
        }
    }

    fn logfmt_of(v: &str) -> String {
        let mut out = Vec::new();
        put_logfmt_str(&mut out, v);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn logfmt_values_are_quoted_as_logfmt_parsers_expect() {
        for (value, want) in [
            // Bare: no space, `=`, `"` or control character.
            ("tempo", "tempo"),
            ("/var/run/netns/live-store-0", "/var/run/netns/live-store-0"),
            (r"back\slash", r"back\slash"),
            ("zoë/ライブ-ストア", "zoë/ライブ-ストア"),
            // Empty: nothing after `=`, as go-logfmt writes it.
            ("", ""),
            // Quoted, with escapes.
            ("live store", r#""live store""#),
            ("a=b", r#""a=b""#),
            (r#"say "hi""#, r#""say \"hi\"""#),
            (r"a \ b", r#""a \\ b""#),
            ("new\nline", r#""new\nline""#),
            ("tab\there", r#""tab\there""#),
            ("cr\rhere", r#""cr\rhere""#),
            ("bell\u{7}", r#""bell\u0007""#),
            ("\u{1}\u{1f}\u{7f}\u{85}", r#""\u0001\u001f\u007f\u0085""#),
            ("é \u{301}\u{200b}", "\"é \u{301}\u{200b}\""),
        ] {
            assert_eq!(logfmt_of(value), want, "{value:?}");
        }
    }

    /// A logfmt reader as Loki's `| logfmt` (go-logfmt) reads lines: `key=`
    /// then a bare value up to the next space, or a double-quoted one with
    /// backslash escapes; strict about anything else.
    fn parse_logfmt(line: &str) -> Vec<(String, String)> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        assert!(!line.contains('\n'), "one record per line: {line:?}");
        let mut chars = line.chars().peekable();
        let mut fields = Vec::new();
        loop {
            while chars.next_if_eq(&' ').is_some() {}
            if chars.peek().is_none() {
                return fields;
            }
            let mut key = String::new();
            while let Some(c) = chars.next_if(|&c| c != '=' && c != ' ') {
                assert!(c != '"' && !c.is_control(), "{c:?} in a key: {line:?}");
                key.push(c);
            }
            assert!(!key.is_empty(), "empty key: {line:?}");
            assert_eq!(chars.next(), Some('='), "{key} has no value: {line:?}");
            let mut value = String::new();
            if chars.next_if_eq(&'"').is_some() {
                loop {
                    match chars.next().expect("unterminated quoted value") {
                        '"' => break,
                        '\\' => value.push(match chars.next().expect("escape") {
                            '"' => '"',
                            '\\' => '\\',
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            'u' => {
                                let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                                let code = u32::from_str_radix(&hex, 16).expect("\\u hex");
                                char::from_u32(code).expect("a char")
                            }
                            other => panic!("unknown escape \\{other} in {line:?}"),
                        }),
                        c => {
                            assert!(!c.is_control(), "raw {c:?} in quotes: {line:?}");
                            value.push(c);
                        }
                    }
                }
                assert!(
                    matches!(chars.peek(), None | Some(' ')),
                    "text after a quoted value: {line:?}"
                );
            } else {
                while let Some(c) = chars.next_if(|&c| c != ' ') {
                    assert!(
                        c != '=' && c != '"' && !c.is_control(),
                        "{c:?} in a bare value: {line:?}"
                    );
                    value.push(c);
                }
            }
            fields.push((key, value));
        }
    }

    #[test]
    fn logfmt_records_parse_back_into_their_fields() {
        for name in [
            "/var/run/netns/live-store-0",
            "/var/run/netns/live store",
            "",
            "quo\"te\\back=eq",
            "tab\tnew\nline\rcr\u{1}\u{7f}\u{9f}",
            "é\u{301}\u{200b} ライブ",
        ] {
            let recorder = Recorder {
                namespaces: Arc::new(Mutex::new(HashMap::from([(
                    7,
                    NsInfo {
                        name: name.to_owned(),
                        listener: Some(Owner {
                            pid: 42,
                            comm: format!("comm {name}"),
                        }),
                        pod: Some(format!("tempo/{name}")),
                    },
                )]))),
                clock_offset_ns: 0,
            };
            let table = recorder.namespaces.lock().expect("lock").clone();
            for kind in [EVENT_OPEN, EVENT_CLOSE, EVENT_REFUSED] {
                let e = event(kind);
                let record = recorder.record(&e).expect("known kind");
                let want = fields(&record);
                assert_eq!(want[2], ("netns".to_owned(), name.to_owned()));
                // The reference path and the agent's hot path.
                let mut line = Vec::new();
                write_line(&mut line, FlowFormat::Logfmt, &record).expect("write");
                let mut rendered = Vec::new();
                Renderer::default().render(
                    &mut rendered,
                    FlowFormat::Logfmt,
                    &e,
                    table.get(&7).map(Ns::new),
                    0,
                );
                for out in [line, rendered] {
                    let out = String::from_utf8(out).expect("utf-8");
                    assert_eq!(parse_logfmt(&out), want, "{out}");
                }
            }
        }
    }

    /// One record with every field, and one with the fewest (refused, IPv6,
    /// from a namespace the agent does not know), pinned byte for byte in
    /// every format, through both the reference path and the renderer.
    #[test]
    fn full_records_pinned_in_every_format() {
        let recorder = Recorder {
            namespaces: Arc::new(Mutex::new(HashMap::from([(
                7,
                NsInfo {
                    name: "/var/run/netns/live store".to_owned(),
                    listener: Some(Owner {
                        pid: 42,
                        comm: r#"tempo "ls""#.to_owned(),
                    }),
                    pod: Some("tempo/live-store-0".to_owned()),
                },
            )]))),
            clock_offset_ns: 1_700_000_000_123_456_789,
        };
        let table = recorder.namespaces.lock().expect("lock").clone();
        let close = event(EVENT_CLOSE);
        let mut refused = event(EVENT_REFUSED);
        refused.family = 10;
        refused.netns_cookie = 8;
        refused.remote_ip = [u32::to_be(0xfd00_5eed), 0, 0, u32::to_be(1)];
        refused.local_ip = [u32::to_be(0xfd00_5eed), 0, 0, u32::to_be(2)];
        for (e, format, want) in [
            (
                &close,
                FlowFormat::Json,
                r#"{"event":"close","time":"2023-11-14T22:13:21.123456Z","netns":"/var/run/netns/live store","netns_cookie":7,"pod":"tempo/live-store-0","client_addr":"198.18.0.1","client_port":40000,"local_addr":"198.18.0.2","advertise_port":12345,"listen_port":9095,"flow_id":99,"listener_pid":42,"listener_comm":"tempo \"ls\"","duration_ms":2.5,"bytes_received":10,"bytes_sent":20,"srtt_us":42,"retransmits":1,"end":"rst"}"#,
            ),
            (
                &close,
                FlowFormat::Logfmt,
                r#"event=close time=2023-11-14T22:13:21.123456Z netns="/var/run/netns/live store" netns_cookie=7 pod=tempo/live-store-0 client_addr=198.18.0.1 client_port=40000 local_addr=198.18.0.2 advertise_port=12345 listen_port=9095 flow_id=99 listener_pid=42 listener_comm="tempo \"ls\"" duration_ms=2.5 bytes_received=10 bytes_sent=20 srtt_us=42 retransmits=1 end=rst"#,
            ),
            (
                &close,
                FlowFormat::Text,
                "2023-11-14T22:13:21.123456Z close   tempo/live-store-0 198.18.0.1:40000 -> :12345 => :9095 2.500ms rx=10B tx=20B srtt=42us retrans=1 end=rst",
            ),
            (
                &refused,
                FlowFormat::Json,
                r#"{"event":"refused","time":"2023-11-14T22:13:21.123456Z","netns":"cookie:8","netns_cookie":8,"client_addr":"fd00:5eed::1","client_port":40000,"local_addr":"fd00:5eed::2","advertise_port":12345,"listen_port":9095}"#,
            ),
            (
                &refused,
                FlowFormat::Logfmt,
                "event=refused time=2023-11-14T22:13:21.123456Z netns=cookie:8 netns_cookie=8 client_addr=fd00:5eed::1 client_port=40000 local_addr=fd00:5eed::2 advertise_port=12345 listen_port=9095",
            ),
            (
                &refused,
                FlowFormat::Text,
                "2023-11-14T22:13:21.123456Z refused cookie:8 [fd00:5eed::1]:40000 -> :12345 => :9095",
            ),
        ] {
            let want = format!("{want}\n");
            let record = recorder.record(e).expect("known kind");
            let mut line = Vec::new();
            write_line(&mut line, format, &record).expect("write");
            assert_eq!(String::from_utf8_lossy(&line), want, "{format:?}");
            let mut rendered = Vec::new();
            let ns = table.get(&e.netns_cookie).map(Ns::new);
            let offset = recorder.clock_offset_ns;
            assert!(Renderer::default().render(&mut rendered, format, e, ns, offset));
            assert_eq!(String::from_utf8_lossy(&rendered), want, "{format:?}");
        }
    }

    #[test]
    fn ipv6_addresses_round_trip() {
        let addr: Ipv6Addr = "fd00:5eed::1".parse().expect("addr");
        let o = addr.octets();
        let words: [u32; 4] = std::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        });
        assert_eq!(ip(10, words), IpAddr::V6(addr));
    }
}
