//! TLS configurations for both sides, built on rustls with the ring provider.

use crate::{Result, WireError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::sync::Arc;

/// ALPN protocol name PostgreSQL 17+ clients use for direct SSL.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(context: &str, err: impl std::fmt::Display) -> WireError {
    WireError::Tls(format!("{context}: {err}"))
}

/// The server configuration clients see, from a PEM certificate chain and private key.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|err| tls_error("certificate", err))?;
    if certs.is_empty() {
        return Err(WireError::Tls(
            "certificate file holds no certificate".into(),
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| tls_error("private key", err))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| tls_error("protocol versions", err))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| tls_error("certificate and key", err))?;
    // Offered to every client. A client that sends no ALPN still connects via SSLRequest;
    // direct SSL additionally requires it (checked after the handshake).
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// How pgbastion verifies the upstream's certificate.
#[derive(Debug, Clone)]
pub enum UpstreamTlsMode {
    Disable,
    /// Encrypt without verifying the certificate (libpq's `sslmode=require`).
    Require(Arc<ClientConfig>),
    /// Verify the chain against the CA and the host name (libpq's `sslmode=verify-full`).
    VerifyFull(Arc<ClientConfig>),
}

pub fn upstream_require() -> Result<UpstreamTlsMode> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| tls_error("protocol versions", err))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(UpstreamTlsMode::Require(Arc::new(config)))
}

pub fn upstream_verify_full(ca_pem: &[u8]) -> Result<UpstreamTlsMode> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|err| tls_error("CA certificate", err))?;
        roots
            .add(cert)
            .map_err(|err| tls_error("CA certificate", err))?;
    }
    if roots.is_empty() {
        return Err(WireError::Tls("CA file holds no certificate".into()));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| tls_error("protocol versions", err))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(UpstreamTlsMode::VerifyFull(Arc::new(config)))
}

/// `sslmode=require`: any certificate, but the handshake's signatures are still checked so the
/// session keys belong to whoever holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
