//! Listening TCP sockets of the calling thread's network namespace, from the
//! kernel's sock_diag netlink interface. Asking for LISTEN only makes the
//! kernel walk its listener table alone; /proc/net/tcp walks the whole
//! established-connection hash on every read, tens of milliseconds on a big
//! host, which a once-a-second scan of every namespace cannot afford.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// A listening TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub family: u16,
    /// The address it is bound to (`::`/`0.0.0.0` for a wildcard).
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub inode: u64,
    /// The kernel's socket cookie: what `LISTENERS` reads back for an entry.
    pub cookie: u64,
    /// The cgroup v2 id the socket belongs to (its creator's cgroup), which
    /// accepted connections inherit: where `sock_ops` must run for them. 0 if
    /// the kernel did not say (before Linux 5.7).
    pub cgroup_id: u64,
}

/// `INET_DIAG_CGROUP_ID` (Linux 5.7), sent with every socket.
const INET_DIAG_CGROUP_ID: u16 = 21;

/// TCP sockets in LISTEN state on any of `ports`, IPv4 and IPv6.
pub fn listening(ports: &[u16]) -> io::Result<Vec<Listening>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut found = Vec::new();
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0)?;
        'dump: loop {
            let (data, _) = socket.recv_from_full()?;
            if data.is_empty() {
                break;
            }
            let mut offset = 0;
            while offset < data.len() {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::other(format!("sock_diag reply: {e}")))?;
                let len = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let port = r.header.socket_id.source_port;
                        if ports.contains(&port) {
                            // idiag_cookie: two u32 halves in host order, low first.
                            let c = r.header.socket_id.cookie;
                            let half = |i: usize| {
                                u32::from_ne_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]) as u64
                            };
                            found.push(Listening {
                                family: family as u16,
                                addr: r.header.socket_id.source_address,
                                port,
                                inode: r.header.inode as u64,
                                cookie: half(0) | (half(4) << 32),
                                cgroup_id: cgroup_id(&r.nlas),
                            });
                        }
                    }
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(io::Error::other(format!("sock_diag: {e:?}")));
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
    Ok(found)
}

fn cgroup_id(nlas: &[netlink_packet_sock_diag::inet::nlas::Nla]) -> u64 {
    use netlink_packet_core::Nla as _;
    nlas.iter()
        .find_map(|nla| match nla {
            netlink_packet_sock_diag::inet::nlas::Nla::Other(o)
                if o.kind() == INET_DIAG_CGROUP_ID =>
            {
                let mut value = [0u8; 8];
                o.emit_value(&mut value);
                Some(u64::from_ne_bytes(value))
            }
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_this_process() {
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let l6 = std::net::TcpListener::bind("[::1]:0").expect("bind");
        let (p4, p6) = (
            l4.local_addr().expect("addr").port(),
            l6.local_addr().expect("addr").port(),
        );
        let found = listening(&[p4, p6]).expect("sock_diag dump");
        assert!(
            found.iter().any(|l| l.port == p4 && l.family == 2),
            "{found:?}"
        );
        assert!(
            found.iter().any(|l| l.port == p6 && l.family == 10),
            "{found:?}"
        );
        assert!(found.iter().all(|l| l.inode != 0));
        // This process's own cgroup, as the cgroup v2 hierarchy numbers it.
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("v2 line");
        let mount = crate::sys::cgroup::cgroup2_mount().expect("cgroup2");
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(mount.join(path.trim_start_matches('/'))).expect("stat"),
        );
        assert!(
            found.iter().all(|l| l.cgroup_id == ino),
            "{found:?} vs {ino}"
        );
        // A connected socket on the port is not a listener.
        let _c = std::net::TcpStream::connect(("127.0.0.1", p4)).expect("connect");
        assert_eq!(listening(&[p4]).expect("dump").len(), 1);
    }
}
