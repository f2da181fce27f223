//! What each subcommand does with its arguments.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hbone::ca::DevCa;
use hbone::entry::{self, socks5::SocksConfig};
use hbone::gateway::Routes;
use std::path::PathBuf;

use hbone::policy::{self, IdPattern, Policy, PolicyHandle, TargetRule};
use hbone::services::{ServiceTable, ServicesHandle};
use hbone::{Server, ServerConfig, SpiffeId};
use tokio::net::TcpListener;

use super::args::{ConnectArgs, ForwardArgs, GatewayArgs, IdentityArgs, ServerArgs, Socks5Args};
use super::entry_access;
use super::ops::{Ops, PolicyInForce};
use super::revocation::RevocationArgs;
use super::watch::{Event, watch};
use super::{CaCommand, PolicyCommand};

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 86_400)
}

pub(super) fn run_ca(command: CaCommand) -> anyhow::Result<()> {
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
        CaCommand::Revoke {
            ca,
            cert,
            crl_out,
            days: d,
        } => {
            let revoked = hbone::ca::revoke(&ca, &cert, days(d))?;
            let out = crl_out.unwrap_or_else(|| ca.join(hbone::ca::CRL_FILE));
            write_atomically(&out, &revoked.crl_pem)?;
            let what = if revoked.already {
                "was revoked already"
            } else {
                "revoked"
            };
            println!(
                "{} {what}; CRL number {} of {} revoked certificate(s), next update in {d} day(s), written to {}",
                cert.display(),
                revoked.number,
                revoked.revoked.len(),
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes `contents` to a temporary file beside `path`, then renames it
/// over `path`: a process watching the file never reads half of it.
fn write_atomically(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, contents)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

pub(super) async fn run_server(args: ServerArgs, ops: &Ops) -> anyhow::Result<()> {
    let first = args.identity.obtain().await?;
    let identity = first.identity.clone();
    ops.identity_in_use(&identity);
    let baggage = args.meta.baggage(identity.id());
    let mut config =
        ServerConfig::new(args.listen, identity).with_access_log(args.identity.access_log());
    ops.equip(&mut config);
    config.revocation = args.revocation.load()?;
    let flags = (args.allow_ids, args.allow_targets);
    config.policy = server_policy(args.policy.as_deref(), &flags)?;
    warn_of_rules_that_never_match(&config.policy, &config.identity);
    config.proxy_protocol = args.proxy_protocol;
    config.baggage = baggage;
    if let Some(path) = &args.services {
        config.services = ServiceTable::load(path)?;
    }
    args.serve.apply(&mut config);
    let targets = config.policy.targets();
    let rules = config.policy.rules().len();
    let services = config.services.len();
    let server = Server::bind(config).await?;
    ops.policy_in_force(PolicyInForce {
        section: "server",
        handle: server.policy(),
        flags_rule: flags_rule_origin(args.policy.is_some(), &flags),
        targets: true,
    });
    ops.listener_bound();
    tracing::info!(
        listen = %server.local_addr(), id = %server.local_id(),
        rules, targets = %targets.join(","), services, "HBONE server ready"
    );
    if let Some(path) = args.policy {
        watch_policy(path, flags, server.policy(), ops);
    }
    if let Some(path) = args.services {
        watch_services(path, server.services(), ops);
    }
    watch_tls(server.tls(), args.identity, first, args.revocation, ops);
    ops.serve(server, args.serve.drain_timeout).await
}

/// Rules naming peers of a trust domain this server accepts no client
/// from can never match: say so at start, loudly.
fn warn_of_rules_that_never_match(policy: &Policy, identity: &hbone::Identity) {
    let trust_domain = identity.id().trust_domain();
    let federated = identity.federated_bundles();
    for rule in policy.rules() {
        for pattern in rule.from.iter().filter(|p| {
            p.trust_domain() != trust_domain && !federated.contains_key(p.trust_domain())
        }) {
            tracing::warn!(
                rule = %rule.name, %pattern,
                "this pattern can never match: the server accepts clients of trust domain {trust_domain} and of federated trust domains it has bundles for only"
            );
        }
    }
    if policy
        .rules()
        .iter()
        .all(|r| r.action == policy::Action::Deny)
    {
        tracing::warn!("the policy allows nothing: every tunnel will be denied (403)");
    }
}

/// The policy from the file (if any) plus the rule the --allow-* flags
/// stand for (when given, or when there is no file).
fn server_policy(
    file: Option<&std::path::Path>,
    flags: &(Vec<IdPattern>, Vec<TargetRule>),
) -> anyhow::Result<Policy> {
    let (ids, targets) = flags;
    let Some(path) = file else {
        return Ok(Policy::new(ids.clone(), targets.clone()));
    };
    let mut rules = policy::file::load(path)?.rules().to_vec();
    if !ids.is_empty() || !targets.is_empty() {
        rules.push(Policy::flags_rule(ids.clone(), targets.clone()));
    }
    Ok(Policy::from_rules(rules))
}

/// Where the rule of the --allow-* flags comes from, when [`server_policy`]
/// adds one (always last): `flags`, or `default` when neither flag was
/// given and there is no file.
fn flags_rule_origin(
    file: bool,
    (ids, targets): &(Vec<IdPattern>, Vec<TargetRule>),
) -> Option<&'static str> {
    if !ids.is_empty() || !targets.is_empty() {
        Some("flags")
    } else if !file {
        Some("default")
    } else {
        None
    }
}

/// Reloads the policy file when it changes and on SIGHUP. A file that
/// does not load keeps the old policy in force.
fn watch_policy(
    path: PathBuf,
    flags: (Vec<IdPattern>, Vec<TargetRule>),
    handle: PolicyHandle,
    ops: &Ops,
) {
    let files = vec![path.clone()];
    let metrics = ops.telemetry.metrics.clone();
    tokio::spawn(watch(files, move |event| {
        let Event::Reload(why) = event else { return };
        let loaded = server_policy(Some(&path), &flags);
        if let Some(metrics) = &metrics {
            metrics.reload("policy", loaded.is_ok());
        }
        match loaded {
            Ok(policy) => {
                let rules = policy.rules().len();
                handle.replace(policy);
                tracing::info!(path = %path.display(), rules, why, "policy reloaded");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), why, "policy not reloaded, the old one stays in force: {e:#}")
            }
        }
    }));
}

