//! Certificate chains a verifier has accepted, so that a peer that
//! handshakes again with the same certificates is not checked twice for
//! what cannot have changed.
//!
//! A TLS 1.3 handshake with mutual authentication verifies four
//! signatures: each side checks the CA's signature on the other's
//! certificate and the other's CertificateVerify. The second proves that
//! the peer holds its key now and is checked every time; the first
//! depends only on the certificates' bytes, the trust anchors, the
//! revocation lists and the clock. Trust anchors and revocation lists
//! never change under a verifier (a reload builds a new verifier, with an
//! empty cache), so a chain accepted once is accepted again until the
//! earliest `notAfter` among its certificates and, where an expired
//! revocation list refuses handshakes, the earliest `nextUpdate`: until
//! then a hit is the verdict a new check would give. Only acceptances are
//! kept, and the identity checks that follow the chain's run every time.
//!
//! On 2 CPUs, P-256 arithmetic was about a quarter of the CPU of a new
//! mTLS connection, most of it in verifying; skipping the chain's check on
//! a repeat visit takes one of the two verifications off each side.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, UnixTime};

use crate::revocation::Revocation;

/// The most chains kept. A node's peers are its mesh's workloads; past
/// this many distinct chains, verdicts that have lapsed are dropped, and
/// if none has, all are (each chain is then checked in full again once).
const CAPACITY: usize = 1024;

/// A SHA-256 of a chain's certificates, each length-prefixed.
type ChainKey = [u8; 32];

/// The chains a verifier accepted, with how long each verdict holds.
#[derive(Debug)]
pub(crate) struct VerifiedChains {
    /// Seconds since the epoch from which no verdict holds, whatever the
    /// chain: the earliest `nextUpdate` of revocation lists that refuse
    /// handshakes once expired.
    lists_expire: Option<u64>,
    chains: Mutex<HashMap<ChainKey, Verdict>>,
}

/// When an accepted chain was checked and until when the acceptance
/// holds, in seconds since the epoch (the resolution of certificates'
/// validity).
#[derive(Debug, Clone, Copy)]
struct Verdict {
    checked: u64,
    /// The first second at which it no longer holds.
    lapses: u64,
}

impl Verdict {
    /// Whether the verdict holds at `now`. A clock set back to before the
    /// check is not trusted to leave `notBefore` behind: it checks anew.
    fn holds(self, now: u64) -> bool {
        self.checked <= now && now < self.lapses
    }
}

impl VerifiedChains {
    /// An empty cache for a verifier that checks against `revocation`.
    pub(crate) fn new(revocation: &Revocation) -> Self {
        VerifiedChains {
            lists_expire: revocation.verdicts_lapse().map(seconds),
            chains: Mutex::new(HashMap::new()),
        }
    }

    /// `verify` (the full check of the chain `end_entity` + `intermediates`
    /// at `now`) unless that very chain passed it before and the verdict
    /// still holds. Its errors come back as they were.
    pub(crate) fn check<T>(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<T, rustls::Error>,
    ) -> Result<(), rustls::Error> {
        let now = now.as_secs();
        let key = chain_key(end_entity, intermediates);
        if self.lookup(&key).is_some_and(|verdict| verdict.holds(now)) {
            return Ok(());
        }
        verify()?;
        // A chain verify accepted parses; one that somehow does not is
        // simply not kept.
        if let Some(lapses) = self.lapses(end_entity, intermediates) {
            self.keep(
                key,
                Verdict {
                    checked: now,
                    lapses,
                },
            );
        }
        Ok(())
    }

    fn lookup(&self, key: &ChainKey) -> Option<Verdict> {
        self.chains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn keep(&self, key: ChainKey, verdict: Verdict) {
        let mut chains = self.chains.lock().unwrap_or_else(|e| e.into_inner());
        if chains.len() >= CAPACITY && !chains.contains_key(&key) {
            chains.retain(|_, kept| kept.holds(verdict.checked));
            if chains.len() >= CAPACITY {
                chains.clear();
            }
        }
        chains.insert(key, verdict);
    }

    /// The first second at which the chain's acceptance no longer holds:
    /// its earliest `notAfter` passed, or the revocation lists expired.
    fn lapses(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<u64> {
        let mut lapses = self.lists_expire.unwrap_or(u64::MAX);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            let info = crate::x509::parse(cert).ok()?;
            // Valid through the second of `notAfter` itself.
            lapses = lapses.min(seconds(info.not_after).saturating_add(1));
        }
        Some(lapses)
    }

    #[cfg(all(test, feature = "ca"))]
    fn len(&self) -> usize {
        self.chains.lock().unwrap().len()
    }
}

fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> ChainKey {
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        digest.update(&(cert.len() as u64).to_be_bytes());
        digest.update(cert);
    }
    let mut key = [0; 32];
    key.copy_from_slice(digest.finish().as_ref());
    key
}

/// Seconds since the epoch; zero before it.
fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(all(test, feature = "ca"))]
mod tests;
