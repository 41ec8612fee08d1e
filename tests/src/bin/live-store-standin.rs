//! A live-store stand-in for tests that need a real process: it lives in a
//! network namespace (`ip netns exec NS live-store-standin ADDR NAME [--mptcp]
//! [--reuseport] [-target=NAME] [-config.file=PATH]`) and answers like the tests' `Server`, until
//! killed. `-target=live-store` is what Tempo's own command line carries, and
//! what the agent's discovery looks for; the stand-in itself ignores it.

use redirector_tests::{listen, ListenOpts};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(name)) = (args.next(), args.next()) else {
        eprintln!("usage: live-store-standin ADDR NAME [--mptcp] [--reuseport] [-target=NAME]");
        std::process::exit(2);
    };
    // Tests hold thousands of connections to it.
    redirector_tests::raise_open_files(8192);
    let mut opts = ListenOpts::default();
    let mut bind_many = 0u32;
    let mut bind_from = 0u32;
    let mut chroot = None;
    let mut storm: Option<u16> = None;
    let mut unshare_loop = 0u32;
    for flag in args {
        match flag.as_str() {
            // A hostile pod: after listening, N more listeners on the same
            // port, one per loopback address from 127.1.0.0 + K up.
            // Runs with DIR as its root (after loading everything it needs),
            // as a container's process does.
            n if n.starts_with("--chroot=") => chroot = Some(n["--chroot=".len()..].to_owned()),
            // A hostile pod: bind() and close() PORT in a loop, forever.
            n if n.starts_with("--bind-storm=") => {
                storm = n["--bind-storm=".len()..].parse().ok();
                if storm.is_none() {
                    eprintln!("live-store-standin: --bind-storm=PORT");
                    std::process::exit(2);
                }
            }
            // A hostile pod: N children, 32 at a time, each in new user and
            // network namespaces where it listens on the port for 50 ms, then
            // exits. The count made goes to the file $STANDIN_MADE_FILE.
            n if n.starts_with("--unshare-loop=") => {
                unshare_loop = n["--unshare-loop=".len()..].parse().unwrap_or_else(|_| {
                    eprintln!("live-store-standin: --unshare-loop=N");
                    std::process::exit(2);
                });
            }
            n if n.starts_with("--bind-from=") => {
                bind_from = n["--bind-from=".len()..].parse().unwrap_or_else(|_| {
                    eprintln!("live-store-standin: --bind-from=K");
                    std::process::exit(2);
                });
            }
            n if n.starts_with("--bind-many=") => {
                bind_many = n["--bind-many=".len()..].parse().unwrap_or_else(|_| {
                    eprintln!("live-store-standin: --bind-many=N");
                    std::process::exit(2);
                });
            }
            "--mptcp" => opts.mptcp = true,
            "--reuseport" => opts.reuseport = true,
            // What Tempo reads; discovery reads them too, the stand-in not.
            t if t.starts_with("-target=") || t.starts_with("-config.file=") => {}
            other => {
                eprintln!("live-store-standin: unknown flag {other}");
                std::process::exit(2);
            }
        }
    }
    if let Some(dir) = &chroot {
        let c = std::ffi::CString::new(dir.as_str()).unwrap_or_default();
        // SAFETY: chroot(2) and chdir(2) with NUL-terminated paths.
        let failed = unsafe { libc::chroot(c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 };
        if failed {
            eprintln!(
                "live-store-standin: chroot {dir}: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
    let bound = addr
        .parse()
        .map_err(std::io::Error::other)
        .and_then(|a| listen(a, opts));
    let (listener, mptcp) = match bound {
        Ok(l) => l,
        Err(e) => {
            eprintln!("live-store-standin: bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "listening on {addr} with {}",
        if mptcp { "mptcp" } else { "tcp" }
    );
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let _server = redirector_tests::Server::serve(listener, &name);
    if let Some(port) = storm {
        std::thread::spawn(move || loop {
            drop(std::net::TcpListener::bind(("127.0.0.1", port)));
        });
    }
    if unshare_loop > 0 {
        std::thread::spawn(move || {
            let mut made = 0;
            for start in (0..unshare_loop).step_by(32) {
                let batch = (unshare_loop - start).min(32);
                made += namespaces_with_listeners(port, batch);
            }
            if let Some(path) = std::env::var_os("STANDIN_MADE_FILE") {
                let _ = std::fs::write(path, made.to_string());
            }
        });
    }
    let mut held = Vec::new();
    if bind_many > 0 {
        redirector_tests::raise_open_files(u64::from(bind_many));
        // Let the agent serve this namespace (its bind hook) first, so the
        // kernel's own quota meets every one of these.
        std::thread::sleep(std::time::Duration::from_millis(500));
        for i in bind_from..bind_from + bind_many {
            let ip = std::net::Ipv4Addr::from(0x7f01_0000 + i);
            match std::net::TcpListener::bind((ip, port)) {
                Ok(l) => held.push(l),
                Err(e) => {
                    eprintln!("live-store-standin: bind {ip}:{port}: {e}");
                    std::process::exit(1);
                }
            }
        }
        eprintln!("bound {bind_many} more");
    }
    loop {
        std::thread::park();
    }
}

/// Forks `n` children that each enter new user and network namespaces and
/// listen on `port` there for 50 ms, then exit; waits for them. Returns how
/// many listened.
fn namespaces_with_listeners(port: u16, n: u32) -> u32 {
    let mut children = Vec::new();
    for _ in 0..n {
        // SAFETY: the child only makes async-signal-safe system calls before
        // _exit (the parent has other threads).
        match unsafe { libc::fork() } {
            0 => unsafe {
                let ok = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0 && {
                    let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0);
                    let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
                    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                    addr.sin6_port = port.to_be();
                    fd >= 0
                        && libc::bind(
                            fd,
                            (&addr as *const libc::sockaddr_in6).cast(),
                            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                        ) == 0
                        && libc::listen(fd, 16) == 0
                };
                libc::usleep(50_000);
                libc::_exit(if ok { 0 } else { 1 });
            },
            pid if pid > 0 => children.push(pid),
            _ => {}
        }
    }
    let mut listened = 0;
    for pid in children {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) } == pid;
        if waited && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            listened += 1;
        }
    }
    listened
}
