//! The kernel's clocks, as flow records need them.

use rustix::time::ClockId;

/// Nanoseconds to add to a CLOCK_MONOTONIC time (`bpf_ktime_get_ns`) to get
/// Unix time.
pub fn monotonic_to_unix_offset_ns() -> i128 {
    fn now(clock: ClockId) -> i128 {
        let ts = rustix::time::clock_gettime(clock);
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    now(ClockId::Realtime) - now(ClockId::Monotonic)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix time minus the time since boot: after 2020, and the wall clock now.
    #[test]
    fn monotonic_offset_is_the_boot_time() {
        let offset = monotonic_to_unix_offset_ns();
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as i128;
        assert!(offset > 1_577_836_800 * 1_000_000_000, "{offset}");
        assert!(offset <= unix_now);
    }
}