/// Reloads the services table when it changes and on SIGHUP. A file that
/// does not load keeps the old table in force.
fn watch_services(path: PathBuf, handle: ServicesHandle, ops: &Ops) {
    let metrics = ops.telemetry.metrics.clone();
    tokio::spawn(watch(vec![path.clone()], move |event| {
        let Event::Reload(why) = event else { return };
        let loaded = ServiceTable::load(&path);
        if let Some(metrics) = &metrics {
            metrics.reload("services", loaded.is_ok());
        }
        match loaded {
            Ok(table) => {
                let services = table.len();
                handle.replace(table);
                tracing::info!(path = %path.display(), services, why, "services table reloaded");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), why, "services table not reloaded, the old one stays in force: {e:#}")
            }
        }
    }));
}

/// Reloads a server's identity and revocation lists when their files
/// change and on SIGHUP.
fn watch_tls(
    tls: hbone::tls::ServerTls,
    identity: IdentityArgs,
    first: super::args::Obtained,
    revocation: RevocationArgs,
    ops: &Ops,
) {
    let reloading = tls.clone();
    revocation.watch(ops, move |lists| Ok(reloading.reload_revocation(lists)?));
    watch_identity(identity, first, ops, move |identity| {
        Ok(tls.reload(identity)?)
    });
}

/// Reloads a dialer's identity and revocation lists when their files
/// change and on SIGHUP.
fn watch_dialer(
    dialer: &hbone::Dialer,
    args: &super::args::DialArgs,
    first: super::args::Obtained,
    ops: &Ops,
) {
    watch_dialer_sources(dialer, &args.identity, &args.revocation, first, ops);
}

/// As [`watch_dialer`], for a command that takes only the identity and
/// revocation flags of a dialer.
pub(super) fn watch_dialer_sources(
    dialer: &hbone::Dialer,
    identity: &IdentityArgs,
    revocation: &super::revocation::RevocationArgs,
    first: super::args::Obtained,
    ops: &Ops,
) {
    let reloading = dialer.clone();
    revocation.clone().watch(ops, move |lists| {
        reloading.reload_revocation(lists);
        Ok(())
    });
    let reloading = dialer.clone();
    watch_identity(identity.clone(), first, ops, move |identity| {
        Ok(reloading.reload_identity(identity)?)
    });
}

