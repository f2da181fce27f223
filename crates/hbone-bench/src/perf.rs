//! Syscall counts of the processes under test, from `perf stat` counting
//! the `raw_syscalls:sys_enter` tracepoint (every syscall entry) and, for
//! the mix, one `syscalls:sys_enter_NAME` tracepoint per syscall listed.
//!
//! perf starts with its counters disabled and is told over its control
//! pipe (`--control fd:CTL,ACK`) to enable them just before a run and to
//! disable them just after, and acknowledges each, so the count covers the
//! run and nothing else. Where perf is missing or may not count (no
//! permission, no tracepoints), the bench says so and reports no syscall
//! figure at all: a count is never guessed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::child::die_with_parent;

/// Every syscall entry.
pub const TOTAL_EVENT: &str = "raw_syscalls:sys_enter";
/// The syscalls the mix names; the rest are counted as "other". Those a
/// proxy on tokio makes per unit of work (socket reads and writes, epoll,
/// wake-ups between threads) and per connection (accept, connect, socket
/// options, close), and the allocator's.
const MIX: [&str; 30] = [
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_ctl",
    "futex",
    "sched_yield",
    "accept4",
    "socket",
    "connect",
    "bind",
    "setsockopt",
    "getsockopt",
    "getsockname",
    "getpeername",
    "shutdown",
    "close",
    "fcntl",
    "ioctl",
    "mmap",
    "munmap",
    "madvise",
    "mprotect",
];
/// Where the kernel lists its tracepoints (one directory per syscall).
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// Longest wait for perf to acknowledge a command or to exit.
const PERF_LIMIT: Duration = Duration::from_secs(10);

/// Whether syscalls can be counted here, found out once at the start.
#[derive(Debug, Clone)]
pub enum Syscalls {
    /// perf counts every syscall, and these syscalls one by one; with no
    /// mix, `no_mix` says why.
    Counted {
        mix: Vec<&'static str>,
        no_mix: Option<String>,
    },
    /// Why not: perf is missing, may not count, or failed.
    Unavailable(String),
}

/// Why a `--quick` run counts no mix.
const QUICK_NO_MIX: &str = "not counted with --quick: it takes an extra run per workload, and \
                            perf takes about a second to attach the per-syscall tracepoints";

impl Syscalls {
    /// Tries perf on `pid` (any process of the bench's own): with the mix
    /// unless `quick`, then with the total alone.
    pub fn probe(pid: u32, dir: &Path, quick: bool) -> Syscalls {
        let mut attempts = Vec::new();
        if !quick {
            attempts.push(available_mix());
        }
        attempts.push(Vec::new());
        let mut why = String::new();
        for mix in attempts {
            let no_mix = match (mix.is_empty(), quick) {
                (false, _) => None,
                (true, true) => Some(QUICK_NO_MIX.to_owned()),
                (true, false) => Some(format!("perf could not count it ({why})")),
            };
            let probe = Syscalls::Counted { mix, no_mix };
            let counted =
                Counter::start(&[pid], &probe.events(true), dir).and_then(Counter::finish);
            match counted {
                Ok(_) => return probe,
                Err(e) => why = format!("{e:#}"),
            }
        }
        Syscalls::Unavailable(why)
    }

    pub fn available(&self) -> bool {
        matches!(self, Syscalls::Counted { .. })
    }

    /// Whether a mix can be counted.
    pub fn has_mix(&self) -> bool {
        matches!(self, Syscalls::Counted { mix, .. } if !mix.is_empty())
    }

    /// The perf events to count: the total, and with `mix` one per syscall
    /// of the mix. Every event is a counter on every thread, switched with
    /// the thread at each context switch: the mix's thirty make switches
    /// slow enough to move latency, so timed runs count the total alone.
    pub fn events(&self, mix: bool) -> Vec<String> {
        match self {
            Syscalls::Counted { mix: names, .. } => std::iter::once(TOTAL_EVENT.to_owned())
                .chain(
                    names
                        .iter()
                        .filter(|_| mix)
                        .map(|name| format!("syscalls:sys_enter_{name}")),
                )
                .collect(),
            Syscalls::Unavailable(_) => Vec::new(),
        }
    }
}

/// The syscalls of [`MIX`] this kernel has a tracepoint for; all of them if
/// the tracepoint list cannot be read (perf will say if one is missing).
fn available_mix() -> Vec<&'static str> {
    let Some(root) = TRACEFS
        .iter()
        .map(|root| Path::new(root).join("events/syscalls"))
        .find(|dir| dir.is_dir())
    else {
        return MIX.to_vec();
    };
    MIX.into_iter()
        .filter(|name| root.join(format!("sys_enter_{name}")).is_dir())
        .collect()
}

/// Syscalls counted over one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyscallCounts {
    pub total: u64,
    /// Per syscall of the mix, by name.
    pub by_name: BTreeMap<String, u64>,
}

