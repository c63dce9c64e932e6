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
