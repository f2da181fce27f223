//! What every long-running command shares: metrics, the open-tunnel list,
//! readiness, the admin endpoint and the shutdown signal.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hbone::Identity;
use hbone::Telemetry;
use hbone::active::ActiveTunnels;
use hbone::admin::{Admin, LogControl, Readiness};
use hbone::metrics::Metrics;
use hbone::policy::PolicyHandle;
use hbone::{Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Where the admin endpoint listens: `--admin ADDR`, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AdminSetting {
    Off,
    At(SocketAddr),
}

/// The admin address of `hbone run` when the file says nothing.
pub(super) const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

pub(super) fn parse_admin(text: &str) -> Result<AdminSetting, String> {
    if text == "off" {
        return Ok(AdminSetting::Off);
    }
    text.parse()
        .map(AdminSetting::At)
        .map_err(|_| format!("{text:?} is neither an address like {DEFAULT_ADMIN} nor \"off\""))
}

/// Shared by the listeners of one process.
pub(super) struct Ops {
    pub(super) telemetry: Telemetry,
    pub(super) readiness: Readiness,
    shutdown: watch::Receiver<bool>,
    /// The policies in force, shown on `/config` as they are at each
    /// request.
    policies: Arc<Mutex<Vec<PolicyInForce>>>,
    /// Where servers run their connections under `--runtime per-core`.
    workers: Option<hbone::Workers>,
}

/// A server's or gateway's policy, for `/config`.
pub(super) struct PolicyInForce {
    /// The `/config` section it belongs to: `server` or `gateway`.
    pub(super) section: &'static str,
    /// Read at each request, so that `/config` follows reloads.
    pub(super) handle: PolicyHandle,
    /// Where the last rule comes from when the flags made it: `flags`, or
    /// `default` when they were not given (see
    /// [`hbone::policy::Policy::flags_rule`]).
    pub(super) flags_rule: Option<&'static str>,
    /// Whether targets apply (a gateway's targets are its routes).
    pub(super) targets: bool,
}

impl PolicyInForce {
    /// The rules as `/config` shows them: one object per rule, in order,
    /// each list's items as a policy file writes them.
    fn to_json(&self) -> serde_json::Value {
        fn texts<T: ToString>(items: &[T]) -> Vec<String> {
            items.iter().map(ToString::to_string).collect()
        }
        let policy = self.handle.current();
        let rules = policy.rules();
        let shown = rules.iter().enumerate().map(|(index, rule)| {
            let origin = match self.flags_rule {
                Some(origin) if index + 1 == rules.len() => origin,
                _ => "policy file",
            };
            let mut shown = serde_json::json!({
                "name": rule.name,
                "action": rule.action.to_string(),
                "from": texts(&rule.from),
                "source": texts(&rule.source),
            });
            if self.targets {
                shown["to"] = texts(&rule.to).into();
                shown["services"] = texts(&rule.services).into();
            }
            shown["origin"] = origin.into();
            shown
        });
        shown.collect::<Vec<_>>().into()
    }
}

/// `config` with each policy's rules in force under its section, as
/// `policy-rules`.
fn with_policies(config: &serde_json::Value, policies: &[PolicyInForce]) -> serde_json::Value {
    let mut config = config.clone();
    for policy in policies {
        if let Some(serde_json::Value::Object(section)) = config.get_mut(policy.section) {
            section.insert("policy-rules".into(), policy.to_json());
        }
    }
    config
}

impl Ops {
    /// Starts the admin endpoint (when `admin` is an address) and the
    /// signal handling: the first SIGTERM or Ctrl-C asks every listener to
    /// stop (servers drain) and makes `/readyz` fail; a second exits at
    /// once with status 130. `listeners` is how many must be bound before
    /// the process is ready.
    pub(super) async fn start(
        admin: AdminSetting,
        listeners: usize,
        config: serde_json::Value,
        logging: Arc<dyn LogControl>,
    ) -> anyhow::Result<Ops> {
        let readiness = Readiness::new(listeners);
        let telemetry = match admin {
            AdminSetting::Off => Telemetry::default(),
            AdminSetting::At(_) => Telemetry::default()
                .with_metrics(Arc::new(Metrics::new()))
                .with_tunnels(Arc::new(ActiveTunnels::default())),
        };
        if let (Some(metrics), Some(tunnels)) = (&telemetry.metrics, &telemetry.tunnels) {
            let tunnels = Arc::downgrade(tunnels);
            metrics.on_scrape(move |metrics| {
                if let Some(tunnels) = tunnels.upgrade() {
                    let (clients, servers) = tunnels.count_by_role();
                    metrics.tunnels_open(clients as i64, servers as i64);
                }
            });
        }
        let policies = Arc::new(Mutex::new(Vec::new()));
        if let AdminSetting::At(addr) = admin {
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for the admin endpoint (--admin ADDR or `off`)")
            })?;
            let bound = listener.local_addr().unwrap_or(addr);
            if !bound.ip().is_loopback() {
                tracing::warn!(listen = %bound, "the admin endpoint has no authentication; keep it off public interfaces");
            }
            tracing::info!(listen = %bound, "admin endpoint ready (/metrics /healthz /readyz /config /tunnels /logging)");
            let in_force = policies.clone();
            let admin = Admin::default()
                .with_telemetry(&telemetry)
                .with_readiness(readiness.clone())
                .with_config_source(move || {
                    let policies = in_force.lock().unwrap_or_else(|e| e.into_inner());
                    with_policies(&config, &policies)
                })
                .with_logging(logging);
            tokio::spawn(admin.serve(listener));
        }
        let (requested, shutdown) = watch::channel(false);
        // Taken over now, before any listener says it is ready, so an early
        // SIGTERM drains instead of killing.
        let signals = StopSignals::listen()?;
        tokio::spawn(handle_signals(signals, requested, readiness.clone()));
        Ok(Ops {
            telemetry,
            readiness,
            shutdown,
            policies,
            workers: None,
        })
    }

    /// Servers equipped and dialers made from now on serve their
    /// connections on `workers`.
    pub(super) fn with_workers(mut self, workers: Option<hbone::Workers>) -> Self {
        self.workers = workers;
        self
    }

    /// The per-core workers, under `--runtime per-core`.
    pub(super) fn workers(&self) -> Option<hbone::Workers> {
        self.workers.clone()
    }

    /// Shows `policy`'s rules on `/config` from now on, as they stand at
    /// each request.
    pub(super) fn policy_in_force(&self, policy: PolicyInForce) {
        self.policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(policy);
    }

    /// Resolves once a shutdown was asked for.
    pub(super) async fn shutdown_requested(&self) {
        let mut shutdown = self.shutdown.clone();
        let _ = shutdown.wait_for(|requested| *requested).await;
    }

    fn metrics(&self) -> Option<&Metrics> {
        self.telemetry.metrics.as_deref()
    }

    /// Publishes a (re)loaded identity's expiry to metrics and readiness.
    pub(super) fn identity_in_use(&self, identity: &Identity) {
        let Some((_, expires)) = identity.validity() else {
            return;
        };
        if let Some(metrics) = self.metrics() {
            metrics.certificate(identity.id(), expires);
        }
        self.readiness
            .certificate(&identity.id().to_string(), expires);
    }

    /// A listener is bound; the process is ready once all are.
    pub(super) fn listener_bound(&self) {
        if self.readiness.listener_bound() {
            super::systemd::ready();
        }
    }

    /// Serves until shutdown, then drains: no new connections, GOAWAY on
    /// the open ones, and up to `deadline` for their tunnels to finish.
    pub(super) async fn serve(&self, server: Server, deadline: Duration) -> anyhow::Result<()> {
        let drainer = server.drainer();
        let stats = server.stats();
        let listen = server.local_addr();
        let mut running = tokio::spawn(server.run());
        tokio::select! {
            result = &mut running => return Ok(result?),
            () = self.shutdown_requested() => {}
        }
        let open = stats.snapshot();
        tracing::info!(
            %listen, connections = open.connections_active, tunnels = open.tunnels_active,
            deadline_s = deadline.as_secs_f64(), "draining: stopped accepting, GOAWAY sent"
        );
        drainer.drain();
        tokio::select! {
            result = &mut running => {
                result?;
                tracing::info!(%listen, "drained: every tunnel finished");
            }
            () = tokio::time::sleep(deadline) => {
                let left = stats.snapshot();
                tracing::warn!(%listen, tunnels = left.tunnels_active, "drain deadline passed; closing what is left");
            }
        }
        Ok(())
    }

    /// Gives a server configuration this process's telemetry.
    pub(super) fn equip(&self, config: &mut ServerConfig) {
        config.telemetry = self.telemetry.clone();
        config.workers = self.workers.clone();
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened for.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// First SIGTERM or Ctrl-C: ask everything to stop. Second: exit now.
async fn handle_signals(
    mut signals: StopSignals,
    requested: watch::Sender<bool>,
    readiness: Readiness,
) {
    signals.next().await;
    readiness.start_draining();
    super::systemd::stopping();
    requested.send_replace(true);
    signals.next().await;
    tracing::warn!("second signal: exiting now");
    super::logwriter::flush_before_exit();
    std::process::exit(130)
}

/// A flag's value as JSON of its own type: switches as booleans, numbers
/// as numbers, durations as seconds (a number); `None` for the rest, which
/// are shown as given.
fn typed_value(matches: &clap::ArgMatches, id: &str) -> Option<serde_json::Value> {
    if let Ok(Some(switch)) = matches.try_get_one::<bool>(id) {
        return Some((*switch).into());
    }
    if let Ok(Some(duration)) = matches.try_get_one::<std::time::Duration>(id) {
        return Some(duration.as_secs_f64().into());
    }
    if let Ok(Some(duration)) = matches.try_get_one::<Option<std::time::Duration>>(id) {
        return Some(duration.map(|d| d.as_secs_f64()).into());
    }
    macro_rules! number {
        ($($t:ty),*) => {$(
            if let Ok(Some(n)) = matches.try_get_one::<$t>(id) {
                return Some((*n).into());
            }
        )*};
    }
    number!(u16, u32, u64, usize, i64);
    None
}

/// Which of a command's flags [`effective_config`] shows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Fields {
    /// Its own: `/config`'s section for the command.
    Own,
    /// Those about the whole process (logs, threads, admin): `/config`'s
    /// top level.
    Global,
}

