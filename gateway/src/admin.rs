//! Admin actions shared by the admin routes (`http::admin`, `http::credits`)
//! and the operator commands (`gateway admin ...`, see [`crate::operator`]):
//! one code path, so a change made from the shell is written, audited and
//! propagated exactly as one made through the API.
//!
//! The two callers differ in one decision only, [`Unknown`]: the routes
//! provision a user id never seen (docs/api.md "Conventions"), the shell refuses it, so a typo
//! at 3 a.m. never creates an account.

use std::collections::BTreeMap;
use std::sync::Arc;

use common::class::Class;
use common::settings::{ClassLimit, PlanSettings};
use serde::Serialize;
use serde_json::{json, Value};

use crate::audit::{self, Action};
use crate::credits::pricing::{PriceBody, PriceEntry};
use crate::credits::Count;
use crate::error::{Error, Result};
use crate::users::UserStore;
use crate::users::{self, Status, UserRecord};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// What an admin action does with a user id that was never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Create it (free plan, starting credits) first: the admin routes.
    Provision,
    /// 404 `not_found`, nothing written: the operator commands.
    Refuse,
}

/// The user an admin action targets, loaded into this gateway's directory
/// (and its credits into Redis) the same way for both callers.
pub async fn target(store: &UserStore, user_id: &str, unknown: Unknown) -> Result<Arc<UserRecord>> {
    if unknown == Unknown::Refuse && users::find(store, user_id).await?.is_none() {
        return Err(Error::NotFound(format!("no user {user_id}")));
    }
    store.directory.get_by_id(store, user_id, None).await
}

/// A plan name from the configuration (`plans.PLAN`), else 422 naming `plan`
/// and listing the known ones.
pub fn plan_name(plans: &BTreeMap<String, PlanSettings>, raw: &str) -> Result<String> {
    if plans.contains_key(raw) {
        return Ok(raw.to_string());
    }
    let known: Vec<&str> = plans.keys().map(String::as_str).collect();
    Err(Error::validation(
        "plan",
        format!("unknown plan {raw:?}; one of {}", known.join(", ")),
    ))
}

/// Who asks for an admin change, for its audit row.
#[derive(Debug, Clone, Copy)]
pub struct By<'a> {
    /// An admin's user id (routes) or `operator[:NAME]` (shell).
    pub actor: &'a str,
    pub request_id: &'a str,
}

/// The result of a plan change.
#[derive(Debug, Clone)]
pub struct PlanChange {
    pub previous: String,
    pub record: Arc<UserRecord>,
}

/// `PUT /api/admin/users/:id/plan` and `gateway admin plan`: the user's row
/// and its `user.plan` audit row in one transaction, then the Redis user hash
/// (see [`audit::change_user`]); every gateway applies the plan's limits
/// within its user cache's lifetime (≤ 5 s). The user must exist ([`target`]).
pub async fn set_plan(
    store: &UserStore,
    by: By<'_>,
    user_id: &str,
    plan: &str,
) -> Result<PlanChange> {
    let action = Action {
        actor: by.actor,
        action: "user.plan",
        target: Some(user_id),
        request_id: by.request_id,
    };
    let plan = plan.to_string();
    let (previous, record) = audit::change_user(store, action, user_id, |conn, before| {
        Box::pin(async move {
            sqlx::query("update users set plan = $2, updated_at = now() where id = $1")
                .bind(&before.id)
                .bind(&plan)
                .execute(&mut *conn)
                .await?;
            let details = json!({"plan": plan, "previous": before.plan});
            Ok((before.plan.clone(), details))
        })
    })
    .await?;
    Ok(PlanChange { previous, record })
}

/// What every admin change of a user answers (plan, rate-limit set and removed, status;
/// docs/api.md "Admin"): the user's plan, status and effective limits after the change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UserAnswer {
    /// The user changed.
    pub user_id: String,
    /// The user's plan (`plans.PLAN` of the configuration).
    pub plan: String,
    /// The account's status (the description is [`status_schema`]'s).
    #[schema(schema_with = status_schema)]
    pub status: String,
    /// The effective limit of every endpoint class, by class name.
    pub rate_limits: BTreeMap<String, EffectiveLimit>,
}

/// One class's effective limit.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct EffectiveLimit {
    /// Requests allowed per window.
    pub limit: u64,
    /// The window, in seconds.
    pub window_secs: u64,
    /// Whether it is the user's override or the plan's limit.
    pub source: LimitSource,
}

/// Where an effective limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LimitSource {
    /// A per-user override (`PUT /api/admin/users/{id}/rate-limits`).
    Override,
    /// The plan's limit (or the default one).
    Plan,
}

impl UserAnswer {
    /// `rec` with `limit(class)`, the limit the guard applies, for every class.
    pub fn new(rec: &UserRecord, limit: impl Fn(Class) -> ClassLimit) -> Self {
        let rate_limits = Class::ALL
            .into_iter()
            .map(|c| {
                let l = limit(c);
                let source = if rec.overrides.contains_key(&c) {
                    LimitSource::Override
                } else {
                    LimitSource::Plan
                };
                let effective = EffectiveLimit {
                    limit: l.limit,
                    window_secs: l.window_secs,
                    source,
                };
                (c.as_str().to_string(), effective)
            })
            .collect();
        Self {
            user_id: rec.id.clone(),
            plan: rec.plan.clone(),
            status: rec.status.as_str().to_string(),
            rate_limits,
        }
    }
}

