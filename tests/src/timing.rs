//! How long tests wait, on hardware and under emulation.

use std::{
    thread,
    time::{Duration, Instant},
};

/// Set in the kernel matrix's QEMU guests, which run under software emulation.
pub const EMULATED_ENV: &str = "REDIRECTOR_TEST_EMULATED";

/// A latency bound measured on a real machine, stretched tenfold under
/// emulation (still far below a stall, which is what such bounds catch).
pub fn latency_bound(on_hardware: Duration) -> Duration {
    if std::env::var_os(EMULATED_ENV).is_some() {
        on_hardware * 10
    } else {
        on_hardware
    }
}

/// Polls `f` every 10 ms until it holds or `within` has passed; whether it
/// held (asked once more at the deadline).
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    f()
}
