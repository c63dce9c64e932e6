//! Events for unit tests, built as the gateway builds them.

use chrono::Utc;
use common::events::{
    BatchedConsume, CreditConsumeBatch, CreditContext, Envelope, Event, UsageBatch, UsageDetail,
    UsageEvent,
};
use serde_json::{json, Value};
use uuid::Uuid;

pub fn model_event(user: &str, model: &str, metadata: Option<Value>) -> UsageEvent {
    UsageEvent {
        id: Uuid::new_v4(),
        user_id: user.into(),
        session_id: Some("s1".into()),
        occurred_at: Utc::now(),
        received_at: Utc::now(),
        metadata,
        detail: UsageDetail::Model {
            provider: "openai".into(),
            model: model.into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            latency_ms: Some(20),
            success: Some(true),
        },
        credits: None,
    }
}

/// Built from JSON, as the gateway's events arrive: optional fields
/// added to the event types later need no change here.
pub fn consume(user: &str, context: CreditContext) -> BatchedConsume {
    let mut v = json!({
        "id": Uuid::new_v4(),
        "occurred_at": Utc::now(),
        "transaction_id": Uuid::new_v4(),
        "user_id": user,
        "amount": 7,
    });
    let ctx = serde_json::to_value(&context).unwrap();
    v.as_object_mut()
        .unwrap()
        .extend(ctx.as_object().unwrap().clone());
    serde_json::from_value(v).unwrap()
}

pub fn usage(events: Vec<UsageEvent>) -> Envelope {
    Envelope::new(Event::UsageBatch(UsageBatch { events }), None, Utc::now())
}

pub fn consumes(items: Vec<BatchedConsume>) -> Envelope {
    Envelope::new(
        Event::CreditConsumeBatch(CreditConsumeBatch { consumes: items }),
        None,
        Utc::now(),
    )
}
