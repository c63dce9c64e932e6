//! Publishing to RabbitMQ with publisher confirms.
//!
//! One long-lived connection and channel per gateway, in confirm mode, with many
//! confirms in flight at once. A supervisor task owns the connection: when the
//! broker goes away it drops the channel (publishes then fail fast with 503) and
//! reconnects with backoff, redeclaring the topology. We do not rely on lapin's
//! own recovery.
//!
//! Usage events and credit consumes of concurrent requests are grouped: a
//! batcher per kind gathers what arrives within `amqp.linger_us` into one
//! `usage.batch` (or `credit.consume_batch`) message, and answers every
//! waiting request when the broker confirms that one message.
//!
//! The request id (SPEC §5) travels with what a request publishes: read here
//! from the request's scope ([`common::request_id::current`]), so callers
//! need not pass it. A message of its own carries it on its envelope (and as
//! the AMQP `correlation_id`); a grouped consume carries its own in its
//! context, since one message holds consumes of many requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::amqp::{self, Topology};
use common::events::{BatchedConsume, CreditConsumeBatch, Envelope, Event, UsageBatch, UsageEvent};
use common::settings::Settings;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, oneshot, Notify, RwLock};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error, Clone)]
pub enum PublishError {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("no confirm within the timeout")]
    Timeout,
    #[error("the broker refused the message")]
    Nacked,
    #[error("the message was unroutable")]
    Returned,
    #[error("broker error: {0}")]
    Broker(String),
}

struct Inner {
    url: String,
    topology: Topology,
    confirm_timeout: Duration,
    channel: RwLock<Option<Channel>>,
    connected: AtomicBool,
    /// Woken when a publish sees the channel broken, so the supervisor reconnects now.
    broken: Notify,
    /// Cancelled once the supervisor has closed the connection for good.
    closed: CancellationToken,
}

/// Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    usage: mpsc::Sender<BatchItem<UsageEvent>>,
    consumes: mpsc::Sender<BatchItem<BatchedConsume>>,
}

type BatchItem<T> = (Vec<T>, oneshot::Sender<Result<(), PublishError>>);