/// `status` of a user: one of [`Status`]'s names.
fn status_schema() -> utoipa::openapi::Object {
    let names = [Status::Active, Status::Suspended, Status::Deleted].map(Status::as_str);
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .description(Some("The account's status."))
        .enum_values(Some(names))
        .build()
}

/// Sets one entry, with its audit row (`pricing.set`, target `provider/model`,
/// the new rates and the previous ones) in the same transaction.
#[tracing::instrument(skip_all, fields(actor))]
pub async fn set_price(
    pg: &PgPool,
    actor: &str,
    request_id: &str,
    body: PriceBody,
) -> Result<PriceEntry> {
    let provider = body.provider.into_inner();
    let model = body.model.into_inner();
    PriceBody::field_empty(&provider, "provider")?;
    PriceBody::field_empty(&model, "model")?;
    let (p, c) = (body.prompt_per_mtok.get(), body.completion_per_mtok.get());
    let k = body.cached_per_mtok.map(Count::get).unwrap_or(0);
    let target = format!("{provider}/{model}");
    let a = Action {
        actor,
        action: "pricing.set",
        target: Some(&target),
        request_id,
    };
    let by = actor.to_string();
    audit::write(pg, a, move |conn| {
        Box::pin(async move {
            let before: Option<(i64, i64, i64)> = sqlx::query_as(
                "select prompt_per_mtok, completion_per_mtok, cached_per_mtok from price_book \
                 where provider = $1 and model = $2 for update",
            )
            .bind(&provider)
            .bind(&model)
            .fetch_optional(&mut *conn)
            .await?;
            let (updated_at,): (DateTime<Utc>,) = sqlx::query_as(
                "insert into price_book (provider, model, prompt_per_mtok, completion_per_mtok, cached_per_mtok, updated_at, updated_by) \
                 values ($1, $2, $3, $4, $5, now(), $6) \
                 on conflict (provider, model) do update set prompt_per_mtok = excluded.prompt_per_mtok, \
                   completion_per_mtok = excluded.completion_per_mtok, cached_per_mtok = excluded.cached_per_mtok, \
                   updated_at = excluded.updated_at, updated_by = excluded.updated_by \
                 returning updated_at",
            )
            .bind(&provider)
            .bind(&model)
            .bind(p)
            .bind(c)
            .bind(k)
            .bind(&by)
            .fetch_one(&mut *conn)
            .await?;
            let previous = before.map(|b| {
                json!({"prompt_per_mtok": b.0, "completion_per_mtok": b.1, "cached_per_mtok": b.2})
            });
            let details: Value = json!({
                "provider": provider, "model": model, "prompt_per_mtok": p,
                "completion_per_mtok": c, "cached_per_mtok": k, "previous": previous,
            });
            let entry = PriceEntry {
                provider,
                model,
                prompt_per_mtok: p,
                completion_per_mtok: c,
                cached_per_mtok: k,
                updated_at,
            };
            Ok((entry, details))
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::settings::Settings;

    #[test]
    fn a_plan_is_one_of_the_configured_ones_and_the_error_lists_them() {
        let settings = Settings::load_from(
            std::path::Path::new("/nonexistent"),
            &[("JWT_SECRET".to_string(), "x".repeat(32))].into(),
        )
        .unwrap();
        assert_eq!(plan_name(&settings.plans, "pro").unwrap(), "pro");
        match plan_name(&settings.plans, "platinum") {
            Err(Error::Validation { field, message }) => {
                assert_eq!(field, "plan");
                for p in ["free", "pro", "team", "enterprise"] {
                    assert!(message.contains(p), "{message}");
                }
            }
            other => panic!("{other:?}"),
        }
        assert!(plan_name(&settings.plans, "Pro").is_err());
    }

    #[test]
    fn the_user_answer_is_the_json_the_admin_routes_always_sent() {
        let rec = UserRecord {
            id: "u1".into(),
            plan: "pro".into(),
            status: Status::Suspended,
            overrides: [(
                Class::Usage,
                ClassLimit {
                    limit: 5,
                    window_secs: 10,
                },
            )]
            .into(),
        };
        let limit = |c: Class| {
            rec.overrides.get(&c).copied().unwrap_or(ClassLimit {
                limit: 60,
                window_secs: 60,
            })
        };
        let got = serde_json::to_value(UserAnswer::new(&rec, limit)).unwrap();
        let mut limits = serde_json::Map::new();
        for c in Class::ALL {
            let want = if c == Class::Usage {
                json!({"limit": 5, "window_secs": 10, "source": "override"})
            } else {
                json!({"limit": 60, "window_secs": 60, "source": "plan"})
            };
            limits.insert(c.as_str().to_string(), want);
        }
        let want =
            json!({"user_id": "u1", "plan": "pro", "status": "suspended", "rate_limits": limits});
        assert_eq!(got, want);
    }
}
