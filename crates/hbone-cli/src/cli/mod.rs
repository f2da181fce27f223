//! Argument definitions and the glue from arguments to the library.

mod access_line;
mod args;
mod commands;
pub(crate) mod config_file;
mod demo;
mod entry_access;
mod federation;
mod identity_out;
mod logwriter;
pub mod merge;
mod node;
mod ops;
mod revocation;
mod run;
pub mod sandbox;
mod systemd;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use args::{ConnectArgs, ForwardArgs, GatewayArgs, ServerArgs, Socks5Args};
use clap::{Args, Parser, Subcommand};
use hbone::SpiffeId;
use hbone::admin::LogControl;

#[derive(Parser)]
#[command(
    name = "hbone",
    version,
    about = "HBONE tunnels: TCP over HTTP/2 CONNECT inside mutual TLS with SPIFFE identities",
    after_help = "Start with `hbone demo`, then see `hbone ca --help` and `hbone server --help`."
)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug`, `hbone=trace` (env RUST_LOG also works).
    #[arg(long, global = true, value_name = "FILTER", help_heading = GLOBAL_OPTIONS)]
    log: Option<String>,

    /// Log lines as human-readable text, or as one JSON object per line
    /// (access records included) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, help_heading = GLOBAL_OPTIONS)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// The `--help` heading of the flags about the whole process (logs,
/// threads, the admin endpoint), listed after a subcommand's own flags.
pub(crate) const GLOBAL_OPTIONS: &str = "Global options";

/// `--threads` and `--runtime`, for the commands that run tunnels.
#[derive(Args, Clone, Copy, Default)]
pub(super) struct RuntimeArgs {
    /// Worker threads for the async runtime (default: one per CPU;
    /// processes that share a machine do better splitting its CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), help_heading = GLOBAL_OPTIONS)]
    threads: Option<u16>,
    /// How the worker threads share the work: `work-stealing`, one
    /// runtime whose threads take tasks from each other, or `per-core`,
    /// where each connection a server, gateway or entry accepts stays, with
    /// its tunnels and the pooled connections they ride, on one
    /// single-threaded worker pinned to a CPU, which accepts the
    /// connections arriving on that CPU (no cross-thread wake-ups; the
    /// control plane keeps a runtime of one thread). Past a few CPUs,
    /// per-core kept scaling where work-stealing levelled off (README,
    /// Performance).
    #[arg(long, value_enum, value_name = "KIND", default_value_t = RuntimeKind::WorkStealing, help_heading = GLOBAL_OPTIONS)]
    runtime: RuntimeKind,
}

/// How tunnels are scheduled over the worker threads.
#[derive(Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    // Plain comments: a doc line per value would make clap lay the whole
    // --help out in its long form.
    #[default]
    WorkStealing,
    PerCore,
}

/// `--threads` and `--admin`, for the commands that serve until stopped.
#[derive(Args, Clone, Copy, Default)]
pub(super) struct ServiceArgs {
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Admin endpoint address (/metrics, /healthz, /readyz, /config,
    /// /tunnels, /logging), or `off`. Default: off, except for `hbone run`
    /// (127.0.0.1:15000). It has no authentication: keep it on loopback or
    /// a pod-internal port.
    #[arg(long, value_name = "ADDR|off", value_parser = ops::parse_admin, help_heading = GLOBAL_OPTIONS)]
    admin: Option<ops::AdminSetting>,
    /// Run without the sandbox. By default (on Linux) the process sets
    /// no_new_privs and, with Landlock, may only read the directories of
    /// the files it was given (identity, policy, CRLs...) and the system's
    /// name-resolution files, and write only in --identity-out.
    #[arg(long, help_heading = GLOBAL_OPTIONS)]
    no_sandbox: bool,
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Development CA: create one and issue SPIFFE certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Terminate HBONE tunnels and connect them to their targets.
    #[command(after_help = "Examples:
  hbone server --identity-dir certs/server
  hbone server --identity-dir certs/server --listen 0.0.0.0:15008 \\
      --allow-target 10.0.0.0/8:80-443 --allow-id 'spiffe://cluster.local/ns/web/*'

Without --allow-target only loopback targets are reachable. Statuses: 405 not CONNECT,
400 bad request or authority, 403 denied by policy, 503 target unreachable, 504 dial timeout.")]
    Server {
        #[command(flatten)]
        args: ServerArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Forward a local TCP port through an HBONE tunnel to a fixed target.
    #[command(after_help = "Example:
  hbone forward --identity-dir certs/client --listen 127.0.0.1:8080 \\
      --server 10.0.0.2:15008 --server-id spiffe://cluster.local/ns/demo/sa/server \\
      --target 127.0.0.1:80")]
    Forward {
        #[command(flatten)]
        args: ForwardArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Open one tunnel between stdin/stdout and a target (ssh ProxyCommand).
    #[command(after_help = "Example:
  ssh -o ProxyCommand='hbone connect --identity-dir ~/.hbone --server 10.0.0.2:15008 \\
      --server-id spiffe://cluster.local/ns/ops/sa/bastion --target 127.0.0.1:22' host")]
    Connect {
        #[command(flatten)]
        args: ConnectArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// A SOCKS5 entry: each CONNECT request becomes an HBONE tunnel.
    #[command(after_help = "Example:
  hbone socks5 --identity-dir certs/client --listen 127.0.0.1:1080 \\
      --server 10.0.0.2:15008 --server-id spiffe://cluster.local/ns/demo/sa/server
  curl --socks5 127.0.0.1:1080 http://127.0.0.1:8080/

Without --server each tunnel goes to port 15008 of the requested address, as in Istio ambient.
Domain names (curl --socks5-hostname) are resolved by the entry.

For other machines, say who may use it (it refuses to listen off loopback otherwise):
  hbone socks5 ... --listen 0.0.0.0:1080 --allow-source 10.1.0.0/16
  hbone socks5 ... --listen 0.0.0.0:1080 --socks5-credentials /etc/hbone/socks5-users
  curl --socks5 alice:s3cret@10.1.0.5:1080 http://127.0.0.1:8080/")]
    Socks5 {
        #[command(flatten)]
        args: Socks5Args,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Put this host in the mesh: capture its outbound TCP to mesh
    /// destinations (nftables or iptables rules) and tunnel it over HBONE.
    #[command(after_help = "Example:
  hbone node --identity-dir /etc/hbone/identity \\
      --mesh 10.0.2.0/24 --peer 10.0.2.0/24=spiffe://cluster.local/ns/db/sa/db

Connections from this host to 10.0.2.0/24 go to port 15008 of the address dialled, as HBONE
tunnels whose server must prove the peer's ID. Installs table inet hbone at start (or, with
--firewall iptables, chains HBONE-OUTPUT and HBONE-INPUT) and removes them on exit; --print-rules
shows them. Needs CAP_NET_ADMIN (rules and socket mark).")]
    Node {
        #[command(flatten)]
        args: node::NodeArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Check a policy file, or ask it who may reach what.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Double-HBONE gateway: relay outer tunnels to services' HBONE endpoints.
    #[command(after_help = "Example:
  hbone gateway --identity-dir certs/gateway --listen 0.0.0.0:15008 --routes routes.toml

routes.toml:
  [[route]]
  host = \"echo.demo.svc.cluster.local\"
  port = 8080                      # optional: only this service port
  endpoints = [\"10.0.0.7\", \"10.0.0.8:15008\"]   # HBONE port defaults to 15008

A host may be an IP address (IPv6 in brackets), the service a node's --remote capture asks for.
Clients reach it with --gateway ADDR --gateway-id ID --service HOST:PORT; the gateway relays the
inner TLS connection to an endpoint and never sees the tunnelled bytes. Unknown services get 503.")]
    Gateway {
        #[command(flatten)]
        args: GatewayArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Self-contained demonstration on loopback: CA, server, forward, 64 MiB echoed.
    Demo {
        #[command(flatten)]
        args: demo::DemoArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Measure throughput, latency, connection rate and memory, direct and tunnelled.
    Bench {
        #[command(flatten)]
        args: hbone_bench::BenchArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Run every server, gateway and entry a config file declares.
    #[command(after_help = "Example:
  hbone config example > hbone.toml   # then edit it
  hbone config check hbone.toml
  hbone run --config hbone.toml --log-format json

Global options given here (--log, --log-format, --threads, --admin) override the file's top-level
fields. The admin endpoint defaults to 127.0.0.1:15000 (`admin = \"off\"` disables it).
SIGTERM drains every listener together; SIGHUP reloads policy and identity files.
See docs/config.md for every field.")]
    Run {
        #[command(flatten)]
        args: run::RunArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Configuration file: check one, or print a commented example.
    #[command(subcommand)]
    Config(config_file::ConfigCommand),
    /// Print a shell completion script for bash, zsh, fish, elvish or
    /// PowerShell.
    #[command(after_help = "Example:
  hbone completions bash > /etc/bash_completion.d/hbone")]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), every subcommand included.
    #[command(after_help = "Example:
  hbone man > hbone.1 && man ./hbone.1")]
    Man,
}

