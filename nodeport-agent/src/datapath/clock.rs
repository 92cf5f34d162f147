//! The datapath's clock, seen from userspace: the programs keep time in jiffies
//! (`bpf_jiffies64`, the cheapest clock they can read), so the agent needs the tick rate to
//! convert timeouts and the current jiffies to tell which entries have expired.

/// Kernel ticks per second (CONFIG_HZ): the resolution of CLOCK_MONOTONIC_COARSE is exactly
/// one tick.
pub fn kernel_hz() -> u32 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres fills `res`.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    if ok && tick_ns > 0 {
        (1_000_000_000 / tick_ns) as u32
    } else {
        250
    }
}

/// The kernel's jiffies now. Read from /proc/timer_list (root only, exact); otherwise
/// estimated from CLOCK_MONOTONIC_COARSE, which the tick drives (within a fraction of a
/// second: jiffies start at 2^32 - 300 HZ shortly after boot).
pub fn jiffies_now(hz: u32) -> u64 {
    std::fs::read_to_string("/proc/timer_list")
        .ok()
        .and_then(|text| parse_timer_list(&text))
        .unwrap_or_else(|| estimated_jiffies(hz))
}

fn estimated_jiffies(hz: u32) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let hz = u64::from(hz);
    let ticks = now.tv_sec as u64 * hz + now.tv_nsec as u64 * hz / 1_000_000_000;
    INITIAL_JIFFIES - 300 * hz + ticks
}

/// `INITIAL_JIFFIES` is `(unsigned int)(-300 * HZ)` on 64-bit kernels: 2^32 - 300 HZ.
const INITIAL_JIFFIES: u64 = 1 << 32;

/// The `jiffies: N` line of /proc/timer_list.
fn parse_timer_list(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("jiffies: "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jiffies_line_of_timer_list() {
        let text = "now at 7270889 nsecs\n  .last_jiffies   : 4296709851\njiffies: 4296709956\n";
        assert_eq!(parse_timer_list(text), Some(4_296_709_956));
        assert_eq!(parse_timer_list("no such line"), None);
    }

    #[test]
    #[ignore = "needs root (reads /proc/timer_list): run `cargo xtask test`"]
    fn the_estimate_agrees_with_the_kernel_within_a_second() {
        let hz = kernel_hz();
        let text = std::fs::read_to_string("/proc/timer_list").expect("/proc/timer_list (root)");
        let exact = parse_timer_list(&text).expect("a jiffies line");
        let estimate = estimated_jiffies(hz);
        assert!(
            exact.abs_diff(estimate) < u64::from(hz),
            "{exact} vs {estimate}"
        );
    }
}