impl Publisher {
    /// Starts the supervisor and the usage batcher; returns at once.
    pub fn start(settings: &Settings, shutdown: CancellationToken) -> Self {
        let inner = Arc::new(Inner {
            url: settings.amqp.url.clone(),
            topology: Topology::new(&settings.amqp.namespace, settings.amqp.delivery_limit),
            confirm_timeout: Duration::from_millis(settings.amqp.confirm_timeout_ms),
            channel: RwLock::new(None),
            connected: AtomicBool::new(false),
            broken: Notify::new(),
            closed: CancellationToken::new(),
        });
        let (usage, usage_rx) = mpsc::channel(65_536);
        let (consumes, consumes_rx) = mpsc::channel(65_536);
        let publisher = Self {
            inner,
            usage,
            consumes,
        };
        tokio::spawn(supervise(publisher.inner.clone(), shutdown));
        let linger = Duration::from_micros(settings.amqp.linger_us);
        let max = settings.amqp.max_batch_events;
        let slots = settings.amqp.max_in_flight;
        tokio::spawn(run_batcher(
            publisher.clone(),
            usage_rx,
            linger,
            max,
            slots,
            |events| Event::UsageBatch(UsageBatch { events }),
        ));
        tokio::spawn(run_batcher(
            publisher.clone(),
            consumes_rx,
            linger,
            max,
            slots,
            |consumes| Event::CreditConsumeBatch(CreditConsumeBatch { consumes }),
        ));
        publisher
    }

    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Waits until connected or the timeout passes (start-up, tests).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Resolves once the connection is closed after shutdown.
    pub async fn closed(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.closed.cancelled()).await;
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Publishes one envelope and waits for the broker's confirm (bounded).
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        self.publish_before(
            envelope,
            tokio::time::Instant::now() + self.inner.confirm_timeout,
        )
        .await
    }

    /// Publishes and waits for the confirm until `deadline`; a deadline that
    /// has already passed publishes nothing (so the 503 it answers is true).
    async fn publish_before(
        &self,
        envelope: &Envelope,
        deadline: tokio::time::Instant,
    ) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        let result = if tokio::time::Instant::now() >= deadline {
            Err(PublishError::Timeout)
        } else {
            loop {
                let r = tokio::time::timeout_at(deadline, self.publish_inner(envelope))
                    .await
                    .unwrap_or(Err(PublishError::Timeout));
                match r {
                    Err(PublishError::Nacked)
                        if retry_after_nack(tokio::time::Instant::now(), deadline) =>
                    {
                        tracing::debug!("the broker nacked a message; sending it again");
                        tokio::time::sleep(NACK_RETRY).await;
                    }
                    r => break r,
                }
            }
        };
        let outcome = if result.is_ok() { "ack" } else { "fail" };
        metrics::counter!("publish_confirms_total", "outcome" => outcome).increment(1);
        metrics::histogram!("publish_confirm_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    async fn publish_inner(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let stamped;
        let envelope = match (&envelope.request_id, common::request_id::current()) {
            (None, Some(id)) => {
                stamped = Envelope {
                    request_id: Some(id),
                    ..envelope.clone()
                };
                &stamped
            }
            _ => envelope,
        };
        let channel = self
            .inner
            .channel
            .read()
            .await
            .clone()
            .ok_or(PublishError::NotConnected)?;
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(envelope.id.to_string()))
            .with_type(ShortString::from(envelope.event.routing_key()))
            .with_content_type(ShortString::from("application/json"))
            // Persistent: the message survives a broker restart once confirmed.
            .with_delivery_mode(2)
            .with_timestamp(envelope.received_at.timestamp() as u64);
        let props = match &envelope.request_id {
            Some(id) => props.with_correlation_id(ShortString::from(id.as_str())),
            None => props,
        };
        let confirm = channel
            .basic_publish(
                &self.inner.topology.exchange(),
                envelope.event.routing_key(),
                // Mandatory: an unroutable message comes back and counts as a failure.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &envelope.to_bytes(),
                props,
            )
            .await
            .map_err(|e| self.broken(e))?;
        match confirm.await.map_err(|e| self.broken(e))? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Returned),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::Broker("confirms not enabled".into())),
        }
    }

    fn broken(&self, e: lapin::Error) -> PublishError {
        self.inner.broken.notify_one();
        PublishError::Broker(e.to_string())
    }

    /// Publishes usage events grouped with those of concurrent requests; returns
    /// once the message carrying them is confirmed.
    pub async fn publish_usage(&self, events: Vec<UsageEvent>) -> Result<(), PublishError> {
        self.grouped(&self.usage, events).await
    }

    /// Publishes a consume grouped with those of concurrent requests; returns
    /// once the message carrying it is confirmed.
    pub async fn publish_consume(&self, mut consume: BatchedConsume) -> Result<(), PublishError> {
        let context = &mut consume.consume.context;
        if context.request_id.is_none() {
            context.request_id = common::request_id::current();
        }
        self.grouped(&self.consumes, vec![consume]).await
    }

    async fn grouped<T>(
        &self,
        batcher: &mpsc::Sender<BatchItem<T>>,
        items: Vec<T>,
    ) -> Result<(), PublishError> {
        if !self.is_connected() {
            return Err(PublishError::NotConnected);
        }
        let (tx, rx) = oneshot::channel();
        batcher
            .send((items, tx))
            .await
            .map_err(|_| PublishError::NotConnected)?;
        rx.await.unwrap_or(Err(PublishError::NotConnected))
    }
}

async fn supervise(inner: Arc<Inner>, shutdown: CancellationToken) {
    let _closed = inner.closed.clone().drop_guard();
    let mut backoff = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match connect(&inner).await {
            Ok((conn, channel)) => {
                backoff = Duration::from_millis(100);
                let lost = Arc::new(Notify::new());
                let l = lost.clone();
                conn.on_error(move |e| {
                    tracing::warn!(error = %e, "broker connection lost");
                    l.notify_one();
                });
                *inner.channel.write().await = Some(channel.clone());
                inner.connected.store(true, Ordering::Relaxed);
                tracing::info!("connected to the broker");
                // Also poll: a closed channel without a connection error counts too.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = lost.notified() => break,
                        _ = inner.broken.notified() => {
                            if !channel.status().connected() || !conn.status().connected() { break; }
                        }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            if !channel.status().connected() || !conn.status().connected() { break; }
                        }
                    }
                }
                inner.connected.store(false, Ordering::Relaxed);
                *inner.channel.write().await = None;
                if shutdown.is_cancelled() {
                    // In-flight confirms finished before we got here (see startup).
                    let _ = conn.close(200, "shutdown").await;
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(320, "reconnect"))
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "broker connect failed; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn connect(inner: &Inner) -> anyhow::Result<(lapin::Connection, Channel)> {
    let conn = tokio::time::timeout(Duration::from_secs(5), amqp::connect(&inner.url)).await??;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    inner.topology.declare(&channel).await?;
    Ok((conn, channel))
}

