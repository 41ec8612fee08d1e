//! The ring page: its URL, one bounded GET, and dskit's JSON read into shards,
//! with an error for each way a wrong URL shows (HTML, 404, not a ring).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The largest ring page read: a ring of hundreds of live-stores with 128
/// tokens each is around a megabyte.
pub const MAX_RING_BYTES: u64 = 16 << 20;
/// Connecting to the Tempo component.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A ring page URL: `http://host[:port]/path`, validated up front so a typo is
/// a usage error (exit 2), not a failure every period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingUrl(String);

impl RingUrl {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "`{s}`: https is not supported; ask a Tempo component over plain http \
                 (its http_listen_port, e.g. http://tempo-distributor:3200/live-store/ring), \
                 or through a local proxy that speaks https to it"
            ));
        }
        let Some(rest) = lower.strip_prefix("http://") else {
            return Err(format!(
                "`{s}` is not an http:// URL, e.g. http://tempo-distributor:3200/live-store/ring"
            ));
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.is_empty() || host.starts_with(':') {
            return Err(format!(
                "`{s}` has no host, e.g. http://tempo-distributor:3200/live-store/ring"
            ));
        }
        if s.chars().any(char::is_whitespace) {
            return Err(format!("`{s}` contains whitespace"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RingUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for RingUrl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::parse(s)
    }
}

/// dskit's ring status page as JSON (`ring/ring_http.go`: `httpResponse` with
/// its `ingesterDesc` shards). Only what the check needs; every other field
/// (`now`, `tokens`, `timestamp`, `read_only`, `versions`, ...) is ignored.
#[derive(Debug, Deserialize)]
pub struct RingPage {
    /// Go encodes an empty ring's nil slice as `null`.
    #[serde(deserialize_with = "null_as_empty")]
    pub shards: Vec<Shard>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    /// ACTIVE, JOINING, LEAVING, PENDING, or UNHEALTHY (missed heartbeats).
    pub state: String,
    /// What queriers dial: `ip:port` (`[ip]:port` for IPv6), as the
    /// live-store registered it (`instance_addr`, `instance_port`).
    pub address: String,
    #[serde(default)]
    pub zone: String,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<Shard>, D::Error> {
    Ok(Option::<Vec<Shard>>::deserialize(d)?.unwrap_or_default())
}

/// Reads a ring page body, with an error an operator can act on.
pub fn parse_page(body: &[u8]) -> std::result::Result<RingPage, String> {
    let start = body.iter().find(|b| !b.is_ascii_whitespace());
    match start {
        Some(b'<') => {
            return Err(
                "answered HTML, not JSON: not a dskit ring page (is the path \
                        /live-store/ring?)"
                    .to_owned(),
            )
        }
        // Not even the start of a JSON object or array: say what it was.
        Some(b'{' | b'[') => {}
        _ => {
            let text = String::from_utf8_lossy(body);
            let first: String = text
                .trim()
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(80)
                .collect();
            return Err(format!("answered something that is not JSON: {first:?}"));
        }
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("answered something that is not JSON ({e})")
        } else {
            format!("answered JSON that is not a live-store ring page ({e})")
        }
    })
}

/// GETs the ring page with `Accept: application/json`, bounded in time and size.
pub fn fetch(url: &RingUrl) -> std::result::Result<RingPage, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(REQUEST_TIMEOUT))
        // Status codes are read below, with a message for each.
        .http_status_as_error(false)
        // A ring page is served where it is asked for; a redirect is reported
        // as such, not followed to wherever it points.
        .max_redirects(0)
        .user_agent(concat!("redirector/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let fail = |what: String| format!("ring {url}: {what}");
    let mut response = agent
        .get(url.as_str())
        .header("Accept", "application/json")
        .call()
        .map_err(|e| fail(request_error(&e)))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RING_BYTES)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => fail(format!(
                "the answer is larger than {} MiB: not a ring page",
                MAX_RING_BYTES >> 20
            )),
            e => fail(format!("reading the answer: {}", request_error(&e))),
        })?;
    match status {
        200..=299 => parse_page(&body).map_err(fail),
        404 => Err(fail(
            "404 Not Found: this component does not serve the live-store ring (ask a \
             distributor or querier, on its HTTP port, at /live-store/ring)"
                .to_owned(),
        )),
        code => {
            let text = String::from_utf8_lossy(&body);
            let first = text.lines().next().unwrap_or_default().trim();
            let first: String = first.chars().take(200).collect();
            Err(fail(format!("HTTP {code}: {first}")))
        }
    }
}

