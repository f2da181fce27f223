//! Reading a process's memory and CPU time from /proc (Linux).
//!
//! Resident memory (VmRSS) is what a deployment pays per tunnel; utime +
//! stime is the CPU the process burned, including its kernel work on its
//! sockets, which is where much of a proxy's cost lies.

use anyhow::{Context, bail};

/// Resident set size of `pid`, in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_rss_kib(&status).with_context(|| format!("{path} has no VmRSS line"))
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

/// User plus system CPU time of `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}"))?;
    // SAFETY: sysconf only reads a system setting.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        bail!("the system reports no clock tick rate");
    }
    Ok(ticks as f64 / per_second as f64)
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command
/// name (field 2) is in parentheses and may hold spaces, so counting starts
/// after its closing parenthesis, at field 3.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The sum of [`cpu_seconds`] over several processes.
pub fn total_cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\thbone\nVmPeak:\t  100 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(5120));
        let stat = "4242 (hb one) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
    }
}
