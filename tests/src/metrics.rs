//! The agent's HTTP endpoint read over loopback: status, headers, and the
//! samples of its Prometheus text.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    time::Duration,
};

/// Minimal HTTP/1.1 GET over loopback (`ADDR/path`): (status code, body).
pub fn http_get(addr_path: &str) -> (u16, String) {
    let response = http_request(addr_path, &[]).expect("GET from the metrics endpoint");
    (response.status, response.body)
}

/// What [`http_request`] read.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// (name in lowercase, value), in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// HTTP/1.1 GET over loopback (`ADDR/path`) with extra request `headers` (an
/// `Accept` to negotiate the metrics format, for one). Reads a chunked body
/// too: Go servers such as Prometheus send larger answers that way.
pub fn http_request(addr_path: &str, headers: &[(&str, &str)]) -> io::Result<HttpResponse> {
    let (addr, path) = addr_path.split_at(
        addr_path
            .find('/')
            .ok_or_else(|| io::Error::other(format!("no path in {addr_path:?}")))?,
    );
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    conn.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = response[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).map_err(io::Error::other)?,
    })
}

/// The payload of a chunked HTTP/1.1 body (`SIZE\r\nDATA\r\n`... `0\r\n\r\n`).
fn dechunk(mut body: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| io::Error::other("truncated chunk size"))?;
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| io::Error::other("bad chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let data = body
            .get(eol + 2..eol + 2 + size)
            .ok_or_else(|| io::Error::other("truncated chunk"))?;
        out.extend_from_slice(data);
        body = body.get(eol + 4 + size..).unwrap_or_default();
    }
}

/// The value of the sample `name` (no labels) in a Prometheus text `body`.
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
}
