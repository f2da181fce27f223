//! One lifecycle per tunnel: the access record, the Istio counters and the
//! open-tunnel entry of a tunnel that opened, kept together and recorded
//! exactly once, however the tunnel ends.
//!
//! A [`TunnelLifecycle`] is made when a tunnel is answered 200 (server) or
//! opened (entries); it counts the tunnel opened and lists it. The relay
//! reports progress as bytes move and finishes it with the relay's result.
//! A lifecycle dropped unfinished (its task cancelled at a drain deadline,
//! the runtime shutting down) still writes its record, as ended before its
//! relay did, and counts the tunnel closed as broken.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::access::{AccessLog, End, Outcome, Role, TunnelRecord};
use crate::active::{ActiveTunnels, Registration, TunnelInfo};
use crate::headers::TraceParent;
use crate::metrics::{Metrics, TunnelCounters};
use crate::relay::{CopyError, Transferred};

/// What a server or dialer reports to, beyond its access log. Both parts
/// are optional: without them nothing is counted or tracked. A dialer
/// counts its handshakes and pooled connections; the tunnels themselves
/// are counted by whatever relays them: the server and the entries, or a
/// [`TunnelLifecycle`] for a [`crate::Tunnel`] an application relays.
///
/// `Telemetry::default()` reports nothing; add parts with the `with_*`
/// methods.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Telemetry {
    /// Prometheus metrics (the `metrics` feature).
    pub metrics: Option<Arc<Metrics>>,
    /// Open tunnels, for `/tunnels`.
    pub tunnels: Option<Arc<ActiveTunnels>>,
}

impl Telemetry {
    /// Counts into `metrics` ([`Telemetry::metrics`]).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Lists open tunnels in `tunnels` ([`Telemetry::tunnels`]).
    #[must_use]
    pub fn with_tunnels(mut self, tunnels: Arc<ActiveTunnels>) -> Self {
        self.tunnels = Some(tunnels);
        self
    }
}

/// Why a lifecycle dropped unfinished is recorded as failed.
const CUT_SHORT: &str = "tunnel ended before its relay finished (drain deadline or shutdown)";

/// The bookkeeping of one open tunnel. Finish it with
/// [`TunnelLifecycle::finish`]; dropping it unfinished records it as cut
/// short.
pub struct TunnelLifecycle {
    record: Box<TunnelRecord>,
    started: Instant,
    log: Arc<dyn AccessLog>,
    counters: Option<Arc<TunnelCounters>>,
    registration: Option<Registration>,
    /// Whether the relay's local side is the tunnel's source: the
    /// application for a client; for a server the source is across the
    /// tunnel and the local side is the target.
    local_is_source: bool,
    recorded: bool,
}

impl std::fmt::Debug for TunnelLifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelLifecycle")
            .field("record", &self.record)
            .field("recorded", &self.recorded)
            .finish_non_exhaustive()
    }
}

impl TunnelLifecycle {
    /// Starts the lifecycle of a tunnel that has just opened, `started`
    /// being when it was asked for: counts it opened and lists it.
    pub(crate) fn open(
        record: Box<TunnelRecord>,
        started: Instant,
        log: Arc<dyn AccessLog>,
        telemetry: &Telemetry,
        counters: Option<Arc<TunnelCounters>>,
    ) -> Self {
        if let Some(counters) = &counters {
            counters.opened(started.elapsed());
        }
        let registration = telemetry.tunnels.as_ref().map(|tunnels| {
            tunnels.register(TunnelInfo {
                role: record.role,
                source: record.source,
                original_source: record.original_source,
                peer_id: record
                    .peer_id
                    .clone()
                    .unwrap_or_else(|| record.local_id.clone()),
                target: record.target.clone(),
            })
        });
        TunnelLifecycle {
            local_is_source: record.role == Role::Client,
            record,
            started,
            log,
            counters,
            registration,
            recorded: false,
        }
    }

    /// The lifecycle of a tunnel an application relays itself: a client
    /// record from `source` to `target` through `tunnel`, logged to `log`
    /// and counted in the dialer's telemetry.
    pub fn for_tunnel(
        dialer: &crate::Dialer,
        tunnel: &crate::Tunnel,
        source: SocketAddr,
        target: SocketAddr,
        log: Arc<dyn AccessLog>,
        started: Instant,
    ) -> Self {
        let record = Box::new(TunnelRecord {
            role: Role::Client,
            source,
            peer_id: Some(tunnel.peer_arc()),
            local_id: dialer.local_id_arc(),
            target: target.to_string(),
            original_source: None,
            gateway: None,
            trace: None,
            outcome: Outcome::Completed,
            bytes_sent: 0,
            bytes_received: 0,
            duration: std::time::Duration::ZERO,
        });
        Self::open(
            record,
            started,
            log,
            dialer.telemetry(),
            tunnel.counters().cloned(),
        )
    }

    /// Records `trace` as the tunnel's trace context: the one its CONNECT
    /// carried, so that both ends log the same trace id.
    pub fn with_trace(mut self, trace: TraceParent) -> Self {
        self.record.trace = Some(trace);
        self
    }

    /// Records the gateway a double-HBONE tunnel went through, so the
    /// record shows the route was not direct.
    pub fn with_gateway(mut self, gateway: Option<SocketAddr>) -> Self {
        self.record.gateway = gateway;
        self
    }

