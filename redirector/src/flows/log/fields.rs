//! The one list of a flow record's fields: their names, their order, and the
//! kind of value each holds. Every format walks it ([`walk`]), whichever
//! path the record comes by ([`HasFields`]), so a field added here shows in
//! every format, in the same place, written the same way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use redirector_common::AF_INET;

use super::format::json_plain;

/// Declares [`Key`] and [`walk`] from one line per field: the order every
/// format writes them in, and the name JSON and logfmt give each (its
/// spelling in each, with the separator before it, is made from it here).
macro_rules! keys {
    ($($key:ident = $name:literal,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(super) enum Key {
            $($key,)*
        }

        impl Key {
            pub(super) const ALL: &'static [Key] = &[$(Key::$key,)*];

            /// `,"name":`, for JSON: written as one piece (the first field
            /// without its comma).
            pub(super) const fn json(self) -> &'static str {
                match self {
                    $(Key::$key => concat!(",\"", $name, "\":"),)*
                }
            }

            /// ` name=`, for logfmt (the first field without its space).
            pub(super) const fn logfmt(self) -> &'static str {
                match self {
                    $(Key::$key => concat!(" ", $name, "="),)*
                }
            }
        }

        /// Hands `sink` each field `r` has, in [`Key::ALL`] order. Written
        /// out field by field, not as a loop over `Key::ALL`: with the key
        /// known at each call, the matches on it fold away and each name is
        /// written as one constant. As a loop, the agent's JSON lines cost
        /// half as many instructions again (`flow_cost` under callgrind).
        #[inline(always)]
        pub(super) fn walk<'a>(r: &'a impl HasFields, sink: &mut impl Sink<'a>) {
            $(
                if let Some(value) = r.value(Key::$key) {
                    sink.field(Key::$key, value);
                }
            )*
        }
    };
}

keys! {
    Event = "event",
    Time = "time",
    Netns = "netns",
    NetnsCookie = "netns_cookie",
    Pod = "pod",
    ClientAddr = "client_addr",
    ClientPort = "client_port",
    LocalAddr = "local_addr",
    AdvertisePort = "advertise_port",
    ListenPort = "listen_port",
    FlowId = "flow_id",
    ListenerPid = "listener_pid",
    ListenerComm = "listener_comm",
    DurationMs = "duration_ms",
    BytesReceived = "bytes_received",
    BytesSent = "bytes_sent",
    SrttUs = "srtt_us",
    Retransmits = "retransmits",
    End = "end",
}

/// A field's value, by how the formats write it (see `format`).
#[derive(Clone, Copy, Debug)]
pub(super) enum Value<'a> {
    /// Text the agent makes itself (event and end names, times): ASCII that
    /// no format escapes, so it is written without being looked at.
    Word(&'a [u8]),
    /// Text from elsewhere (names from the node, anything read off the
    /// wire): JSON escapes it unless `json_plain`, logfmt quotes it if it must.
    Str {
        s: &'a str,
        json_plain: bool,
    },
    /// A namespace the agent cannot name: `cookie:N`.
    Cookie(u64),
    Uint(u64),
    Int(i64),
    /// A duration in milliseconds.
    Ms(f64),
    /// An address as the kernel stores it: family and words ([`ip`]).
    Ip(u16, [u32; 4]),
}

impl<'a> Value<'a> {
    /// Text whose need for JSON escapes is not known yet.
    pub(super) fn str(s: &'a str) -> Self {
        Value::Str {
            s,
            json_plain: json_plain(s),
        }
    }
}

/// What a format does with each field [`walk`] hands it.
pub(super) trait Sink<'a> {
    fn field(&mut self, key: Key, value: Value<'a>);
}

/// A record that can say what each field of [`Key::ALL`] holds; `None` for a
/// field this record does not have (a refused connection has no flow id).
pub(super) trait HasFields {
    fn value(&self, key: Key) -> Option<Value<'_>>;
}

pub(super) fn ip(family: u16, words: [u32; 4]) -> IpAddr {
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
