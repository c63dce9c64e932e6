//! Operator commands for the dead-letter queue: list, show, replay, purge.
//!
//! Messages are fetched with `basic.get` and manual acks: what a command does
//! not consume is returned with `nack(requeue)`, so listing changes nothing and
//! purge or replay removes only the messages it names.
//!
//! Two kinds of dead letter share the queue: messages the broker dead-lettered
//! (rejected or past the delivery limit; their `x-death` header says where and
//! why), and members a consumer took out of a group and published here itself
//! (headers `x-dead-reason`, `x-dead-queue`, `x-dead-from`: why, from which
//! queue, and the id of the message they were part of). Both replay the same
//! way: to the events exchange with the envelope's routing key.

use std::time::Duration;

use clap::Subcommand;
use common::amqp::topology::Topology;
use common::settings::Settings;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

/// One dead-lettered message as an operator sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// The envelope id (AMQP `message_id`), or `-` when the message has none.
    pub id: String,
    /// Routing key it was first published with (from `x-death`), e.g. `usage.batch`.
    pub routing_key: String,
    /// Queue it died in and why (`rejected`, `delivery_limit`, ...).
    pub queue: String,
    pub reason: String,
    /// For a member taken out of a group: the id of that group's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub size: usize,
    /// The body, as text (truncated for `list`).
    pub body: String,
}

/// Which messages a command applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Ids(Vec<String>),
}

impl Selection {
    fn matches(&self, id: &str) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }
}

pub struct Dlq {
    conn: Connection,
    channel: Channel,
    topology: Topology,
}

impl Dlq {
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            common::amqp::connect::connect(&settings.amqp.url),
        )
        .await??;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let topology = Topology::new(&settings.amqp.namespace, settings.amqp.delivery_limit);
        topology.declare(&channel).await?;
        Ok(Self {
            conn,
            channel,
            topology,
        })
    }

    /// Lists up to `limit` dead letters without removing any.
    pub async fn list(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let (msgs, _) = self.take(limit).await?;
        let out = msgs.iter().map(|m| describe(m, 512)).collect();
        self.requeue(&msgs).await?;
        Ok(out)
    }

    /// The full message with this id, if present.
    pub async fn show(&self, id: &str) -> anyhow::Result<Option<DeadLetter>> {
        let (msgs, _) = self.take(usize::MAX).await?;
        let found = msgs
            .iter()
            .map(|m| describe(m, usize::MAX))
            .find(|d| d.id == id);
        self.requeue(&msgs).await?;
        Ok(found)
    }

    /// Republishes the selected messages to the events exchange with their
    /// original routing key (confirmed), then removes them from the dead-letter
    /// queue. Returns what was replayed.
    pub async fn replay(&self, sel: &Selection) -> anyhow::Result<Vec<DeadLetter>> {
        let (msgs, _) = self.take(usize::MAX).await?;
        let mut done = Vec::new();
        let mut keep = Vec::new();
        for m in msgs {
            let d = describe(&m, 512);
            if !sel.matches(&d.id) {
                keep.push(m);
                continue;
            }
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"));
            let props = match m.delivery.properties.message_id() {
                Some(id) => props.with_message_id(id.clone()),
                None => props,
            };
            let confirm = self
                .channel
                .basic_publish(
                    &self.topology.exchange(),
                    &d.routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.delivery.data,
                    props,
                )
                .await?
                .await?;
            match confirm {
                Confirmation::Ack(None) => {
                    self.channel
                        .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                        .await?;
                    done.push(d);
                }
                _ => {
                    keep.push(m);
                    anyhow::bail!("the broker did not take the replay of {}", d.id);
                }
            }
        }
        self.requeue(&keep).await?;
        Ok(done)
    }

    /// Deletes the selected messages; everything else stays.
    pub async fn purge(&self, sel: &Selection) -> anyhow::Result<Vec<DeadLetter>> {
        let (msgs, _) = self.take(usize::MAX).await?;
        let mut done = Vec::new();
        let mut keep = Vec::new();
        for m in msgs {
            let d = describe(&m, 512);
            if sel.matches(&d.id) {
                self.channel
                    .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
                done.push(d);
            } else {
                keep.push(m);
            }
        }
        self.requeue(&keep).await?;
        Ok(done)
    }

    /// Takes up to `limit` messages (unacked) off the dead-letter queue.
    async fn take(&self, limit: usize) -> anyhow::Result<(Vec<BasicGetMessage>, u32)> {
        let queue = self.topology.dead_letter_queue();
        let mut out = Vec::new();
        let mut remaining = 0;
        while out.len() < limit {
            match self
                .channel
                .basic_get(&queue, BasicGetOptions { no_ack: false })
                .await?
            {
                Some(m) => {
                    remaining = m.message_count;
                    out.push(m);
                }
                None => break,
            }
        }
        Ok((out, remaining))
    }

    async fn requeue(&self, msgs: &[BasicGetMessage]) -> anyhow::Result<()> {
        for m in msgs {
            self.channel
                .basic_nack(
                    m.delivery.delivery_tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await?;
        }
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done").await;
        let _ = self.conn.close(200, "done").await;
    }
}

