//! TLS towards PostgreSQL with libpq's `sslmode` semantics: the one rustls client
//! configuration used by every connection of the crate, the SQL connections
//! (through tokio-postgres-rustls, see [`super::connect()`]) as well as the
//! replication connection (`crate::relay::replication`).
//!
//! | mode         | without a CA                  | with a CA                      |
//! |--------------|-------------------------------|--------------------------------|
//! | `Disable`    | no TLS                        | no TLS                         |
//! | `Prefer`     | encrypt, no certificate check | encrypt, no certificate check  |
//! | `Require`    | encrypt, no certificate check | chain must lead to the CA      |
//! | `VerifyCa`   | error                         | chain must lead to the CA      |
//! | `VerifyFull` | error                         | chain, and the name must match |
//!
//! `Require` with a CA behaving like `VerifyCa` is what libpq does when a root
//! certificate is present.
//!
//! `VerifyCa`/`VerifyFull` without a CA are refused rather than falling back to
//! the system's trust store. libpq refuses them too (unless told
//! `sslrootcert=system`), the `OutboxRelay` CRD requires `caSecretRef` for these
//! modes, and for `VerifyCa` the fallback would be close to no check at all: any
//! certificate from any public CA, for any name, would pass.
//!
//! Whether to fall back to plaintext (`Prefer`) is up to the caller, since it
//! happens on the wire before and around the handshake.
//!
//! The CA is taken as PEM bytes, not as a file path: the operator reads it from
//! a Secret, and the worker reads its mounted file once at start-up
//! (`crate::relay::config::Credentials`), so both connections of a worker trust
//! exactly the same certificates.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::PgError;
use crate::api::PgSslMode;

/// The rustls client configuration for an `sslmode`, or `None` for `Disable`.
///
/// `ca_pem` holds the CA certificate(s) to trust, PEM. See the module
/// documentation for what each mode checks. The only error is
/// [`PgError::TlsConfig`]: a verifying mode without a CA, or CA data that is not
/// usable.
pub fn tls_client_config(mode: PgSslMode, ca_pem: Option<&[u8]>) -> Result<Option<ClientConfig>, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let check = match (mode, ca_pem) {
        (PgSslMode::Disable, _) => return Ok(None),
        (PgSslMode::Prefer, _) | (PgSslMode::Require, None) => CertificateCheck::None,
        (PgSslMode::Require | PgSslMode::VerifyCa, Some(pem)) => {
            CertificateCheck::Chain(webpki_verifier(pem, &provider)?)
        }
        (PgSslMode::VerifyFull, Some(pem)) => CertificateCheck::ChainAndName(webpki_verifier(pem, &provider)?),
        (PgSslMode::VerifyCa | PgSslMode::VerifyFull, None) => {
            return Err(PgError::TlsConfig {
                reason: format!("sslmode {mode:?} needs a CA certificate (spec.database.tls.caSecretRef)"),
            });
        }
    };
    let verifier = Arc::new(SslModeVerifier {
        provider: provider.clone(),
        check,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::TlsConfig { reason: e.to_string() })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(config))
}

fn webpki_verifier(pem: &[u8], provider: &Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>, PgError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| PgError::TlsConfig {
            reason: format!("CA certificate is not valid PEM: {e}"),
        })?;
        roots.add(cert).map_err(|e| PgError::TlsConfig {
            reason: format!("CA certificate is unusable: {e}"),
        })?;
    }
    if roots.is_empty() {
        return Err(PgError::TlsConfig {
            reason: "CA data contains no PEM certificate".into(),
        });
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| PgError::TlsConfig { reason: e.to_string() })
}

/// What is checked of the server's certificate.
#[derive(Debug)]
enum CertificateCheck {
    /// `prefer`, and `require` without a CA: encryption without authentication
    /// of the server.
    None,
    /// `verify-ca` (and `require` with a CA): the chain must lead to the CA, but
    /// the certificate need not name the host (servers behind a Service often
    /// carry only their pod's name).
    Chain(Arc<WebPkiServerVerifier>),
    /// `verify-full`: the chain, and the certificate must name the host.
    ChainAndName(Arc<WebPkiServerVerifier>),
}

/// The certificate verifier of every mode. The handshake signatures are checked
/// in all of them, so even without a certificate check the session is bound to
/// the key in whatever certificate the server sent.
#[derive(Debug)]
struct SslModeVerifier {
    provider: Arc<CryptoProvider>,
    check: CertificateCheck,
}

impl ServerCertVerifier for SslModeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            CertificateCheck::None => Ok(ServerCertVerified::assertion()),
            CertificateCheck::ChainAndName(webpki) => {
                webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            CertificateCheck::Chain(webpki) => {
                match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
                    // Name checks run after the chain has been validated, so a name
                    // mismatch implies the chain itself is good.
                    Err(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                    )) => Ok(ServerCertVerified::assertion()),
                    other => other,
                }
            }
        }
    }

    // The same checks WebPkiServerVerifier makes, with the same algorithms (it is
    // built from the same provider), so they need not go through it.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn tls_modes() {
        assert!(tls_client_config(PgSslMode::Disable, None).unwrap().is_none());
        assert!(tls_client_config(PgSslMode::Prefer, None).unwrap().is_some());
        assert!(tls_client_config(PgSslMode::Require, None).unwrap().is_some());
        for mode in [PgSslMode::VerifyCa, PgSslMode::VerifyFull] {
            let e = tls_client_config(mode, None).unwrap_err();
            assert_eq!(e.category(), "TlsConfigInvalid");
            let e = tls_client_config(mode, Some(b"not a certificate")).unwrap_err();
            assert_eq!(e.category(), "TlsConfigInvalid");
        }
    }

    #[test]
    fn ca_is_checked_where_it_is_used() {
        let ca = fixture("ca.crt");
        for mode in [PgSslMode::Require, PgSslMode::VerifyCa, PgSslMode::VerifyFull] {
            assert!(tls_client_config(mode, Some(&ca)).unwrap().is_some(), "{mode:?}");
            let e = tls_client_config(mode, Some(b"not a certificate")).unwrap_err();
            assert_eq!(e.category(), "TlsConfigInvalid", "{mode:?}");
        }
        // Prefer never checks the certificate, so it does not look at the CA.
        assert!(
            tls_client_config(PgSslMode::Prefer, Some(b"not a certificate"))
                .unwrap()
                .is_some()
        );
        assert!(tls_client_config(PgSslMode::Disable, Some(&ca)).unwrap().is_none());
    }
}