#[derive(Subcommand)]
pub(super) enum PolicyCommand {
    /// Validate a policy file; errors name the line.
    #[command(after_help = "Example:\n  hbone policy check policy.toml")]
    Check { file: PathBuf },
    /// Say which rule decides a tunnel (exit status 1 when denied).
    #[command(after_help = "Example:
  hbone policy test policy.toml --id spiffe://cluster.local/ns/web/sa/app --source 10.0.0.5 --target 10.1.2.3:5432")]
    Test {
        file: PathBuf,
        /// The peer's SPIFFE ID.
        #[arg(long)]
        id: SpiffeId,
        /// The target, ip:port (for a service, the address it leads to).
        #[arg(long)]
        target: std::net::SocketAddr,
        /// The service the CONNECT named, HOST:PORT, when it named one:
        /// rules naming services match it.
        #[arg(long, value_name = "HOST:PORT", value_parser = parse_service_name)]
        service: Option<hbone::authority::ServiceName>,
        /// The peer's TCP source address. Required when a rule names source
        /// networks; otherwise 127.0.0.1 is assumed (and said).
        #[arg(long)]
        source: Option<std::net::IpAddr>,
    },
}

/// `--server`/`--target`: an address or a host name, with a message that
/// says what is expected.
pub(super) fn parse_host_port(text: &str) -> Result<hbone::authority::Target, String> {
    hbone::authority::parse_target(text).map_err(|_| {
        format!("{text:?}: expected HOST:PORT, e.g. 127.0.0.1:8080, db.internal:5432 or [::1]:8080")
    })
}

