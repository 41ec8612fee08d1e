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
};
use serde::Serialize;

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
    pub client_addr: String,
    pub client_port: u16,
    pub local_addr: String,
    pub advertise_port: u16,
    pub listen_port: u16,
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
            EVENT_REFUSED => "refused",
            _ => return None,
        };
        let unix_ns = (e.ts_ns as i128 + self.clock_offset_ns).max(0) as u128;
        let time = UNIX_EPOCH + Duration::from_nanos(unix_ns as u64);
        let close = e.kind == EVENT_CLOSE;
        let info = self
            .namespaces
            .lock()
            .ok()
            .and_then(|n| n.get(&e.netns_cookie).cloned())
            .unwrap_or_else(|| NsInfo {
                name: format!("cookie:{}", e.netns_cookie),
                listener: None,
            });
        Some(FlowRecord {
            event,
            time: humantime::format_rfc3339_micros(time).to_string(),
            netns: info.name,
            netns_cookie: e.netns_cookie,
            client_addr: ip(e.family, e.remote_ip).to_string(),
            client_port: e.remote_port,
            local_addr: ip(e.family, e.local_ip).to_string(),
            advertise_port: e.local_port,
            listen_port: e.listen_port,
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
            duration_ms: close.then(|| e.duration_ns as f64 / 1e6),
            bytes_received: close.then_some(e.bytes_received),
            bytes_sent: close.then_some(e.bytes_sent),
            srtt_us: close.then_some(e.srtt_us),
            retransmits: close.then_some(e.retransmits),
            end: close.then_some(match e.end {
                END_FIN => "fin",
                END_RST => "rst",
                END_ABORTED => "aborted",
                _ => "unknown",
            }),
        })
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

/// `key=value` pairs; values with spaces, quotes, `=` or nothing are quoted.
fn logfmt(record: &FlowRecord) -> String {
    let mut line = String::new();
    for (k, v) in fields(record) {
        if !line.is_empty() {
            line.push(' ');
        }
        let needs_quotes = v.is_empty()
            || v.chars()
                .any(|c| c == ' ' || c == '"' || c == '=' || c.is_control());
        if needs_quotes {
            let _ = write!(line, "{k}={v:?}");
        } else {
            let _ = write!(line, "{k}={v}");
        }
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
        r.time, r.event, r.netns, r.advertise_port, r.listen_port
    );
    if let (Some(ms), Some(rx), Some(tx), Some(end)) =
        (r.duration_ms, r.bytes_received, r.bytes_sent, r.end)
    {
        let _ = write!(
            line,
            " {ms:.3}ms rx={rx}B tx={tx}B srtt={}us retrans={} end={end}",
            r.srtt_us.unwrap_or(0),
            r.retransmits.unwrap_or(0)
        );
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