/// A `perf stat` process attached to some processes, counting.
pub struct Counter {
    child: Child,
    control: std::io::PipeWriter,
    acks: Receiver<String>,
    output: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Counter {
    /// Attaches perf to every thread of `pids` (threads they start later
    /// are counted too) and enables the counters once it is attached.
    pub fn start(pids: &[u32], events: &[String], dir: &Path) -> anyhow::Result<Counter> {
        let (control_read, control) = std::io::pipe()?;
        let (acks_read, acks_write) = std::io::pipe()?;
        let fds = [control_read.as_raw_fd(), acks_write.as_raw_fd()];
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let output = dir.join(format!("perf-{nanos}.csv"));
        let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut command = Command::new("perf");
        command
            .arg("stat")
            .args(["-x", ",", "--delay=-1"])
            .arg("--control")
            .arg(format!("fd:{},{}", fds[0], fds[1]))
            .arg("-o")
            .arg(&output)
            .args(["-e", &events.join(",")])
            .args(["-p", &pid_list.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        pass_fds(&mut command, fds);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("perf is not installed"),
            Err(e) => return Err(e).context("cannot start perf"),
        };
        // perf holds its own copies now; ours must go, so that its exit
        // closes the acknowledgement pipe.
        drop((control_read, acks_write));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                *keep.lock().unwrap_or_else(|e| e.into_inner()) = text;
            });
        }
        let (ack_tx, acks) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(acks_read).lines() {
                let Ok(line) = line else { break };
                if ack_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut counter = Counter {
            child,
            control,
            acks,
            output,
            stderr,
        };
        counter.command("enable")?;
        Ok(counter)
    }

    /// Disables the counters, lets perf print them and reads them.
    pub fn finish(mut self) -> anyhow::Result<SyscallCounts> {
        self.command("disable")?;
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + PERF_LIMIT;
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                bail!("perf did not exit within {} s", PERF_LIMIT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&self.output)
            .with_context(|| format!("perf wrote no {}", self.output.display()))?;
        let _ = std::fs::remove_file(&self.output);
        parse(&text)
    }

    /// Sends `enable` or `disable` and waits for perf's acknowledgement.
    fn command(&mut self, what: &str) -> anyhow::Result<()> {
        let sent = writeln!(self.control, "{what}").and_then(|()| self.control.flush());
        let answer = match sent {
            Ok(()) => self.acks.recv_timeout(PERF_LIMIT),
            Err(_) => Err(RecvTimeoutError::Disconnected),
        };
        match answer {
            // perf writes the string with its terminating NUL: "ack\n\0".
            Ok(line) if line.trim_matches(|c: char| c == '\0' || c.is_whitespace()) == "ack" => {
                Ok(())
            }
            Ok(line) => bail!("perf answered {line:?} to {what}"),
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "perf did not acknowledge {what} within {} s",
                    PERF_LIMIT.as_secs()
                )
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.failure()),
        }
    }

    /// perf exited: its own words say why (no permission, unknown event).
    fn failure(&mut self) -> anyhow::Error {
        let deadline = Instant::now() + Duration::from_secs(2);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => break None,
            }
        };
        // The stderr thread may still be reading its last words.
        std::thread::sleep(Duration::from_millis(50));
        let said = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let said: Vec<&str> = said
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("Events "))
            .take(2)
            .collect();
        let status = status.map(|s| format!(" ({s})")).unwrap_or_default();
        if said.is_empty() {
            anyhow::anyhow!("perf stat exited{status}")
        } else {
            anyhow::anyhow!("perf stat exited{status}: {}", said.join(" / "))
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.output);
    }
}

/// Lets the child inherit `fds` (pipes are created close-on-exec).
fn pass_fds(command: &mut Command, fds: [i32; 2]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls fcntl, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for fd in fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// `perf stat -x ,` output: `COUNT,UNIT,EVENT,...` per event; comment and
/// empty lines skipped. A counter that never ran (`<not counted>`: no
/// thread made that syscall's tracepoint fire) is zero; one the kernel
/// cannot count is an error.
fn parse(text: &str) -> anyhow::Result<SyscallCounts> {
    let mut counts = SyscallCounts::default();
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(',');
        let (Some(count), Some(_unit), Some(event)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let count = match count {
            "<not counted>" => 0,
            other => other
                .parse::<u64>()
                .with_context(|| format!("perf counted {other:?} for {event}"))?,
        };
        if event == TOTAL_EVENT {
            total = Some(count);
        } else if let Some(name) = event.strip_prefix("syscalls:sys_enter_") {
            counts.by_name.insert(name.to_owned(), count);
        }
    }
    counts.total = total.with_context(|| format!("perf printed no {TOTAL_EVENT} count"))?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_stat_csv() {
        let text = "# started on Tue Dec  1 18:20:54 2026\n\n\
                    20305,,raw_syscalls:sys_enter,54236352,100.00,,\n\
                    1200,,syscalls:sys_enter_read,54236352,100.00,,\n\
                    <not counted>,,syscalls:sys_enter_futex,0,100.00,,\n";
        let counts = parse(text).unwrap();
        assert_eq!(counts.total, 20305);
        assert_eq!(counts.by_name["read"], 1200);
        assert_eq!(counts.by_name["futex"], 0);
        assert!(parse("# started\n").is_err(), "no total is no figure");
        assert!(parse("<not supported>,,raw_syscalls:sys_enter,0,0,,\n").is_err());
    }

    #[test]
    fn events_put_the_total_first() {
        let counted = Syscalls::Counted {
            mix: vec!["read", "futex"],
            no_mix: None,
        };
        assert_eq!(
            counted.events(true),
            [
                "raw_syscalls:sys_enter",
                "syscalls:sys_enter_read",
                "syscalls:sys_enter_futex"
            ]
        );
        assert_eq!(counted.events(false), ["raw_syscalls:sys_enter"]);
        assert!(counted.has_mix());
        assert!(
            Syscalls::Unavailable("no perf".into())
                .events(true)
                .is_empty()
        );
    }
}