/// `--listen` and other addresses that must be literal.
pub(super) fn parse_ip_port(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?}: expected IP:PORT, e.g. 127.0.0.1:8080 or [::]:15008"))
}

fn parse_service_name(text: &str) -> Result<hbone::authority::ServiceName, String> {
    match hbone::authority::parse_target(text) {
        Ok(hbone::authority::Target::Service(name)) => Ok(name),
        _ => Err("expected HOST:PORT, e.g. echo.default.svc.cluster.local:8081".into()),
    }
}

#[derive(Subcommand)]
pub(super) enum CaCommand {
    /// Create a CA (ca-cert.pem, ca-key.pem) in a directory.
    #[command(after_help = "Example:\n  hbone ca init --out ca --trust-domain cluster.local")]
    Init {
        /// Directory to write the CA into.
        #[arg(long)]
        out: PathBuf,
        /// Trust domain the CA issues identities for.
        #[arg(long, default_value = hbone::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Issue a certificate (cert.pem, key.pem, bundle.pem) for a SPIFFE ID.
    #[command(after_help = "Example:
  hbone ca issue --ca ca --id spiffe://cluster.local/ns/demo/sa/server --out certs/server")]
    Issue {
        /// Directory of a CA made by `hbone ca init`.
        #[arg(long)]
        ca: PathBuf,
        /// The SPIFFE ID, e.g. spiffe://cluster.local/ns/NS/sa/SA.
        #[arg(long)]
        id: SpiffeId,
        /// Directory to write cert.pem, key.pem and bundle.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (at least 1: a certificate valid for 0 days
        /// is expired when written).
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Revoke a certificate the CA issued, and write a CRL of every
    /// certificate it revoked so far, signed by the CA.
    #[command(
        after_help = "The revoked serials are kept in revoked.txt in the CA directory, so each
run adds to the list and numbers the CRL one higher. Running it again
(with any certificate already revoked) renews the CRL before its next
update. Give the CRL to servers, gateways and entries with --crl (crl in
a config file); they reload it when the file changes.

Example:
  hbone ca revoke --ca ca --cert certs/client/cert.pem --crl-out certs/crl.pem"
    )]
    Revoke {
        /// Directory of a CA made by `hbone ca init`.
        #[arg(long, visible_alias = "ca-dir")]
        ca: PathBuf,
        /// The certificate to revoke (PEM, its first certificate, or DER).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Where to write the CRL (PEM); default crl.pem in the CA
        /// directory.
        #[arg(long, value_name = "FILE")]
        crl_out: Option<PathBuf>,
        /// Days until the CRL's next update, after which peers warn (or,
        /// fail-closed, refuse): revoke again before then to renew it.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
}

/// Logs go to stderr, so `hbone connect` keeps stdout for the tunnel.
///
/// A background thread does the writing (see [`logwriter`]), so a slow
/// stderr never stalls tunnels. Keep the returned guard alive: dropping it
/// flushes what is buffered.
pub fn init_logging(cli: &Cli) -> (logwriter::FlushGuard, Arc<dyn LogControl>) {
    use tracing_subscriber::EnvFilter;
    let default = match cli.command {
        Command::Connect { .. } => "warn",
        Command::Demo { .. } | Command::Bench { .. } => "warn",
        _ => "info",
    };
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("warning: bad log filter {filter:?} ({e}); using {default:?}");
        EnvFilter::new(default)
    });
    let (writer, guard) = logwriter::batch_writer(std::io::stderr());
    logwriter::register_process_log(&writer);
    let access_writer = writer.clone();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let control: Arc<dyn LogControl> = match cli.log_format {
        LogFormat::Text => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            if !terminal {
                access_line::install(access_writer, false);
            }
            let logs = logs.with_ansi(terminal).with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            Arc::new(ReloadableFilter(handle))
        }
        LogFormat::Json => {
            access_line::install(access_writer, true);
            let logs = logs.json().flatten_event(true).with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            Arc::new(ReloadableFilter(handle))
        }
    };
    (guard, control)
}

