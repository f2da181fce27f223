//! What the figures were measured on, and with which command: a benchmark
//! figure means little without the machine, the build and how busy it was.

use super::cross_cpu;

/// A description of this machine, read from /proc.
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    /// How an idle CPU waits for work ([`idle_cpus`]).
    pub idle: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let memory = read("/proc/meminfo")
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = read("/proc/version").trim().to_owned();
        let virtual_machine = cpuinfo
            .lines()
            .filter_map(|line| line.strip_prefix("flags"))
            .any(|flags| flags.split_whitespace().any(|flag| flag == "hypervisor"));
        let cpuidle = |name: &str| read_trimmed(&format!("/sys/devices/system/cpu/cpuidle/{name}"));
        let idle = idle_cpus(
            cpuidle("current_driver").as_deref(),
            cpuidle("current_governor").as_deref(),
            read_trimmed("/sys/module/haltpoll/parameters/guest_halt_poll_ns").as_deref(),
            virtual_machine,
        );
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory,
            kernel: if kernel.is_empty() {
                "unknown".to_owned()
            } else {
                kernel
            },
            idle,
        }
    }
}

/// How this machine's idle CPUs wait, in words: the cpuidle driver and
/// governor, the guest's halt polling where the driver is `haltpoll`, and
/// whether this is a virtual machine. It moves CPU per request and latency
/// more than most code changes do: a request wakes a sleeping thread at
/// every hop, and where the CPU it sleeps on has halted, waking it costs
/// an interrupt to another CPU, which on a virtual machine exits to the
/// hypervisor, unless the idle CPU polls for a while before it halts.
fn idle_cpus(
    driver: Option<&str>,
    governor: Option<&str>,
    halt_poll_ns: Option<&str>,
    virtual_machine: bool,
) -> String {
    let mut parts = Vec::new();
    match (driver, governor) {
        (Some(driver), Some(governor)) => {
            parts.push(format!("cpuidle driver `{driver}`, governor `{governor}`"))
        }
        (Some(driver), None) => parts.push(format!("cpuidle driver `{driver}`")),
        _ => parts.push("cpuidle unknown".to_owned()),
    }
    if driver == Some("haltpoll") {
        match halt_poll_ns.and_then(|ns| ns.parse::<u64>().ok()) {
            Some(0) => parts.push(
                "no halt polling (`guest_halt_poll_ns` 0: an idle CPU halts at once, and waking \
                 it goes through the hypervisor)"
                    .to_owned(),
            ),
            Some(ns) => parts.push(format!(
                "halt polling up to {ns} ns (`guest_halt_poll_ns`) before an idle CPU halts"
            )),
            None => {}
        }
    }
    parts.push(if virtual_machine {
        "a virtual machine (the `hypervisor` CPU flag)".to_owned()
    } else {
        "no `hypervisor` CPU flag".to_owned()
    });
    parts.join("; ")
}

impl Machine {
    /// The CPUs, memory and kernel as Markdown list items, one per line.
    pub fn markdown_items(&self) -> String {
        format!(
            "- CPUs: {} × {}\n- idle CPUs: {}\n- memory: {}\n- kernel: {}\n",
            self.cpus, self.cpu_model, self.idle, self.memory, self.kernel
        )
    }
}

/// The "Circumstances" section that ends a written report: the machine,
/// how far apart two of its CPUs were around the runs (`probed`, where
/// any were), the build and the command that produced it.
pub fn circumstances(command: &str, probed: &[cross_cpu::Around]) -> String {
    let mut cross = String::new();
    if !probed.is_empty() {
        cross = cross_cpu::machine_item(probed) + "\n";
        cross += &cross_cpu::variation_item(probed).unwrap_or_default();
    }
    format!(
        "\n## Circumstances\n\n{}{cross}- build: {}\n- command:\n\n    {command}\n",
        Machine::describe().markdown_items(),
        build_profile()
    )
}

/// The CPUs this process may run on, in order; `mode` (the option that
/// holds processes to CPUs) names what needs them where it cannot be done.
#[cfg(target_os = "linux")]
pub fn allowed_cpus(_mode: &str) -> anyhow::Result<Vec<usize>> {
    use anyhow::Context as _;
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills
    // it, and CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot read this process's CPUs");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

/// Elsewhere processes are not held to CPUs.
#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus(mode: &str) -> anyhow::Result<Vec<usize>> {
    anyhow::bail!("{mode} holds processes to CPUs, which it does on Linux only")
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg writes them:
/// how busy the machine was around the measurement.
pub fn load_average() -> String {
    let text = read("/proc/loadavg");
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    if fields.len() == 3 {
        fields.join(" ")
    } else {
        "unknown".to_owned()
    }
}

/// The soft limit on open files of this process (already raised to the
/// hard limit at start; children get the same).
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_cur
}

/// Raises this process's open-file limit (children inherit it) to at least
/// `needed` where it is lower: above the hard limit only with the privilege
/// to (root), so the result may still fall short. Returns the limit now.
pub fn raise_open_file_limit(needed: u64) -> u64 {
    let current = open_file_limit();
    if current < needed {
        let wanted = libc::rlimit {
            rlim_cur: needed,
            rlim_max: needed,
        };
        // SAFETY: setrlimit only reads the struct we pass. An unprivileged
        // process may not raise its hard limit: the call then fails and
        // changes nothing.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) };
    }
    open_file_limit()
}

/// The Cargo profile that built this binary: `dist` (optimised as one
/// program, the binary to deploy), `release`, or a debug build whose
/// figures mean little.
pub fn build_profile() -> String {
    let profile = env!("HBONE_BENCH_PROFILE");
    if cfg!(debug_assertions) {
        format!("{profile} (debug: figures not representative; build with --profile dist)")
    } else if profile == "dist" {
        "dist (fat LTO, one codegen unit: the binary to deploy)".to_owned()
    } else {
        profile.to_owned()
    }
}

/// The current date and time in UTC, to the minute.
pub fn now_utc() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute()
    )
}

/// This process's command line, quoted where a shell would need it.
pub fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .and_then(|path| {
            std::path::Path::new(&path)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "hbone".to_owned());
    std::iter::once(program)
        .chain(args.map(|arg| quote(&arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A one-line file's content, trimmed; `None` when it cannot be read or
/// is empty.
fn read_trimmed(path: &str) -> Option<String> {
    Some(read(path).trim().to_owned()).filter(|text| !text.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("--runs"), "--runs");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn idle_cpus_say_whether_a_halted_cpu_is_woken_through_the_hypervisor() {
        let halting = idle_cpus(Some("haltpoll"), Some("haltpoll"), Some("0"), true);
        assert_eq!(
            halting,
            "cpuidle driver `haltpoll`, governor `haltpoll`; no halt polling \
             (`guest_halt_poll_ns` 0: an idle CPU halts at once, and waking it goes through \
             the hypervisor); a virtual machine (the `hypervisor` CPU flag)"
        );
        let polling = idle_cpus(Some("haltpoll"), Some("haltpoll"), Some("200000"), true);
        assert!(
            polling.contains("halt polling up to 200000 ns"),
            "{polling}"
        );
        let metal = idle_cpus(Some("intel_idle"), Some("menu"), Some("0"), false);
        assert_eq!(
            metal,
            "cpuidle driver `intel_idle`, governor `menu`; no `hypervisor` CPU flag"
        );
        assert!(idle_cpus(None, None, None, false).starts_with("cpuidle unknown"));
    }

    #[test]
    fn describes_this_machine() {
        let machine = Machine::describe();
        assert!(machine.cpus > 0);
        assert!(now_utc().ends_with("UTC"));
    }
}
