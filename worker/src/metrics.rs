//! Every series the worker records, registered at start at 0 (docs/api.md "Operations"), so
//! a fresh worker's `/metrics` already names each one and an alert on a
//! series reads 0 rather than "no data". Label values come from fixed sets:
//! the queues this worker consumes (`worker.queues`, under the namespace)
//! and the fixed `by` of expired holds.
//!
//! `increment(0)`, never `absolute(0)`: tests run several workers (and
//! gateways) on one process-wide recorder, and a later start must not reset
//! what an earlier one counted.

use common::amqp::topology::Topology;
use common::settings::Settings;

/// Every series name the worker records (the binary test checks each is in
/// a fresh worker's `/metrics`).
pub const SERIES: [&str; 10] = [
    "worker_batch_messages",
    "worker_consumer_fenced_total",
    "worker_events_stored_total",
    "worker_dead_letters_total",
    "worker_db_retries_total",
    "publish_to_postgres_lag_seconds",
    "credit_reservations_released_total",
    "credit_reconcile_repairs_total",
    "credit_holds_expired_total",
    "publish_to_postgres_lag_seconds_bucket",
];

/// Describes and registers every series with its fixed label values.
pub fn init(settings: &Settings) {
    use metrics::{describe_counter, describe_histogram, Unit};
    // The recorder first: series registered before it exists go nowhere.
    let _ = crate::http::metrics_handle();
    describe_histogram!(
        "worker_batch_messages",
        "Messages per consumed batch, by queue"
    );
    describe_counter!(
        "worker_events_stored_total",
        "Events committed to Postgres, by queue"
    );
    describe_counter!(
        "worker_dead_letters_total",
        "Messages dead-lettered, by queue"
    );
    describe_counter!(
        "worker_consumer_fenced_total",
        "Credits consumers that stopped because their heartbeat could not reach Redis"
    );
    describe_counter!(
        "worker_db_retries_total",
        "Batches retried after a transient Postgres error"
    );
    describe_histogram!(
        "publish_to_postgres_lag_seconds",
        Unit::Seconds,
        "Time from an event's publish to its commit"
    );
    describe_counter!(
        "credit_reservations_released_total",
        "Stale reservations released by the reconciler"
    );
    describe_counter!(
        "credit_reconcile_repairs_total",
        "Balances the reconciler repaired"
    );
    describe_counter!(
        "credit_holds_expired_total",
        "Holds released by their expiry"
    );
    let topology = Topology::new(&settings.amqp.namespace, settings.amqp.delivery_limit);
    for short in &settings.worker.queues {
        let queue = topology.queue(short);
        let _ = metrics::histogram!("worker_batch_messages", "queue" => queue.clone());
        metrics::counter!("worker_events_stored_total", "queue" => queue.clone()).increment(0);
        metrics::counter!("worker_dead_letters_total", "queue" => queue).increment(0);
    }
    metrics::counter!("worker_db_retries_total").increment(0);
    metrics::counter!("worker_consumer_fenced_total").increment(0);
    let _ = metrics::histogram!("publish_to_postgres_lag_seconds");
    metrics::counter!("credit_reservations_released_total").increment(0);
    metrics::counter!("credit_reconcile_repairs_total").increment(0);
    metrics::counter!("credit_holds_expired_total", "by" => "worker").increment(0);
}
