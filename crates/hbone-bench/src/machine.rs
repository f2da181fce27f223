//! What the figures were measured on, and with which command: a benchmark
//! figure means little without the machine, the build and how busy it was.

/// A description of this machine, read from /proc.
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
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
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory,
            kernel: if kernel.is_empty() {
                "unknown".to_owned()
            } else {
                kernel
            },
        }
    }
}

impl Machine {
    /// The CPUs, memory and kernel as Markdown list items, one per line.
    pub fn markdown_items(&self) -> String {
        format!(
            "- CPUs: {} × {}\n- memory: {}\n- kernel: {}\n",
            self.cpus, self.cpu_model, self.memory, self.kernel
        )
    }
}

/// The "Circumstances" section that ends a written report: the machine,
/// the build and the command that produced it.
pub fn circumstances(command: &str) -> String {
    format!(
        "\n## Circumstances\n\n{}- build: {}\n- command:\n\n    {command}\n",
        Machine::describe().markdown_items(),
        build_profile()
    )
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
    fn describes_this_machine() {
        let machine = Machine::describe();
        assert!(machine.cpus > 0);
        assert!(now_utc().ends_with("UTC"));
    }
}
