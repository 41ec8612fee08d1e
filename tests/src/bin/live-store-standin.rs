//! A live-store stand-in for discovery tests: a real process that lives in a
//! network namespace (`ip netns exec NS live-store-standin ADDR NAME`) and
//! answers like the tests' `Server`, until killed.

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(name)) = (args.next(), args.next()) else {
        eprintln!("usage: live-store-standin ADDR NAME");
        std::process::exit(2);
    };
    let listener = match std::net::TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("live-store-standin: bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {addr}");
    let _server = redirector_tests::Server::serve(listener, &name);
    loop {
        std::thread::park();
    }
}
