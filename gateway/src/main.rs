//! The gateway binary: only wiring.

use common::settings::Settings;

// glibc malloc was a fifth of the gateway's CPU under load (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    common::telemetry::init(settings.app_env);
    let shutdown = common::shutdown::on_signal();
    let app = match gateway::startup::Application::build(settings, shutdown).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("gateway failed to start: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = app.run_until_stopped().await {
        eprintln!("gateway stopped with an error: {e:#}");
        std::process::exit(1);
    }
}
