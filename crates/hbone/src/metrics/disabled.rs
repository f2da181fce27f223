//! Built without the `metrics` feature: the same types, uninhabited. No
//! value of them can exist, so every `Option<Arc<Metrics>>` is `None` and
//! the calls behind it compile away, without a `cfg` at each call site.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{DestinationService, Reporter, ResponseFlag, WorkloadMeta};
use crate::identity::SpiffeId;

/// Metrics are not compiled in (enable the `metrics` feature).
#[derive(Debug)]
pub enum Metrics {}

/// Counters of a connection's tunnels; none without the `metrics` feature.
#[derive(Debug, Clone)]
pub enum TunnelCounters {}

/// Byte counters of a relay; none without the `metrics` feature.
#[derive(Debug)]
pub enum RelayBytes {}

/// An open-connection gauge; none without the `metrics` feature.
#[derive(Debug)]
pub enum ConnectionGauge {}

impl Metrics {
    /// See the `metrics` feature's `Metrics::on_scrape`.
    pub fn on_scrape(&self, _hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::tunnel_counters`.
    pub(crate) fn tunnel_counters(
        &self,
        _reporter: Reporter,
        _source: &WorkloadMeta,
        _destination: &WorkloadMeta,
        _service: &DestinationService,
    ) -> TunnelCounters {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::tunnel_failed`.
    pub(crate) fn tunnel_failed(
        &self,
        _reporter: Reporter,
        _source: &WorkloadMeta,
        _destination: &WorkloadMeta,
        _service: &DestinationService,
        _flag: ResponseFlag,
    ) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::handshake`.
    pub(crate) fn handshake(&self, _reporter: Reporter, _succeeded: bool, _took: Duration) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::limit_refused`.
    pub(crate) fn limit_refused(&self, _limit: &'static str) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::policy_decision`.
    pub(crate) fn policy_decision(&self, _rule: &str, _allowed: bool) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::server_connection`.
    pub(crate) fn server_connection(&self) -> ConnectionGauge {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::tunnels_open`.
    pub fn tunnels_open(&self, _clients: i64, _servers: i64) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::certificate`.
    pub fn certificate(&self, _id: &SpiffeId, _expires: SystemTime) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::reload`.
    pub fn reload(&self, _what: &'static str, _succeeded: bool) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::renewal`.
    pub fn renewal(&self, _source: &'static str, _succeeded: bool) {
        match *self {}
    }

    /// See the `metrics` feature's `Metrics::inbound_plaintext`.
    pub fn inbound_plaintext(&self, _mode: &'static str, _total: u64) {
        match *self {}
    }

    pub(crate) fn add_pool(&self, _peer: &SpiffeId, _connections: i64, _streams: i64) {
        match *self {}
    }
}

impl TunnelCounters {
    /// See the `metrics` feature's `TunnelCounters::opened`.
    pub fn opened(&self, _setup: Duration) {
        match *self {}
    }

    /// See the `metrics` feature's `TunnelCounters::ended`.
    pub fn ended(&self, _lifetime: Duration, _broken: bool) {
        match *self {}
    }

    /// See the `metrics` feature's `TunnelCounters::relay_bytes`.
    pub fn relay_bytes(&self) -> Arc<RelayBytes> {
        match *self {}
    }
}

impl RelayBytes {
    /// See the `metrics` feature's `RelayBytes::add`.
    pub fn add(&self, _to_tunnel: u64, _from_tunnel: u64) {
        match *self {}
    }
}
