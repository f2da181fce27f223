//! The one crypto provider compiled in, shared by the TLS configurations
//! and by identity loading (which checks that a key matches its
//! certificate with it).

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The one crypto provider compiled in: aws-lc-rs limited to the TLS 1.3
/// AES-GCM suites that ztunnel offers.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
            let mut provider = default_provider();
            provider.cipher_suites = vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
            ];
            Arc::new(provider)
        })
        .clone()
}
