//! The querier's side: connections to a [`Server`](crate::Server), what it
//! answered, and how they close.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use crate::Netns;

/// Which server answered each of `n` requests to `addr` made from `ns`;
/// panics, naming the connection, at the first that fails.
pub fn answered_by(ns: &Netns, addr: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            request(ns, addr, b"x")
                .unwrap_or_else(|e| panic!("connection {i} to {addr} failed: {e}"))
                .server
        })
        .collect()
}

/// What a `Server` answered.
#[derive(Debug)]
pub struct Reply {
    pub server: String,
    pub peer_seen: SocketAddr,
    pub echo: Vec<u8>,
    pub local_addr: SocketAddr,
}

/// Connects from inside `ns` to `addr`, sends `payload`, and reads the reply.
pub fn request(ns: &Netns, addr: &str, payload: &[u8]) -> io::Result<Reply> {
    let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
    ns.run(|| {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let local_addr = conn.local_addr()?;
        conn.write_all(payload)?;
        match conn.shutdown(Shutdown::Write) {
            // The server's RST came first: the read below reports it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            other => other?,
        }
        let mut reader = BufReader::new(conn);
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let (server, peer) = header
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| io::Error::other(format!("bad reply header {header:?}")))?;
        let mut echo = Vec::new();
        reader.read_to_end(&mut echo)?;
        Ok(Reply {
            server: server.to_owned(),
            peer_seen: peer.parse().map_err(io::Error::other)?,
            echo,
            local_addr,
        })
    })
}

/// Whether `seen` is `expected`, as a dual-stack socket reports an IPv4
/// address (`::ffff:a.b.c.d`) or plain.
pub fn same_ip(seen: &SocketAddr, expected: impl Into<IpAddr>) -> bool {
    seen.ip().to_canonical() == expected.into()
}

/// SO_LINGER {on, 0}: closing `conn` then sends a RST instead of a FIN.
pub fn reset_on_close(conn: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a correctly sized struct.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
