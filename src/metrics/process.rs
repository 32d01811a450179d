//! The process's own figures in the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), read from `/proc/self`
//! on Linux, so a dashboard or a memory alert needs nothing from the kubelet. Elsewhere nothing
//! is read and the series stay absent.

use metrics::{counter, describe_counter, describe_gauge, gauge};

pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const VIRTUAL_MEMORY: &str = "process_virtual_memory_bytes";
pub const OPEN_FDS: &str = "process_open_fds";
pub const MAX_FDS: &str = "process_max_fds";
pub const START_TIME: &str = "process_start_time_seconds";

/// Every name, for the tests that check a scrape.
pub const ALL: &[&str] = &[CPU_SECONDS, RESIDENT_MEMORY, VIRTUAL_MEMORY, OPEN_FDS, MAX_FDS, START_TIME];

pub(super) fn describe() {
    describe_counter!(CPU_SECONDS, "User and system CPU time spent by the process, in seconds.");
    describe_gauge!(RESIDENT_MEMORY, "Resident memory of the process, in bytes.");
    describe_gauge!(VIRTUAL_MEMORY, "Virtual memory of the process, in bytes.");
    describe_gauge!(OPEN_FDS, "Open file descriptors of the process.");
    describe_gauge!(MAX_FDS, "The process's limit on open file descriptors.");
    describe_gauge!(START_TIME, "When the process started, in seconds since the Unix epoch.");
}

/// One reading of the process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

/// Reads the process and sets the series; does nothing where `/proc` is not there.
pub fn record() {
    if let Some(s) = sample() {
        counter!(CPU_SECONDS).absolute(s.cpu_seconds as u64);
        gauge!(RESIDENT_MEMORY).set(s.resident_bytes as f64);
        gauge!(VIRTUAL_MEMORY).set(s.virtual_bytes as f64);
        gauge!(OPEN_FDS).set(s.open_fds as f64);
        gauge!(MAX_FDS).set(s.max_fds as f64);
        gauge!(START_TIME).set(s.start_time_seconds);
    }
}

/// The process now, from `/proc/self/{stat,statm,fd}` and `/proc/stat`; `None` off Linux or
/// when a file cannot be read.
#[cfg(target_os = "linux")]
pub fn sample() -> Option<Sample> {
    // SAFETY: sysconf and getrlimit only read process-wide settings into values we own.
    let (ticks, page, max_fds) = unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 0 };
        (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE), max)
    };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let (utime, stime, start) = parse_stat(&stat)?;
    let (virtual_pages, resident_pages) = parse_statm(&statm)?;
    let btime = parse_btime(&boot)?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let ticks = ticks as f64;
    Some(Sample {
        cpu_seconds: (utime + stime) as f64 / ticks,
        resident_bytes: resident_pages * page as u64,
        virtual_bytes: virtual_pages * page as u64,
        open_fds,
        max_fds,
        start_time_seconds: btime as f64 + start as f64 / ticks,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn sample() -> Option<Sample> {
    None
}

/// `utime`, `stime` and `starttime` (clock ticks) from `/proc/self/stat`. The command name, in
/// parentheses, may hold spaces and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3; utime 14, stime 15, starttime 22 (1-based, man proc).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)?, field(15)?, field(22)?))
}

/// Total and resident size (pages) from `/proc/self/statm`.
fn parse_statm(statm: &str) -> Option<(u64, u64)> {
    let mut it = statm.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Boot time (seconds since the epoch) from `/proc/stat`.
fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse_with_odd_command_names() {
        let stat = "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 25 0 0 20 0 9 0 12345 \
                    1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some((150, 25, 12345)));
        assert_eq!(parse_statm("2500 700 300 10 0 900 0\n"), Some((2500, 700)));
        assert_eq!(parse_btime("cpu  1 2 3\nintr 5\nbtime 1764662400\nprocesses 9\n"), Some(1_764_662_400));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reads_as_running_now() {
        let s = sample().expect("a Linux /proc");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(s.start_time_seconds > now - 3600.0 && s.start_time_seconds <= now + 1.0, "{s:?}");
        assert!(s.resident_bytes > 1 << 20 && s.virtual_bytes >= s.resident_bytes, "{s:?}");
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
    }
}
