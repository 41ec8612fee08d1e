//! Close records against the real kernel, one test per way a redirected TCP
//! connection can end. The kernel's byte counters follow sequence numbers, so
//! each FIN counts one; a close record must carry the payload bytes only,
//! whoever closed first, whether the querier's ACK of a FIN came alone or on
//! its own FIN, for simultaneous and half closes, resets and timeouts.
//!
//! The live-store is plain sockets accepted here, so every test decides when
//! each side writes, reads, shuts down or closes. Each step that sets up an
//! order waits for the TCP state it needs (read from TCP_INFO) instead of
//! sleeping, so the orders do not depend on timing.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Barrier, Mutex},
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{netns::ip, *};

/// Payload bytes the querier sends and the live-store answers: distinct, so a
/// swapped direction shows.
const N: usize = 1000;
const M: usize = 2345;
/// What the querier sends after the live-store's half-close.
const N2: usize = 3210;
/// What the live-store writes once the querier has gone silent: never acknowledged.
const UNACKED: usize = 777;
/// How long the live-store's kernel waits for an ACK before aborting.
const USER_TIMEOUT_MS: u32 = 1000;
/// Longest wait for any step: one that never happens fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

// include/net/tcp_states.h
const TCP_CLOSE: u8 = 7;
const TCP_CLOSING: u8 = 11;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn advertised(self) -> SocketAddr {
        SocketAddr::new(self.live_store(), ADVERTISE)
    }

    fn querier(self) -> IpAddr {
        match self {
            Family::V4 => QUERIER_V4.into(),
            Family::V6 => QUERIER_V6.into(),
        }
    }

    fn live_store(self) -> IpAddr {
        match self {
            Family::V4 => LIVE_STORE_V4.into(),
            Family::V6 => LIVE_STORE_V6.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// The querier closes first; the live-store reads EOF, then closes.
    QuerierFirst,
    /// The live-store closes first; the querier's kernel ACKs that FIN on its
    /// own (delayed ACK), and only then does the querier close.
    LiveStoreFirstAckAlone,
    /// The live-store closes first; the querier, blocked in read(), closes on
    /// EOF before its delayed ACK is due, so one FIN+ACK segment answers.
    LiveStoreFirstFinAck,
    /// Each side sends its FIN before it has received the other's.
    Simultaneous,
    /// The live-store sends its answer and half-closes, then keeps reading
    /// what the querier sends after that FIN.
    HalfClose,
    /// The querier resets (SO_LINGER 0) after the exchange.
    QuerierReset,
    /// The querier goes silent; the live-store's unacknowledged write times
    /// out (TCP_USER_TIMEOUT).
    Timeout,
}

impl Order {
    const ALL: [Order; 7] = [
        Order::QuerierFirst,
        Order::LiveStoreFirstAckAlone,
        Order::LiveStoreFirstFinAck,
        Order::Simultaneous,
        Order::HalfClose,
        Order::QuerierReset,
        Order::Timeout,
    ];

    fn end(self) -> &'static str {
        match self {
            Order::QuerierReset => "rst",
            Order::Timeout => "aborted",
            _ => "fin",
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address (a dual-stack listener's view of
/// an IPv4 peer) turned back into IPv4, so both ends name a peer alike.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The live-store's dual-stack listener on `[::]:LISTEN` and the connections it
/// accepted that no test has claimed yet.
struct LiveStore {
    listener: TcpListener,
    unclaimed: Mutex<HashMap<SocketAddr, TcpStream>>,
}

impl LiveStore {
    fn listen(l: &Netns) -> Self {
        let listener = l
            .run(|| TcpListener::bind(("::", LISTEN)))
            .expect("live-store listens on every address");
        // Nonblocking: waiting for a connection that never comes fails, not hangs.
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        Self {
            listener,
            unclaimed: Mutex::new(HashMap::new()),
        }
    }

    /// The live-store's end of the connection from `client`. Connections of
    /// other threads accepted meanwhile wait in `unclaimed` for theirs.
    fn accept_from(&self, client: SocketAddr) -> TcpStream {
        let client = canonical(client);
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let mut unclaimed = self.unclaimed.lock().expect("lock");
                if let Some(conn) = unclaimed.remove(&client) {
                    return conn;
                }
                match self.listener.accept() {
                    Ok((conn, peer)) => {
                        unclaimed.insert(canonical(peer), conn);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept on the live-store: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "the connection from {client} never reached the live-store's listener"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One redirected connection: the querier's socket (in `q`) and the
/// live-store's accepted socket (in `l`). Sockets stay in the namespace they
/// were created in, so any thread may use them.
struct Conn {
    client: SocketAddr,
    q: TcpStream,
    l: TcpStream,
}

/// What the close record of a connection must say.
#[derive(Debug)]
struct Expected {
    order: Order,
    family: Family,
    client: SocketAddr,
    received: u64,
    sent: u64,
}

/// A querier namespace, a live-store namespace whose listener was open before
/// the agent started (as a running live-store's is), and the agent.
struct Harness {
    agent: Agent,
    metrics: String,
    live: LiveStore,
    s: FlowSetup,
    /// The querier's next source port: each connection gets its own, so its
    /// close record is found by client address (the kernel may otherwise reuse
    /// the port of a connection that ended in RST or a timeout).
    next_port: std::sync::atomic::AtomicU16,
}

impl Harness {
    fn new() -> Self {
        let s = FlowSetup::new();
        let live = LiveStore::listen(&s.l);
        let agent = s.agent(&["--flow-format", "json"]);
        let metrics = agent.metrics_url("/metrics");
        Self {
            agent,
            metrics,
            live,
            s,
            next_port: std::sync::atomic::AtomicU16::new(20000),
        }
    }

    fn connect(&self, family: Family) -> Conn {
        let addr = family.advertised();
        let port = self
            .next_port
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let q = self
            .s
            .q
            .run(|| {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                let any: std::net::IpAddr = if addr.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                socket.bind(&SocketAddr::new(any, port).into())?;
                socket.connect_timeout(&addr.into(), WAIT)?;
                Ok::<TcpStream, std::io::Error>(socket.into())
            })
            .unwrap_or_else(|e| panic!("querier connects to {addr}: {e}\n{}", self.diagnose()));
        let client = q.local_addr().expect("querier's local address");
        let l = self.live.accept_from(client);
        for conn in [&q, &l] {
            conn.set_nonblocking(false).expect("blocking socket");
            conn.set_read_timeout(Some(WAIT)).expect("read timeout");
            conn.set_write_timeout(Some(WAIT)).expect("write timeout");
        }
        Conn { client, q, l }
    }

    /// Connects over `family`, exchanges `n` bytes up and `m` bytes down, and
    /// ends the connection in `order`. Returns what its close record must say
    /// and, for `LiveStoreFirstFinAck`, whether the querier's FIN did carry
    /// the ACK of the live-store's FIN (one segment).
    fn run(&self, family: Family, order: Order, n: usize, m: usize) -> (Expected, bool) {
        let c = self.connect(family);
        exchange(&c, n, m);
        let client = c.client;
        let mut received = n as u64;
        let mut fin_ack = true;
        match order {
            Order::QuerierFirst => querier_first(c),
            Order::LiveStoreFirstAckAlone => live_store_first_ack_alone(c),
            Order::LiveStoreFirstFinAck => fin_ack = live_store_first_fin_ack(c),
            Order::Simultaneous => simultaneous(c, &self.s.l, family),
            Order::HalfClose => {
                half_close(c, N2);
                received += N2 as u64;
            }
            Order::QuerierReset => querier_reset(c),
            Order::Timeout => timeout(c, &self.s.q, family),
        }
        let expected = Expected {
            order,
            family,
            client,
            received,
            sent: m as u64,
        };
        (expected, fin_ack)
    }

    /// The agent's view when a connection was not redirected: /readyz and the
    /// metrics about attachments, registrations and unservable listeners
    /// (another test that detaches every redirector link on the machine shows
    /// up here).
    fn diagnose(&self) -> String {
        let readyz = self.metrics.replace("/metrics", "/readyz");
        let (status, body) = http_get(&readyz);
        let (_, metrics) = http_get(&self.metrics);
        let interesting: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && [
                        "attached",
                        "registered",
                        "unservable",
                        "refused",
                        "redirected",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        format!("agent /readyz {status}: {body}\n{}", interesting.join("\n"))
    }

    /// Waits until the kernel has closed `count` flows (the agent reads its
    /// counters at each scrape), so every close record exists before the
    /// agent stops.
    fn wait_closed(&self, count: usize) {
        wait_until(&format!("the kernel counts {count} closed flows"), || {
            let (status, body) = http_get(&self.metrics);
            status == 200 && metric(&body, "redirector_flows_closed_total") >= count as u64
        });
    }

    /// Stops the agent and checks every close record and the counters.
    fn finish(self, expected: &[Expected]) {
        let Harness { agent, s, .. } = self;
        distinct_clients(expected);
        let stopped = agent.stop().expect("agent stops");
        let records = s.json_records();
        let mut wrong = Vec::new();
        for e in expected {
            wrong.extend(check_record(&records, e));
        }
        assert!(
            wrong.is_empty(),
            "{} of {} close records are wrong:\n{}",
            wrong.len(),
            expected.len(),
            wrong.join("\n")
        );
        let count = expected.len() as u64;
        let received: u64 = expected.iter().map(|e| e.received).sum();
        let sent: u64 = expected.iter().map(|e| e.sent).sum();
        assert_eq!(stopped.counter("flows_opened"), count);
        assert_eq!(stopped.counter("flows_closed"), count);
        assert_eq!(
            stopped.counter("bytes_received"),
            received,
            "payload bytes from the queriers, summed"
        );
        assert_eq!(
            stopped.counter("bytes_sent"),
            sent,
            "acknowledged payload bytes to the queriers, summed"
        );
        assert_eq!(stopped.counter("records_dropped"), 0);
    }
}

/// No two expectations for one client address: each names one connection.
fn distinct_clients(expected: &[Expected]) {
    let mut seen = std::collections::HashSet::new();
    for e in expected {
        assert!(seen.insert(e.client), "client {} used twice", e.client);
    }
}

/// The close record for `e`'s connection, compared field by field; returns
/// what is wrong (with the records seen), nothing if it is right.
fn check_record(records: &[serde_json::Value], e: &Expected) -> Option<String> {
    let mine: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            r["client_port"] == e.client.port()
                && r["client_addr"]
                    .as_str()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    == Some(e.client.ip())
        })
        .collect();
    let what = format!(
        "{:?} over {:?} from {} (expected received={} sent={} end={})",
        e.order,
        e.family,
        e.client,
        e.received,
        e.sent,
        e.order.end()
    );
    let kinds: Vec<&serde_json::Value> = mine.iter().map(|r| &r["event"]).collect();
    if kinds != ["open", "close"] {
        return Some(format!(
            "{what}: want one open then one close record, got {mine:?}"
        ));
    }
    let close = mine[1];
    eprintln!("{what}: {close}");
    let right = close["bytes_received"] == e.received
        && close["bytes_sent"] == e.sent
        && close["end"] == e.order.end()
        && close["listen_port"] == LISTEN
        && close["advertise_port"] == ADVERTISE;
    // A timeout is the one order that must have retransmitted.
    let retransmitted = e.order != Order::Timeout || close["retransmits"].as_u64() > Some(0);
    (!right || !retransmitted).then(|| format!("{what}: got {close}"))
}

/// Polls `done` until it holds; fails after `WAIT`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting until {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

fn tcp_info(conn: &TcpStream) -> libc::tcp_info {
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info
}

/// Everything `conn` wrote has been sent and acknowledged.
fn all_acked(conn: &TcpStream) -> bool {
    let info = tcp_info(conn);
    info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0
}

fn wait_state(conn: &TcpStream, state: u8, what: &str) {
    wait_until(what, || tcp_info(conn).tcpi_state == state);
}

/// Sends `n` bytes from `from` and reads exactly that many at `to`.
fn transfer(from: &TcpStream, to: &TcpStream, n: usize) {
    thread::scope(|s| {
        // A writer of its own: `n` may exceed what the socket buffers hold.
        s.spawn(move || {
            let mut from = from;
            from.write_all(&vec![b'x'; n]).expect("write the payload");
        });
        let mut to = to;
        let mut got = vec![0; n];
        to.read_exact(&mut got).expect("read the payload");
    });
}

/// Reads once; the byte count (0 at EOF).
fn read_once(mut conn: &TcpStream) -> io::Result<usize> {
    conn.read(&mut [0u8; 4096])
}

/// The querier sends `n` bytes, the live-store answers `m`; returns once each
/// side has every byte acknowledged, so each close starts from a quiet
/// connection and the acknowledged bytes are all of them.
fn exchange(c: &Conn, n: usize, m: usize) {
    transfer(&c.q, &c.l, n);
    transfer(&c.l, &c.q, m);
    wait_until("the querier ACKs all the live-store sent", || {
        all_acked(&c.l)
    });
    wait_until("the live-store ACKs all the querier sent", || {
        all_acked(&c.q)
    });
}

/// Segments the querier's kernel sent so far (data, ACKs, FINs).
fn segs_out(conn: &TcpStream) -> u32 {
    tcp_info(conn).tcpi_segs_out
}

/// 1. The querier closes first; the live-store reads EOF, then closes
///    (CLOSE_WAIT, LAST_ACK, CLOSE on the ACK of its FIN).
fn querier_first(c: Conn) {
    let Conn { q, l, .. } = c;
    drop(q);
    assert_eq!(read_once(&l).expect("live-store reads"), 0, "EOF");
    drop(l);
}

/// 2. The live-store closes first (its socket is orphaned in FIN_WAIT1); the
///    querier's kernel ACKs the FIN alone (FIN_WAIT2, and the kernel closes the
///    orphan into TIME_WAIT there), then the querier closes.
fn live_store_first_ack_alone(c: Conn) {
    let Conn { q, l, .. } = c;
    let before = segs_out(&q);
    drop(l);
    assert_eq!(read_once(&q).expect("querier reads"), 0, "EOF");
    // The only segment the querier can send now is the ACK of that FIN: wait
    // for its delayed ACK to go out instead of sleeping for it.
    wait_until(
        "the querier's kernel ACKs the live-store's FIN alone",
        || segs_out(&q) > before,
    );
    drop(q);
}

/// 3. The live-store closes first; the querier is blocked in read() and
///    closes the moment it sees EOF, well before its delayed ACK is due, so
///    its FIN carries the ACK of the live-store's FIN. Returns whether it did
///    (the querier sent exactly one segment from the live-store's FIN on).
fn live_store_first_fin_ack(c: Conn) -> bool {
    let Conn { q, l, .. } = c;
    let before = segs_out(&q);
    let reading = Barrier::new(2);
    let after = thread::scope(|s| {
        let querier = s.spawn(|| {
            reading.wait();
            let n = read_once(&q).expect("querier reads");
            // shutdown sends the same FIN close() would, and keeps the socket
            // to count what it sent.
            q.shutdown(Shutdown::Write).expect("querier FIN");
            assert_eq!(n, 0, "EOF");
            segs_out(&q)
        });
        reading.wait();
        drop(l);
        querier.join().expect("querier thread")
    });
    drop(q);
    after == before + 1
}

/// 4. Simultaneous close: each side sends its FIN before the other's has
///    arrived. To make that certain rather than likely, the live-store's
///    namespace drops what it sends to the querier while both shut down: its
///    FIN cannot arrive before the querier's FIN has reached it. The
///    live-store is then in CLOSING (its own FIN outstanding when the peer's
///    came), which is checked; then its FIN goes out and is ACKed.
fn simultaneous(c: Conn, l_ns: &Netns, family: Family) {
    let Conn { q, l, .. } = c;
    let hold = Blackhole::add(l_ns, family.querier());
    l.shutdown(Shutdown::Write).expect("live-store FIN");
    q.shutdown(Shutdown::Write).expect("querier FIN");
    wait_state(
        &l,
        TCP_CLOSING,
        "the live-store gets the querier's FIN with its own outstanding (CLOSING)",
    );
    drop(hold);
    wait_state(
        &l,
        TCP_CLOSE,
        "the querier ACKs the live-store's FIN (CLOSING to CLOSE)",
    );
    for conn in [&q, &l] {
        assert_eq!(read_once(conn).expect("read"), 0, "EOF on both sides");
    }
}

/// 5. Half-close by the live-store: it sends its answer and shuts down its
///    sending side, then keeps reading; the querier, having read that FIN,
///    sends `more` bytes and closes.
fn half_close(c: Conn, more: usize) {
    let Conn { q, l, .. } = c;
    l.shutdown(Shutdown::Write).expect("live-store half-close");
    assert_eq!(read_once(&q).expect("querier reads"), 0, "EOF");
    transfer(&q, &l, more);
    drop(q);
    assert_eq!(read_once(&l).expect("live-store reads"), 0, "EOF");
    drop(l);
}

/// 6. The querier resets the connection after the exchange.
fn querier_reset(c: Conn) {
    let Conn { q, l, .. } = c;
    reset_on_close(&q).expect("SO_LINGER");
    drop(q);
    let err = read_once(&l).expect_err("the querier resets");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    drop(l);
}

/// 7. The querier goes silent (its namespace drops what it sends to the
///    live-store); the live-store writes more, which is never acknowledged,
///    and its kernel gives up after TCP_USER_TIMEOUT.
fn timeout(c: Conn, q_ns: &Netns, family: Family) {
    let Conn { q, l, .. } = c;
    set_user_timeout(&l, USER_TIMEOUT_MS);
    let silence = Blackhole::add(q_ns, family.live_store());
    (&l).write_all(&[b'u'; UNACKED]).expect("live-store writes");
    let err = read_once(&l).expect_err("the live-store's kernel times out");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    // Reset while still silent: the querier's socket goes at once and sends
    // nothing after the test.
    reset_on_close(&q).expect("SO_LINGER");
    drop(q);
    drop(silence);
    drop(l);
}

fn set_user_timeout(conn: &TcpStream, ms: u32) {
    let ms: libc::c_uint = ms;
    // SAFETY: setsockopt with a valid fd and a correctly sized value.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_USER_TIMEOUT: {}", io::Error::last_os_error());
}

/// A blackhole route in `ns` to one address: what that namespace sends there
/// is dropped (iproute2 only: no firewall tool is needed); removed on drop.
struct Blackhole<'a> {
    ns: &'a Netns,
    dst: String,
}

impl<'a> Blackhole<'a> {
    fn add(ns: &'a Netns, addr: IpAddr) -> Self {
        let dst = match addr {
            IpAddr::V4(_) => format!("{addr}/32"),
            IpAddr::V6(_) => format!("{addr}/128"),
        };
        ip(&["-n", &ns.name, "route", "add", "blackhole", &dst]).expect("blackhole route");
        Self { ns, dst }
    }
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.ns.name, "route", "del", "blackhole", &self.dst]);
    }
}

/// One connection per family ending in `order`, `N` bytes up and `M` down.
fn one_order(order: Order) {
    let h = Harness::new();
    let mut expected = Vec::new();
    for family in [Family::V4, Family::V6] {
        let (e, fin_ack) = h.run(family, order, N, M);
        assert!(
            fin_ack,
            "{order:?} over {family:?}: the querier sent more than its FIN+ACK"
        );
        expected.push(e);
        h.wait_closed(expected.len());
    }
    h.finish(&expected);
}

#[test]
fn querier_closes_first() {
    one_order(Order::QuerierFirst);
}

#[test]
fn live_store_closes_first_and_the_ack_comes_alone() {
    one_order(Order::LiveStoreFirstAckAlone);
}

#[test]
fn live_store_closes_first_and_the_querier_answers_fin_ack() {
    one_order(Order::LiveStoreFirstFinAck);
}

#[test]
fn simultaneous_close() {
    one_order(Order::Simultaneous);
}

#[test]
fn half_close_by_the_live_store() {
    one_order(Order::HalfClose);
}

#[test]
fn reset_by_the_querier() {
    one_order(Order::QuerierReset);
}

#[test]
fn timeout_counts_only_acknowledged_bytes() {
    one_order(Order::Timeout);
}

/// Every order over both families with payloads from none to past the socket
/// buffers in one agent run, then the orders that need no namespace-wide
/// route side by side: the summed counters equal the sums sent.
#[test]
fn mixed_orders_sum_exactly() {
    let h = Harness::new();
    let sizes = [
        (0, 0),
        (1, 1),
        (N, M),
        (0, 4096),
        (65_537, 0),
        (1_000_000, 300_001),
    ];
    let mut expected = Vec::new();
    // How often the querier's FIN carried its ACK, for the record: both ways
    // of answering a FIN must give the same figures.
    let mut fin_acks = Vec::new();
    for &(n, m) in &sizes {
        for order in Order::ALL {
            for family in [Family::V4, Family::V6] {
                let (e, fin_ack) = h.run(family, order, n, m);
                if order == Order::LiveStoreFirstFinAck {
                    fin_acks.push(fin_ack);
                }
                expected.push(e);
                h.wait_closed(expected.len());
            }
        }
    }
    let side_by_side = [
        Order::QuerierFirst,
        Order::LiveStoreFirstAckAlone,
        Order::LiveStoreFirstFinAck,
        Order::HalfClose,
        Order::QuerierReset,
    ];
    let hr = &h;
    let concurrent: Vec<(Expected, bool)> = thread::scope(|s| {
        let runs: Vec<_> = (0..20)
            .map(|i| {
                let order = side_by_side[i % side_by_side.len()];
                let family = [Family::V4, Family::V6][i % 2];
                let (n, m) = sizes[i % sizes.len()];
                s.spawn(move || hr.run(family, order, n, m))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("connection thread"))
            .collect()
    });
    for (e, fin_ack) in concurrent {
        if e.order == Order::LiveStoreFirstFinAck {
            fin_acks.push(fin_ack);
        }
        expected.push(e);
    }
    h.wait_closed(expected.len());
    eprintln!(
        "{} connections; the querier answered with one FIN+ACK segment in {} of {} FIN+ACK runs",
        expected.len(),
        fin_acks.iter().filter(|&&f| f).count(),
        fin_acks.len()
    );
    h.finish(&expected);
}
