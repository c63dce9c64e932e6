//! Logging: human-readable in development, JSON lines in production.

use tracing_subscriber::EnvFilter;

use crate::settings::AppEnv;

/// Installs the global subscriber once; later calls (tests) are no-ops.
pub fn init(env: AppEnv) {
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match env {
        AppEnv::Production => builder.json().flatten_event(true).try_init(),
        AppEnv::Development => builder.try_init(),
    };
}

/// For one-shot commands whose stdout is their answer: logs go to stderr,
/// warnings and errors only unless `RUST_LOG` says otherwise.
pub fn init_for_commands(env: AppEnv) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match env {
        AppEnv::Production => builder.json().flatten_event(true).try_init(),
        AppEnv::Development => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use (a test
/// process may hold a gateway and a worker; they share it).
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 100.0, 1000.0,
                ])
                .expect("buckets")
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_events".into()),
                    &[
                        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0,
                    ],
                )
                .expect("buckets")
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_messages".into()),
                    &[
                        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0,
                    ],
                )
                .expect("buckets")
                .install_recorder()
                .expect("one recorder per process")
        })
        .clone()
}