/// Reloads the identity when its files change and on SIGHUP, and hands it
/// to `apply`; checks expiry hourly. A half-written file or a key that does
/// not match its certificate is refused, and the identity in use stays.
fn watch_identity(
    args: IdentityArgs,
    first: super::args::Obtained,
    ops: &Ops,
    apply: impl Fn(&hbone::Identity) -> anyhow::Result<()> + Send + 'static,
) {
    let istio_ca = args.istio_ca();
    if first.workload_api.is_some() || istio_ca.is_some() {
        // Identities from a source rather than files are also written out
        // when asked to (once they are in use).
        let writing = args.clone();
        let apply = move |identity: &hbone::Identity| {
            apply(identity)?;
            writing.write_out(identity)
        };
        if let Some(api) = first.workload_api {
            tokio::spawn(follow_workload_api(api, first.identity, ops, apply));
        } else if let Some(ca) = istio_ca {
            // Each renewal re-reads the federated bundles, so a changed
            // partner root is taken up with the next certificate.
            let federating = args.clone();
            let apply = move |identity: &hbone::Identity| {
                apply(&federating.with_federation(identity.clone())?)
            };
            tokio::spawn(renew_from_istio_ca(ca, first.identity, ops, apply));
        }
        return;
    }
    // The identity in use, for the hourly expiry check.
    let mut current = Some(first.identity);
    let metrics = ops.telemetry.metrics.clone();
    let readiness = ops.readiness.clone();
    tokio::spawn(watch(args.files(), move |event| match event {
        Event::Hourly => {
            if let Some(identity) = &current {
                super::args::warn_if_expiring(identity);
            }
        }
        Event::Reload(why) => match args
            .load()
            .and_then(|identity| apply(&identity).map(|()| identity))
        {
            Ok(identity) => {
                tracing::info!(id = %identity.id(), why, "identity reloaded; new handshakes use it");
                if let Some((_, expires)) = identity.validity() {
                    if let Some(metrics) = &metrics {
                        metrics.certificate(identity.id(), expires);
                    }
                    readiness.certificate(&identity.id().to_string(), expires);
                }
                if let Some(metrics) = &metrics {
                    metrics.reload("identity", true);
                }
                current = Some(identity);
            }
            Err(e) => {
                if let Some(metrics) = &metrics {
                    metrics.reload("identity", false);
                }
                tracing::error!(why, "identity not reloaded, the one in use stays: {e:#}")
            }
        },
    }));
}

/// Puts every identity the Workload API streams in use (new handshakes
/// use it, open tunnels continue). Should the stream end for good, the
/// identity in use stays until it expires.
fn follow_workload_api(
    api: hbone::workload_api::WorkloadApi,
    first: hbone::Identity,
    ops: &Ops,
    apply: impl Fn(&hbone::Identity) -> anyhow::Result<()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let metrics = ops.telemetry.metrics.clone();
    let readiness = ops.readiness.clone();
    async move {
        let mut in_use = first;
        api.keep_updated(move |update| {
            let unchanged = |new: &hbone::Identity| {
                new.chain() == in_use.chain()
                    && new.bundle() == in_use.bundle()
                    && new.federated_bundles() == in_use.federated_bundles()
            };
            let outcome = match update {
                Ok(identity) if unchanged(&identity) => return,
                Ok(identity) => apply(&identity).map(|()| identity),
                Err(e) => Err(e.into()),
            };
            if let Some(metrics) = &metrics {
                metrics.renewal("workload-api", outcome.is_ok());
            }
            match outcome {
                Ok(identity) => {
                    if let Some((_, expires)) = identity.validity() {
                        if let Some(metrics) = &metrics {
                            metrics.certificate(identity.id(), expires);
                        }
                        readiness.certificate(&identity.id().to_string(), expires);
                    }
                    tracing::info!(
                        id = %identity.id(), valid_s = super::args::seconds_left(&identity),
                        "identity updated by the SPIFFE Workload API; new handshakes use it"
                    );
                    in_use = identity;
                }
                Err(e) => {
                    tracing::warn!("Workload API update not used; the identity in use stays: {e:#}")
                }
            }
        })
        .await;
        tracing::warn!(
            endpoint = api.endpoint(),
            "the SPIFFE Workload API stream ended; the identity in use stays until it expires"
        );
    }
}

