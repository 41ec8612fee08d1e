//! Turns kernel flow records into log lines: `text` for people, `json` and
//! `logfmt` one record per line for Loki, Vector or promtail.
//!
//! Records come two ways: [`Recorder`] makes a [`FlowRecord`] of owned
//! strings (`record`: what subscribers get, and what `redirector flows`
//! writes back out with [`write_line`]), and [`Renderer`] writes kernel
//! records straight to bytes (`render`: the agent's own log). Either way the
//! record is a walk of one list of fields (`fields`), which each format
//! writes (`format`), so the two ways give the same lines.

use std::io::{self, Write};

use clap::ValueEnum;

mod fields;
mod format;
mod record;
mod render;

pub use record::{end_named, event_named, FlowRecord, NsInfo, Recorder};
pub use render::{Ns, Renderer};

// The tests below name these through `super::*`, as when this was one file.
#[cfg(test)]
use {
    crate::sys::owners::Owner,
    fields::ip,
    format::put_logfmt_str,
    redirector_common::{FlowEvent, AF_INET, END_RST, EVENT_CLOSE, EVENT_OPEN, EVENT_REFUSED},
    std::{
        collections::HashMap,
        net::{IpAddr, Ipv6Addr},
        sync::{Arc, Mutex},
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowFormat {
    Text,
    Json,
    Logfmt,
}

/// Writes `record` as one line in `format`.
pub fn write_line(out: &mut impl Write, format: FlowFormat, record: &FlowRecord) -> io::Result<()> {
    let mut line = Vec::with_capacity(512);
    format::line(&mut line, format, record);
    out.write_all(&line)
}

/// `record` as serde sees it, values as strings: what the tests check the
/// logfmt line against, independently of the field list the formats walk.
#[cfg(test)]
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

/// The logfmt line without its newline.
#[cfg(test)]
fn logfmt(record: &FlowRecord) -> String {
    let mut line = Vec::new();
    format::line(&mut line, FlowFormat::Logfmt, record);
    line.pop();
    String::from_utf8_lossy(&line).into_owned()
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
