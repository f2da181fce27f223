//! Flags shared by several subcommands, and how they become library
//! configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use hbone::authority::Target;
use hbone::config::parse_duration;
use hbone::config::{H2Settings, Timeouts};
use hbone::entry::Destination;
use hbone::headers::{self, Baggage};
use hbone::identity;
use hbone::istio_ca::{IstioCa, IstioCaConfig};
use hbone::keepalive::Keepalive;
use hbone::policy::{IdPattern, TargetRule};
use hbone::server::Limits;
use hbone::workload_api::WorkloadApi;
use hbone::{Dialer, DialerConfig, Identity, Route, ServerConfig, SpiffeId};

use super::entry_access::EntryAccessArgs;
use super::federation::{self, FederatedBundleArg};
use super::revocation::RevocationArgs;

/// Where this process's certificate, key and trust bundle come from.
#[derive(Args, Clone)]
pub(super) struct IdentityArgs {
    /// Directory holding cert.pem, key.pem and bundle.pem (or Istio's
    /// cert-chain.pem, key.pem and root-cert.pem).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cert", "key", "trust_bundle"])]
    pub(super) identity_dir: Option<PathBuf>,
    /// Certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires_all = ["key", "trust_bundle"])]
    pub(super) cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, value_name = "FILE", requires_all = ["cert", "trust_bundle"])]
    pub(super) key: Option<PathBuf>,
    /// CA certificates that peers must chain to (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["cert", "key"])]
    pub(super) trust_bundle: Option<PathBuf>,
    /// Get the certificate from Istio's CA at HOST:PORT (istiod serves it
    /// on 15012) instead of files: a key made in this process, renewed at
    /// about half of each certificate's lifetime.
    #[arg(
        long,
        value_name = "HOST:PORT",
        conflicts_with_all = ["identity_dir", "cert", "key", "trust_bundle"],
        requires_all = ["istio_ca_root", "token_file", "id"]
    )]
    pub(super) istio_ca: Option<String>,
    /// The root certificate the Istio CA's own TLS certificate must chain
    /// to (Istio's root-cert.pem).
    #[arg(long, value_name = "FILE", requires = "istio_ca")]
    pub(super) istio_ca_root: Option<PathBuf>,
    /// The name the Istio CA's TLS certificate must carry, when it differs
    /// from the host dialled (e.g. istiod.istio-system.svc when dialling
    /// an IP address).
    #[arg(long, value_name = "NAME", requires = "istio_ca")]
    pub(super) istio_ca_name: Option<String>,
    /// Also trust peers that chain to the --istio-ca-root file's
    /// certificates, besides the root the CA answers with: during a mesh
    /// root rotation Istio's root-cert.pem holds the old and the new root.
    /// Re-read at every renewal.
    #[arg(long, requires = "istio_ca")]
    pub(super) trust_istio_ca_root: bool,
    /// File holding the bearer token for the Istio CA (a service-account
    /// token with audience istio-ca), read at every request.
    #[arg(long, value_name = "FILE", requires = "istio_ca")]
    pub(super) token_file: Option<PathBuf>,
    /// Cluster the token comes from, sent to the Istio CA as ClusterID.
    #[arg(long, value_name = "NAME", requires = "istio_ca")]
    pub(super) cluster_id: Option<String>,
    /// The SPIFFE ID to ask the Istio CA for (spiffe://TD/ns/NS/sa/SA).
    #[arg(long, value_name = "SPIFFE-ID", requires = "istio_ca")]
    pub(super) id: Option<SpiffeId>,
    /// Certificate lifetime to ask the Istio CA for (it may shorten it).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub(super) cert_lifetime: Duration,
    /// Take the identity from the SPIFFE Workload API at this endpoint
    /// (e.g. unix:///run/spire/agent.sock, as SPIFFE_ENDPOINT_SOCKET holds
    /// it) instead of files: the agent's default SVID and its trust
    /// domain's bundle, rotated live on every update the agent streams.
    /// Without a value (an empty string in a config file), the endpoint
    /// comes from SPIFFE_ENDPOINT_SOCKET.
    #[arg(
        long,
        value_name = "ENDPOINT",
        num_args = 0..=1,
        default_missing_value = "",
        conflicts_with_all = ["identity_dir", "cert", "key", "trust_bundle", "istio_ca"]
    )]
    pub(super) workload_api: Option<String>,
    /// Roots of another trust domain (SPIFFE federation) as TD=FILE (PEM),
    /// repeatable: a peer of that domain must chain to these roots, and a
    /// server admits it only when a policy rule names it. Re-read with the
    /// identity. The Workload API brings its own.
    #[arg(
        long = "federated-bundle",
        value_name = "TD=FILE",
        conflicts_with = "workload_api"
    )]
    pub(super) federated_bundles: Vec<FederatedBundleArg>,
    /// Write the identity in use (cert.pem, key.pem with mode 0600,
    /// bundle.pem) to this directory at start and after every renewal or
    /// update, for other local processes. Only with an identity from the
    /// Istio CA or the Workload API.
    #[arg(long, value_name = "DIR")]
    pub(super) identity_out: Option<PathBuf>,
    /// Start (and reload) with a private key that group or others may
    /// read, with a warning. Without it such a key is refused: anyone who
    /// can read it can be this workload.
    #[arg(long)]
    pub(super) allow_insecure_key_permissions: bool,
}

