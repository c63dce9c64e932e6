//! TLS to the three stores: the material besides the system roots
//! (`tls.ca_file`, a client identity), read and checked once at start, and
//! the one warning per store that a production process talks plain text.
//!
//! Every store verifies its server against the system roots *and* the CA
//! file: Postgres through sqlx (`sslmode=verify-full`, `common::db`), Redis
//! (`rediss://`, [`redis_client`]) and RabbitMQ (`amqps://`,
//! `amqp::connect`). All run on rustls with the ring provider.

use std::sync::OnceLock;

use base64::Engine;

use crate::settings::tls::PKCS12_PASSWORD;
pub use crate::settings::tls::{ClientIdentity, TlsMaterial};
use crate::settings::{AppEnv, Settings, SettingsError};

static MATERIAL: OnceLock<TlsMaterial> = OnceLock::new();

/// Reads the TLS material once for the process (both binaries call it at
/// start, before any store connects) and logs the plain-text warnings.
pub fn init(settings: &Settings) -> Result<(), SettingsError> {
    let material = TlsMaterial::load(&settings.tls)?;
    crate::amqp::connect::use_tls(crate::amqp::connect::AmqpTls {
        ca_pem: material
            .ca_pem
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        pkcs12: material
            .client
            .as_ref()
            .map(|c| (c.pkcs12.clone(), PKCS12_PASSWORD.to_string())),
    });
    if MATERIAL.set(material).is_ok() {
        for store in plaintext_stores(settings) {
            tracing::warn!(
                store,
                "APP_ENV=production and the {store} URL is plain text (no TLS)"
            );
        }
    }
    Ok(())
}

/// The process's TLS material ([`init`]); none before it runs.
pub fn material() -> &'static TlsMaterial {
    static NONE: TlsMaterial = TlsMaterial {
        ca_pem: None,
        client: None,
    };
    MATERIAL.get().unwrap_or(&NONE)
}

/// The stores a production process reaches in plain text, one name each:
/// `postgres` unless `sslmode` is `require`, `verify-ca` or `verify-full`;
/// `redis` for `redis://` (`rediss://` and a local `unix://` socket are
/// fine); `rabbitmq` when any node of `AMQP_URL` is `amqp://`. Empty outside
/// production: plain text is allowed, only worth a warning there.
pub fn plaintext_stores(settings: &Settings) -> Vec<&'static str> {
    if settings.app_env != AppEnv::Production {
        return Vec::new();
    }
    let mut out = Vec::new();
    if !postgres_requires_tls(&settings.database.url) {
        out.push("postgres");
    }
    if settings.redis.plaintext() {
        out.push("redis");
    }
    let amqp = crate::amqp::connect::node_urls(&settings.amqp.url).unwrap_or_default();
    if amqp.is_empty() || amqp.iter().any(|u| !u.starts_with("amqps://")) {
        out.push("rabbitmq");
    }
    out
}

/// Whether a Postgres URL insists on TLS (`sslmode=require|verify-ca|verify-full`).
pub fn postgres_requires_tls(url: &str) -> bool {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| {
            (k == "sslmode" || k == "ssl-mode")
                && matches!(v, "require" | "verify-ca" | "verify-full")
        })
}

