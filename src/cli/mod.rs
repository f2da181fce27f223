//! Argument definitions and the glue from arguments to the library.

mod bench;
mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hbone::access::TracingLog;
use hbone::ca::DevCa;
use hbone::config::Timeouts;
use hbone::entry::{self, Upstream};
use hbone::policy::{IdPattern, Policy, TargetRule};
use hbone::{Dialer, DialerConfig, Identity, Server, ServerConfig, SpiffeId};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "hbone",
    version,
    about = "HBONE tunnels: TCP over HTTP/2 CONNECT inside mutual TLS with SPIFFE identities",
    after_help = "Start with `hbone demo`, then see `hbone ca --help` and `hbone server --help`."
)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug`, `hbone=trace` (env RUST_LOG also works).
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,

    /// Worker threads for the async runtime (default: one per CPU).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,

    #[command(subcommand)]
    command: Command,
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
    Server(ServerArgs),
    /// Forward a local TCP port through an HBONE tunnel to a fixed target.
    #[command(after_help = "Example:
  hbone forward --identity-dir certs/client --listen 127.0.0.1:8080 \\
      --server 10.0.0.2:15008 --server-id spiffe://cluster.local/ns/demo/sa/server \\
      --target 127.0.0.1:80")]
    Forward(ForwardArgs),
    /// Open one tunnel between stdin/stdout and a target (ssh ProxyCommand).
    #[command(after_help = "Example:
  ssh -o ProxyCommand='hbone connect --identity-dir ~/.hbone --server 10.0.0.2:15008 \\
      --server-id spiffe://cluster.local/ns/ops/sa/bastion --target 127.0.0.1:22' host")]
    Connect(ConnectArgs),
    /// A SOCKS5 entry: each CONNECT request becomes an HBONE tunnel.
    #[command(after_help = "Example:
  hbone socks5 --identity-dir certs/client --listen 127.0.0.1:1080 \\
      --server 10.0.0.2:15008 --server-id spiffe://cluster.local/ns/demo/sa/server
  curl --socks5 127.0.0.1:1080 http://127.0.0.1:8080/

Without --server each tunnel goes to port 15008 of the requested address, as in Istio ambient.
Only IP addresses are accepted (no domain names).")]
    Socks5(Socks5Args),
    /// Self-contained demonstration on loopback: CA, server, forward, 64 MiB echoed.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency, connection rate and memory, direct and tunnelled.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum CaCommand {
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
        #[arg(long, default_value_t = 3650)]
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
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
}

/// Where this process's certificate, key and trust bundle come from.
#[derive(Args, Clone)]
struct IdentityArgs {
    /// Directory holding cert.pem, key.pem and bundle.pem (or Istio's
    /// cert-chain.pem, key.pem and root-cert.pem).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cert", "key", "trust_bundle"])]
    identity_dir: Option<PathBuf>,
    /// Certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires_all = ["key", "trust_bundle"])]
    cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, value_name = "FILE", requires_all = ["cert", "trust_bundle"])]
    key: Option<PathBuf>,
    /// CA certificates that peers must chain to (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["cert", "key"])]
    trust_bundle: Option<PathBuf>,
}

impl IdentityArgs {
    fn load(&self) -> anyhow::Result<Identity> {
        let identity = match (
            &self.identity_dir,
            &self.cert,
            &self.key,
            &self.trust_bundle,
        ) {
            (Some(dir), _, _, _) => Identity::from_dir(dir)?,
            (None, Some(cert), Some(key), Some(bundle)) => Identity::from_files(cert, key, bundle)?,
            _ => bail!(
                "an identity is required: pass --identity-dir DIR, or --cert, --key and --trust-bundle"
            ),
        };
        tracing::info!(id = %identity.id(), "identity loaded");
        Ok(identity)
    }
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    identity: IdentityArgs,
    /// Address to listen on.
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    /// Targets tunnels may reach: CIDR[:PORT|:PORT-PORT], repeatable. Replaces the
    /// loopback-only default.
    #[arg(long = "allow-target", value_name = "RULE")]
    allow_targets: Vec<TargetRule>,
    /// Peers that may open tunnels: exact SPIFFE ID, spiffe://TD/* or
    /// spiffe://TD/ns/NS/*, repeatable. Default: any peer of our trust domain.
    #[arg(long = "allow-id", value_name = "PATTERN")]
    allow_ids: Vec<IdPattern>,
    /// Timeout for dialing a target.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Timeout for the TLS and HTTP/2 handshakes of an incoming connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
}

/// Flags shared by the commands that open tunnels.
#[derive(Args)]
struct DialArgs {
    #[command(flatten)]
    identity: IdentityArgs,
    /// SPIFFE ID the server must present; repeat to accept any of several.
    #[arg(long = "server-id", value_name = "SPIFFE_ID", required = true)]
    server_ids: Vec<SpiffeId>,
    /// Timeout for TCP connect to the server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Timeout for the TLS and HTTP/2 handshakes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Open a fresh TLS + HTTP/2 connection for every tunnel instead of
    /// sharing connections (costs a handshake per tunnel; for measurement).
    #[arg(long)]
    no_pool: bool,
}

impl DialArgs {
    fn dialer(&self) -> anyhow::Result<Dialer> {
        let identity = self.identity.load()?;
        let config = DialerConfig {
            timeouts: Timeouts {
                connect: self.connect_timeout,
                handshake: self.handshake_timeout,
                ..Timeouts::default()
            },
            pooling: !self.no_pool,
            ..DialerConfig::default()
        };
        Ok(Dialer::with_config(&identity, config)?)
    }
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    dial: DialArgs,
    /// Local address to accept application connections on.
    #[arg(long)]
    listen: SocketAddr,
    /// HBONE server address.
    #[arg(long)]
    server: SocketAddr,
    /// Target (ip:port) the server connects each tunnel to.
    #[arg(long)]
    target: SocketAddr,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    dial: DialArgs,
    /// HBONE server address.
    #[arg(long)]
    server: SocketAddr,
    /// Target (ip:port) the server connects the tunnel to.
    #[arg(long)]
    target: SocketAddr,
}

#[derive(Args)]
struct Socks5Args {
    #[command(flatten)]
    dial: DialArgs,
    /// Local address for SOCKS5 clients.
    #[arg(long)]
    listen: SocketAddr,
    /// HBONE server for every tunnel; default: port 15008 of each target.
    #[arg(long)]
    server: Option<SocketAddr>,
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number means seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if duration.is_zero() {
        return Err("a timeout of zero would fail everything; give a positive duration".into());
    }
    Ok(duration)
}

/// Logs go to stderr, so `hbone connect` keeps stdout for the tunnel.
pub fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = match cli.command {
        Command::Connect(_) => "warn",
        Command::Demo(_) | Command::Bench(_) => "warn",
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

impl Cli {
    /// Worker threads requested on the command line, if any.
    pub fn threads(&self) -> Option<usize> {
        self.threads.map(usize::from)
    }
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

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca(command) => run_ca(command),
        Command::Server(args) => run_server(args).await,
        Command::Forward(args) => run_forward(args).await,
        Command::Connect(args) => run_connect(args).await,
        Command::Socks5(args) => run_socks5(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init {
            out,
            trust_domain,
            days: d,
        } => {
            SpiffeId::parse(&format!("spiffe://{trust_domain}"))
                .with_context(|| format!("invalid trust domain {trust_domain:?}"))?;
            let ca = DevCa::generate(&trust_domain, days(d))?;
            ca.save(&out)?;
            println!(
                "CA for trust domain {trust_domain} written to {}",
                out.display()
            );
        }
        CaCommand::Issue {
            ca,
            id,
            out,
            days: d,
        } => {
            let ca = DevCa::load(&ca)?;
            ca.issue(&id, days(d))?.save(&out)?;
            println!(
                "{id} issued to {} (cert.pem, key.pem, bundle.pem)",
                out.display()
            );
        }
    }
    Ok(())
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let identity = args.identity.load()?;
    let mut config = ServerConfig::new(args.listen, identity);
    config.policy = Policy::new(args.allow_ids, args.allow_targets);
    config.timeouts = Timeouts {
        connect: args.connect_timeout,
        handshake: args.handshake_timeout,
        ..Timeouts::default()
    };
    let targets: Vec<String> = config
        .policy
        .targets()
        .iter()
        .map(ToString::to_string)
        .collect();
    let server = Server::bind(config).await?;
    tracing::info!(
        listen = %server.local_addr(), id = %server.local_id(),
        targets = %targets.join(","), "HBONE server ready"
    );
    tokio::select! {
        () = server.run() => Ok(()),
        result = tokio::signal::ctrl_c() => {
            result.context("cannot listen for Ctrl-C")?;
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

async fn run_forward(args: ForwardArgs) -> anyhow::Result<()> {
    let dialer = args.dial.dialer()?;
    let listener = bind(args.listen).await?;
    let upstream = Upstream {
        server: args.server,
        server_ids: args.dial.server_ids,
    };
    tracing::info!(listen = %listener.local_addr()?, server = %args.server, target = %args.target, "forward ready");
    tokio::select! {
        () = entry::forward::run(listener, dialer, upstream, args.target, Arc::new(TracingLog)) => Ok(()),
        result = tokio::signal::ctrl_c() => Ok(result?),
    }
}

async fn run_connect(args: ConnectArgs) -> anyhow::Result<()> {
    let dialer = args.dial.dialer()?;
    let upstream = Upstream {
        server: args.server,
        server_ids: args.dial.server_ids,
    };
    entry::stdio::run(&dialer, &upstream, args.target).await?;
    Ok(())
}

async fn run_socks5(args: Socks5Args) -> anyhow::Result<()> {
    let dialer = args.dial.dialer()?;
    let listener = bind(args.listen).await?;
    let config = entry::socks5::SocksConfig {
        server: args.server,
        server_ids: args.dial.server_ids,
    };
    tracing::info!(listen = %listener.local_addr()?, "SOCKS5 entry ready");
    tokio::select! {
        () = entry::socks5::run(listener, dialer, config, Arc::new(TracingLog)) => Ok(()),
        result = tokio::signal::ctrl_c() => Ok(result?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