/// An identity as first obtained, with the live Workload API stream it
/// came from (kept open for the updates that follow).
pub(super) struct Obtained {
    pub(super) identity: Identity,
    pub(super) workload_api: Option<WorkloadApi>,
}

/// How long the first SVID from the Workload API may take at start.
const WORKLOAD_API_FIRST_SYNC: Duration = Duration::from_secs(15);

impl IdentityArgs {
    /// Gets the identity (from the Istio CA when one is set, else from
    /// files), logs it and warns when it nears expiry.
    pub(super) async fn obtain(&self) -> anyhow::Result<Obtained> {
        if self.identity_out.is_some() && self.workload_api.is_none() && self.istio_ca.is_none() {
            bail!(
                "--identity-out writes an identity from the Istio CA or the Workload API; \
                 give --istio-ca or --workload-api, or drop it"
            );
        }
        let obtained = self.obtain_from_source().await?;
        self.write_out(&obtained.identity)?;
        Ok(obtained)
    }

    /// Writes `identity` to the --identity-out directory, if one is set.
    pub(super) fn write_out(&self, identity: &Identity) -> anyhow::Result<()> {
        match &self.identity_out {
            Some(dir) => super::identity_out::write(dir, identity),
            None => Ok(()),
        }
    }

    /// The Workload API endpoint, when the identity comes from one: the
    /// one given, or SPIFFE_ENDPOINT_SOCKET's for `--workload-api` alone.
    pub(super) fn workload_api_endpoint(&self) -> anyhow::Result<Option<String>> {
        match self.workload_api.as_deref() {
            None => Ok(None),
            Some("") => match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
                Ok(endpoint) if !endpoint.is_empty() => Ok(Some(endpoint)),
                _ => bail!(
                    "--workload-api without an endpoint takes it from SPIFFE_ENDPOINT_SOCKET, \
                     which is not set; give it, e.g. --workload-api unix:///run/spire/agent.sock"
                ),
            },
            Some(endpoint) => Ok(Some(endpoint.to_owned())),
        }
    }

    async fn obtain_from_source(&self) -> anyhow::Result<Obtained> {
        if let Some(endpoint) = &self.workload_api_endpoint()? {
            let api = WorkloadApi::connect(endpoint, WORKLOAD_API_FIRST_SYNC).await?;
            let identity = api.identity()?;
            tracing::info!(
                id = %identity.id(), endpoint = %endpoint,
                valid_s = seconds_left(&identity),
                "identity from the SPIFFE Workload API"
            );
            return Ok(Obtained {
                identity,
                workload_api: Some(api),
            });
        }
        let identity = match self.istio_ca() {
            None => self.load()?,
            Some(ca) => {
                let identity = self.with_federation(ca.issue().await?)?;
                tracing::info!(
                    id = %identity.id(), ca = %ca.config().address,
                    valid_s = seconds_left(&identity),
                    "certificate issued by the Istio CA"
                );
                identity
            }
        };
        Ok(Obtained {
            identity,
            workload_api: None,
        })
    }

    /// `identity` with the --federated-bundle roots, read now.
    pub(super) fn with_federation(&self, identity: Identity) -> anyhow::Result<Identity> {
        federation::attach(identity, &self.federated_bundles)
    }

    /// Where the identity comes from, as the access log names it.
    pub(super) fn source_name(&self) -> &'static str {
        if self.workload_api.is_some() {
            "workload-api"
        } else if self.istio_ca.is_some() {
            "istio-ca"
        } else {
            "files"
        }
    }

    /// The access log of a component with this identity: each record
    /// names the identity's source.
    pub(super) fn access_log(&self) -> std::sync::Arc<dyn hbone::access::AccessLog> {
        super::access_line::access_log(self.source_name())
    }

    /// The Istio CA client, when the identity comes from one.
    pub(super) fn istio_ca(&self) -> Option<IstioCa> {
        let (Some(address), Some(root), Some(token), Some(id)) = (
            &self.istio_ca,
            &self.istio_ca_root,
            &self.token_file,
            &self.id,
        ) else {
            return None;
        };
        let mut config = IstioCaConfig::new(address.clone(), root, token, id.clone());
        config.server_name = self.istio_ca_name.clone();
        config.cluster_id = self.cluster_id.clone();
        config.validity = self.cert_lifetime;
        config.trust_root_cert = self.trust_istio_ca_root;
        Some(IstioCa::new(config))
    }

    /// Loads the identity from files, logs it and warns when it nears
    /// expiry. A key that group or others may read is refused, unless
    /// allowed (then warned of).
    pub(super) fn load(&self) -> anyhow::Result<Identity> {
        if let Some(key) = self.key_path() {
            check_key_permissions(&key, self.allow_insecure_key_permissions)?;
        }
        let identity = self.read()?;
        tracing::info!(id = %identity.id(), "identity loaded");
        warn_if_expiring(&identity);
        Ok(identity)
    }

    /// The private key file in use.
    fn key_path(&self) -> Option<PathBuf> {
        match (&self.identity_dir, &self.key) {
            (Some(dir), _) => Some(dir.join(hbone::identity::KEY_FILE)),
            (None, Some(key)) => Some(key.clone()),
            (None, None) => None,
        }
    }

    /// Loads the identity without a word (for the rotation watcher's
    /// starting point: the command has just loaded and logged it).
    pub(super) fn read(&self) -> anyhow::Result<Identity> {
        let identity = match (
            &self.identity_dir,
            &self.cert,
            &self.key,
            &self.trust_bundle,
        ) {
            (Some(dir), _, _, _) => Identity::from_dir(dir)?,
            (None, Some(cert), Some(key), Some(bundle)) => Identity::from_files(cert, key, bundle)?,
            _ => bail!(
                "an identity is required: pass --identity-dir DIR, or --cert, --key and --trust-bundle, or --istio-ca with --istio-ca-root, --token-file and --id, or --workload-api ENDPOINT"
            ),
        };
        self.with_federation(identity)
    }

    /// The files the identity comes from, to watch for rotation.
    pub(super) fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = match (
            &self.identity_dir,
            &self.cert,
            &self.key,
            &self.trust_bundle,
        ) {
            (Some(dir), ..) => [
                identity::CERT_FILE,
                identity::KEY_FILE,
                identity::BUNDLE_FILE,
                identity::ISTIO_CERT_FILE,
                identity::ISTIO_BUNDLE_FILE,
            ]
            .iter()
            .map(|name| dir.join(name))
            .collect(),
            (None, cert, key, bundle) => {
                [cert, key, bundle].into_iter().flatten().cloned().collect()
            }
        };
        files.extend(self.federated_bundles.iter().map(|arg| arg.path.clone()));
        files
    }
}