/// Keeps the Istio CA's certificate fresh: each new one goes to `apply`
/// (new handshakes use it, open tunnels continue); a failure leaves the
/// one in use until it expires, and readiness fails only then.
fn renew_from_istio_ca(
    ca: hbone::istio_ca::IstioCa,
    first: hbone::Identity,
    ops: &Ops,
    apply: impl Fn(&hbone::Identity) -> anyhow::Result<()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    use hbone::istio_ca::Renewal;
    let metrics = ops.telemetry.metrics.clone();
    let readiness = ops.readiness.clone();
    let count = move |succeeded| {
        if let Some(metrics) = &metrics {
            metrics.renewal("istio-ca", succeeded);
        }
    };
    let published = ops.telemetry.metrics.clone();
    async move {
        ca.keep_renewed(first, move |event| match event {
            Renewal::Renewed(identity) => {
                apply(identity).map_err(|e| format!("{e:#}"))?;
                count(true);
                if let Some((_, expires)) = identity.validity() {
                    if let Some(metrics) = &published {
                        metrics.certificate(identity.id(), expires);
                    }
                    readiness.certificate(&identity.id().to_string(), expires);
                }
                tracing::info!(
                    id = %identity.id(), valid_s = super::args::seconds_left(identity),
                    "certificate renewed by the Istio CA; new handshakes use it"
                );
                Ok(())
            }
            Renewal::Failed { error, retry_in } => {
                count(false);
                tracing::warn!(
                    retry_in_s = retry_in.as_secs_f64(),
                    "certificate not renewed; the one in use stays until it expires: {error}"
                );
                Ok(())
            }
        })
        .await;
    }
}

