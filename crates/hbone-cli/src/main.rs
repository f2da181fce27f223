//! The `hbone` command line: parses arguments, builds configuration and
//! calls the library. Each subcommand lives in `cli/`.

mod cli;

/// jemalloc: cheaper aligned allocations (every tokio task and socket
/// registration is cache-line aligned) and less fragmentation across the
/// runtime's threads than the system allocator; measured with hbone bench.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // A config file's fields join the command line first (flags win).
    let (argv, file) = match cli::merge::expand(std::env::args_os().collect()) {
        Ok(expanded) => expanded,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let matches = cli::Cli::command().get_matches_from(argv);
    let args = match cli::Cli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    // Counted before the sandbox, which hides the cgroup files that say
    // how many CPUs a container may use.
    let threads = args.threads().or_else(default_threads);
    // Before any thread starts, so that every thread is in it.
    let sandbox = cli::sandbox::enter(&args, file.as_ref());
    let (log_writer, logging) = cli::init_logging(&args);
    sandbox.report();
    cli::raise_fd_limit();
    let per_core = matches!(args.runtime(), cli::RuntimeKind::PerCore);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if per_core {
        // Only the control plane runs here; the data plane has the workers.
        builder.worker_threads(1);
    } else if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    sandbox.probe(&runtime);
    // Started after the sandbox, so that their threads are in it too.
    let workers = match args.runtime() {
        cli::RuntimeKind::WorkStealing => None,
        cli::RuntimeKind::PerCore => {
            let count = threads.unwrap_or_else(tokio_default_threads);
            match hbone::Workers::start(count) {
                Ok(workers) => Some(workers),
                Err(e) => {
                    eprintln!("error: cannot start the per-core workers: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let result = runtime.block_on(cli::run(
        args,
        &matches,
        file.as_ref(),
        logging,
        workers.clone(),
    ));
    // Stop every task first (their last records go to the log buffer), then
    // let the log writer write it all out and finish, so that a fatal error
    // is the last thing printed.
    drop(runtime);
    if let Some(workers) = workers {
        workers.shutdown();
    }
    drop(log_writer);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The runtime's worker threads when `--threads` is not given: what tokio
/// would choose (`TOKIO_WORKER_THREADS`, else the CPUs this process may
/// use), or `None` to leave it to tokio.
fn default_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    std::thread::available_parallelism().ok().map(usize::from)
}

/// The threads tokio starts when not told: TOKIO_WORKER_THREADS, else one
/// per CPU.
fn tokio_default_threads() -> usize {
    let from_env = std::env::var("TOKIO_WORKER_THREADS").ok();
    from_env
        .and_then(|threads| threads.parse().ok())
        .filter(|&threads| threads > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

/// The error and its causes on one line, each cause once: library errors
/// often repeat their cause in their own message.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether an error is about certificate, key or bundle files (which the
/// development CA can make), rather than a policy, routes or config file.
fn names_identity_file(text: &str) -> bool {
    [
        "cert.pem",
        "key.pem",
        "bundle.pem",
        "cert-chain.pem",
        "root-cert.pem",
        "ca-cert.pem",
        "ca-key.pem",
    ]
    .iter()
    .any(|name| text.contains(name))
}

/// What to try next, for the startup errors operators meet most.
fn hint(error: &anyhow::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    let io = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<std::io::Error>())?;
    let text = format!("{error:#}");
    Some(match io.kind() {
        ErrorKind::AddrInUse => {
            "another socket holds that address: a process listening on it, or, for a port in the \
             kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), a connection that \
             took it as its local port, even one still closing (`ss -tanp` shows both); stop that \
             process, or choose another port (--listen, --admin)"
        }
        ErrorKind::AddrNotAvailable => {
            "that IP is not an address of this machine; use one it has, or 0.0.0.0 / [::] for all"
        }
        ErrorKind::PermissionDenied if text.contains("listen") => {
            "ports below 1024 need CAP_NET_BIND_SERVICE; HBONE's usual port is 15008"
        }
        ErrorKind::NotFound | ErrorKind::PermissionDenied if names_identity_file(&text) => {
            "check the path; `hbone ca init` and `hbone ca issue` create development certificates"
        }
        ErrorKind::NotFound | ErrorKind::PermissionDenied => {
            "check the path, and that this user may read it"
        }
        _ => return None,
    })
}
