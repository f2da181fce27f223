use std::cell::Cell;
use std::time::Duration;

use rustls::CertificateError;

use super::*;
use crate::test_support::{test_id, test_identities};

const DAY: Duration = Duration::from_secs(86_400);

/// The leaf certificate of each identity, all from one CA.
fn leaves<const N: usize>(names: [&str; N]) -> [CertificateDer<'static>; N] {
    test_identities(names).map(|identity| identity.chain()[0].clone())
}

fn at(time: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(time.duration_since(UNIX_EPOCH).unwrap())
}

/// `cache.check` with a verification that counts its calls and answers
/// `verdict`.
fn check(
    cache: &VerifiedChains,
    leaf: &CertificateDer<'_>,
    now: UnixTime,
    calls: &Cell<usize>,
    verdict: Result<(), rustls::Error>,
) -> Result<(), rustls::Error> {
    cache.check(leaf, &[], now, || {
        calls.set(calls.get() + 1);
        verdict
    })
}

#[test]
fn a_chain_accepted_once_is_not_checked_again_while_it_is_valid() {
    let [alice, bob] = leaves(["alice", "bob"]);
    let cache = VerifiedChains::new(&Revocation::default());
    let calls = Cell::new(0);
    let now = UnixTime::now();
    check(&cache, &alice, now, &calls, Ok(())).unwrap();
    check(&cache, &alice, now, &calls, Ok(())).unwrap();
    assert_eq!(calls.get(), 1, "the second handshake reuses the verdict");
    check(&cache, &bob, now, &calls, Ok(())).unwrap();
    assert_eq!(calls.get(), 2, "another chain is checked in full");
    // The same leaf with an intermediate after it is another chain.
    cache
        .check(&alice, std::slice::from_ref(&bob), now, || {
            calls.set(calls.get() + 1);
            Ok::<_, rustls::Error>(())
        })
        .unwrap();
    assert_eq!(calls.get(), 3);
}

#[test]
fn refusals_are_not_kept() {
    let [alice] = leaves(["alice"]);
    let cache = VerifiedChains::new(&Revocation::default());
    let calls = Cell::new(0);
    let now = UnixTime::now();
    let refused = || Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    assert!(check(&cache, &alice, now, &calls, refused()).is_err());
    assert!(check(&cache, &alice, now, &calls, refused()).is_err());
    assert_eq!(calls.get(), 2, "every refusal is a full check");
    assert_eq!(cache.len(), 0);
}

#[test]
fn a_verdict_lapses_when_the_certificate_expires() {
    let [alice] = leaves(["alice"]);
    let not_after = crate::x509::parse(&alice).unwrap().not_after;
    let cache = VerifiedChains::new(&Revocation::default());
    let calls = Cell::new(0);
    check(&cache, &alice, UnixTime::now(), &calls, Ok(())).unwrap();
    check(&cache, &alice, at(not_after), &calls, Ok(())).unwrap();
    assert_eq!(calls.get(), 1, "valid through its notAfter second");
    let expired = Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    let after = at(not_after + Duration::from_secs(1));
    assert!(
        check(&cache, &alice, after, &calls, expired).is_err(),
        "past notAfter the full check runs, and refuses"
    );
    assert_eq!(calls.get(), 2);
}

#[test]
fn a_clock_set_back_checks_anew() {
    let [alice] = leaves(["alice"]);
    let cache = VerifiedChains::new(&Revocation::default());
    let calls = Cell::new(0);
    let now = SystemTime::now();
    check(&cache, &alice, at(now), &calls, Ok(())).unwrap();
    check(
        &cache,
        &alice,
        at(now - Duration::from_secs(60)),
        &calls,
        Ok(()),
    )
    .unwrap();
    assert_eq!(calls.get(), 2);
}

#[test]
fn fail_closed_lists_bound_every_verdict_by_their_next_update() {
    let ca = crate::ca::DevCa::generate("cluster.local", DAY).unwrap();
    let alice = ca
        .issue(&test_id("alice"), DAY)
        .unwrap()
        .identity()
        .unwrap();
    let alice = alice.chain()[0].clone();
    let crl = ca.crl(&[], 1, Duration::from_secs(3_600)).unwrap();
    let lists = Revocation::from_bytes(crl.as_bytes(), "crl.pem").unwrap();
    let next_update = lists.verdicts_lapse();
    assert_eq!(
        next_update, None,
        "lists that do not fail closed set no bound"
    );
    let lists = lists.with_fail_closed(true);
    let next_update = lists.verdicts_lapse().expect("a bound");

    let cache = VerifiedChains::new(&lists);
    let calls = Cell::new(0);
    check(&cache, &alice, UnixTime::now(), &calls, Ok(())).unwrap();
    let before = at(next_update - Duration::from_secs(1));
    check(&cache, &alice, before, &calls, Ok(())).unwrap();
    assert_eq!(calls.get(), 1);
    let expired_list = Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    assert!(check(&cache, &alice, at(next_update), &calls, expired_list).is_err());
    assert_eq!(
        calls.get(),
        2,
        "from nextUpdate on the lists are consulted again"
    );
}

#[test]
fn the_cache_stays_within_its_capacity() {
    let cache = VerifiedChains::new(&Revocation::default());
    let key = |n: usize| {
        let mut key = [0; 32];
        key[..8].copy_from_slice(&(n as u64).to_be_bytes());
        key
    };
    let verdict = |lapses| Verdict {
        checked: 100,
        lapses,
    };
    // Half of them lapsed by the time the cache fills.
    for n in 0..CAPACITY {
        cache.keep(key(n), verdict(if n % 2 == 0 { 150 } else { 50 }));
    }
    assert_eq!(cache.len(), CAPACITY);
    cache.keep(key(CAPACITY), verdict(150));
    assert_eq!(cache.len(), CAPACITY / 2 + 1, "lapsed verdicts went first");
    for n in CAPACITY + 1..2 * CAPACITY {
        cache.keep(key(n), verdict(150));
    }
    assert!(cache.len() <= CAPACITY, "{}", cache.len());
    assert!(cache.lookup(&key(2 * CAPACITY - 1)).is_some());
}