/// The effective settings of a command, for `/config`: every argument
/// with its value and where the value came from. Values of arguments
/// that could hold secrets are redacted (there are none today: keys are
/// only referenced by path).
pub(super) fn effective_config(
    matches: &clap::ArgMatches,
    command: &clap::Command,
    fields: Fields,
) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let global = arg.get_help_heading() == Some(super::GLOBAL_OPTIONS);
        if global != (fields == Fields::Global) {
            continue;
        }
        let Ok(Some(values)) = matches.try_get_raw(id) else {
            continue;
        };
        let values: Vec<String> = values.map(|v| v.to_string_lossy().into_owned()).collect();
        let name = arg.get_long().unwrap_or(id).to_owned();
        let secret = ["secret", "password", "token"]
            .iter()
            .any(|s| name.contains(s));
        let value = if secret {
            serde_json::Value::from("<redacted>")
        } else if let Some(typed) = typed_value(matches, id) {
            typed
        } else if matches!(arg.get_action(), clap::ArgAction::Append) {
            serde_json::Value::from(values)
        } else {
            serde_json::Value::from(values.join(" "))
        };
        object.insert(name, value);
    }
    serde_json::Value::Object(object)
}

#[cfg(test)]
mod tests {
    use hbone::policy::{IpNet, Policy, Rule};
    use serde_json::json;

