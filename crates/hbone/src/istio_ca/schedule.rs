//! When to ask for the next certificate: at about half of the current one's
//! lifetime, and after a failure sooner, backing off.

use std::time::{Duration, SystemTime};

/// Renewal starts at a point drawn from this share of the lifetime, so a
/// fleet started together does not ask the CA all at once.
const RENEW_AT: (f64, f64) = (0.45, 0.55);

/// The first retry after a failure; each further failure doubles it.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between retries, however many have failed.
pub(super) const MAX_RETRY: Duration = Duration::from_secs(300);

/// How long to wait before renewing a certificate valid from `issued` to
/// `expires`, as seen at `now`; `jitter` in [0, 1) picks the point within
/// [`RENEW_AT`]. Zero once that point has passed.
pub(super) fn renewal_delay(
    issued: SystemTime,
    expires: SystemTime,
    now: SystemTime,
    jitter: f64,
) -> Duration {
    let lifetime = expires.duration_since(issued).unwrap_or_default();
    let share = RENEW_AT.0 + (RENEW_AT.1 - RENEW_AT.0) * jitter.clamp(0.0, 1.0);
    let at = issued + lifetime.mul_f64(share);
    at.duration_since(now).unwrap_or_default()
}

/// The wait after `failures` failed attempts in a row (1 or more): doubling
/// from [`FIRST_RETRY`], capped at [`MAX_RETRY`], and never past the half
/// of what is left before `expires`, so a short certificate still gets its
/// retries in before it runs out.
pub(super) fn retry_delay(failures: u32, now: SystemTime, expires: SystemTime) -> Duration {
    let doubled = FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let capped = doubled.min(MAX_RETRY);
    match expires.duration_since(now) {
        Ok(left) => capped.min((left / 2).max(FIRST_RETRY)),
        Err(_) => capped,
    }
}

/// A number in [0, 1) from the system's random source.
pub(super) fn jitter() -> f64 {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn renewal_comes_at_about_half_the_lifetime() {
        let issued = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let expires = issued + 24 * HOUR;
        let earliest = renewal_delay(issued, expires, issued, 0.0);
        let latest = renewal_delay(issued, expires, issued, 0.999_999);
        assert_eq!(earliest, (24 * HOUR).mul_f64(0.45));
        assert!(latest > (24 * HOUR).mul_f64(0.549) && latest <= (24 * HOUR).mul_f64(0.55));
        // Later in the certificate's life the wait is shorter, and nothing
        // once the point has passed.
        assert_eq!(
            renewal_delay(issued, expires, issued + 6 * HOUR, 0.0),
            (24 * HOUR).mul_f64(0.45) - 6 * HOUR
        );
        assert_eq!(
            renewal_delay(issued, expires, issued + 20 * HOUR, 0.5),
            Duration::ZERO
        );
    }

    #[test]
    fn retries_double_up_to_the_cap() {
        let now = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        let far = now + 24 * HOUR;
        let waits: Vec<u64> = (1..=12)
            .map(|n| retry_delay(n, now, far).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(u32::MAX, now, far), MAX_RETRY);
    }

    #[test]
    fn retries_hurry_as_expiry_nears_and_go_on_after_it() {
        let now = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        assert_eq!(
            retry_delay(10, now, now + Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        // Expired: keep asking at the capped pace.
        assert_eq!(retry_delay(3, now, now - HOUR), Duration::from_secs(4));
        assert_eq!(retry_delay(20, now, now - HOUR), MAX_RETRY);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
