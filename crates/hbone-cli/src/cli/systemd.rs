//! systemd's readiness protocol (`Type=notify`): READY=1 once every
//! listener is bound, RELOADING=1 then READY=1 around a reload, STOPPING=1
//! when a drain starts. Without `NOTIFY_SOCKET` (not under systemd) each
//! call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot tell systemd our state: {e}");
    }
}

/// Every listener is bound: the service is up.
pub(super) fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload starts; [`reloaded`] ends it.
pub(super) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("cannot read the monotonic clock for systemd: {e}"),
    }
}

/// The reload is done (whether or not the new file was taken).
pub(super) fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// A drain started: no new connections from now on.
pub(super) fn stopping() {
    send(&[NotifyState::Stopping]);
}
