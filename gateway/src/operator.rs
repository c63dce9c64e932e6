//! The operator commands (`gateway admin grant|plan`): the admin routes'
//! actions from a shell, through the very same functions ([`crate::admin`],
//! [`crate::credits::grant`]), so the Postgres write, its audit row and the
//! Redis update are those of `POST /api/admin/...`.
//!
//! What differs from the routes, on purpose:
//! - an unknown user id is refused ([`Unknown::Refuse`]), never provisioned;
//! - the audit actor is `operator` or `operator:NAME` (`--actor NAME`), a
//!   form no user id can take (ids have no `:`), so the trail tells shell
//!   changes from API ones;
//! - the request id is a fresh UUID, printed so it can be quoted.
//!
//! Every input is checked before anything is read or written, so bad input
//! changes nothing.

use common::settings::{Settings, MAX_CREDITS};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admin::{self, By, Unknown};
use crate::credits::{self, Amount, Answer, GrantBody, GrantRequest, Remembered};
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::state::AppState;

/// The exit status of a command that failed with `e`. Every failure is 1
/// today (README: "bad input exits 1"): the input refused before anything
/// was written (validation, an unknown user or plan) and a refusal or outage
/// on the way. This is the one place to tell them apart if scripts ever
/// need to (an outage would be 75, `EX_TEMPFAIL`: retrying may work).
pub fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Validation { .. } | Error::NotFound(_) => 1,
        Error::Forbidden(_)
        | Error::AccountSuspended
        | Error::AccountDeleted
        | Error::InsufficientCredits { .. }
        | Error::IdempotencyConflict(_)
        | Error::HoldExpired
        | Error::UpgradeRequired { .. }
        | Error::RateLimited { .. } => 1,
        Error::Unavailable { .. } | Error::Internal(_) => 1,
    }
}

/// The audit actor for `--actor NAME`: `operator` alone, or `operator:NAME`
/// with NAME 1..=64 of `[A-Za-z0-9_.@-]` (a login or an e-mail address).
pub fn actor(name: Option<&str>) -> Result<String> {
    match name {
        None => Ok("operator".into()),
        Some(n)
            if (1..=64).contains(&n.len())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b)) =>
        {
            Ok(format!("operator:{n}"))
        }
        Some(_) => Err(Error::validation(
            "actor",
            "must be 1 to 64 of [A-Za-z0-9_.@-]",
        )),
    }
}

/// A `--user` value: a well-formed user id (docs/api.md "Conventions"), else 422 naming `user`.
pub fn user_id(raw: &str) -> Result<String> {
    if crate::auth::valid_user_id(raw) {
        Ok(raw.to_string())
    } else {
        Err(Error::validation(
            "user",
            "must be 1 to 64 of [A-Za-z0-9_-]",
        ))
    }
}

/// A `--amount` value: 1..=2^53−1, as the route's `amount`.
pub fn amount(raw: i64) -> Result<Amount> {
    Amount::new(raw).ok_or_else(|| {
        Error::validation(
            "amount",
            format!("must be an integer from 1 to {MAX_CREDITS}"),
        )
    })
}

/// A grant as it was applied (or found applied, for a repeated key).
#[derive(Debug, Clone)]
pub struct Granted {
    pub transaction_id: String,
    /// What the user can spend now.
    pub balance: i64,
    /// The same `--idempotency-key` and values were granted before: nothing new.
    pub replayed: bool,
}

/// A plan change as it was applied.
#[derive(Debug, Clone)]
pub struct Planned {
    pub previous: String,
    pub plan: String,
}

/// The admin routes' state without the HTTP server, for one operator.
pub struct Operator {
    state: AppState,
    actor: String,
    request_id: String,
}

