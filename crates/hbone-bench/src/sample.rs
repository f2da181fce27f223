//! Reading a process's memory, CPU time and scheduling counts from /proc
//! (Linux).
//!
//! Resident memory (VmRSS) is what a deployment pays per tunnel; utime +
//! stime is the CPU the process burned, including its kernel work on its
//! sockets, which is where much of a proxy's cost lies. Context switches
//! and migrations are kept per thread only, so a [`Snapshot`] holds each
//! thread's and [`Snapshot::since`] subtracts thread by thread.

use std::collections::BTreeMap;

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

/// CPU time of a process, in seconds, as the kernel splits it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    /// In user space.
    pub user: f64,
    /// In the kernel on the process's behalf: syscalls and, unless the
    /// kernel accounts interrupt time apart, the softirq work they run
    /// (such as loopback TCP's receive path).
    pub system: f64,
}

impl CpuTime {
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    fn minus(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// User and system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<CpuTime> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let (user, system) = parse_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}"))?;
    let per_second = ticks_per_second()?;
    let seconds = |ticks: u64| ticks as f64 / per_second;
    Ok(CpuTime {
        user: seconds(user),
        system: seconds(system),
    })
}

/// The clock ticks /proc counts CPU time in, per second.
fn ticks_per_second() -> anyhow::Result<f64> {
    // SAFETY: sysconf only reads a system setting.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        bail!("the system reports no clock tick rate");
    }
    Ok(per_second as f64)
}

/// utime and stime (fields 14 and 15) of a /proc/PID/stat line. The
/// command name (field 2) is in parentheses and may hold spaces, so
/// counting starts after its closing parenthesis, at field 3.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The sum of [`cpu_time`] over several processes.
pub fn total_cpu_time(pids: &[u32]) -> anyhow::Result<CpuTime> {
    pids.iter().try_fold(CpuTime::default(), |sum, &pid| {
        let time = cpu_time(pid)?;
        Ok(CpuTime {
            user: sum.user + time.user,
            system: sum.system + time.system,
        })
    })
}

/// What one thread's scheduler counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ThreadCounts {
    voluntary: u64,
    involuntary: u64,
    /// `None` where /proc/PID/task/TID/sched is missing (a kernel built
    /// without scheduler debugging).
    migrations: Option<u64>,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
}

/// CPU time and per-thread scheduling counts of some processes at one
/// moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    cpu: CpuTime,
    threads: BTreeMap<(u32, u32), ThreadCounts>,
    /// Clock ticks per second, for the threads' CPU time.
    per_second: f64,
}

/// What the processes spent between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub cpu_seconds: f64,
    /// Of it, in the kernel.
    pub system_seconds: f64,
    pub voluntary: u64,
    pub involuntary: u64,
    /// `None` if any thread's migrations could not be read.
    pub migrations: Option<u64>,
    /// Threads seen in the first snapshot and gone in the second: their
    /// context switches and migrations since the first are missing.
    pub threads_gone: usize,
    /// The CPU time of the thread that spent the most: beside the total,
    /// it tells a process held back by one saturated thread (or worker)
    /// from one with work spread evenly.
    pub busiest_thread_seconds: f64,
}

impl Snapshot {
    /// Reads every thread of `pids` now.
    pub fn take(pids: &[u32]) -> anyhow::Result<Snapshot> {
        let per_second = ticks_per_second()?;
        let mut threads = BTreeMap::new();
        for &pid in pids {
            let dir = format!("/proc/{pid}/task");
            let tasks = std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
            for task in tasks {
                let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                // A thread may end between the listing and the reading.
                if let Some(counts) = thread_counts(pid, tid) {
                    threads.insert((pid, tid), counts);
                }
            }
        }
        Ok(Snapshot {
            cpu: total_cpu_time(pids)?,
            threads,
            per_second,
        })
    }

