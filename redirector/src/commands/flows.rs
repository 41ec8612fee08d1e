//! `redirector flows`: follows a running agent's flow records over its Unix
//! socket (see [`crate::flows::sub`] for the protocol), keeps those that match the
//! filters, and prints them in the agent's own line formats.

use std::{
    collections::VecDeque,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::{
    flows::log::{self, FlowFormat, FlowRecord},
    flows::sub::{Notice, Request, HISTORY},
};

/// `redirector flows`: filters apply on this side, so any combination works.
#[derive(Args, Debug)]
pub struct FlowsArgs {
    /// The running agent's socket (its --flows-socket).
    #[arg(
        long,
        env = "REDIRECTOR_FLOWS_SOCKET",
        value_name = "PATH",
        default_value = crate::flows::sub::DEFAULT_FLOWS_SOCKET
    )]
    pub flows_socket: PathBuf,

    /// Only records whose namespace (as in the `netns` field: the path the agent
    /// serves, e.g. /proc/PID/ns/net) contains this. Repeat for any of several.
    #[arg(long, value_name = "SUBSTRING")]
    pub netns: Vec<String>,

    /// Only records of this live-store pod (`--kube`): its name, or
    /// namespace/name. Repeat for any of several.
    #[arg(long, value_name = "POD")]
    pub pod: Vec<String>,

    /// Only records of live-store pods in this Kubernetes namespace (`--kube`).
    /// Repeat for any of several.
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Vec<String>,

    /// Only records of this querier address or network, e.g. 10.42.3.7,
    /// 10.42.0.0/16, fd00::/64. Repeat for any of several.
    #[arg(long, value_name = "IP[/PREFIX]", value_parser = parse_client)]
    pub client: Vec<ClientNet>,

    /// Only these events. Repeat for several.
    #[arg(long, value_enum, value_name = "EVENT")]
    pub event: Vec<EventKind>,

    /// `text` (the agent's text log lines), `json` (its JSON lines, byte for
    /// byte) or `logfmt`.
    #[arg(short, long, value_enum, default_value_t = FlowFormat::Text)]
    pub output: FlowFormat,

    /// First print the last N matching records of those the agent keeps (its
    /// latest 1024), then exit, unless --follow.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,

    /// Keep printing new records as they come: the default without --last.
    #[arg(short, long)]
    pub follow: bool,
}

/// Which records `--event` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventKind {
    Open,
    /// A long-lived flow's counters so far (every --flow-update-interval).
    Update,
    Close,
    Refused,
}

impl EventKind {
    fn name(self) -> &'static str {
        match self {
            EventKind::Open => "open",
            EventKind::Update => "update",
            EventKind::Close => "close",
            EventKind::Refused => "refused",
        }
    }
}

/// `--client IP[/prefix]`: a querier address or network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientNet {
    addr: IpAddr,
    prefix: u8,
}

/// Parses `IP` or `IP/prefix`. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
/// means its IPv4 address, as records of IPv4 queriers show it.
pub fn parse_client(s: &str) -> Result<ClientNet, String> {
    let s = s.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            format!("`{s}` is not an IP address or network (e.g. 10.0.0.7, 10.0.0.0/16, fd00::/64)")
        })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => return Err(format!("`{s}`: the prefix length must be 0-{max}")),
        },
    };
    Ok(match addr {
        IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => ClientNet {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            },
            None => ClientNet { addr, prefix },
        },
        _ => ClientNet { addr, prefix },
    })
}