impl Operator {
    /// Connections open lazily; the publisher never connects (neither action
    /// publishes an event).
    pub fn new(settings: Settings, actor: String) -> anyhow::Result<Self> {
        let stopped = CancellationToken::new();
        stopped.cancel();
        let publisher = Publisher::start(&settings, stopped);
        let state = crate::startup::app_state(settings.into(), publisher)?;
        Ok(Self {
            state,
            actor,
            request_id: Uuid::new_v4().to_string(),
        })
    }

    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The audit rows' `request_id`.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// `gateway admin grant`: as `POST /api/admin/users/:id/credits/grant`.
    pub async fn grant(
        &self,
        user: &str,
        amount: i64,
        reason: &str,
        key: Option<&str>,
    ) -> Result<Granted> {
        let user = user_id(user)?;
        let body = GrantBody {
            amount: self::amount(amount)?,
            reason: credits::Reason::parse(reason.to_string())
                .map_err(|r| Error::validation("reason", r))?,
        };
        let (amount, reason) = body.validate()?;
        let key = key
            .map(|k| credits::idempotency_key_value("idempotency-key", k))
            .transpose()?;
        admin::target(&self.state.user_store, &user, Unknown::Refuse).await?;
        let answer = credits::grant(
            &self.state.credits,
            &self.state.publisher,
            GrantRequest {
                actor: self.actor.clone(),
                user_id: user,
                amount,
                reason,
                key,
                request_id: self.request_id.clone(),
            },
        )
        .await?;
        let (body, replayed) = match answer {
            Answer::Fresh(body) => (body, false),
            Answer::Replayed(Remembered::Ok(body)) => (body, true),
            Answer::Replayed(Remembered::Insufficient { .. }) => {
                return Err(Error::Internal(anyhow::anyhow!(
                    "a grant answered like a refused consume"
                )))
            }
        };
        Ok(Granted {
            transaction_id: body["transaction_id"].as_str().unwrap_or_default().into(),
            balance: body["balance"].as_i64().unwrap_or_default(),
            replayed,
        })
    }

    /// `gateway admin plan`: as `PUT /api/admin/users/:id/plan`.
    pub async fn set_plan(&self, user: &str, plan: &str) -> Result<Planned> {
        let user = user_id(user)?;
        let plan = admin::plan_name(&self.state.settings.plans, plan)?;
        admin::target(&self.state.user_store, &user, Unknown::Refuse).await?;
        let by = By {
            actor: &self.actor,
            request_id: &self.request_id,
        };
        let change = admin::set_plan(&self.state.user_store, by, &user, &plan).await?;
        Ok(Planned {
            previous: change.previous,
            plan: change.record.plan.clone(),
        })
    }

    /// Closes the Postgres pool (so the server sees a clean disconnect).
    pub async fn close(self) {
        self.state.pg.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_actor_is_marked_as_an_operator_and_can_never_be_a_user_id() {
        assert_eq!(actor(None).unwrap(), "operator");
        assert_eq!(actor(Some("alice")).unwrap(), "operator:alice");
        assert_eq!(
            actor(Some("ops.lead@example.com")).unwrap(),
            "operator:ops.lead@example.com"
        );
        for bad in ["", "has space", "a:b", &"x".repeat(65)] {
            assert_eq!(field(actor(Some(bad))), "actor", "{bad:?}");
        }
        assert!(!crate::auth::valid_user_id(&actor(Some("alice")).unwrap()));
    }

    #[test]
    fn amounts_follow_the_routes_rules() {
        assert_eq!(amount(1).unwrap().get(), 1);
        assert_eq!(amount(MAX_CREDITS).unwrap().get(), MAX_CREDITS);
        for bad in [0, -5, MAX_CREDITS + 1, i64::MIN] {
            assert_eq!(field(amount(bad)), "amount", "{bad}");
        }
    }

    #[test]
    fn bad_input_exits_1() {
        assert_eq!(exit_code(&Error::validation("amount", "x")), 1);
        assert_eq!(exit_code(&Error::NotFound("no user u".into())), 1);
    }

    #[test]
    fn user_ids_follow_the_token_sub_rules() {
        assert_eq!(user_id("user_2abc-X").unwrap(), "user_2abc-X");
        for bad in ["", "a b", "a:b", &"u".repeat(65)] {
            assert_eq!(field(user_id(bad)), "user", "{bad:?}");
        }
    }
}