    /// What was spent from `earlier` to this snapshot. Threads started in
    /// between count from zero.
    pub fn since(&self, earlier: &Snapshot) -> Spent {
        let cpu = self.cpu.minus(earlier.cpu);
        let mut spent = Spent {
            cpu_seconds: cpu.total(),
            system_seconds: cpu.system,
            migrations: Some(0),
            ..Spent::default()
        };
        for (key, now) in &self.threads {
            let before = earlier.threads.get(key).copied().unwrap_or(ThreadCounts {
                migrations: Some(0),
                ..ThreadCounts::default()
            });
            let ticks = now.cpu_ticks.saturating_sub(before.cpu_ticks);
            if self.per_second > 0.0 {
                spent.busiest_thread_seconds = spent
                    .busiest_thread_seconds
                    .max(ticks as f64 / self.per_second);
            }
            spent.voluntary += now.voluntary.saturating_sub(before.voluntary);
            spent.involuntary += now.involuntary.saturating_sub(before.involuntary);
            spent.migrations = match (spent.migrations, now.migrations, before.migrations) {
                (Some(sum), Some(now), Some(before)) => Some(sum + now.saturating_sub(before)),
                _ => None,
            };
        }
        spent.threads_gone = earlier
            .threads
            .keys()
            .filter(|key| !self.threads.contains_key(key))
            .count();
        spent
    }
}

/// One thread's counts, or `None` if it has ended.
fn thread_counts(pid: u32, tid: u32) -> Option<ThreadCounts> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let (voluntary, involuntary) = parse_switches(&status)?;
    let migrations = std::fs::read_to_string(format!("{dir}/sched"))
        .ok()
        .and_then(|sched| parse_migrations(&sched));
    let (utime, stime) = parse_cpu_ticks(&std::fs::read_to_string(format!("{dir}/stat")).ok()?)?;
    Some(ThreadCounts {
        voluntary,
        involuntary,
        migrations,
        cpu_ticks: utime + stime,
    })
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a
/// /proc/…/status file.
fn parse_switches(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ))
}

/// `se.nr_migrations` of a /proc/…/sched file.
fn parse_migrations(sched: &str) -> Option<u64> {
    sched.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == "se.nr_migrations")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_switches_and_migrations() {
        let status =
            "Name:\thbone\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), Some((120, 7)));
        assert_eq!(parse_switches("Name:\thbone\n"), None);
        let sched = "hbone (42, #threads: 3)\n---\nse.exec_start   :   1.5\nse.nr_migrations   :   31\nnr_switches : 9\n";
        assert_eq!(parse_migrations(sched), Some(31));
        assert_eq!(parse_migrations("nr_switches : 9\n"), None);
    }

    #[test]
    fn snapshots_subtract_thread_by_thread() {
        let counts = |voluntary, involuntary, migrations| ThreadCounts {
            voluntary,
            involuntary,
            migrations: Some(migrations),
            cpu_ticks: voluntary * 10,
        };
        let before = Snapshot {
            cpu: CpuTime {
                user: 0.75,
                system: 0.25,
            },
            threads: BTreeMap::from([((1, 1), counts(10, 1, 2)), ((1, 2), counts(5, 0, 0))]),
            per_second: 100.0,
        };
        let after = Snapshot {
            cpu: CpuTime {
                user: 1.0,
                system: 0.5,
            },
            threads: BTreeMap::from([((1, 1), counts(30, 2, 3)), ((1, 3), counts(4, 1, 1))]),
            per_second: 100.0,
        };
        let spent = after.since(&before);
        assert_eq!(spent.voluntary, 20 + 4);
        assert_eq!(spent.involuntary, 1 + 1);
        assert_eq!(spent.migrations, Some(1 + 1));
        assert_eq!(spent.threads_gone, 1);
        // Thread 1 spent 200 ticks, the new thread 3 40: 2 s at 100 a second.
        assert!((spent.busiest_thread_seconds - 2.0).abs() < 1e-9);
        assert!((spent.cpu_seconds - 0.5).abs() < 1e-9);
        assert!((spent.system_seconds - 0.25).abs() < 1e-9);
    }

    #[test]
    fn snapshots_this_process() {
        let me = std::process::id();
        let before = Snapshot::take(&[me]).unwrap();
        std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(5)))
            .join()
            .unwrap();
        let spent = Snapshot::take(&[me]).unwrap().since(&before);
        assert!(spent.cpu_seconds >= 0.0);
        assert!(!before.threads.is_empty());
    }

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\thbone\nVmPeak:\t  100 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(5120));
        let stat = "4242 (hb one) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some((250, 50)));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        let cpu = cpu_time(me).unwrap();
        assert!(cpu.user >= 0.0 && cpu.system >= 0.0);
    }
}
