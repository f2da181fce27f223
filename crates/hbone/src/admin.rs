//! The admin endpoint: a small HTTP/1.1 server for operators and
//! orchestrators. Meant for loopback or a pod-internal port, never the
//! public interface: it has no authentication.
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 once every listener is bound; 503 while draining or with an expired certificate |
//! | `GET /metrics` | Prometheus text (OpenMetrics) |
//! | `GET /config` | the effective configuration, JSON, secrets redacted; parts that change at run time (a reloaded policy) as they are now |
//! | `GET /tunnels?limit=N` | open tunnels, oldest first, JSON |
//! | `GET /logging`, `POST /logging?level=FILTER` | read or change the log filter |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::active::ActiveTunnels;
use crate::lifecycle::Telemetry;
use crate::metrics::Metrics;

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an admin connection (keep-alive included) stays open.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// `/tunnels` lists at most this many unless asked for more.
const DEFAULT_TUNNEL_LIMIT: usize = 1000;

/// Changes the process's log filter at run time.
pub trait LogControl: Send + Sync {
    /// The filter in force.
    fn current(&self) -> String;
    /// Replaces the filter; the error says why `filter` is not valid.
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// Whether the process should receive traffic: `/readyz`.
#[derive(Clone, Default, Debug)]
pub struct Readiness {
    inner: Arc<ReadinessState>,
}

#[derive(Default, Debug)]
struct ReadinessState {
    /// Listeners still to be bound.
    pending: AtomicUsize,
    draining: AtomicBool,
    /// Expiry of each identity in use.
    certificates: Mutex<HashMap<String, SystemTime>>,
}

impl Readiness {
    /// Unready until [`Readiness::listener_bound`] was called `listeners` times.
    pub fn new(listeners: usize) -> Self {
        let readiness = Readiness::default();
        readiness.inner.pending.store(listeners, Ordering::Release);
        readiness
    }

    /// Counts one listener as bound; ready once all are (and nothing else
    /// holds readiness back). Returns whether this was the last one.
    pub fn listener_bound(&self) -> bool {
        self.inner
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            == Ok(1)
    }

    /// Unready from now on: orchestrators stop sending new traffic while
    /// open tunnels finish.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Records the certificate `id` uses; an expired one makes us unready.
    pub fn certificate(&self, id: &str, expires: SystemTime) {
        self.inner
            .certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), expires);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        if self.inner.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        let pending = self.inner.pending.load(Ordering::Acquire);
        if pending > 0 {
            return Err(format!("{pending} listener(s) not bound yet"));
        }
        let now = SystemTime::now();
        let certificates = self
            .inner
            .certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((id, _)) = certificates.iter().find(|(_, expires)| **expires <= now) {
            return Err(format!("the certificate of {id} has expired"));
        }
        Ok(())
    }
}

/// What `/config` serves, computed at each request ([`Admin::config_source`]).
pub type ConfigSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin endpoint serves: `Admin::default()` serves `/healthz`
/// and `/readyz`; the `with_*` methods add the rest.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Admin {
    /// Served on `/metrics`; without it that path answers 404.
    pub metrics: Option<Arc<Metrics>>,
    /// Listed on `/tunnels`; without it that path answers 404.
    pub tunnels: Option<Arc<ActiveTunnels>>,
    /// Answers `/readyz`.
    pub readiness: Readiness,
    /// The effective configuration, as JSON, already redacted.
    pub config: Option<serde_json::Value>,
    /// Builds `/config` afresh for each request, for settings that change
    /// while the process runs (a reloaded policy, say); when set, it is
    /// served instead of `config`.
    pub config_source: Option<ConfigSource>,
    /// Read and changed through `/logging`; without it that path answers
    /// 404.
    pub logging: Option<Arc<dyn LogControl>>,
}

impl Admin {
    /// Serves `telemetry`'s metrics on `/metrics` and its open tunnels on
    /// `/tunnels`, those it has.
    #[must_use]
    pub fn with_telemetry(mut self, telemetry: &Telemetry) -> Self {
        self.metrics = telemetry.metrics.clone();
        self.tunnels = telemetry.tunnels.clone();
        self
    }

    /// Serves `metrics` on `/metrics` ([`Admin::metrics`]).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Lists `tunnels` on `/tunnels` (the `tunnels` field).
    #[must_use]
    pub fn with_tunnels(mut self, tunnels: Arc<ActiveTunnels>) -> Self {
        self.tunnels = Some(tunnels);
        self
    }

    /// Sets [`Admin::readiness`].
    #[must_use]
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Serves `config` on `/config` ([`Admin::config`]).
    #[must_use]
    pub fn with_config(mut self, config: serde_json::Value) -> Self {
        self.config = Some(config);
        self
    }

    /// Serves on `/config` what `source` returns at each request
    /// ([`Admin::config_source`]), so that `/config` follows reloads.
    #[must_use]
    pub fn with_config_source(
        mut self,
        source: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.config_source = Some(Arc::new(source));
        self
    }

    /// What `/config` shows now: the source's answer, else the fixed
    /// configuration.
    fn current_config(&self) -> Option<serde_json::Value> {
        match &self.config_source {
            Some(source) => Some(source()),
            None => self.config.clone(),
        }
    }

    /// Serves `/logging` through `logging` (the `logging` field).
    #[must_use]
    pub fn with_logging(mut self, logging: Arc<dyn LogControl>) -> Self {
        self.logging = Some(logging);
        self
    }