/// The log filter, changed at run time through `POST /logging`.
struct ReloadableFilter<S>(tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>);

impl<S: 'static> LogControl for ReloadableFilter<S> {
    fn current(&self) -> String {
        self.0
            .with_current(|filter| filter.to_string())
            .unwrap_or_default()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

impl Cli {
    /// Worker threads requested on the command line, if any.
    pub fn threads(&self) -> Option<usize> {
        self.command.runtime().threads.map(usize::from)
    }

    /// `--runtime`.
    pub fn runtime(&self) -> RuntimeKind {
        self.command.runtime().runtime
    }
}

impl Command {
    /// `--threads`, `--admin` and `--no-sandbox`, for the commands that
    /// serve until stopped.
    fn service(&self) -> Option<&ServiceArgs> {
        match self {
            Command::Server { service, .. }
            | Command::Forward { service, .. }
            | Command::Socks5 { service, .. }
            | Command::Gateway { service, .. }
            | Command::Run { service, .. } => Some(service),
            _ => None,
        }
    }

    /// `--threads`, for the commands that take it.
    fn runtime(&self) -> RuntimeArgs {
        match self {
            Command::Server { service, .. }
            | Command::Forward { service, .. }
            | Command::Socks5 { service, .. }
            | Command::Gateway { service, .. }
            | Command::Node { service, .. }
            | Command::Run { service, .. } => service.runtime,
            Command::Connect { runtime, .. }
            | Command::Demo { runtime, .. }
            | Command::Bench { runtime, .. } => *runtime,
            Command::Ca(_)
            | Command::Policy(_)
            | Command::Config(_)
            | Command::Completions { .. }
            | Command::Man => RuntimeArgs::default(),
        }
    }
}

/// `/config`'s top level: the flags about the whole process, the root's
/// and the subcommand's.
fn global_config(matches: &clap::ArgMatches) -> serde_json::Value {
    use clap::CommandFactory;
    let root = Cli::command();
    let mut config = ops::effective_config(matches, &root, ops::Fields::Global);
    if let (Some((name, sub_matches)), serde_json::Value::Object(object)) =
        (matches.subcommand(), &mut config)
        && let Some(sub) = root.find_subcommand(name)
        && let serde_json::Value::Object(process) =
            ops::effective_config(sub_matches, sub, ops::Fields::Global)
    {
        object.extend(process);
    }
    config
}

/// Raises the soft limit on open files to the hard limit. Every tunnel
/// holds two sockets on each end, so the common default soft limit of 1024
/// would cap a proxy at a few hundred tunnels.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!("could not raise the open-file limit");
            }
        }
    }
}

