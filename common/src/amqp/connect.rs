//! The AMQP connection, driven by the tokio runtime the binaries already run.
//!
//! `AMQP_URL` may list several nodes of one RabbitMQ cluster, comma-separated:
//! [`connect`] tries them in order and returns the first that answers, so a
//! caller that reconnects in a loop (the gateway's publisher, the worker's
//! consumers) moves to another node by itself when its node goes away.
//! `amqps://` nodes verify the server against the system roots plus
//! `tls.ca_file` and present the client identity (`common::tls`).

use std::sync::OnceLock;
use std::time::Duration;

/// The TLS material of `amqps://` nodes, given at start (`common::tls::init`):
/// the CA bundle (PEM) trusted besides the system roots, and the client
/// identity as PKCS#12 with its password.
#[derive(Debug, Clone, Default)]
pub struct AmqpTls {
    pub ca_pem: Option<String>,
    pub pkcs12: Option<(Vec<u8>, String)>,
}

static TLS: OnceLock<AmqpTls> = OnceLock::new();

/// Sets the process's AMQP TLS material; the first call wins.
pub fn use_tls(tls: AmqpTls) {
    let _ = TLS.set(tls);
}

/// Bound on one node's connect when others are left to try, so a node that
/// drops packets does not hold up the rest.
const NODE_TIMEOUT: Duration = Duration::from_secs(2);

/// The node URLs of an `AMQP_URL`: comma-separated, each trimmed and each a
/// valid `amqp://` or `amqps://` URL (the reason names the bad one, without
/// its password).
pub fn node_urls(list: &str) -> Result<Vec<&str>, String> {
    let nodes: Vec<&str> = list.split(',').map(str::trim).collect();
    for (i, node) in nodes.iter().enumerate() {
        if node.is_empty() {
            return Err(format!("node {} of the list is empty", i + 1));
        }
        if !(node.starts_with("amqp://") || node.starts_with("amqps://")) {
            return Err(format!(
                "{} must start with amqp:// or amqps://",
                redact(node)
            ));
        }
        if let Err(e) = node.parse::<lapin::uri::AMQPUri>() {
            return Err(format!("{} is not a valid AMQP URL: {e}", redact(node)));
        }
    }
    Ok(nodes)
}

/// A URL without its user and password, for logs.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Opens an AMQP connection driven by tokio (not lapin's default executor)
/// to the first node of `url` that answers.
pub async fn connect(url: &str) -> lapin::Result<lapin::Connection> {
    let nodes = node_urls(url).map_err(|reason| {
        lapin::Error::IOError(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            reason,
        )))
    })?;
    let mut last = None;
    for (i, node) in nodes.iter().enumerate() {
        let attempt = connect_node(node);
        let result = if i + 1 < nodes.len() {
            match tokio::time::timeout(NODE_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(lapin::Error::IOError(std::sync::Arc::new(
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 2 s"),
                ))),
            }
        } else {
            attempt.await
        };
        match result {
            Ok(conn) => {
                if nodes.len() > 1 {
                    tracing::info!(node = %redact(node), index = i, "amqp: connected");
                }
                return Ok(conn);
            }
            Err(e) => {
                if nodes.len() > 1 {
                    tracing::warn!(node = %redact(node), index = i, error = %e, "amqp: node did not answer");
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("node_urls returns at least one node"))
}

async fn connect_node(url: &str) -> lapin::Result<lapin::Connection> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let material = TLS.get().cloned().unwrap_or_default();
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: material
            .pkcs12
            .map(|(der, password)| lapin::tcp::OwnedIdentity { der, password }),
        cert_chain: material.ca_pem,
    };
    lapin::Connection::connect_with_config(url, props, tls).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_split_on_commas_and_trimmed() {
        let list = "amqp://u:p@a:5672/%2f, amqps://u:p@b:5671/vh ,amqp://c";
        assert_eq!(
            node_urls(list).unwrap(),
            ["amqp://u:p@a:5672/%2f", "amqps://u:p@b:5671/vh", "amqp://c"]
        );
        assert_eq!(
            node_urls("amqp://guest:guest@127.0.0.1:5672/%2f")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_bad_node_is_named_without_its_password() {
        let err = node_urls("amqp://a,http://u:secret@b").unwrap_err();
        assert!(err.contains("http://b"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(node_urls("amqp://a,,amqp://b")
            .unwrap_err()
            .contains("node 2"));
        assert!(node_urls("").is_err());
        let err = node_urls("amqp://u:secret@h:notaport").unwrap_err();
        assert!(
            err.contains("not a valid AMQP URL") && !err.contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn redact_drops_the_user_info_only() {
        assert_eq!(redact("amqps://u:p@h:5671/vh"), "amqps://h:5671/vh");
        assert_eq!(redact("amqp://h"), "amqp://h");
    }
}