pub(super) fn run_policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { file } => {
            let policy = policy::file::load(&file)?;
            println!(
                "{}: {} rule(s), valid",
                file.display(),
                policy.rules().len()
            );
            if policy
                .rules()
                .iter()
                .all(|r| r.action == policy::Action::Deny)
            {
                println!("  it allows nothing: every tunnel would be denied (403)");
            }
            for rule in policy.rules() {
                println!("  {} {:?}", rule.action, rule.name);
            }
        }
        PolicyCommand::Test {
            file,
            id,
            target,
            service,
            source,
        } => {
            let policy = policy::file::load(&file)?;
            let names_sources = policy.rules().iter().any(|r| !r.source.is_empty());
            let source = match source {
                Some(source) => source,
                None if names_sources => anyhow::bail!(
                    "{}: its rules name source networks, so the answer depends on where the peer connects from: give --source IP",
                    file.display()
                ),
                None => {
                    println!("(source 127.0.0.1 assumed: no rule names a source network)");
                    std::net::IpAddr::from([127, 0, 0, 1])
                }
            };
            match policy.decide_service(&id, source, target, service.as_ref()) {
                Ok(allowed) => println!("allow: rule {:?}", allowed.rule),
                Err(denial) => {
                    println!("deny: {denial}");
                    super::logwriter::flush_before_exit();
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}

pub(super) async fn run_gateway(args: GatewayArgs, ops: &Ops) -> anyhow::Result<()> {
    let first = args.identity.obtain().await?;
    let identity = first.identity.clone();
    ops.identity_in_use(&identity);
    let routes = Routes::load(&args.routes)?;
    let mut config =
        ServerConfig::new(args.listen, identity).with_access_log(args.identity.access_log());
    ops.equip(&mut config);
    config.revocation = args.revocation.load()?;
    let flags_rule = flags_rule_origin(false, &(args.allow_ids.clone(), Vec::new()));
    config.policy = Policy::new(args.allow_ids, Vec::new());
    args.serve.apply(&mut config);
    let route_count = routes.len();
    config.gateway_routes = Some(Arc::new(routes));
    let server = Server::bind(config).await?;
    ops.policy_in_force(PolicyInForce {
        section: "gateway",
        handle: server.policy(),
        flags_rule,
        targets: false,
    });
    ops.listener_bound();
    tracing::info!(
        listen = %server.local_addr(), id = %server.local_id(),
        routes = route_count, "HBONE gateway ready"
    );
    watch_tls(server.tls(), args.identity, first, args.revocation, ops);
    ops.serve(server, args.serve.drain_timeout).await
}

/// An entry's listener; under `--runtime per-core` one that every worker
/// can accept on for itself.
pub(super) async fn bind_entry(listen: SocketAddr, ops: &Ops) -> anyhow::Result<TcpListener> {
    let bound = match ops.workers() {
        Some(workers) => workers.bind_listener(listen),
        None => TcpListener::bind(listen).await,
    };
    bound.with_context(|| format!("cannot listen on {listen}"))
}

pub(super) async fn run_forward(args: ForwardArgs, ops: &Ops) -> anyhow::Result<()> {
    entry_access::check_listen(args.listen, &args.access, None)?;
    let destination = args.dial.destination(args.server.as_ref(), &args.target)?;
    let (dialer, first) = args.dial.dialer(ops).await?;
    watch_dialer(&dialer, &args.dial, first, ops);
    let listener = bind_entry(args.listen, ops).await?;
    ops.listener_bound();
    tracing::info!(
        listen = %listener.local_addr()?, id = %dialer.local_id(), route = %destination,
        "forward ready"
    );
    let log = args.dial.identity.access_log();
    let serving = entry::forward::serve_with_access(
        listener,
        dialer.clone(),
        destination,
        log,
        args.access.sources(),
        ops.shutdown_requested(),
    );
    drain_entry(serving, ops, &dialer, args.drain_timeout).await;
    Ok(())
}

/// Runs an entry until shutdown, then lets its open tunnels finish for up
/// to `deadline` and ends its connections cleanly.
async fn drain_entry(
    serving: impl std::future::Future<Output = ()>,
    ops: &Ops,
    dialer: &hbone::Dialer,
    deadline: Duration,
) {
    tokio::pin!(serving);
    // The entry itself stops accepting once shutdown is requested.
    let finished = tokio::select! {
        () = &mut serving => true,
        () = ops.shutdown_requested() => false,
    };
    tracing::info!(
        deadline_s = deadline.as_secs_f64(),
        "draining: stopped accepting; waiting for open tunnels"
    );
    let drained = finished
        || tokio::select! {
            () = &mut serving => true,
            () = tokio::time::sleep(deadline) => false,
        };
    if drained {
        tracing::info!("drained: every tunnel finished");
    } else {
        tracing::warn!("drain deadline passed; closing what is left");
    }
    close_connections(dialer, CONNECT_CLOSE_LIMIT).await;
}

/// How long `hbone connect` waits for its connection to close cleanly.
const CONNECT_CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// Ends the dialer's connections with GOAWAY and TLS close_notify, so
/// servers and gateways log a normal end rather than a lost connection.
async fn close_connections(dialer: &hbone::Dialer, limit: Duration) {
    if !dialer.close(limit).await {
        tracing::info!(
            limit_s = limit.as_secs_f64(),
            "stopping with HBONE connections still open"
        );
    }
}

pub(super) async fn run_connect(args: ConnectArgs) -> anyhow::Result<()> {
    let destination = args.dial.destination(args.server.as_ref(), &args.target)?;
    let dialer = args.dial.dialer_without_telemetry().await?;
    let result = entry::stdio::run(&dialer, &destination).await;
    close_connections(&dialer, CONNECT_CLOSE_LIMIT).await;
    result?;
    Ok(())
}

pub(super) async fn run_socks5(args: Socks5Args, ops: &Ops) -> anyhow::Result<()> {
    let has_credentials = args.socks5_credentials.is_some();
    entry_access::check_listen(args.listen, &args.access, Some(has_credentials))?;
    let access = entry_access::socks_access(&args.access, args.socks5_credentials.clone(), ops)?;
    let server_ids = args.dial.server_ids.clone();
    let config = match (args.server, args.dial.gateway) {
        (None, None) => SocksConfig::PerTarget { server_ids },
        (Some(server), None) => SocksConfig::Server { server, server_ids },
        (None, Some(gateway)) => SocksConfig::Fixed(hbone::Route::Gateway {
            gateway,
            gateway_ids: args.dial.gateway_ids.clone(),
            service: args.dial.service.clone().unwrap_or_default(),
            server_ids,
        }),
        (Some(_), Some(_)) => anyhow::bail!("give either --server or --gateway, not both"),
    };
    let (dialer, first) = args.dial.dialer(ops).await?;
    watch_dialer(&dialer, &args.dial, first, ops);
    let listener = bind_entry(args.listen, ops).await?;
    ops.listener_bound();
    tracing::info!(listen = %listener.local_addr()?, id = %dialer.local_id(), "SOCKS5 entry ready");
    let serving = entry::socks5::serve_with_access(
        listener,
        dialer.clone(),
        config,
        args.dial.identity.access_log(),
        access,
        ops.shutdown_requested(),
    );
    drain_entry(serving, ops, &dialer, args.drain_timeout).await;
    Ok(())
}
