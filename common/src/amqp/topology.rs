//! The AMQP topology, declared the same way by gateways and workers at start
//! (declarations are idempotent, so whoever comes first creates it).
//!
//! ```text
//!  {ns}.events (topic) ──usage.#──▶ {ns}.usage    ┐
//!                      ──credit.#─▶ {ns}.credits  │ quorum, x-delivery-limit,
//!                      ──session.#▶ {ns}.sessions │ dead-letter to {ns}.dlx
//!                      ──user.#───▶ {ns}.users    ┘
//!  {ns}.dlx (fanout) ─────────────▶ {ns}.dead
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// The work queues, by the short names `worker run --queues` takes.
pub const QUEUES: [&str; 4] = ["usage", "credits", "sessions", "users"];

/// Names of everything in one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    pub namespace: String,
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(namespace: &str, delivery_limit: u32) -> Self {
        Self {
            namespace: namespace.to_string(),
            delivery_limit,
        }
    }

    pub fn exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Full queue name for a short name (`usage` → `vsc.usage`).
    pub fn queue(&self, short: &str) -> String {
        format!("{}.{short}", self.namespace)
    }

    /// Routing-key pattern that feeds a queue.
    pub fn binding(short: &str) -> &'static str {
        match short {
            "usage" => "usage.#",
            "credits" => "credit.#",
            "sessions" => "session.#",
            _ => "user.#",
        }
    }

    /// Declares exchanges, queues and bindings. Safe to call any number of times
    /// from any number of processes, as long as the arguments never change.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        // Durable: the exchange must outlive broker restarts, or publishes after
        // a restart would be unroutable (and, being mandatory, refused).
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                &self.exchange(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        // Fanout: everything dead-lettered lands in one queue an operator reads.
        channel
            .exchange_declare(
                &self.dead_letter_exchange(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let queue_opts = QueueDeclareOptions {
            // Durable, never exclusive or auto-delete: events outlive consumers.
            durable: true,
            exclusive: false,
            auto_delete: false,
            ..Default::default()
        };
        let mut dead_args = FieldTable::default();
        // Quorum: replicated on a cluster, and it keeps the delivery count.
        dead_args.insert(ShortString::from("x-queue-type"), quorum());
        channel
            .queue_declare(&self.dead_letter_queue(), queue_opts, dead_args)
            .await?;
        channel
            .queue_bind(
                &self.dead_letter_queue(),
                &self.dead_letter_exchange(),
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for short in QUEUES {
            let mut args = FieldTable::default();
            args.insert(ShortString::from("x-queue-type"), quorum());
            // RabbitMQ 3.10 sets no default delivery limit on quorum queues; ours
            // is high enough that crashes and restarts never dead-letter good events,
            // and finite so a message that kills its consumer stops looping.
            args.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            // Where rejected and over-delivered messages go instead of vanishing.
            args.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString(self.dead_letter_exchange().into()),
            );
            channel
                .queue_declare(&self.queue(short), queue_opts, args)
                .await?;
            channel
                .queue_bind(
                    &self.queue(short),
                    &self.exchange(),
                    Self::binding(short),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Deletes everything of this namespace (tests clean up with it).
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for short in QUEUES {
            channel
                .queue_delete(&self.queue(short), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .queue_delete(&self.dead_letter_queue(), QueueDeleteOptions::default())
            .await?;
        for ex in [self.exchange(), self.dead_letter_exchange()] {
            channel
                .exchange_delete(&ex, ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn quorum() -> AMQPValue {
    AMQPValue::LongString("quorum".into())
}
