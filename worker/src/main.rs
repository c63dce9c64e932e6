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
    /// Load demo data through a running gateway (dev tokens must be on):
    /// sessions, usage over several days, credit grants and spends.
    Demo {
        /// Gateway base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        #[arg(long, default_value_t = 10)]
        users: usize,
        /// Days of history (at most 30: usage/track's acceptance window).
        #[arg(long, default_value_t = 14)]
        days: u32,
        #[arg(long, default_value_t = 40)]
        events_per_day: usize,
        /// Demo users are PREFIX0, PREFIX1, ...
        #[arg(long, default_value = "demo_user_")]
        user_prefix: String,
    },
    /// Compare Redis balances with the Postgres ledger and repair drift (the
    /// reconciler of docs/architecture.md, on demand); prints every repair.
    Reconcile {
        /// Only this user (default: every user with a balance loaded in Redis).
        #[arg(long)]
        user: Option<String>,
    },
    /// Inspect and act on dead-lettered messages (queue `<namespace>.dead`).
    Dlq {
        #[command(subcommand)]
        action: worker::cli::dlq::DlqAction,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run { queues: None }) {
        Command::Migrate => worker::migrate(&configured()).await,
        Command::Dlq { action } => worker::cli::dlq::run(&configured(), action).await,
        Command::Reconcile { user } => worker::cli::reconcile::run(configured(), user).await,
        Command::Demo {
            gateway,
            users,
            days,
            events_per_day,
            user_prefix,
        } => {
            // It talks to a gateway over HTTP only, so it needs no
            // configuration and runs from any shell (dev.sh prints the line).
            common::telemetry::init(common::settings::AppEnv::Development);
            let plan = worker::demo::DemoPlan {
                gateway,
                users,
                days,
                events_per_day,
                user_prefix,
            };
            worker::demo::load(&plan).await.map(|r| {
                println!(
                    "demo: {} users, {} usage events, {} grants, {} consumes",
                    r.users, r.events, r.grants, r.consumes
                );
            })
        }
        Command::Run { queues } => {
            let mut settings = configured();
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

/// The settings, with logging set up; a bad configuration exits 2 with one
/// line naming the key.
fn configured() -> Settings {
    match Settings::load() {
        Ok(s) => {
            common::telemetry::init(s.app_env);
            if let Err(e) = common::tls::init(&s) {
                eprintln!("{e}");
                std::process::exit(2);
            }
            s
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}
