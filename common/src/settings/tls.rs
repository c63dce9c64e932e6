//! The TLS material of `tls.*` (`common::tls` uses it): read from its
//! files and checked at start, so a bad file refuses to start naming its key.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{SettingsError, TlsSettings};

/// The TLS material of `tls.*`, read from its files and checked.
#[derive(Debug, Clone, Default)]
pub struct TlsMaterial {
    /// The CA bundle as read (PEM), trusted besides the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The client identity, when both files are set.
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its PKCS#8 key, both PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The same identity as the PKCS#12 lapin's rustls path reads, with a
    /// throwaway password (it never leaves the process).
    pub(crate) pkcs12: Vec<u8>,
    chain_len: usize,
}

/// The password of the PKCS#12 of a [`ClientIdentity`].
pub(crate) const PKCS12_PASSWORD: &str = "in-process";

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.chain_len)
            .finish()
    }
}

fn refuse(key: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn read(key: &str, path: &str) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|e| refuse(key, format!("cannot read {path:?}: {e}")))
}

/// The certificates of a PEM bundle; none, or one that does not parse, is refused.
fn certificates(
    key: &str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, SettingsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            refuse(
                key,
                format!("{path:?} is not a PEM certificate file: {e:?}"),
            )
        })?;
    if certs.is_empty() {
        return Err(refuse(key, format!("{path:?} holds no PEM certificate")));
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Reads and checks the files `tls.*` names: each exists, the CA bundle
    /// holds only certificates usable as trust anchors, the client
    /// certificate and its PKCS#8 key parse and belong together. Either
    /// client file without the other is refused.
    pub fn load(tls: &TlsSettings) -> Result<Self, SettingsError> {
        let set = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
        let ca_pem = match set(&tls.ca_file) {
            Some(path) => {
                let pem = read("tls.ca_file", &path)?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("tls.ca_file", &path, &pem)? {
                    roots.add(cert).map_err(|e| {
                        refuse(
                            "tls.ca_file",
                            format!("{path:?}: not a CA certificate: {e}"),
                        )
                    })?;
                }
                Some(pem)
            }
            None => None,
        };
        let client = match (set(&tls.client_cert_file), set(&tls.client_key_file)) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(refuse(
                    "tls.client_key_file",
                    "must be set with tls.client_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(refuse(
                    "tls.client_cert_file",
                    "must be set with tls.client_key_file",
                ))
            }
            (Some(cert_path), Some(key_path)) => Some(identity(&cert_path, &key_path)?),
        };
        Ok(Self { ca_pem, client })
    }

    /// Whether anything besides the system roots is configured.
    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client.is_none()
    }
}

fn identity(cert_path: &str, key_path: &str) -> Result<ClientIdentity, SettingsError> {
    let cert_pem = read("tls.client_cert_file", cert_path)?;
    let chain = certificates("tls.client_cert_file", cert_path, &cert_pem)?;
    let key_pem = read("tls.client_key_file", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        refuse(
            "tls.client_key_file",
            format!("{key_path:?} is not a PEM private key: {e:?}"),
        )
    })?;
    let PrivateKeyDer::Pkcs8(pkcs8) = &key else {
        return Err(refuse(
            "tls.client_key_file",
            format!("{key_path:?} must be PKCS#8 (BEGIN PRIVATE KEY; openssl pkcs8 -topk8 -nocrypt converts)"),
        ));
    };
    let pkcs12 = pkcs12(&chain, pkcs8).map_err(|e| {
        refuse(
            "tls.client_key_file",
            format!("{key_path:?}: cannot make a PKCS#12 of it: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
        |e| {
            refuse(
                "tls.client_key_file",
                format!("{key_path:?} does not fit {cert_path:?}: {e}"),
            )
        },
    )?;
    Ok(ClientIdentity {
        cert_pem,
        key_pem,
        pkcs12,
        chain_len: chain.len(),
    })
}

fn pkcs12(
    chain: &[CertificateDer<'static>],
    key: &PrivatePkcs8KeyDer<'_>,
) -> Result<Vec<u8>, p12_keystore::error::Error> {
    let certs = chain
        .iter()
        .map(|c| p12_keystore::Certificate::from_der(c.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let entry = p12_keystore::PrivateKeyChain::new(key.secret_pkcs8_der(), b"client", certs);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(
        "client",
        p12_keystore::KeyStoreEntry::PrivateKeyChain(entry),
    );
    store.writer(PKCS12_PASSWORD).write()
}
