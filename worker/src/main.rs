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
    /// reconciler of SPEC §8, on demand); prints every repair.
    Reconcile {
        /// Only this user (default: every user with a balance loaded in Redis).
        #[arg(long)]
        user: Option<String>,
    },
    /// Inspect and act on dead-lettered messages (queue `<namespace>.dead`).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters (id, original routing key, queue, reason, size); removes nothing.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print one dead letter in full, as JSON.
    Show { id: String },
    /// Republish messages to their original routing key (confirmed), then remove them
    /// from the dead-letter queue. Use after fixing what made them fail.
    Replay {
        /// Envelope ids to replay (repeatable).
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete messages from the dead-letter queue; only those named (or --all).
    Purge {
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run { queues: None }) {
        Command::Migrate => worker::migrate(&configured()).await,
        Command::Dlq { action } => dlq(&configured(), action).await,
        Command::Reconcile { user } => reconcile(configured(), user).await,
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
            s
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}

async fn dlq(settings: &Settings, action: DlqAction) -> anyhow::Result<()> {
    use worker::dlq::{Dlq, Selection};
    let q = Dlq::connect(settings).await?;
    let sel = |ids: Vec<String>, all: bool| {
        if all {
            Selection::All
        } else {
            Selection::Ids(ids)
        }
    };
    let result = match action {
        DlqAction::List { limit } => {
            let list = q.list(limit).await?;
            println!(
                "{:<38} {:<22} {:<16} {:<16} {:>8}",
                "ID", "ROUTING KEY", "QUEUE", "REASON", "BYTES"
            );
            for d in &list {
                println!(
                    "{:<38} {:<22} {:<16} {:<16} {:>8}",
                    d.id, d.routing_key, d.queue, d.reason, d.size
                );
            }
            println!("{} dead letter(s)", list.len());
            Ok(())
        }
        DlqAction::Show { id } => match q.show(&id).await? {
            Some(d) => {
                println!("{}", serde_json::to_string_pretty(&d)?);
                Ok(())
            }
            None => Err(anyhow::anyhow!("no dead letter with id {id}")),
        },
        DlqAction::Replay { ids, all } => {
            let done = q.replay(&sel(ids, all)).await?;
            for d in &done {
                println!("replayed {} -> {}", d.id, d.routing_key);
            }
            println!("{} replayed", done.len());
            Ok(())
        }
        DlqAction::Purge { ids, all } => {
            let done = q.purge(&sel(ids, all)).await?;
            for d in &done {
                println!("purged {}", d.id);
            }
            println!("{} purged", done.len());
            Ok(())
        }
    };
    q.close().await;
    result
}

async fn reconcile(settings: Settings, user: Option<String>) -> anyhow::Result<()> {
    let ctx = worker::startup::Ctx::new(settings)?;
    let repairs = match user {
        Some(u) => worker::reconcile::reconcile_user(&ctx, &u)
            .await?
            .into_iter()
            .collect::<Vec<_>>(),
        None => {
            let s = worker::reconcile::reconcile_all(&ctx).await?;
            println!("checked {} user(s)", s.users);
            s.repairs
        }
    };
    for r in &repairs {
        println!("repaired {}: balance {} -> {}", r.user_id, r.from, r.to);
    }
    println!("{} repaired", repairs.len());
    Ok(())
}
