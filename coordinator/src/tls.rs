//! TLS (rustls, `ring` provider) for every listener, with optional mutual
//! TLS, and the matching client configuration.
//!
//! The server side is loaded once from PEM files ([`ServerTlsFiles::load`])
//! into a [`ServerTls`] that carries both the gRPC configuration (tonic) and
//! an acceptor for the plain-HTTP `/metrics` listener, so both listeners
//! present the same certificate and, with `client_ca`, demand a client
//! certificate signed by that CA. Problems are reported before anything
//! binds, naming the file and what is wrong with it.
//!
//! Certificates are verified the usual webpki way: clients check the
//! server's name (a DNS name or an IP address in its subjectAltName)
//! against the endpoint they dialled, or against
//! [`ClientTlsFiles::domain`] when set.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::CoordinatorError;

/// Where the server's certificate, key and (for mutual TLS) client CA are.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s); when set, every client must present a
    /// certificate signed by one of them (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A loaded server TLS configuration for the gRPC and metrics listeners.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) grpc: ServerTlsConfig,
    pub(crate) metrics: tokio_rustls::TlsAcceptor,
    /// Whether clients must present a certificate.
    pub mutual: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, what: impl fmt::Display) -> CoordinatorError {
    CoordinatorError::InvalidArgument(format!("TLS file {}: {what}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, CoordinatorError> {
    std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))
}

/// Every certificate in a PEM file; at least one.
fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CoordinatorError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(path, "no CERTIFICATE section found"));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CoordinatorError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| bad(path, format!("no usable private key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTlsFiles {
    /// Reads and checks the files and builds both listeners' configurations.
    pub fn load(&self) -> Result<ServerTls, CoordinatorError> {
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let chain = certs(&self.cert, &cert_pem)?;
        let key = private_key(&self.key, &key_pem)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| CoordinatorError::Internal(format!("rustls: {e}")))?;
        let mut grpc = ServerTlsConfig::new().identity(Identity::from_pem(&cert_pem, &key_pem));
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let ca_pem = read(ca)?;
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca, &ca_pem)? {
                    roots
                        .add(c)
                        .map_err(|e| bad(ca, format!("not a usable CA certificate: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| bad(ca, e))?;
                grpc = grpc.client_ca_root(Certificate::from_pem(&ca_pem));
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut metrics = builder.with_single_cert(chain, key).map_err(|e| {
            bad(
                &self.key,
                format!("does not match {}: {e}", self.cert.display()),
            )
        })?;
        metrics.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            grpc,
            metrics: tokio_rustls::TlsAcceptor::from(Arc::new(metrics)),
            mutual: self.client_ca.is_some(),
        })
    }
}

/// What a client (worker, CLI, test) trusts and presents.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM certificate and key presented for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name to verify the server certificate against instead of the
    /// endpoint's host.
    pub domain: Option<String>,
}

impl ClientTlsFiles {
    /// The tonic client configuration (endpoints must use `https://`).
    pub fn load(&self) -> Result<ClientTlsConfig, CoordinatorError> {
        let ca_pem = read(&self.ca)?;
        certs(&self.ca, &ca_pem)?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = &self.identity {
            let (cert_pem, key_pem) = (read(cert)?, read(key)?);
            certs(cert, &cert_pem)?;
            private_key(key, &key_pem)?;
            cfg = cfg.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}