fn request_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => format!("cannot connect: {io}"),
        ureq::Error::Timeout(t) => format!("no answer in time ({t})"),
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::ConnectionFailed => "connection failed".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    /// A ring page as dskit renders it (`json.NewEncoder(w).Encode(httpResponse)`),
    /// with fields this check ignores and one no dskit version has.
    const PAGE: &str = r#"{"shards":[
        {"id":"live-store-zone-a-0","state":"ACTIVE","address":"10.0.1.5:12345",
         "timestamp":"2026-11-30T08:00:00Z","registered_timestamp":"2026-11-30T07:00:00Z",
         "read_only":false,"read_only_updated_timestamp":"0001-01-01T00:00:00Z",
         "zone":"zone-a","tokens":[1,2,3],"versions":{"1":2}},
        {"id":"live-store-zone-b-0","state":"UNHEALTHY","address":"[fd00::5]:9095",
         "timestamp":"2026-11-30T08:00:00Z","registered_timestamp":"0001-01-01T00:00:00Z",
         "zone":"","tokens":null,"something_new":{"nested":[1]}}
      ],"now":"2026-11-30T08:00:01.5Z","showTokens":false}"#;

    #[test]
    fn dskit_ring_page_parses_with_extra_fields() {
        let page = parse_page(PAGE.as_bytes()).unwrap();
        assert_eq!(
            page.shards,
            [
                Shard {
                    id: "live-store-zone-a-0".into(),
                    state: "ACTIVE".into(),
                    address: "10.0.1.5:12345".into(),
                    zone: "zone-a".into(),
                },
                Shard {
                    id: "live-store-zone-b-0".into(),
                    state: "UNHEALTHY".into(),
                    address: "[fd00::5]:9095".into(),
                    zone: "".into(),
                },
            ]
        );
        let v6: SocketAddr = page.shards[1].address.parse().unwrap();
        assert_eq!(v6.port(), 9095);
    }

    #[test]
    fn empty_rings_parse() {
        // Go renders an empty ring's nil slice as null.
        assert!(parse_page(br#"{"shards":null,"now":"x"}"#)
            .unwrap()
            .shards
            .is_empty());
        assert!(parse_page(b"{\"shards\":[]}\n").unwrap().shards.is_empty());
        // No zone (older dskit versions): empty.
        let p = parse_page(br#"{"shards":[{"id":"a","state":"ACTIVE","address":"1.2.3.4:5"}]}"#)
            .unwrap();
        assert_eq!(p.shards[0].zone, "");
    }

    #[test]
    fn missing_fields_are_named() {
        let e = parse_page(br#"{"now":"x"}"#).unwrap_err();
        assert!(e.contains("missing field `shards`"), "{e}");
        assert!(
            e.starts_with("answered JSON that is not a live-store ring page"),
            "{e}"
        );
        let e = parse_page(br#"{"shards":[{"id":"a","state":"ACTIVE"}]}"#).unwrap_err();
        assert!(e.contains("missing field `address`"), "{e}");
        let e =
            parse_page(br#"{"shards":[{"state":"ACTIVE","address":"1.2.3.4:5"}]}"#).unwrap_err();
        assert!(e.contains("missing field `id`"), "{e}");
        let e = parse_page(br#"{"shards":[{"id":"a","address":"1.2.3.4:5"}]}"#).unwrap_err();
        assert!(e.contains("missing field `state`"), "{e}");
        let e = parse_page(br#"{"shards":{"a":1}}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = parse_page(br#"[]"#).unwrap_err();
        assert!(e.contains("not a live-store ring page"), "{e}");
    }

    #[test]
    fn non_json_answers_say_so() {
        let e = parse_page(b"\n<!DOCTYPE html><html>ring</html>").unwrap_err();
        assert!(e.starts_with("answered HTML, not JSON"), "{e}");
        let e = parse_page(b"404 page not found\n").unwrap_err();
        assert!(e.starts_with("answered something that is not JSON"), "{e}");
        let e = parse_page(b"").unwrap_err();
        assert!(e.starts_with("answered something that is not JSON"), "{e}");
        let e = parse_page(br#"{"shards":[{"id":"a""#).unwrap_err();
        assert!(e.starts_with("answered something that is not JSON"), "{e}");
    }

    #[test]
    fn urls() {
        for ok in [
            "http://tempo-distributor:3200/live-store/ring",
            "http://127.0.0.1:3200/live-store/ring",
            "HTTP://[::1]:3200/live-store/ring",
            "http://tempo/live-store/ring?x=1",
        ] {
            assert_eq!(RingUrl::parse(ok).unwrap().as_str(), ok);
        }
        let e = RingUrl::parse("https://tempo:3200/live-store/ring").unwrap_err();
        assert!(e.contains("https is not supported"), "{e}");
        let e = RingUrl::parse("tempo:3200/live-store/ring").unwrap_err();
        assert!(e.contains("not an http:// URL"), "{e}");
        assert!(RingUrl::parse("http:///live-store/ring")
            .unwrap_err()
            .contains("no host"));
        assert!(RingUrl::parse("http://:3200/x")
            .unwrap_err()
            .contains("no host"));
        assert!(RingUrl::parse("http://a b/x")
            .unwrap_err()
            .contains("whitespace"));
    }
}
