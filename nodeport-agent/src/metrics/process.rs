//! The standard process metrics (`process_*`, as Prometheus' client libraries export them), read
//! from /proc/self at scrape time: CPU time, resident and virtual memory, open and maximum file
//! descriptors, start time.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// The process's figures at one instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: f64,
    pub virtual_memory_bytes: f64,
    pub open_fds: f64,
    pub max_fds: f64,
    pub start_time_seconds: f64,
}

/// `sysconf(name)`, `None` when unknown.
fn sysconf(name: libc::c_int) -> Option<f64> {
    // SAFETY: sysconf only reads its argument.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v as f64)
}

/// The fields of /proc/[pid]/stat after the command name (which may hold spaces and
/// parentheses), so that `fields[0]` is field 3 (`state`) of proc(5).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().collect())
}

/// `btime` of /proc/stat: the boot time, in Unix seconds.
fn boot_time(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Parses /proc/self/stat and /proc/stat with the clock tick and page size given.
fn parse(stat: &str, proc_stat: &str, ticks: f64, page: f64) -> Option<(f64, f64, f64, f64)> {
    let f = stat_fields(stat)?;
    let num = |field: usize| -> Option<f64> { f.get(field - 3)?.parse::<f64>().ok() };
    // proc(5): utime 14, stime 15, starttime 22 (ticks since boot), vsize 23 (bytes), rss 24
    // (pages).
    let cpu = (num(14)? + num(15)?) / ticks;
    let start = boot_time(proc_stat)? + num(22)? / ticks;
    Some((cpu, num(24)? * page, num(23)?, start))
}

impl ProcessStats {
    /// Reads this process's figures; `None` if /proc is not readable.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks = sysconf(libc::_SC_CLK_TCK)?;
        let page = sysconf(libc::_SC_PAGESIZE)?;
        let (cpu_seconds, resident_memory_bytes, virtual_memory_bytes, start_time_seconds) =
            parse(&stat, &proc_stat, ticks, page)?;
        // The directory's own descriptor is among those listed, as in client_golang.
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur as f64
        } else {
            0.0
        };
        Some(Self {
            cpu_seconds,
            resident_memory_bytes,
            virtual_memory_bytes,
            open_fds,
            max_fds,
            start_time_seconds,
        })
    }
}

/// Encodes [`ProcessStats::read`] at every scrape; nothing when /proc cannot be read.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes (the memory-mapped BPF arrays included)",
                s.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_memory_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_an_awkward_command_name() {
        // A command name with a space and a parenthesis; utime 250 and stime 50 ticks,
        // started 1000 ticks after boot, 3133440 bytes of virtual memory, 394 pages resident.
        let stat = "29993 (a) b) R 29990 29990 19992 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 \
                    1000 3133440 394 18446744073709551615 0 0";
        let proc_stat = "cpu  1 2 3\nbtime 1796288604\nprocesses 5\n";
        assert_eq!(
            parse(stat, proc_stat, 100.0, 4096.0),
            Some((3.0, 394.0 * 4096.0, 3133440.0, 1796288614.0))
        );
        assert_eq!(parse("garbage", proc_stat, 100.0, 4096.0), None);
    }

    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read().expect("/proc is readable");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(s.resident_memory_bytes > 1e5, "{s:?}");
        assert!(s.virtual_memory_bytes >= s.resident_memory_bytes, "{s:?}");
        assert!(s.open_fds >= 3.0 && s.max_fds >= s.open_fds, "{s:?}");
        // Started within the last day, not in the future (clock tick rounding aside).
        assert!(
            s.start_time_seconds > now - 86_400.0 && s.start_time_seconds <= now + 1.0,
            "{s:?}"
        );
        assert!(s.cpu_seconds >= 0.0, "{s:?}");
    }
}