/// A private key others on the machine can read is as good as theirs:
/// refuse it, with the fix, or (when allowed) warn. A key that cannot be
/// looked at is left to the load, which says why.
pub(crate) fn check_key_permissions(key: &Path, allowed: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(metadata) = std::fs::metadata(key) else {
        return Ok(());
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if !allowed {
        bail!(
            "private key {} is readable by group or others (mode {mode:o}); fix: chmod 600 {}, \
             or start with --allow-insecure-key-permissions",
            key.display(),
            key.display()
        );
    }
    tracing::warn!(
        key = %key.display(), mode = format!("{mode:o}"),
        "private key is readable by group or others; fix: chmod 600 {}",
        key.display()
    );
    Ok(())
}

/// Seconds until `identity` expires (0 once it has), for logs.
pub(super) fn seconds_left(identity: &Identity) -> u64 {
    identity
        .expires_at()
        .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
        .map_or(0, |left| left.as_secs())
}

/// A certificate in the last fifth of its validity gets a warning (and an
/// expired one an error) at every load and hourly, so rotation that stopped
/// is noticed in time. Istio rotates its 24-hour certificates at half
/// their life, so a healthy mesh never sees this.
pub(super) fn warn_if_expiring(identity: &Identity) {
    let Some((issued, expires)) = identity.validity() else {
        return;
    };
    let lifetime = expires.duration_since(issued).unwrap_or_default();
    match expires.duration_since(std::time::SystemTime::now()) {
        Err(_) => {
            tracing::error!(id = %identity.id(), "certificate has EXPIRED; peers will refuse it")
        }
        Ok(left) if left < lifetime / 5 => tracing::warn!(
            id = %identity.id(), minutes_left = left.as_secs() / 60,
            "certificate is in the last fifth of its validity; rotate it"
        ),
        Ok(_) => {}
    }
}

/// `--config FILE` on a single subcommand: its section of the file
/// supplies the flags the command line does not give (see `cli::merge`).
#[derive(Args)]
pub(super) struct ConfigArg {
    /// Take this command's settings from its section of a config file
    /// (and the file's top-level fields); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct ServerArgs {
    #[command(flatten)]
    pub(super) config_file: ConfigArg,
    #[command(flatten)]
    pub(super) identity: IdentityArgs,
    #[command(flatten)]
    pub(super) revocation: RevocationArgs,
    /// Address to listen on.
    #[arg(long, default_value = "[::]:15008", value_parser = super::parse_ip_port)]
    pub(super) listen: SocketAddr,
    /// Targets tunnels may reach: CIDR[:PORT|:PORT-PORT], repeatable, e.g.
    /// 10.0.0.0/8:5432, 192.0.2.7:8000-8099, [fd00::/8]:443 (IPv6 in
    /// brackets when a port follows). Replaces the loopback-only default.
    #[arg(long = "allow-target", value_name = "RULE")]
    pub(super) allow_targets: Vec<TargetRule>,
    /// Peers that may open tunnels: exact SPIFFE ID, spiffe://TD/* or
    /// spiffe://TD/ns/NS/*, repeatable. Default: any peer of our trust domain.
    #[arg(long = "allow-id", value_name = "PATTERN")]
    pub(super) allow_ids: Vec<IdPattern>,
    /// Policy file (TOML) of ordered allow/deny rules; reloaded when it
    /// changes and on SIGHUP. --allow-* flags add one more allow rule.
    #[arg(long, value_name = "FILE")]
    pub(super) policy: Option<PathBuf>,
    /// Services table (TOML): service host names this server answers for
    /// when a CONNECT names `hostname:port` (as ztunnel does in double
    /// HBONE), and where each leads; reloaded like the policy. Without it,
    /// such requests are refused (503, unknown_service).
    #[arg(long, value_name = "FILE")]
    pub(super) services: Option<PathBuf>,
    #[command(flatten)]
    pub(super) serve: ServeArgs,
    /// Send a PROXY protocol v2 header to each target (original client
    /// address, and the peer's SPIFFE ID in TLV 0xD0).
    #[arg(long)]
    pub(super) proxy_protocol: bool,
    #[command(flatten)]
    pub(super) meta: MetaArgs,
}

#[derive(Args)]
pub(super) struct GatewayArgs {
    #[command(flatten)]
    pub(super) config_file: ConfigArg,
    #[command(flatten)]
    pub(super) identity: IdentityArgs,
    #[command(flatten)]
    pub(super) revocation: RevocationArgs,
    /// Address to listen on.
    #[arg(long, default_value = "[::]:15008", value_parser = super::parse_ip_port)]
    pub(super) listen: SocketAddr,
    /// Routing table (TOML): service host names or addresses to HBONE
    /// endpoints.
    #[arg(long, value_name = "FILE")]
    pub(super) routes: PathBuf,
    /// Peers that may use the gateway (as for `hbone server`).
    #[arg(long = "allow-id", value_name = "PATTERN")]
    pub(super) allow_ids: Vec<IdPattern>,
    #[command(flatten)]
    pub(super) serve: ServeArgs,
}

/// How a server or gateway treats its connections: timeouts, limits and
/// the drain on SIGTERM.
#[derive(Args)]
pub(super) struct ServeArgs {
    /// Timeout for dialing a target.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(super) connect_timeout: Duration,
    /// Timeout for the TLS and HTTP/2 handshakes of an incoming connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) handshake_timeout: Duration,
    /// How often to PING each client connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) keepalive_interval: Duration,
    /// A client that does not answer a PING within this is disconnected.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub(super) keepalive_timeout: Duration,
    /// A connection with no open tunnel for this long gets GOAWAY (also
    /// ends clients that connect and never send a complete CONNECT).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub(super) connection_idle_timeout: Duration,
    /// Close tunnels that move no byte for this long (default: never).
    #[arg(long, value_parser = parse_duration)]
    pub(super) tunnel_idle_timeout: Option<Duration>,
    /// Largest request header list accepted (bytes); bigger gets 431.
    #[arg(long, default_value_t = H2Settings::server().max_header_list_size)]
    pub(super) max_header_list_size: u32,
    /// Open connections, all sources together; more are closed at once.
    #[arg(long, default_value_t = Limits::default().max_connections, value_parser = at_least_one)]
    pub(super) max_connections: usize,
    /// Open connections from one source IP.
    #[arg(long, default_value_t = Limits::default().max_connections_per_ip, value_parser = at_least_one)]
    pub(super) max_connections_per_ip: usize,
    /// Open tunnels, all connections together; more get 503.
    #[arg(long, default_value_t = Limits::default().max_tunnels, value_parser = at_least_one)]
    pub(super) max_tunnels: usize,
    /// Concurrent streams per connection, announced in SETTINGS.
    #[arg(long, default_value_t = H2Settings::server().max_concurrent_streams, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) max_streams: u32,
    /// Control frames (SETTINGS, PING, PRIORITY, empty DATA, and
    /// WINDOW_UPDATE or RST_STREAM beyond what the traffic accounts for)
    /// one connection may send per --control-frame-window; one more and
    /// it is closed with GOAWAY(ENHANCE_YOUR_CALM).
    #[arg(long, default_value_t = Limits::default().max_control_frames, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) max_control_frames: u32,
    /// The period --max-control-frames is counted over.
    #[arg(long, default_value = "10s", value_parser = parse_window)]
    pub(super) control_frame_window: Duration,
    /// On SIGTERM or Ctrl-C: stop accepting, send GOAWAY, and give open
    /// tunnels this long to finish (0s: close them at once). A second
    /// signal exits at once.
    #[arg(long, default_value = "30s", value_parser = parse_drain_timeout)]
    pub(super) drain_timeout: Duration,
    /// Grant clients the largest flow-control windows (4 MiB per stream,
    /// 16 MiB per connection) at once, instead of starting at 64 KiB and
    /// sizing them to what each connection carries: more throughput for
    /// many bulk tunnels through a busy node, longer waits for the small
    /// requests that share their connection.
    #[arg(long)]
    pub(super) fixed_windows: bool,
}

impl ServeArgs {
    /// Applies these settings to `config`.
    pub(super) fn apply(&self, config: &mut ServerConfig) {
        config.timeouts = Timeouts::default()
            .with_connect(self.connect_timeout)
            .with_handshake(self.handshake_timeout)
            .with_keepalive(Keepalive::new(
                self.keepalive_interval,
                self.keepalive_timeout,
            ))
            .with_connection_idle(self.connection_idle_timeout)
            .with_tunnel_idle(self.tunnel_idle_timeout);
        config.h2.max_header_list_size = self.max_header_list_size;
        config.limits = Limits::default()
            .with_max_connections(self.max_connections)
            .with_max_connections_per_ip(self.max_connections_per_ip)
            .with_max_tunnels(self.max_tunnels)
            .with_max_control_frames(self.max_control_frames, self.control_frame_window);
        config.h2.max_concurrent_streams = self.max_streams;
        config.h2.adaptive_windows = !self.fixed_windows;
    }
}

/// Flags shared by the commands that open tunnels.
#[derive(Args)]
pub(super) struct DialArgs {
    #[command(flatten)]
    pub(super) identity: IdentityArgs,
    #[command(flatten)]
    pub(super) revocation: RevocationArgs,
    /// SPIFFE ID the server must present (spiffe://TD alone: any workload
    /// of TD); repeat to accept any of several.
    #[arg(long = "server-id", value_name = "SPIFFE_ID", required = true)]
    pub(super) server_ids: Vec<SpiffeId>,
    /// Timeout for TCP connect to the server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(super) connect_timeout: Duration,
    /// Timeout for the TLS and HTTP/2 handshakes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) handshake_timeout: Duration,
    /// How often to PING each server connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) keepalive_interval: Duration,
    /// A server that does not answer a PING within this is given up on;
    /// its tunnels fail and new ones use a new connection.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub(super) keepalive_timeout: Duration,
    /// Open a fresh TLS + HTTP/2 connection for every tunnel instead of
    /// sharing connections (costs a handshake per tunnel; for measurement).
    #[arg(long)]
    pub(super) no_pool: bool,
    /// Double HBONE: reach the server through this gateway (needs
    /// --gateway-id and --service).
    #[arg(long, value_name = "ADDR", requires_all = ["gateway_ids", "service"])]
    pub(super) gateway: Option<SocketAddr>,
    /// SPIFFE ID the gateway must present; repeatable. A trust domain
    /// alone (spiffe://TD) accepts any workload of it.
    #[arg(long = "gateway-id", value_name = "SPIFFE_ID", requires = "gateway")]
    pub(super) gateway_ids: Vec<SpiffeId>,
    /// The destination service as the gateway knows it, HOST:PORT (the
    /// outer CONNECT's authority).
    #[arg(long, value_name = "HOST:PORT", requires = "gateway")]
    pub(super) service: Option<String>,
    #[command(flatten)]
    pub(super) meta: MetaArgs,
    /// Our network name, sent as x-forwarded-network on the inner CONNECT
    /// of double HBONE.
    #[arg(long, value_name = "NAME")]
    pub(super) network: Option<String>,
    /// Grant servers the largest flow-control windows (4 MiB per stream,
    /// 16 MiB per connection) at once for what they send back, instead of
    /// sizing them to what each connection carries.
    #[arg(long)]
    pub(super) fixed_windows: bool,
}

impl DialArgs {
    /// The dialer, counting into `ops`' telemetry and running its entries
    /// on `ops`' workers, and the identity it started with.
    pub(super) async fn dialer(&self, ops: &super::ops::Ops) -> anyhow::Result<(Dialer, Obtained)> {
        let obtained = self.identity.obtain().await?;
        ops.identity_in_use(&obtained.identity);
        let dialer = self.dialer_with(&obtained.identity, ops.telemetry.clone(), ops.workers())?;
        Ok((dialer, obtained))
    }

    /// The dialer of a one-shot command (nothing to report to).
    pub(super) async fn dialer_without_telemetry(&self) -> anyhow::Result<Dialer> {
        self.dialer_with(
            &self.identity.obtain().await?.identity,
            Default::default(),
            None,
        )
    }

    fn dialer_with(
        &self,
        identity: &Identity,
        telemetry: hbone::Telemetry,
        workers: Option<hbone::Workers>,
    ) -> anyhow::Result<Dialer> {
        let mut config = DialerConfig::default()
            .with_timeouts(
                Timeouts::default()
                    .with_connect(self.connect_timeout)
                    .with_handshake(self.handshake_timeout)
                    .with_keepalive(Keepalive::new(
                        self.keepalive_interval,
                        self.keepalive_timeout,
                    )),
            )
            .with_pooling(!self.no_pool)
            .with_baggage(self.meta.baggage(identity.id()))
            .with_telemetry(telemetry)
            .with_revocation(self.revocation.load()?);
        config.network = self.network.clone();
        config.h2.adaptive_windows = !self.fixed_windows;
        config.workers = workers;
        Ok(Dialer::with_config(identity, config)?)
    }

    /// Where tunnels to `target` go: to `server` (an address or a host
    /// name), or through the gateway when one is given.
    pub(super) fn destination(
        &self,
        server: Option<&Target>,
        target: &Target,
    ) -> anyhow::Result<Destination> {
        let server_ids = self.server_ids.clone();
        match (self.gateway, server) {
            (Some(gateway), None) => Ok(Destination::new(
                Route::Gateway {
                    gateway,
                    gateway_ids: self.gateway_ids.clone(),
                    service: self.service.clone().unwrap_or_default(),
                    server_ids,
                },
                target.clone(),
            )),
            (None, Some(server)) => Ok(Destination::direct(
                server.clone(),
                server_ids,
                target.clone(),
            )),
            (Some(_), Some(_)) => bail!("give either --server or --gateway, not both"),
            (None, None) => bail!(
                "say where tunnels go: --server ADDR, or --gateway ADDR with --gateway-id and --service"
            ),
        }
    }
}

/// Our workload's metadata, sent as `baggage` (ztunnel's keys) and, with
/// our SPIFFE ID, our side of the `istio_tcp_*` labels. The namespace
/// comes from our SPIFFE ID when it has the Istio form.
#[derive(Args, Clone)]
pub(super) struct MetaArgs {
    /// Cluster name (k8s.cluster.name).
    #[arg(long, value_name = "NAME")]
    pub(super) cluster: Option<String>,
    /// Workload as KIND/NAME, e.g. deployment/web (k8s.deployment.name=web).
    #[arg(long, value_name = "KIND/NAME")]
    pub(super) workload: Option<String>,
    /// Service name (service.name).
    #[arg(long, value_name = "NAME")]
    pub(super) app: Option<String>,
    /// Service version (service.version).
    #[arg(long, value_name = "VERSION")]
    pub(super) app_version: Option<String>,
}

impl MetaArgs {
    pub(super) fn baggage(&self, id: &SpiffeId) -> Baggage {
        let mut baggage = Baggage::default();
        baggage.set(
            headers::CLUSTER_KEY,
            self.cluster.as_deref().unwrap_or_default(),
        );
        baggage.set(headers::NAMESPACE_KEY, id.namespace().unwrap_or_default());
        if let Some((kind, name)) = self.workload.as_deref().and_then(|w| w.split_once('/')) {
            baggage.set(&format!("k8s.{kind}.name"), name);
        }
        baggage.set(
            headers::SERVICE_KEY,
            self.app.as_deref().unwrap_or_default(),
        );
        baggage.set(
            headers::VERSION_KEY,
            self.app_version.as_deref().unwrap_or_default(),
        );
        baggage
    }
}

#[derive(Args)]
pub(super) struct ForwardArgs {
    #[command(flatten)]
    pub(super) config_file: ConfigArg,
    #[command(flatten)]
    pub(super) dial: DialArgs,
    /// Local address to accept application connections on (an address
    /// other than loopback needs --allow-source or --allow-remote-clients).
    #[arg(long, value_parser = super::parse_ip_port)]
    pub(super) listen: SocketAddr,
    #[command(flatten)]
    pub(super) access: EntryAccessArgs,
    /// HBONE server, IP:PORT or HOST:PORT (a name is resolved at each new
    /// connection, every address tried in order); or use --gateway.
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse_host_port)]
    pub(super) server: Option<Target>,
    /// Target the server connects each tunnel to, IP:PORT or HOST:PORT (a
    /// name is resolved here, at each new connection; the server's policy
    /// judges the address).
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse_host_port)]
    pub(super) target: Target,
    /// On SIGTERM or Ctrl-C: stop accepting and give open tunnels this long
    /// to finish (0s: close them at once). A second signal exits at once.
    #[arg(long, default_value = "30s", value_parser = parse_drain_timeout)]
    pub(super) drain_timeout: Duration,
}