impl ClientNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bytes: &[u8], prefix: u8) -> Vec<u8> {
            bytes
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let keep = (prefix as usize).saturating_sub(i * 8).min(8);
                    // keep = 0 -> mask 0; 8 -> 0xff.
                    b & (0xffu16 << (8 - keep)) as u8
                })
                .collect()
        }
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(&net.octets(), self.prefix) == masked(&ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(&net.octets(), self.prefix) == masked(&ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// What `--netns`, `--pod`, `--namespace`, `--client` and `--event` keep;
/// each empty list keeps all, and repeating a flag keeps records that match
/// any of its values.
#[derive(Debug, Default)]
pub struct Filter {
    pub netns: Vec<String>,
    pub pods: Vec<String>,
    pub namespaces: Vec<String>,
    pub clients: Vec<ClientNet>,
    pub events: Vec<EventKind>,
}

impl Filter {
    fn matches(&self, r: &FlowRecord) -> bool {
        let netns =
            self.netns.is_empty() || self.netns.iter().any(|n| r.netns.contains(n.as_str()));
        let event = self.events.is_empty() || self.events.iter().any(|e| e.name() == r.event);
        // `namespace/name`: a pod by name, or every pod of a namespace.
        let (namespace, name) = r
            .pod
            .as_deref()
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        let pod = self.pods.is_empty()
            || self
                .pods
                .iter()
                .any(|p| !name.is_empty() && (p == name || Some(p.as_str()) == r.pod.as_deref()));
        let k8s_namespace = self.namespaces.is_empty()
            || self
                .namespaces
                .iter()
                .any(|n| !namespace.is_empty() && n == namespace);
        let client = self.clients.is_empty()
            || r.client_addr
                .parse::<IpAddr>()
                .map(|ip| self.clients.iter().any(|c| c.contains(ip)))
                .unwrap_or(false);
        netns && event && client && pod && k8s_namespace
    }
}

/// One line from the agent.
enum Line {
    Record(Box<FlowRecord>),
    Notice(Notice),
}

fn parse_line(line: &str) -> Result<Line> {
    let value: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("the agent sent {line:?}"))?;
    if value.get("event").is_some() {
        let record = serde_json::from_value(value)
            .with_context(|| format!("the agent sent a record this CLI cannot read: {line}"))?;
        return Ok(Line::Record(Box::new(record)));
    }
    serde_json::from_value(value)
        .map(Line::Notice)
        .with_context(|| format!("the agent sent {line:?}"))
}

/// Writes a record as `format`: JSON is passed through as the agent wrote it.
fn print(
    out: &mut impl Write,
    format: FlowFormat,
    raw: &str,
    record: FlowRecord,
) -> io::Result<()> {
    match format {
        FlowFormat::Json => writeln!(out, "{raw}"),
        _ => log::write_line(out, format, &record),
    }
}

fn lost_message(n: u64) -> String {
    format!(
        "redirector: missed {n} flow record(s): this client read too slowly and the agent never waits for subscribers (filter less, or write to a file)"
    )
}

pub async fn follow(args: FlowsArgs) -> Result<()> {
    let path = args.flows_socket.as_path();
    let filter = Filter {
        netns: args.netns,
        pods: args.pod,
        namespaces: args.namespace,
        clients: args.client,
        events: args.event,
    };
    let follow = args.follow || args.last.is_none();
    let mut stream = connect(path).await?;
    // The whole replay when --last is asked: the filters apply here, so the
    // last N matching records may be anywhere in it.
    let request = Request {
        last: if args.last.is_some() { HISTORY } else { 0 },
    };
    let mut req = serde_json::to_string(&request)?;
    req.push('\n');
    stream
        .write_all(req.as_bytes())
        .await
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut lines = BufReader::new(stream).lines();
    let mut replay: VecDeque<(String, FlowRecord)> = VecDeque::new();
    let mut live = false;
    let stdout = io::stdout();
    let result = async {
        while let Some(line) = lines
            .next_line()
            .await
            .with_context(|| format!("reading {}", path.display()))?
        {
            let mut out = stdout.lock();
            match parse_line(&line)? {
                Line::Record(r) if !filter.matches(&r) => {}
                Line::Record(r) if !live => {
                    if args.last == Some(replay.len()) {
                        replay.pop_front();
                    }
                    if args.last != Some(0) {
                        replay.push_back((line, *r));
                    }
                }
                Line::Record(r) => print(&mut out, args.output, &line, *r)?,
                Line::Notice(Notice::Live(_)) => {
                    live = true;
                    for (raw, r) in replay.drain(..) {
                        print(&mut out, args.output, &raw, r)?;
                    }
                    out.flush()?;
                    if !follow {
                        return Ok(());
                    }
                }
                Line::Notice(Notice::Lost(n)) => {
                    // Said where it happened: after what was printed so far.
                    out.flush()?;
                    eprintln!("{}", lost_message(n));
                }
                Line::Notice(Notice::Error(e)) => bail!("the agent refused the request: {e}"),
            }
        }
        bail!(
            "the agent closed {} (it stopped or restarted): run `redirector flows` again once it is back",
            path.display()
        )
    }
    .await;
    match result {
        // `redirector flows | head`: the reader is done, so are we.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow!(
            "no agent is serving flow records on {}: start one with `redirector run` \
             (or point --flows-socket / REDIRECTOR_FLOWS_SOCKET at the socket of the agent that runs)",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: the agent makes its flow socket readable by root only (mode 0600): run `redirector flows` as root",
            path.display()
        ),
        _ => anyhow!("connecting to {}: {e}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn client_filters_parse_addresses_and_networks() {
        let one = parse_client("198.18.0.1").expect("v4");
        assert!(one.contains(ip("198.18.0.1")));
        assert!(!one.contains(ip("198.18.0.2")));
        // A dual-stack listener's records may show IPv4 queriers mapped.
        assert!(one.contains(ip("::ffff:198.18.0.1")));
        assert!(!one.contains(ip("fd00:5eed::1")));

        let net = parse_client("10.1.0.0/16").expect("v4 net");
        assert!(net.contains(ip("10.1.255.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        let odd = parse_client("10.0.0.0/9").expect("v4 /9");
        assert!(odd.contains(ip("10.127.0.1")));
        assert!(!odd.contains(ip("10.128.0.1")));
        assert!(parse_client("0.0.0.0/0")
            .expect("all")
            .contains(ip("1.2.3.4")));

        let v6 = parse_client("fd00:5eed::/64").expect("v6 net");
        assert!(v6.contains(ip("fd00:5eed::1")));
        assert!(!v6.contains(ip("fd00:5eee::1")));
        assert!(!v6.contains(ip("198.18.0.1")));
        assert!(parse_client("[fd00:5eed::1]")
            .expect("bracketed")
            .contains(ip("fd00:5eed::1")));
        assert_eq!(
            parse_client("::ffff:198.18.0.0/120").expect("mapped"),
            parse_client("198.18.0.0/24").expect("v4")
        );

        assert!(parse_client("querier").unwrap_err().contains("not an IP"));
        assert!(parse_client("10.0.0.0/33").unwrap_err().contains("0-32"));
        assert!(parse_client("fd00::/129").unwrap_err().contains("0-128"));
        assert!(parse_client("10.0.0.0/x").unwrap_err().contains("0-32"));
    }

    fn wire(event: &str, netns: &str, client: &str) -> FlowRecord {
        let line = format!(
            r#"{{"event":"{event}","time":"2026-01-01T00:00:00.000000Z","netns":"{netns}","netns_cookie":7,"client_addr":"{client}","client_port":4000,"local_addr":"198.18.0.2","advertise_port":12345,"listen_port":9095}}"#
        );
        serde_json::from_str(&line).expect("record")
    }

    #[test]
    fn filters_combine_across_flags_and_within_one() {
        let f = Filter {
            netns: vec!["live-store".into()],
            clients: vec![parse_client("198.18.0.1").expect("ip")],
            events: vec![EventKind::Close, EventKind::Refused],
            ..Filter::default()
        };
        assert!(f.matches(&wire("close", "/var/run/netns/live-store-0", "198.18.0.1")));
        assert!(f.matches(&wire(
            "refused",
            "/var/run/netns/live-store-0",
            "198.18.0.1"
        )));
        assert!(!f.matches(&wire("open", "/var/run/netns/live-store-0", "198.18.0.1")));
        assert!(!f.matches(&wire("close", "/var/run/netns/other", "198.18.0.1")));
        assert!(!f.matches(&wire(
            "close",
            "/var/run/netns/live-store-0",
            "fd00:5eed::1"
        )));
        assert!(Filter::default().matches(&wire("open", "cookie:7", "fd00:5eed::1")));
    }

    #[test]
    fn cli_flags_build_the_filter() {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from([
            "redirector",
            "flows",
            "--netns",
            "live-store-0",
            "--client",
            "10.0.0.0/8",
            "--client",
            "fd00::1",
            "--event",
            "close",
            "--event",
            "refused",
            "--output",
            "json",
            "--last",
            "5",
        ])
        .expect("parses");
        let crate::cli::Command::Flows(a) = cli.command else {
            panic!("not flows");
        };
        assert_eq!(a.netns, ["live-store-0"]);
        assert_eq!(a.client.len(), 2);
        assert_eq!(a.event, [EventKind::Close, EventKind::Refused]);
        assert_eq!(a.output, FlowFormat::Json);
        assert_eq!(a.last, Some(5));
        assert!(!a.follow);
        let bad = crate::cli::Cli::try_parse_from(["redirector", "flows", "--event", "opened"]);
        assert!(bad.expect_err("bad event").to_string().contains("opened"));
        let bad =
            crate::cli::Cli::try_parse_from(["redirector", "flows", "--client", "10.0.0.0/40"]);
        assert!(bad.expect_err("bad prefix").to_string().contains("0-32"));
    }

    #[test]
    fn records_round_trip_into_the_agents_formats() {
        let raw = r#"{"event":"close","time":"2026-11-24T04:37:51.971097Z","netns":"/var/run/netns/live-store-0","netns_cookie":4099,"client_addr":"198.18.0.1","client_port":44948,"local_addr":"198.18.0.2","advertise_port":12345,"listen_port":9095,"listener_pid":42,"listener_comm":"tempo","duration_ms":43.06,"bytes_received":5,"bytes_sent":10,"srtt_us":53,"retransmits":0,"end":"fin"}"#;
        let Line::Record(r) = parse_line(raw).expect("parses") else {
            panic!("not a record");
        };
        // Every field survives: re-serialized, it is the agent's line again.
        let record = r;
        let mut json = Vec::new();
        log::write_line(&mut json, FlowFormat::Json, &record).expect("json");
        assert_eq!(String::from_utf8(json).expect("utf8").trim_end(), raw);
        let mut text = Vec::new();
        log::write_line(&mut text, FlowFormat::Text, &record).expect("text");
        assert_eq!(
            String::from_utf8(text).expect("utf8"),
            "2026-11-24T04:37:51.971097Z close   /var/run/netns/live-store-0 198.18.0.1:44948 -> :12345 => :9095 43.060ms rx=5B tx=10B srtt=53us retrans=0 end=fin\n"
        );
        assert!(matches!(
            parse_line(r#"{"lost":3}"#).expect("notice"),
            Line::Notice(Notice::Lost(3))
        ));
        assert!(parse_line("not json").is_err());
    }

    /// Every event and end the agent writes is read back as itself: an
    /// update record once came out of `redirector flows` as "unknown".
    #[test]
    fn every_event_and_end_name_is_read_back_as_itself() {
        for (event, end) in [
            ("open", None),
            ("update", None),
            ("close", Some("fin")),
            ("close", Some("rst")),
            ("close", Some("aborted")),
            ("refused", None),
        ] {
            let end_field = end.map(|e| format!(r#","end":"{e}""#)).unwrap_or_default();
            let raw = format!(
                r#"{{"event":"{event}","time":"t","netns":"n","netns_cookie":1,"client_addr":"198.18.0.1","client_port":1,"local_addr":"198.18.0.2","advertise_port":12345,"listen_port":9095{end_field}}}"#
            );
            let Line::Record(r) = parse_line(&raw).expect("parses") else {
                panic!("not a record");
            };
            let record = r;
            assert_eq!((record.event, record.end), (event, end), "{raw}");
        }
        assert_eq!(log::event_named("reset"), "unknown");
        assert_eq!(log::end_named("timeout"), "unknown");
    }

    #[test]
    fn lost_records_are_counted_in_words() {
        assert!(lost_message(12).starts_with("redirector: missed 12 flow record(s)"));
    }

    #[test]
    fn pods_are_matched_by_name_or_namespace_slash_name_and_by_namespace() {
        let with_pod = |pod: &str| -> FlowRecord {
            let line = format!(
                r#"{{"event":"open","time":"2026-01-01T00:00:00.000000Z","netns":"/proc/1/ns/net","netns_cookie":7,"pod":"{pod}","client_addr":"198.18.0.1","client_port":4000,"local_addr":"198.18.0.2","advertise_port":12345,"listen_port":9095,"flow_id":42}}"#
            );
            serde_json::from_str(&line).expect("record")
        };
        let by_name = Filter {
            pods: vec!["live-store-0".into()],
            ..Filter::default()
        };
        assert!(by_name.matches(&with_pod("tempo/live-store-0")));
        assert!(!by_name.matches(&with_pod("tempo/live-store-1")));
        assert!(!by_name.matches(&wire("open", "/var/run/netns/ls", "198.18.0.1")));
        let qualified = Filter {
            pods: vec!["tempo/live-store-0".into()],
            ..Filter::default()
        };
        assert!(qualified.matches(&with_pod("tempo/live-store-0")));
        assert!(!qualified.matches(&with_pod("other/live-store-0")));
        let namespace = Filter {
            namespaces: vec!["tempo".into()],
            ..Filter::default()
        };
        assert!(namespace.matches(&with_pod("tempo/live-store-1")));
        assert!(!namespace.matches(&with_pod("tempo-dev/live-store-1")));
        assert!(!namespace.matches(&wire("open", "/var/run/netns/ls", "198.18.0.1")));
        // The flow id and pod survive the trip back into a record.
        let r = with_pod("tempo/live-store-0");
        assert_eq!(r.flow_id, Some(42));
        assert_eq!(r.pod.as_deref(), Some("tempo/live-store-0"));
    }
}