    /// The tunnel's Istio byte counters, for a relay to add to as bytes
    /// move.
    pub(crate) fn counters(&self) -> Option<&Arc<TunnelCounters>> {
        self.counters.as_ref()
    }

    /// Notes the bytes moved so far (for the record, should the tunnel be
    /// cut short) and publishes them to the open-tunnel list.
    pub fn progress(&mut self, moved: Transferred) {
        self.set_bytes(moved);
        if let Some(registration) = &self.registration {
            registration.update(moved, self.local_is_source);
        }
    }

    /// Records how the relay ended: the access record, the closed counter
    /// (as broken when it failed) and the end of the open-tunnel entry.
    pub fn finish(mut self, result: Result<Transferred, &CopyError>) {
        match result {
            Ok(moved) => self.set_bytes(moved),
            Err(error) => {
                self.set_bytes(error.transferred);
                self.record.outcome = Outcome::Failed {
                    end: End::of(&error.error),
                    detail: error.to_string(),
                };
            }
        }
        self.record_once();
    }

    /// Records a tunnel that failed before any byte was relayed.
    pub(crate) fn fail(mut self, end: End, why: String) {
        self.record.outcome = Outcome::Failed { end, detail: why };
        self.record_once();
    }

    /// Istio's convention, from this proxy's side: received from the
    /// source side, sent back to it.
    fn set_bytes(&mut self, moved: Transferred) {
        let (received, sent) = if self.local_is_source {
            (moved.to_tunnel, moved.from_tunnel)
        } else {
            (moved.from_tunnel, moved.to_tunnel)
        };
        self.record.bytes_sent = sent;
        self.record.bytes_received = received;
    }

    fn record_once(&mut self) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.record.duration = self.started.elapsed();
        self.log.record(&self.record);
        if let Some(counters) = &self.counters {
            let broken = matches!(self.record.outcome, Outcome::Failed { .. });
            counters.ended(self.record.duration, broken);
        }
    }
}

impl Drop for TunnelLifecycle {
    fn drop(&mut self) {
        if !self.recorded {
            self.record.outcome = Outcome::Failed {
                end: End::DrainDeadline,
                detail: CUT_SHORT.to_owned(),
            };
            self.record_once();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::identity::SpiffeId;

    #[derive(Default)]
    struct Kept(Mutex<Vec<TunnelRecord>>);

    impl AccessLog for Kept {
        fn record(&self, record: &TunnelRecord) {
            self.0.lock().unwrap().push(record.clone());
        }
    }

    fn record(role: Role) -> Box<TunnelRecord> {
        Box::new(TunnelRecord {
            role,
            source: "127.0.0.1:1".parse().unwrap(),
            peer_id: None,
            local_id: Arc::new(SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap()),
            target: "127.0.0.1:2".into(),
            original_source: None,
            gateway: None,
            trace: None,
            outcome: Outcome::Completed,
            bytes_sent: 0,
            bytes_received: 0,
            duration: std::time::Duration::ZERO,
        })
    }

    fn open(role: Role, log: &Arc<Kept>) -> TunnelLifecycle {
        let telemetry = Telemetry {
            tunnels: Some(Arc::default()),
            ..Telemetry::default()
        };
        TunnelLifecycle::open(record(role), Instant::now(), log.clone(), &telemetry, None)
    }

    #[test]
    fn finished_is_recorded_once_with_bytes_by_direction() {
        let log = Arc::new(Kept::default());
        let moved = Transferred {
            to_tunnel: 100,
            from_tunnel: 10_000,
        };
        // A server's local side is the target: to_tunnel is sent back to
        // the source. An entry's local side is the application: to_tunnel is received
        // from the source.
        open(Role::Server, &log).finish(Ok(moved));
        open(Role::Client, &log).finish(Ok(moved));
        let records = log.0.lock().unwrap();
        assert_eq!(records.len(), 2);
        let bytes = |r: &TunnelRecord| (r.bytes_sent, r.bytes_received);
        assert_eq!(bytes(&records[0]), (100, 10_000));
        assert_eq!(bytes(&records[1]), (10_000, 100));
        assert!(records.iter().all(|r| r.outcome == Outcome::Completed));
    }

    #[test]
    fn dropped_unfinished_is_recorded_as_cut_short() {
        let log = Arc::new(Kept::default());
        let mut lifecycle = open(Role::Server, &log);
        lifecycle.progress(Transferred {
            to_tunnel: 5,
            from_tunnel: 7,
        });
        drop(lifecycle);
        let failed = TunnelLifecycle::fail;
        failed(
            open(Role::Client, &log),
            End::ClientGone,
            "client went away".into(),
        );
        let records = log.0.lock().unwrap();
        assert_eq!(records.len(), 2, "one record each, no more");
        assert_eq!(
            records[0].outcome,
            Outcome::Failed {
                end: End::DrainDeadline,
                detail: CUT_SHORT.into()
            }
        );
        assert_eq!((records[0].bytes_sent, records[0].bytes_received), (5, 7));
        assert_eq!(
            records[1].outcome,
            Outcome::Failed {
                end: End::ClientGone,
                detail: "client went away".into()
            }
        );
    }
}