/// Runs the parsed command. `matches` is what clap parsed, for `/config`.
pub async fn run(
    cli: Cli,
    matches: &clap::ArgMatches,
    file: Option<&config_file::ConfigFile>,
    logging: Arc<dyn LogControl>,
    workers: Option<hbone::Workers>,
) -> anyhow::Result<()> {
    if let (Command::Run { service, .. }, Some(file)) = (&cli.command, file) {
        // The raw arguments: the file's own `log` was merged into `matches`.
        let log_flag_given =
            std::env::args().any(|arg| arg == "--log" || arg.starts_with("--log="));
        let global = global_config(matches);
        return run::run(
            file,
            service.admin,
            log_flag_given,
            global,
            logging,
            workers,
        )
        .await;
    }
    let start_ops = |service: ServiceArgs, logging| async move {
        use clap::CommandFactory;
        let root = Cli::command();
        let mut config = global_config(matches);
        if let (Some((name, sub_matches)), serde_json::Value::Object(object)) =
            (matches.subcommand(), &mut config)
            && let Some(sub) = root.find_subcommand(name)
        {
            object.insert(
                name.to_owned(),
                ops::effective_config(sub_matches, sub, ops::Fields::Own),
            );
        }
        let admin = service.admin.unwrap_or(ops::AdminSetting::Off);
        let ops = ops::Ops::start(admin, 1, config, logging).await?;
        anyhow::Ok(ops.with_workers(workers))
    };
    match cli.command {
        Command::Ca(command) => commands::run_ca(command),
        Command::Server { args, service } => {
            commands::run_server(args, &start_ops(service, logging).await?).await
        }
        Command::Forward { args, service } => {
            commands::run_forward(args, &start_ops(service, logging).await?).await
        }
        Command::Connect { args, .. } => commands::run_connect(args).await,
        Command::Socks5 { args, service } => {
            commands::run_socks5(args, &start_ops(service, logging).await?).await
        }
        Command::Gateway { args, service } => {
            commands::run_gateway(args, &start_ops(service, logging).await?).await
        }
        Command::Node { args, .. } if args.print_rules => node::print_rules(&args),
        Command::Node { args, service } => {
            node::run_node(args, &start_ops(service, logging).await?).await
        }
        Command::Policy(command) => commands::run_policy(command),
        Command::Demo { args, .. } => demo::run(args).await,
        Command::Bench { args, .. } => hbone_bench::run(args, logwriter::flush_before_exit).await,
        Command::Config(command) => config_file::run(command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hbone", &mut script);
            print_all(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            write_man_page(&mut page)?;
            print_all(&page)
        }
        Command::Run { args, .. } => anyhow::bail!("{}: not loaded", args.config.display()),
    }
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is
/// not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The manual page: the top-level page, then a section per subcommand
/// (and per nested subcommand), all from the clap definition.
fn write_man_page(out: &mut impl std::io::Write) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let root = Cli::command();
    clap_mangen::Man::new(root.clone()).render(out)?;
    fn sections(
        command: &clap::Command,
        path: &str,
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<()> {
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{path} {}", sub.get_name());
            writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
            clap_mangen::Man::new(sub.clone()).render_description_section(out)?;
            clap_mangen::Man::new(sub.clone()).render_options_section(out)?;
            sections(sub, &name, out)?;
        }
        Ok(())
    }
    sections(&root, "hbone", out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
