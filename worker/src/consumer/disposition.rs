//! What happens to what Postgres refuses (docs/events.md: one member never fails
//! a group, money never depends on metadata), as plain functions.
//!
//! The consumer first tries a whole batch in one transaction. A transient
//! database error (`common::db::is_transient`) holds the batch and retries it after
//! [`backoff`]; never a reason to dead-letter. Refused data: a set of
//! several is bisected ([`push_halves`]) down to the refused message, whose
//! next step [`disposition`] decides: its members one by one (a group), a
//! retry without free text (a money event, once), or a dead letter alone.
//! Nothing is dropped silently: a message that cannot even be decoded is
//! rejected without requeue, which the broker dead-letters.

use std::time::Duration;

use common::events::{CreditConsumeBatch, Envelope, Event};

use crate::handlers::sanitize::{strip_context, usage_member};

/// The longest wait between two tries (of Postgres, or of the broker).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The wait after `prev`: doubled, at most [`MAX_BACKOFF`].
pub fn backoff(prev: Duration) -> Duration {
    (prev * 2).min(MAX_BACKOFF)
}

/// Splits a refused set in two onto the stack of sets to try, the first half
/// on top, so that halves commit in arrival order.
pub fn push_halves<T>(todo: &mut Vec<Vec<T>>, mut group: Vec<T>) {
    let second = group.split_off(group.len() / 2);
    todo.push(second);
    todo.push(group);
}

/// The members of a grouped message, each as a message of its own (a group
/// of one, keeping the member's id, user and time); empty when `env` is not
/// a group of several.
pub fn members(env: &Envelope) -> Vec<Envelope> {
    match &env.event {
        Event::UsageBatch(b) if b.events.len() > 1 => b
            .events
            .iter()
            .map(|e| usage_member(&env.received_at, e.clone()))
            .collect(),
        Event::CreditConsumeBatch(b) if b.consumes.len() > 1 => b
            .consumes
            .iter()
            .map(|c| {
                let mut m = Envelope::new(
                    Event::CreditConsumeBatch(CreditConsumeBatch {
                        consumes: vec![c.clone()],
                    }),
                    Some(c.consume.user_id.clone()),
                    c.occurred_at,
                );
                m.id = c.id;
                m.received_at = env.received_at;
                m
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What to do with a message Postgres refused when stored alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// A group of several: store its members one by one (each its own message).
    Split(Vec<Envelope>),
    /// A money event: charge it once more with every free-text field dropped.
    Retry(Box<Envelope>),
    /// Nothing left to try: dead-letter it alone, with the reason.
    DeadLetter,
}

/// Decides the next step for a refused message; `stripped` says whether its
/// free text was already dropped (a retry of a retry dead-letters).
pub fn disposition(env: &Envelope, stripped: bool) -> Disposition {
    let members = members(env);
    if !members.is_empty() {
        return Disposition::Split(members);
    }
    if stripped {
        return Disposition::DeadLetter;
    }
    let mut retry = env.clone();
    let changed = match &mut retry.event {
        Event::CreditConsume(c) => strip_context(&mut c.context).is_some(),
        Event::CreditConsumeBatch(b) => {
            // Every member stripped (no short circuit).
            let mut any = false;
            for c in &mut b.consumes {
                any |= strip_context(&mut c.consume.context).is_some();
            }
            any
        }
        Event::HoldOpened(h) => strip_context(&mut h.context).is_some(),
        Event::HoldSettled(h) => strip_context(&mut h.context).is_some(),
        _ => false,
    };
    if changed {
        Disposition::Retry(Box::new(retry))
    } else {
        Disposition::DeadLetter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{consume, consumes, model_event, usage};
    use common::events::CreditContext;
    use serde_json::json;

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let mut d = Duration::from_millis(50);
        let mut seen = Vec::new();
        for _ in 0..9 {
            d = backoff(d);
            seen.push(d.as_millis());
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn a_refused_set_is_bisected_first_half_on_top() {
        let mut todo = vec![vec![9]];
        push_halves(&mut todo, vec![1, 2, 3, 4, 5]);
        assert_eq!(todo, vec![vec![9], vec![3, 4, 5], vec![1, 2]]);
        // Popping until singles gives arrival order.
        let mut order = Vec::new();
        let mut todo = vec![vec![1, 2, 3, 4, 5]];
        while let Some(g) = todo.pop() {
            if g.len() > 1 {
                push_halves(&mut todo, g);
            } else {
                order.extend(g);
            }
        }
        assert_eq!(order, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_refused_group_splits_into_members_that_keep_their_ids() {
        let a = consume("a", CreditContext::default());
        let b = consume("b", CreditContext::default());
        let env = consumes(vec![a.clone(), b.clone()]);
        let Disposition::Split(members) = disposition(&env, false) else {
            panic!("split")
        };
        assert_eq!(members.len(), 2);
        for (m, c) in members.iter().zip([&a, &b]) {
            assert_eq!(m.id, c.id);
            assert_eq!(m.occurred_at, c.occurred_at);
            assert_eq!(m.received_at, env.received_at);
            assert_eq!(
                m.event,
                Event::CreditConsumeBatch(CreditConsumeBatch {
                    consumes: vec![c.clone()]
                })
            );
        }
        let u = usage(vec![
            model_event("a", "m", None),
            model_event("b", "m", None),
        ]);
        assert!(matches!(disposition(&u, false), Disposition::Split(m) if m.len() == 2));
    }

    #[test]
    fn a_refused_consume_is_retried_once_without_its_free_text_then_dead_lettered() {
        let ctx = CreditContext {
            model: Some("gpt".into()),
            description: Some("words".into()),
            prompt_tokens: Some(3),
            metadata: Some(json!({"k": "v", "dropped_fields": ["session_id"]})),
            ..Default::default()
        };
        let env = consumes(vec![consume("a", ctx)]);
        let Disposition::Retry(retry) = disposition(&env, false) else {
            panic!("retry")
        };
        let Event::CreditConsumeBatch(b) = &retry.event else {
            panic!("batch")
        };
        let c = &b.consumes[0].consume;
        assert_eq!((c.amount, c.context.prompt_tokens), (7, Some(3)));
        assert_eq!(
            (c.context.model.as_deref(), c.context.description.as_deref()),
            (None, None)
        );
        assert_eq!(
            c.context.metadata,
            Some(json!({"dropped_fields": ["session_id", "model", "description", "metadata"]}))
        );
        assert_eq!(disposition(&retry, true), Disposition::DeadLetter);
        // Nothing to drop: retrying would change nothing.
        let bare = consumes(vec![consume("a", CreditContext::default())]);
        assert_eq!(disposition(&bare, false), Disposition::DeadLetter);
        // A usage event alone, or a session, is dead-lettered at once.
        let one = usage(vec![model_event("a", "m", None)]);
        assert_eq!(disposition(&one, false), Disposition::DeadLetter);
    }
}