/// Gathers items into messages: each message takes what arrived during
/// `linger` after its first item, and also everything that arrives while it
/// waits for one of `max_in_flight` publish slots (a slot is held until the
/// broker confirms). So a quiet gateway publishes at once, and a busy one
/// sends fewer, larger messages as confirms take longer: group commit.
/// The pause before a nacked message is sent again. A quorum queue nacks
/// publishes for some seconds after a node of its cluster stops (seen in the
/// RabbitMQ node-stop test), then takes them again; a repeat of a message the
/// broker did keep is dropped by the worker by its event or transaction ids.
const NACK_RETRY: Duration = Duration::from_millis(100);

/// Whether a nacked publish is sent again: only while another attempt and its
/// confirm still fit before the deadline. Otherwise the nack is the answer
/// (the message surely failed: 503, and a consume's reservation is undone).
fn retry_after_nack(now: tokio::time::Instant, deadline: tokio::time::Instant) -> bool {
    now + NACK_RETRY * 2 <= deadline
}

async fn run_batcher<T: Send + 'static>(
    publisher: Publisher,
    mut rx: mpsc::Receiver<BatchItem<T>>,
    linger: Duration,
    max_events: usize,
    max_in_flight: usize,
    wrap: fn(Vec<T>) -> Event,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    while let Some(first) = rx.recv().await {
        // Every request of this message is answered within the confirm
        // timeout of its first item, slot wait included (docs/api.md "Outages": a write
        // answers 503 within 5 s of a broker that stopped confirming).
        let deadline = tokio::time::Instant::now() + publisher.inner.confirm_timeout;
        let mut events = first.0;
        let mut waiters = vec![first.1];
        if !linger.is_zero() {
            let linger_end = tokio::time::Instant::now() + linger;
            while events.len() < max_events {
                match tokio::time::timeout_at(linger_end, rx.recv()).await {
                    Ok(Some((more, tx))) => {
                        events.extend(more);
                        waiters.push(tx);
                    }
                    _ => break,
                }
            }
        }
        // Wait for a slot, taking in what arrives meanwhile.
        let slot = slots.clone().acquire_owned();
        tokio::pin!(slot);
        let mut open = true;
        let slot = loop {
            tokio::select! {
                biased;
                s = &mut slot => break s.ok(),
                // No slot before the deadline: publish_before answers 503
                // without publishing.
                _ = tokio::time::sleep_until(deadline) => break None,
                item = rx.recv(), if open && events.len() < max_events => match item {
                    Some((more, tx)) => {
                        events.extend(more);
                        waiters.push(tx);
                    }
                    None => open = false,
                },
            }
        };
        // And what is already queued, without waiting (unless this message
        // is out of time: those wait for the next one).
        while slot.is_some() && events.len() < max_events {
            match rx.try_recv() {
                Ok((more, tx)) => {
                    events.extend(more);
                    waiters.push(tx);
                }
                Err(_) => break,
            }
        }
        let n = events.len();
        let event = wrap(events);
        metrics::histogram!("publish_batch_events", "type" => event.routing_key()).record(n as f64);
        let p = publisher.clone();
        // Confirms of up to `max_in_flight` messages overlap.
        tokio::spawn(async move {
            let env = Envelope::new(event, None, Utc::now());
            let result = p.publish_before(&env, deadline).await;
            drop(slot);
            for w in waiters {
                let _ = w.send(result.clone());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nack_is_retried_only_while_another_attempt_fits_before_the_deadline() {
        let now = tokio::time::Instant::now();
        assert!(retry_after_nack(now, now + Duration::from_secs(5)));
        assert!(retry_after_nack(now, now + NACK_RETRY * 2));
        assert!(!retry_after_nack(now, now + NACK_RETRY));
        assert!(!retry_after_nack(now, now));
        assert!(!retry_after_nack(now + Duration::from_secs(1), now));
    }
}
