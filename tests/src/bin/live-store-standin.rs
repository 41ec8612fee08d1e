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
    let mut opts = ListenOpts::default();
    for flag in args {
        match flag.as_str() {
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
    let _server = redirector_tests::Server::serve(listener, &name);
    loop {
        std::thread::park();
    }
}
