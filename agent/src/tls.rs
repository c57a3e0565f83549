//! The TLS library's cryptography: `ring`, the one tonic's TLS already uses, so that the
//! HTTP clients (`reqwest` with `rustls-no-provider`) do not bring a second one.

/// Makes `ring` the process's default rustls provider, once; later calls (and a provider
/// installed before) leave it as it is.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means a provider is installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