    /// Serves on `listener` until the returned future is dropped.
    pub async fn serve(self, listener: TcpListener) {
        let admin = Arc::new(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.answer(request, peer)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                drop(permit);
            });
        }
    }

    fn answer(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let query = request.uri().query().unwrap_or_default();
        let method = request.method();
        let get_only = |allowed: bool, build: &dyn Fn() -> Response<Full<Bytes>>| {
            if allowed {
                build()
            } else {
                method_not_allowed("GET, HEAD")
            }
        };
        let is_get = method == Method::GET || method == Method::HEAD;
        match path {
            "/" => get_only(is_get, &|| {
                text(
                    StatusCode::OK,
                    "hbone admin: /healthz /readyz /metrics /config /tunnels /logging\n".into(),
                )
            }),
            "/healthz" => get_only(is_get, &|| text(StatusCode::OK, "ok\n".into())),
            "/readyz" => get_only(is_get, &|| match self.readiness.check() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }),
            "/metrics" => get_only(is_get, &|| match &self.metrics {
                Some(metrics) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                None => text(StatusCode::NOT_FOUND, "metrics are off\n".into()),
            }),
            "/config" => get_only(is_get, &|| match self.current_config() {
                Some(config) => json(&config),
                None => text(StatusCode::NOT_FOUND, "no configuration to show\n".into()),
            }),
            "/tunnels" => get_only(is_get, &|| self.tunnels(query)),
            "/logging" => self.logging(method, query, peer),
            _ => text(StatusCode::NOT_FOUND, format!("no such path: {path}\n")),
        }
    }

    fn tunnels(&self, query: &str) -> Response<Full<Bytes>> {
        let Some(tunnels) = &self.tunnels else {
            return text(StatusCode::NOT_FOUND, "tunnel tracking is off\n".into());
        };
        let limit = match query_value(query, "limit") {
            None => DEFAULT_TUNNEL_LIMIT,
            Some(n) => match n.parse() {
                Ok(n) => n,
                Err(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("limit must be a number, got {n:?}\n"),
                    );
                }
            },
        };
        let listed: Vec<serde_json::Value> = tunnels
            .list(limit)
            .iter()
            .map(|t| {
                let (sent, received) = t.bytes();
                serde_json::json!({
                    "role": t.role.as_str(),
                    "source": t.source.to_string(),
                    "original_source": t.original_source.map(|o| o.to_string()),
                    "peer_id": t.peer_id.to_string(),
                    "target": t.target,
                    "sent_bytes": sent,
                    "received_bytes": received,
                    "age_seconds": t.age().as_secs_f64(),
                    "opened_at_unix": t.opened_at().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                })
            })
            .collect();
        json(&serde_json::json!({ "total": tunnels.len(), "tunnels": listed }))
    }

    fn logging(&self, method: &Method, query: &str, peer: SocketAddr) -> Response<Full<Bytes>> {
        let Some(logging) = &self.logging else {
            return text(
                StatusCode::NOT_FOUND,
                "log control is not available\n".into(),
            );
        };
        match *method {
            Method::GET | Method::HEAD => text(StatusCode::OK, format!("{}\n", logging.current())),
            Method::POST | Method::PUT => {
                let Some(level) = query_value(query, "level") else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "give the filter as ?level=, e.g. ?level=debug or ?level=info,hbone=trace\n"
                            .into(),
                    );
                };
                match logging.set(&level) {
                    Ok(()) => {
                        tracing::info!(%peer, filter = %level, "log filter changed through the admin endpoint");
                        text(StatusCode::OK, format!("{level}\n"))
                    }
                    Err(why) => text(
                        StatusCode::BAD_REQUEST,
                        format!("bad filter {level:?}: {why}\n"),
                    ),
                }
            }
            _ => method_not_allowed("GET, HEAD, POST, PUT"),
        }
    }
}

/// The value of `key` in a query string, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    respond(StatusCode::OK, "application/json", body)
}

/// A 405 naming in `Allow` every method the path answers (RFC 9110
/// requires the header on a 405).
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed\n".into(),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("level=info%2Chbone%3Dtrace", "level").as_deref(),
            Some("info,hbone=trace")
        );
        assert_eq!(
            query_value("a=1&level=debug", "level").as_deref(),
            Some("debug")
        );
        assert_eq!(query_value("a=1", "level"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn config_comes_from_the_source_at_each_request() {
        assert_eq!(Admin::default().current_config(), None);
        let fixed = Admin::default().with_config(serde_json::json!({"listen": "a"}));
        assert_eq!(
            fixed.current_config(),
            Some(serde_json::json!({"listen": "a"}))
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let live = fixed.with_config_source(
            move || serde_json::json!({ "calls": counted.fetch_add(1, Ordering::SeqCst) + 1 }),
        );
        assert_eq!(live.current_config(), Some(serde_json::json!({"calls": 1})));
        assert_eq!(live.current_config(), Some(serde_json::json!({"calls": 2})));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn readiness_follows_listeners_and_drain() {
        let readiness = Readiness::new(2);
        assert!(readiness.check().is_err());
        readiness.listener_bound();
        readiness.listener_bound();
        assert_eq!(readiness.check(), Ok(()));
        readiness.certificate("spiffe://td/x", SystemTime::now() - Duration::from_secs(1));
        assert!(readiness.check().unwrap_err().contains("expired"));
        readiness.certificate("spiffe://td/x", SystemTime::now() + Duration::from_secs(60));
        readiness.start_draining();
        assert_eq!(readiness.check(), Err("draining".into()));
    }
}
