//! The worker binary: `worker run [--queues ...]` (default) and `worker migrate`.

use clap::{Parser, Subcommand};
use common::settings::Settings;

#[derive(Parser)]
#[command(
    name = "worker",
    about = "Consumes gateway events into Postgres and refreshes Redis caches"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume events (the default).
    Run {
        /// Queues to consume, comma separated: usage,credits,sessions,users.
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
    },
    /// Apply migrations/ and exit (idempotent).
    Migrate,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mut settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    common::telemetry::init(settings.app_env);
    let result = match cli.command.unwrap_or(Command::Run { queues: None }) {
        Command::Migrate => worker::migrate(&settings).await,
        Command::Run { queues } => {
            if let Some(q) = queues {
                settings.worker.queues = q;
                if let Err(e) = settings.validate() {
                    eprintln!("{e}");
                    std::process::exit(2);
                }
            }
            let shutdown = common::shutdown::on_signal();
            match worker::startup::Worker::build(settings, shutdown).await {
                Ok(w) => w.run_until_stopped().await,
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("worker: {e:#}");
        std::process::exit(1);
    }
}
