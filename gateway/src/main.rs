//! The gateway binary: only wiring. `gateway` (or `gateway serve`) serves
//! HTTP; `gateway admin ...` runs one operator action and exits.

use clap::{Args, Parser, Subcommand};
use common::settings::Settings;
use gateway::operator::{self, Operator};

#[derive(Parser)]
#[command(
    name = "gateway",
    about = "The HTTP gateway: authenticates, rate-limits, answers from Redis, publishes to RabbitMQ",
    long_about = "The HTTP gateway: authenticates, rate-limits, answers from Redis, publishes \
                  to RabbitMQ.\n\nWith no subcommand it serves HTTP on GATEWAY_LISTEN until \
                  SIGTERM or Ctrl-C. Configuration comes from config/*.toml and the environment \
                  (README.md, Configuration), for the subcommands too: run them with the gateways' environment, \
                  so they act on the same Postgres, Redis and key prefix."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Operator actions through the same audited path as the admin routes.
    #[command(
        long_about = "Operator actions through the same audited path as the admin \
                            routes (POST /api/admin/...): the Postgres change and its audit_log \
                            row commit together, then Redis is updated, exactly as for the API. \
                            Differences: an unknown user id is refused (never provisioned), and \
                            the audit actor is `operator` or `operator:NAME`. Prints what it did \
                            and the audit request id. Exits 1 with one line on stderr when it \
                            refused (bad input, unknown user: nothing is changed) or a \
                            dependency failed (Postgres or Redis down: re-run it; with \
                            --idempotency-key a grant applies once however often it is run)."
    )]
    Admin(Admin),
    /// Print the OpenAPI document (as GET /openapi.json serves it with this
    /// configuration) to stdout; clients/typescript is generated from it.
    Openapi,
}

#[derive(Args)]
struct Admin {
    /// Who is acting, recorded in the audit trail as `operator:NAME`
    /// (default: `operator`). 1..=64 of [A-Za-z0-9_.@-].
    #[arg(long, global = true, value_name = "NAME")]
    actor: Option<String>,
    #[command(subcommand)]
    action: AdminAction,
}

#[derive(Subcommand)]
enum AdminAction {
    /// Grant credits to a user: a `grant` ledger row and a `credits.grant`
    /// audit row, spendable at once.
    #[command(long_about = "Grant credits to a user, as POST \
                            /api/admin/users/USER/credits/grant: one `grant` row in the \
                            credit_transactions ledger and one `credits.grant` audit_log row \
                            (amount, reason, transaction id) in one transaction, then the amount \
                            is added to the user's Redis balance, so it is spendable at once. \
                            Prints the transaction id and the new balance.\n\nWith \
                            --idempotency-key, running the same command again grants nothing new \
                            and prints the first transaction (the same key with another amount \
                            or reason is refused).")]
    Grant {
        /// The user's id (the token's `sub`); must already exist.
        #[arg(long, value_name = "USER_ID")]
        user: String,
        /// Credits to add: an integer from 1 to 2^53-1.
        #[arg(long, allow_negative_numbers = true)]
        amount: i64,
        /// Why (kept in the ledger row and the audit row): 1..=500 characters.
        #[arg(long)]
        reason: String,
        /// Makes a retried command grant once (as the route's Idempotency-Key).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Change a user's plan: a `user.plan` audit row; every gateway applies
    /// the plan's rate limits within 5 s.
    #[command(
        long_about = "Change a user's plan, as PUT /api/admin/users/USER/plan: \
                            users.plan and a `user.plan` audit_log row (plan and previous plan) \
                            in one transaction, then the user's Redis record, so every gateway \
                            applies the plan's rate-limit multiplier within 5 s. Credits are not \
                            touched. Prints the previous and the new plan."
    )]
    Plan {
        /// The user's id (the token's `sub`); must already exist.
        #[arg(long, value_name = "USER_ID")]
        user: String,
        /// One of the configured plans (`plans.PLAN`; by default free, pro,
        /// team, enterprise).
        #[arg(long)]
        plan: String,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Openapi => {
            // `{:#}`: serde_json's pretty form.
            println!("{:#}", gateway::http::openapi::configured(&settings));
        }
        Command::Admin(admin) => {
            // Logs go to stderr so that stdout is only the command's answer.
            common::telemetry::init_for_commands(settings.app_env);
            if let Err(e) = run_admin(settings, admin).await {
                eprintln!("gateway admin: {e:#}");
                let code = e
                    .downcast_ref::<gateway::error::Error>()
                    .map_or(1, operator::exit_code);
                std::process::exit(code.into());
            }
        }
    }
}

async fn serve(settings: Settings) {
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

async fn run_admin(settings: Settings, admin: Admin) -> anyhow::Result<()> {
    let actor = operator::actor(admin.actor.as_deref())?;
    let op = Operator::new(settings, actor)?;
    let result = match admin.action {
        AdminAction::Grant {
            user,
            amount,
            reason,
            idempotency_key,
        } => op
            .grant(&user, amount, &reason, idempotency_key.as_deref())
            .await
            .map(|g| {
                if g.replayed {
                    println!(
                        "already granted with this idempotency key: transaction {}, balance {} (nothing new written)",
                        g.transaction_id, g.balance
                    );
                    None
                } else {
                    println!(
                        "granted {amount} credits to {user}: transaction {}, balance {}",
                        g.transaction_id, g.balance
                    );
                    Some("credits.grant")
                }
            }),
        AdminAction::Plan { user, plan } => op.set_plan(&user, &plan).await.map(|p| {
            println!("plan of {user}: {} -> {}", p.previous, p.plan);
            Some("user.plan")
        }),
    };
    let outcome = match result {
        Ok(audited) => {
            if let Some(action) = audited {
                println!(
                    "audit: {action} by {}, request {}",
                    op.actor(),
                    op.request_id()
                );
            }
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e)),
    };
    op.close().await;
    outcome
}
