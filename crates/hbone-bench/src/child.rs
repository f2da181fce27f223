//! Child processes of the bench: this same binary re-executed with another
//! subcommand. Running the server, the entries, the apps and the load
//! generator as separate processes is what lets the bench read each one's
//! memory and CPU time from /proc, and keeps them from sharing a runtime.
//!
//! Every child is killed when its [`Proc`] is dropped (on success, on error
//! and on panic), and on Linux also when the bench itself dies, through
//! `PR_SET_PDEATHSIG`. Every wait here has a deadline.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::childlog::ChildLog;

/// A running child process of the bench.
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    ready: Receiver<SocketAddr>,
    log: Arc<Mutex<ChildLog>>,
}

impl Proc {
    /// Starts this binary with `args`. Its stdout lines and stderr (tail,
    /// and the `listen=` address of a "ready" line) are read by threads, so
    /// a chatty child never blocks on a full pipe.
    pub fn spawn(name: &str, args: &[String]) -> anyhow::Result<Proc> {
        Proc::spawn_in(None, name, args)
    }

    /// [`Proc::spawn`] inside the network namespace `netns` (through
    /// `ip netns exec`, which becomes this binary), when one is given.
    pub fn spawn_in(netns: Option<&str>, name: &str, args: &[String]) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("cannot find the hbone binary to re-execute")?;
        Proc::spawn_exe(&exe, netns, name, args)
    }

    /// [`Proc::spawn`] held to `cpus` (`--scaling`), when given.
    pub fn spawn_on(name: &str, args: &[String], cpus: Option<&[usize]>) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("cannot find the hbone binary to re-execute")?;
        Proc::start(&exe, None, cpus, name, args)
    }

    /// [`Proc::spawn_in`] of another hbone binary (`--against`).
    pub fn spawn_exe(
        exe: &Path,
        netns: Option<&str>,
        name: &str,
        args: &[String],
    ) -> anyhow::Result<Proc> {
        Proc::start(exe, netns, None, name, args)
    }

    fn start(
        exe: &Path,
        netns: Option<&str>,
        cpus: Option<&[usize]>,
        name: &str,
        args: &[String],
    ) -> anyhow::Result<Proc> {
        let mut command = match netns {
            None => Command::new(exe),
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(exe);
                command
            }
        };
        command
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        if let Some(cpus) = cpus {
            run_on(&mut command, cpus)?;
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start the {name} process"))?;
        let stdout = child.stdout.take().context("child stdout missing")?;
        let stderr = child.stderr.take().context("child stderr missing")?;
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let log = Arc::new(Mutex::new(ChildLog::default()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let keep = log.clone();
        std::thread::spawn(move || drain_stderr(stderr, &keep, &ready_tx));
        Ok(Proc {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            stdout: line_rx,
            ready: ready_rx,
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address from the child's next "... ready listen=ADDR" log line
    /// (`hbone run` prints one per server and entry it runs).
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<SocketAddr> {
        match self.ready.recv_timeout(limit) {
            Ok(addr) => Ok(addr),
            Err(RecvTimeoutError::Timeout) => {
                Err(self.failure(&format!("was not ready within {} s", limit.as_secs())))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.failure("exited before it was ready")),
        }
    }

    /// The next line the child prints on stdout.
    pub fn next_line(&mut self, limit: Duration) -> anyhow::Result<String> {
        match self.stdout.recv_timeout(limit) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => Err(self.failure(&format!(
                "printed no result within {:.1} s",
                limit.as_secs_f64()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                // Give it a moment to exit so the error can say how it ended.
                let _ = self.wait(Duration::from_millis(500));
                Err(self.failure("ended without printing its result"))
            }
        }
    }

    /// Closes the child's stdin: the load generator's signal to let go of
    /// the tunnels it holds.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the child to exit; an error if it fails or runs past `limit`.
    pub fn wait_success(&mut self, limit: Duration) -> anyhow::Result<()> {
        match self.wait(limit)? {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(self.failure(&format!("failed ({status})"))),
            None => Err(self.failure(&format!("did not exit within {:.1} s", limit.as_secs_f64()))),
        }
    }

    /// An error if the child has exited (a server or entry must not).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(&format!("exited ({status})"))),
            Err(e) => Err(self.failure(&format!("cannot be checked: {e}"))),
        }
    }

    /// The latest problems the child logged (warnings, errors, tunnels
    /// that failed).
    pub fn problems(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .problems()
    }

    /// One line on the problems the child logged over its life, if any.
    pub fn problem_summary(&self) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let latest = log.problems().pop()?;
        Some(format!(
            "{}: {} problem line(s); the latest: {latest}",
            self.name,
            log.problem_count()
        ))
    }

    fn wait(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `hbone NAME PROBLEM`, with the last lines the child wrote on stderr
    /// (an error message there is usually the reason).
    fn failure(&self, problem: &str) -> anyhow::Error {
        // The stderr thread may still be reading the child's last words.
        std::thread::sleep(Duration::from_millis(50));
        let last = self.log.lock().unwrap_or_else(|e| e.into_inner()).last(3);
        if last.is_empty() {
            anyhow::anyhow!("{} {problem}", self.name)
        } else {
            anyhow::anyhow!("{} {problem}; it said: {}", self.name, last.join(" / "))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain_stderr(stderr: impl Read, log: &Mutex<ChildLog>, ready: &mpsc::Sender<SocketAddr>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.contains("ready")
            && !line.contains("admin endpoint")
            && let Some(addr) = listen_addr(&line)
        {
            let _ = ready.send(addr);
        }
        log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

/// The `listen=ADDR` field of a plain-text log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("listen="))
        .and_then(|addr| addr.parse().ok())
}

/// Asks the kernel to kill the child if the thread that started it dies,
/// so a bench killed by a signal leaves no servers behind. The bench starts
/// all children from one thread that lives until the bench ends.
#[cfg(target_os = "linux")]
pub(super) fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure only calls prctl and
    // getppid, which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the bench exited while starting"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn die_with_parent(_command: &mut Command) {}

/// Holds the child, and every thread it starts, to `cpus` from its first
/// instruction: a runtime that sizes itself by the CPUs it may use then
/// takes one thread per CPU given.
#[cfg(target_os = "linux")]
fn run_on(command: &mut Command, cpus: &[usize]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    // SAFETY: a zeroed cpu_set_t is an empty set, filled with CPU_SET.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        anyhow::ensure!(
            cpu < libc::CPU_SETSIZE as usize,
            "CPU {cpu} is beyond what a CPU set holds"
        );
        // SAFETY: `cpu` is within the set, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: between fork and exec the closure only calls
    // sched_setaffinity on a set built beforehand, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn run_on(_command: &mut Command, _cpus: &[usize]) -> anyhow::Result<()> {
    anyhow::bail!("holding a process to some CPUs needs Linux")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listen_address() {
        let line = "2026-01-01T00:00:00Z  INFO hbone::cli: HBONE server ready listen=127.0.0.1:4242 id=spiffe://x/y";
        assert_eq!(listen_addr(line), Some("127.0.0.1:4242".parse().unwrap()));
        assert_eq!(listen_addr("SOCKS5 entry ready"), None);
    }
}