fn describe(m: &BasicGetMessage, max_body: usize) -> DeadLetter {
    let props = &m.delivery.properties;
    let id = props
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .or_else(|| envelope_field(&m.delivery.data, "id"))
        .unwrap_or_else(|| "-".into());
    let (queue, reason, key, from) = death_of(props.headers().as_ref());
    let routing_key = key
        .or_else(|| envelope_field(&m.delivery.data, "type"))
        .unwrap_or_else(|| m.delivery.routing_key.to_string());
    let text = String::from_utf8_lossy(&m.delivery.data);
    DeadLetter {
        id,
        routing_key,
        queue,
        reason,
        from,
        size: m.delivery.data.len(),
        body: text.chars().take(max_body).collect(),
    }
}

fn envelope_field(body: &[u8], field: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get(field)?.as_str().map(str::to_string)
}

fn text_of(v: Option<&AMQPValue>) -> Option<String> {
    match v {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// Where and why a message died: (queue, reason, first routing key, the
/// group's message id). A consumer's own dead letter says it in its headers;
/// the broker's in the first `x-death` entry.
fn death_of(headers: Option<&FieldTable>) -> (String, String, Option<String>, Option<String>) {
    use crate::consumer::{DEAD_FROM_HEADER, DEAD_QUEUE_HEADER, DEAD_REASON_HEADER};
    let header = |k: &str| text_of(headers.and_then(|h| h.inner().get(k)));
    if let Some(reason) = header(DEAD_REASON_HEADER) {
        let queue = header(DEAD_QUEUE_HEADER).unwrap_or_else(|| "-".into());
        return (queue, reason, None, header(DEAD_FROM_HEADER));
    }
    let first = headers
        .and_then(|h| h.inner().get("x-death"))
        .and_then(|v| match v {
            AMQPValue::FieldArray(a) => a.as_slice().first().cloned(),
            _ => None,
        });
    let Some(AMQPValue::FieldTable(t)) = first else {
        return ("-".into(), "-".into(), None, None);
    };
    let s = |k: &str| text_of(t.inner().get(k)).unwrap_or_else(|| "-".into());
    let key = match t.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().and_then(|v| match v {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }),
        _ => None,
    };
    (s("queue"), s("reason"), key, None)
}

#[derive(Subcommand)]
pub enum DlqAction {
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

/// Runs one `worker dlq` command, printing what it did.
pub async fn run(settings: &Settings, action: DlqAction) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(s.into())
    }

    #[test]
    fn a_consumers_own_dead_letter_names_its_reason_queue_and_group() {
        let h = table(&[
            (
                "x-dead-reason",
                long("invalid: model must not contain U+0000"),
            ),
            ("x-dead-queue", long("vsc.usage")),
            ("x-dead-from", long("g-1")),
        ]);
        assert_eq!(
            death_of(Some(&h)),
            (
                "vsc.usage".into(),
                "invalid: model must not contain U+0000".into(),
                None,
                Some("g-1".into())
            )
        );
    }

    #[test]
    fn a_broker_dead_letter_is_read_from_x_death() {
        let death = table(&[
            ("queue", long("vsc.credits")),
            ("reason", long("rejected")),
            (
                "routing-keys",
                AMQPValue::FieldArray(vec![long("credit.consume")].into()),
            ),
        ]);
        let h = table(&[(
            "x-death",
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        )]);
        assert_eq!(
            death_of(Some(&h)),
            (
                "vsc.credits".into(),
                "rejected".into(),
                Some("credit.consume".into()),
                None
            )
        );
        assert_eq!(death_of(None), ("-".into(), "-".into(), None, None));
    }
}