#[derive(Args)]
pub(super) struct ConnectArgs {
    #[command(flatten)]
    pub(super) dial: DialArgs,
    /// HBONE server, IP:PORT or HOST:PORT (every address a name resolves
    /// to is tried in order); or use --gateway.
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse_host_port)]
    pub(super) server: Option<Target>,
    /// Target the server connects the tunnel to, IP:PORT or HOST:PORT (a
    /// name is resolved here; the server's policy judges the address).
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse_host_port)]
    pub(super) target: Target,
}

#[derive(Args)]
pub(super) struct Socks5Args {
    #[command(flatten)]
    pub(super) config_file: ConfigArg,
    #[command(flatten)]
    pub(super) dial: DialArgs,
    /// Local address for SOCKS5 clients (an address other than loopback
    /// needs --allow-source, --allow-remote-clients or
    /// --socks5-credentials).
    #[arg(long, value_parser = super::parse_ip_port)]
    pub(super) listen: SocketAddr,
    #[command(flatten)]
    pub(super) access: EntryAccessArgs,
    /// Ask each client for a user name and password (RFC 1929) from this
    /// file: one user:password per line, # for comments, mode 0600 (it is
    /// refused if group or others may read it). Reloaded when it changes
    /// and on SIGHUP. Passwords cross the network as the client sends
    /// them: on a network you do not trust, add --allow-source too.
    #[arg(long, value_name = "FILE")]
    pub(super) socks5_credentials: Option<PathBuf>,
    /// HBONE server for every tunnel, IP:PORT or HOST:PORT; default: port
    /// 15008 of each target.
    #[arg(long, value_name = "HOST:PORT", value_parser = super::parse_host_port)]
    pub(super) server: Option<Target>,
    /// On SIGTERM or Ctrl-C: stop accepting and give open tunnels this long
    /// to finish (0s: close them at once). A second signal exits at once.
    #[arg(long, default_value = "30s", value_parser = parse_drain_timeout)]
    pub(super) drain_timeout: Duration,
}

/// A limit of at least 1: a limit of 0 would refuse everything.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("0 would refuse everything; give at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("invalid value {text:?}: {e}")),
    }
}

/// A period to count over: zero would count nothing.
fn parse_window(text: &str) -> Result<Duration, String> {
    match text.trim_end_matches(|c: char| c.is_ascii_alphabetic()) {
        "0" => {
            Err("a window of zero would count nothing; give a positive duration, e.g. 10s".into())
        }
        _ => parse_duration(text),
    }
}

/// A drain may be zero: close what is open at once.
fn parse_drain_timeout(text: &str) -> Result<Duration, String> {
    match text.trim_end_matches(|c: char| c.is_ascii_alphabetic()) {
        "0" => Ok(Duration::ZERO),
        _ => parse_duration(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_from_flags_and_identity() {
        let meta = MetaArgs {
            cluster: Some("east".into()),
            workload: Some("deployment/web".into()),
            app: Some("web".into()),
            app_version: None,
        };
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(
            meta.baggage(&id).to_header().unwrap(),
            "k8s.cluster.name=east,k8s.deployment.name=web,k8s.namespace.name=shop,service.name=web"
        );
    }
}