/// A Redis client for `url`: for `rediss://`, one that trusts the system
/// roots plus `tls.ca_file` and presents the client identity when set.
pub fn redis_client(url: &str, material: &TlsMaterial) -> redis::RedisResult<redis::Client> {
    if !url.starts_with("rediss://") || material.is_empty() {
        return redis::Client::open(url);
    }
    let root_cert = match &material.ca_pem {
        Some(ca) => Some(system_roots_with(ca)?),
        None => None,
    };
    let client_tls = material.client.as_ref().map(|c| redis::ClientTlsConfig {
        client_cert: c.cert_pem.clone(),
        client_key: c.key_pem.clone(),
    });
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

/// The system roots as PEM, followed by `ca`: redis-rs trusts a given
/// bundle *instead of* the system roots, so both go in it.
pub(crate) fn system_roots_with(ca: &[u8]) -> redis::RedisResult<Vec<u8>> {
    let found = rustls_native_certs::load_native_certs();
    let mut pem = Vec::new();
    for cert in found.certs {
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem.extend_from_slice(ca);
    if !ca.ends_with(b"\n") {
        pem.push(b'\n');
    }
    Ok(pem)
}

/// lapin's TLS options: the CA bundle added to the system roots, and the
/// client identity.
pub fn amqp_tls_config(material: &TlsMaterial) -> lapin::tcp::OwnedTLSConfig {
    lapin::tcp::OwnedTLSConfig {
        identity: material.client.as_ref().map(|c| lapin::tcp::OwnedIdentity {
            der: c.pkcs12.clone(),
            password: PKCS12_PASSWORD.to_string(),
        }),
        cert_chain: material
            .ca_pem
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;
    use crate::settings::TlsSettings;

    /// A temp dir with a CA, a client certificate it signed (PKCS#8 key),
    /// the same key as PKCS#1/SEC1, another key, and a junk file.
    fn pki() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
        run(&[&["genpkey"][..], &ec, &["-out", "ca.key"]].concat());
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=test ca",
            "-days",
            "2",
            "-out",
            "ca.pem",
        ]);
        run(&[&["genpkey"][..], &ec, &["-out", "client.key"]].concat());
        run(&[
            "req",
            "-new",
            "-key",
            "client.key",
            "-subj",
            "/CN=client",
            "-out",
            "client.csr",
        ]);
        let ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
        std::fs::write(dir.join("client.ext"), ext).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-out",
            "client.pem",
        ]);
        run(&["ec", "-in", "client.key", "-out", "client.sec1.key"]);
        run(&[&["genpkey"][..], &ec, &["-out", "other.key"]].concat());
        std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
        dir
    }

    fn tls(dir: &Path, ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> TlsSettings {
        let path = |f: Option<&str>| f.map(|f| dir.join(f).display().to_string());
        TlsSettings {
            ca_file: path(ca),
            client_cert_file: path(cert),
            client_key_file: path(key),
        }
    }

    #[test]
    fn nothing_set_is_nothing_besides_the_system_roots() {
        let m = TlsMaterial::load(&TlsSettings::default()).unwrap();
        assert!(m.is_empty());
        let blank = TlsSettings {
            ca_file: Some(String::new()),
            ..Default::default()
        };
        assert!(TlsMaterial::load(&blank).unwrap().is_empty());
    }

    #[test]
    fn a_good_ca_and_identity_load_and_the_identity_survives_pkcs12() {
        let dir = pki();
        let m = TlsMaterial::load(&tls(
            &dir,
            Some("ca.pem"),
            Some("client.pem"),
            Some("client.key"),
        ))
        .unwrap();
        assert!(m
            .ca_pem
            .as_ref()
            .unwrap()
            .starts_with(b"-----BEGIN CERTIFICATE-----"));
        let config = amqp_tls_config(&m);
        assert!(config.cert_chain.unwrap().contains("BEGIN CERTIFICATE"));
        let id = config.identity.unwrap();
        let store = p12_keystore::KeyStore::from_pkcs12(&id.der, &id.password).unwrap();
        let (_, chain) = store.private_key_chain().expect("a key in the PKCS#12");
        let key_pem = std::fs::read(dir.join("client.key")).unwrap();
        let PrivateKeyDer::Pkcs8(key) = PrivateKeyDer::from_pem_slice(&key_pem).unwrap() else {
            panic!("genpkey writes PKCS#8")
        };
        assert_eq!(chain.key(), key.secret_pkcs8_der());
        assert_eq!(chain.chain().len(), 1);
    }

    #[test]
    fn bad_files_are_refused_naming_their_key() {
        let dir = pki();
        let cases: [(TlsSettings, &str, &str); 7] = [
            (
                tls(&dir, Some("missing.pem"), None, None),
                "tls.ca_file",
                "cannot read",
            ),
            (
                tls(&dir, Some("junk.pem"), None, None),
                "tls.ca_file",
                "no PEM certificate",
            ),
            (
                tls(&dir, Some("ca.key"), None, None),
                "tls.ca_file",
                "no PEM certificate",
            ),
            (
                tls(&dir, None, Some("client.pem"), None),
                "tls.client_key_file",
                "must be set",
            ),
            (
                tls(&dir, None, None, Some("client.key")),
                "tls.client_cert_file",
                "must be set",
            ),
            (
                tls(&dir, None, Some("client.pem"), Some("other.key")),
                "tls.client_key_file",
                "does not fit",
            ),
            (
                tls(&dir, None, Some("client.pem"), Some("client.sec1.key")),
                "tls.client_key_file",
                "PKCS#8",
            ),
        ];
        for (settings, key, reason) in cases {
            let err = TlsMaterial::load(&settings).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(err.reason.contains(reason), "{err} should say {reason:?}");
        }
        let err =
            TlsMaterial::load(&tls(&dir, None, Some("junk.pem"), Some("client.key"))).unwrap_err();
        assert_eq!(err.key, "tls.client_cert_file", "{err}");
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let mut vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.insert(
            "JWT_SECRET".into(),
            "a-secret-of-at-least-32-bytes-long!!".into(),
        );
        Settings::load_from(Path::new("/nonexistent"), &vars)
    }

    #[test]
    fn the_settings_refuse_a_bad_ca_file_or_amqp_node_at_start() {
        let dir = pki();
        let junk = dir.join("junk.pem").display().to_string();
        let err = settings(&[("APP__TLS__CA_FILE", &junk)]).unwrap_err();
        assert!(
            err.to_string().contains("tls.ca_file") && !err.to_string().contains('\n'),
            "{err}"
        );
        let ca = dir.join("ca.pem").display().to_string();
        let s = settings(&[("APP__TLS__CA_FILE", &ca)]).unwrap();
        assert_eq!(s.tls.ca_file.as_deref(), Some(ca.as_str()));
        let err = settings(&[("AMQP_URL", "amqp://a:5672/%2f,redis://b")]).unwrap_err();
        assert!(err.to_string().contains("AMQP_URL"), "{err}");
        assert!(settings(&[("AMQP_URL", "amqp://a:5672/%2f, amqps://b:5671/%2f")]).is_ok());
    }

    #[test]
    fn plain_text_is_warned_once_per_store_in_production_only() {
        let plain = settings(&[("APP_ENV", "production")]).unwrap();
        assert_eq!(plaintext_stores(&plain), ["postgres", "redis", "rabbitmq"]);
        let dev = settings(&[]).unwrap();
        assert!(plaintext_stores(&dev).is_empty());
        let secure = settings(&[
            ("APP_ENV", "production"),
            (
                "DATABASE_URL",
                "postgres://u@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem",
            ),
            ("REDIS_URL", "rediss://r:6380/2"),
            ("AMQP_URL", "amqps://u:p@a:5671/%2f,amqps://u:p@b:5671/%2f"),
        ])
        .unwrap();
        assert!(plaintext_stores(&secure).is_empty());
        let mixed = settings(&[
            ("APP_ENV", "production"),
            ("DATABASE_URL", "postgres://u@db/app?sslmode=prefer"),
            ("REDIS_URL", "unix:///run/redis.sock"),
            ("AMQP_URL", "amqps://a:5671/%2f,amqp://b:5672/%2f"),
        ])
        .unwrap();
        assert_eq!(plaintext_stores(&mixed), ["postgres", "rabbitmq"]);
    }

    #[test]
    fn postgres_requires_tls_only_for_the_strict_modes() {
        for url in [
            "postgres://h/db?sslmode=require",
            "postgres://h/db?x=1&sslmode=verify-ca",
            "postgres://h/db?sslmode=verify-full",
        ] {
            assert!(postgres_requires_tls(url), "{url}");
        }
        for url in [
            "postgres://h/db",
            "postgres://h/db?sslmode=prefer",
            "postgres://h/db?sslmode=disable",
            "postgres://h/verify-full",
        ] {
            assert!(!postgres_requires_tls(url), "{url}");
        }
    }

    #[test]
    fn a_rediss_client_carries_the_ca_besides_the_system_roots() {
        let dir = pki();
        let m = TlsMaterial::load(&tls(
            &dir,
            Some("ca.pem"),
            Some("client.pem"),
            Some("client.key"),
        ))
        .unwrap();
        let bundle = system_roots_with(m.ca_pem.as_ref().unwrap()).unwrap();
        let parsed = CertificateDer::pem_slice_iter(&bundle)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let system = rustls_native_certs::load_native_certs().certs.len();
        assert_eq!(parsed.len(), system + 1, "every system root and the CA");
        assert!(redis_client("rediss://127.0.0.1:6380/1", &m).is_ok());
        assert!(redis_client("redis://127.0.0.1:6379/1", &m).is_ok());
    }
}
