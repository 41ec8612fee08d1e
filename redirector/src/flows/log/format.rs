//! The three formats, each a walk of the one field list (`fields`): how each
//! kind of value is written in each, and how JSON and logfmt escape text.
//! Everything is appended to a byte buffer, so nothing is allocated on the
//! agent's hot path once the buffer has grown.

use std::io::Write as _;

use redirector_common::AF_INET;
use serde_json::ser::{CompactFormatter, Formatter as _};

use super::{
    fields::{ip, walk, HasFields, Key, Sink, Value},
    FlowFormat,
};

/// Appends `r` as one line in `format`.
pub(super) fn line(out: &mut Vec<u8>, format: FlowFormat, r: &impl HasFields) {
    match format {
        FlowFormat::Json => {
            walk(r, &mut Json { out, first: true });
            out.extend_from_slice(b"}\n");
        }
        FlowFormat::Logfmt => {
            walk(r, &mut Logfmt { out, first: true });
            out.push(b'\n');
        }
        FlowFormat::Text => {
            let mut kept = Text([None; Key::ALL.len()]);
            walk(r, &mut kept);
            kept.write(out);
        }
    }
}

// The sinks are inlined at every field of the walk: with the key and the
// kind of value known there, each field compiles to the writes it needs, as
// a line written out by hand would.

/// `{"key":value,...}`
struct Json<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'a> Sink<'a> for Json<'_> {
    #[inline(always)]
    fn field(&mut self, key: Key, value: Value<'a>) {
        let prefix = key.json().as_bytes();
        if self.first {
            self.first = false;
            self.out.push(b'{');
            self.out.extend_from_slice(&prefix[1..]);
        } else {
            self.out.extend_from_slice(prefix);
        }
        put_json(self.out, value);
    }
}

/// `key=value key=value ...`
struct Logfmt<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'a> Sink<'a> for Logfmt<'_> {
    #[inline(always)]
    fn field(&mut self, key: Key, value: Value<'a>) {
        let prefix = key.logfmt().as_bytes();
        let skip = usize::from(self.first);
        self.first = false;
        self.out.extend_from_slice(&prefix[skip..]);
        put_logfmt(self.out, value);
    }
}

/// `text` is a sentence for people rather than `key=value` pairs: it keeps
/// the fields it shows as the walk passes them, then lays them out.
struct Text<'a>([Option<Value<'a>>; Key::ALL.len()]);

impl<'a> Sink<'a> for Text<'a> {
    #[inline(always)]
    fn field(&mut self, key: Key, value: Value<'a>) {
        self.0[key as usize] = Some(value);
    }
}

impl Text<'_> {
    /// `TIME EVENT POD-OR-NETNS CLIENT:PORT -> :ADVERTISED => :LISTENING`,
    /// then the counters and the end where the record has them.
    fn write(&self, out: &mut Vec<u8>) {
        let field = |key: Key| self.0[key as usize];
        let put = |out: &mut Vec<u8>, key: Key| {
            if let Some(value) = field(key) {
                put_text(out, value);
            }
        };
        put(out, Key::Time);
        out.push(b' ');
        // `{:<7}`: padded to seven characters.
        let start = out.len();
        put(out, Key::Event);
        let chars = out[start..].iter().filter(|&&b| b & 0xc0 != 0x80).count();
        out.extend(std::iter::repeat_n(b' ', 7 - chars.min(7)));
        out.push(b' ');
        if let Some(name) = field(Key::Pod).or(field(Key::Netns)) {
            put_text(out, name);
        }
        out.push(b' ');
        let start = out.len();
        put(out, Key::ClientAddr);
        // An address with colons (IPv6) is bracketed before its port.
        if out[start..].contains(&b':') {
            out.insert(start, b'[');
            out.push(b']');
        }
        out.push(b':');
        put(out, Key::ClientPort);
        out.extend_from_slice(b" -> :");
        put(out, Key::AdvertisePort);
        out.extend_from_slice(b" => :");
        put(out, Key::ListenPort);
        if let (Some(ms), Some(rx), Some(tx)) = (
            field(Key::DurationMs),
            field(Key::BytesReceived),
            field(Key::BytesSent),
        ) {
            // A record from the wire may have counters without the round-trip
            // time or retransmits: those show as 0.
            let zero = Value::Uint(0);
            for (before, value) in [
                (&b" "[..], ms),
                (b"ms rx=", rx),
                (b"B tx=", tx),
                (b"B srtt=", field(Key::SrttUs).unwrap_or(zero)),
                (b"us retrans=", field(Key::Retransmits).unwrap_or(zero)),
            ] {
                out.extend_from_slice(before);
                put_text(out, value);
            }
        }
        if let Some(end) = field(Key::End) {
            out.extend_from_slice(b" end=");
            put_text(out, end);
        }
        out.push(b'\n');
    }
}

#[inline(always)]
fn put_json(out: &mut Vec<u8>, value: Value<'_>) {
    match value {
        Value::Str { s, json_plain } => put_json_str(out, s, json_plain),
        Value::Uint(_) | Value::Int(_) | Value::Ms(_) => put_bare(out, value),
        Value::Word(_) | Value::Ip(..) | Value::Cookie(_) => {
            out.push(b'"');
            put_bare(out, value);
            out.push(b'"');
        }
    }
}

/// Names may need quotes; event names, times, addresses, numbers and end
/// reasons never do.
#[inline(always)]
fn put_logfmt(out: &mut Vec<u8>, value: Value<'_>) {
    match value {
        Value::Str { s, .. } => put_logfmt_str(out, s),
        _ => put_bare(out, value),
    }
}

#[inline(always)]
fn put_text(out: &mut Vec<u8>, value: Value<'_>) {
    match value {
        // Three decimals for people, where the other formats round-trip.
        Value::Ms(ms) => {
            let _ = write!(out, "{ms:.3}");
        }
        _ => put_bare(out, value),
    }
}

/// A value as it is, unquoted. Numbers as serde_json writes them: a
/// duration in its shortest round-trip form, `null` if not finite (never,
/// for one the agent measured). Writes into a Vec<u8> cannot fail, hence the
/// ignored io::Results.
#[inline(always)]
fn put_bare(out: &mut Vec<u8>, value: Value<'_>) {
    let _ = match value {
        Value::Word(w) => out.write_all(w),
        Value::Str { s, .. } => out.write_all(s.as_bytes()),
        Value::Ip(family, words) => {
            put_ip(out, family, words);
            Ok(())
        }
        Value::Cookie(cookie) => {
            out.extend_from_slice(b"cookie:");
            CompactFormatter.write_u64(out, cookie)
        }
        Value::Uint(n) => CompactFormatter.write_u64(out, n),
        Value::Int(n) => CompactFormatter.write_i64(out, n),
        Value::Ms(ms) if ms.is_finite() => CompactFormatter.write_f64(out, ms),
        Value::Ms(_) => CompactFormatter.write_null(out),
    };
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
pub(super) fn json_plain(s: &str) -> bool {
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
pub(super) fn put_logfmt_str(out: &mut Vec<u8>, v: &str) {
    logfmt_value(v, |piece| out.extend_from_slice(piece.as_bytes()));
}