    use super::*;

    #[test]
    fn config_shows_the_rules_in_force_under_their_section() {
        let id = "spiffe://td/ns/a/*";
        let handle = PolicyHandle::new(Policy::new(vec![id.parse().unwrap()], Vec::new()));
        let gateway = PolicyInForce {
            section: "gateway",
            handle: handle.clone(),
            flags_rule: Some("flags"),
            targets: false,
        };
        let config = json!({ "log": "info", "gateway": { "listen": "[::]:15009" } });
        let flags_rule = json!({
            "name": "default: loopback only",
            "action": "allow",
            "from": [id],
            "source": [],
            "origin": "flags",
        });
        assert_eq!(
            with_policies(&config, std::slice::from_ref(&gateway)),
            json!({
                "log": "info",
                "gateway": { "listen": "[::]:15009", "policy-rules": [flags_rule] },
            })
        );
        // A replaced policy shows at once; a gateway's rules have no targets.
        handle.replace(Policy::from_rules(vec![
            Rule::deny("nobody from outside")
                .from_networks([IpNet::new([10, 0, 0, 0].into(), 8).unwrap()]),
            Policy::flags_rule(vec![id.parse().unwrap()], Vec::new()),
        ]));
        assert_eq!(
            gateway.to_json(),
            json!([
                {
                    "name": "nobody from outside",
                    "action": "deny",
                    "from": [],
                    "source": ["10.0.0.0/8"],
                    "origin": "policy file",
                },
                flags_rule,
            ])
        );
        // A section the config lacks gets nothing.
        let server = PolicyInForce {
            section: "server",
            ..gateway
        };
        assert_eq!(with_policies(&config, &[server]), config);
    }
}
