//! Analytics and usage stats (docs/api.md "Analytics", §5.6, §5.10): parse the query, call
//! [`crate::analytics`], answer. Both routes are of class `analytics`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::error::Result;
use super::extract::ApiQuery;
use super::guard::CurrentUser;
use super::target::Target;
use super::{guarded, Class};
use crate::analytics::{self, AnalyticsAnswer, AnalyticsQuery, StatsAnswer, StatsQuery};
use crate::state::AppState;

pub fn router(state: &AppState) -> Router<AppState> {
    guarded(
        state,
        Class::Analytics,
        Router::new()
            .route("/api/vscode/analytics", get(vscode_analytics))
            .route("/api/users/{id}/usage/stats", get(usage_stats)),
    )
}

/// Usage analytics of the caller
///
/// `GET /api/vscode/analytics?days=N` (or `?timeframe=1d|7d|30d`): the caller's own, with the
/// original backend's `modelUsage`, `featureUsage` and `creditHistory` (docs/compatibility.md).
#[utoipa::path(get, path = "/api/vscode/analytics", tag = "analytics",
    params(AnalyticsQuery),
    responses(
        (status = 200, description = "The caller's figures over the window", body = AnalyticsAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn vscode_analytics(
    State(state): State<AppState>,
    user: CurrentUser,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> Result<Json<AnalyticsAnswer>> {
    let days = q.days()?;
    Ok(Json(
        analytics::analytics(&state.pg, &state.redis_link, &state.keys, user.id(), days).await?,
    ))
}

/// Usage statistics grouped by day, model, provider, feature or session
///
/// `GET /api/users/:id/usage/stats?from=&to=&group_by=`; with the original's `period` and/or
/// `groupBy`, also its `timeline`, `byModel`, `byProvider` and `totals.successRate`
/// (docs/compatibility.md).
#[utoipa::path(get, path = "/api/users/{id}/usage/stats", tag = "analytics",
    params(StatsQuery),
    responses(
        (status = 200, description = "The user's figures per key over the window", body = StatsAnswer),
        (status = 503, description = "A dependency is unavailable"),
    ))]
pub(crate) async fn usage_stats(
    State(state): State<AppState>,
    Target(id): Target,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<Json<StatsAnswer>> {
    let req = q.parse(chrono::Utc::now())?;
    Ok(Json(analytics::stats(&state.pg, &id, req).await?))
}

/// The operations of this module (docs/api.md "Analytics").
#[derive(utoipa::OpenApi)]
#[openapi(paths(vscode_analytics, usage_stats))]
pub(crate) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use utoipa::OpenApi;

    fn members(schema: &Value) -> Vec<&str> {
        schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn query(op: &Value) -> Vec<(&str, &Value)> {
        let params = op["parameters"].as_array().unwrap();
        assert!(params
            .iter()
            .all(|p| p["in"] == "query" && p["required"] == false));
        params
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), &p["schema"]))
            .collect()
    }

    #[test]
    fn the_doc_lists_both_routes_with_their_queries_and_answers() {
        let doc = serde_json::to_value(Doc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let op = &doc["paths"]["/api/vscode/analytics"]["get"];
        assert_eq!(op["tags"], json!(["analytics"]));
        assert_eq!(op["summary"], "Usage analytics of the caller");
        let q = query(op);
        assert_eq!(q[0].0, "days");
        assert_eq!(
            (&q[0].1["minimum"], &q[0].1["maximum"], &q[0].1["default"]),
            (&json!(1), &json!(365), &json!(30))
        );
        assert_eq!(
            (q[1].0, &q[1].1["enum"]),
            ("timeframe", &json!(["1d", "7d", "30d"]))
        );
        let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        assert_eq!(statuses, ["200", "503"]);
        let answer = &schemas["AnalyticsAnswer"];
        let want = [
            "as_of",
            "by_feature",
            "by_model",
            "by_provider",
            "creditHistory",
            "daily",
            "featureUsage",
            "from",
            "generated_at",
            "modelUsage",
            "summary",
            "to",
            "totals",
            "user_id",
        ];
        assert_eq!(members(answer), want);
        // Every member always present, `as_of` null when nothing settled yet.
        assert_eq!(answer["required"].as_array().unwrap().len(), want.len());
        assert_eq!(
            answer["properties"]["as_of"]["type"],
            json!(["string", "null"])
        );
        let totals = [
            "completion_tokens",
            "credits_consumed",
            "feature_events",
            "prompt_tokens",
            "requests",
            "sessions",
            "total_tokens",
        ];
        assert_eq!(members(&schemas["AnalyticsTotals"]), totals);
        assert_eq!(
            members(&schemas["ModelFigures"]),
            [
                "completion_tokens",
                "model",
                "prompt_tokens",
                "provider",
                "requests"
            ]
        );
        assert_eq!(
            members(&schemas["ProviderFigures"]),
            ["provider", "requests", "total_tokens"]
        );
        assert_eq!(members(&schemas["FeatureFigures"]), ["events", "feature"]);
        assert_eq!(
            members(&schemas["DayFigures"]),
            [
                "credits_consumed",
                "date",
                "feature_events",
                "requests",
                "total_tokens"
            ]
        );
        let summary = [
            "totalCreditsUsed",
            "totalRequests",
            "totalTokens",
            "uniqueFeatures",
            "uniqueModels",
        ];
        assert_eq!(members(&schemas["AnalyticsSummary"]), summary);
        assert_eq!(
            members(&schemas["ModelUsageEntry"]),
            [
                "created_at",
                "credits_consumed",
                "model_id",
                "provider",
                "tokens_used"
            ]
        );
        assert_eq!(
            members(&schemas["FeatureUsageEntry"]),
            ["feature_name", "last_used_at", "usage_count"]
        );
        let history = &schemas["CreditHistoryEntry"];
        assert_eq!(
            members(history),
            ["amount", "created_at", "description", "transaction_type"]
        );
        assert_eq!(history["required"].as_array().unwrap().len(), 4);

        let op = &doc["paths"]["/api/users/{id}/usage/stats"]["get"];
        assert_eq!(op["tags"], json!(["analytics"]));
        assert_eq!(
            op["summary"],
            "Usage statistics grouped by day, model, provider, feature or session"
        );
        let q = query(op);
        let names: Vec<&str> = q.iter().map(|p| p.0).collect();
        assert_eq!(names, ["from", "to", "group_by", "period", "groupBy"]);
        assert_eq!(q[3].1["enum"], json!(["1d", "7d", "30d"]));
        assert_eq!(q[4].1["enum"], json!(["hour", "day", "week"]));
        assert_eq!(
            q[2].1["enum"],
            json!(["day", "model", "provider", "feature", "session"])
        );
        let answer = &schemas["StatsAnswer"];
        assert_eq!(
            members(answer),
            [
                "byModel",
                "byProvider",
                "from",
                "groupBy",
                "group_by",
                "period",
                "rows",
                "timeline",
                "to",
                "totals",
                "user_id"
            ]
        );
        // The original's members are there only when asked for (`period`/`groupBy`).
        assert_eq!(answer["required"].as_array().unwrap().len(), 6);
        assert_eq!(
            members(&schemas["TimelineEntry"]),
            ["credits", "errors", "period", "requests", "tokens"]
        );
        assert_eq!(
            members(&schemas["ModelStats"]),
            ["credits", "errors", "modelId", "requests", "tokens"]
        );
        assert_eq!(
            members(&schemas["ProviderStats"]),
            ["credits", "errors", "provider", "requests", "tokens"]
        );
        assert_eq!(
            schemas["GroupBy"]["enum"],
            json!(["day", "model", "provider", "feature", "session"])
        );
        let row = &schemas["StatsRow"];
        let figures = [
            "completion_tokens",
            "credits_consumed",
            "feature_events",
            "prompt_tokens",
            "requests",
            "successRate",
        ];
        assert_eq!(members(&schemas["StatsFigures"]), figures);
        assert_eq!(
            members(row),
            [
                "completion_tokens",
                "credits_consumed",
                "feature_events",
                "key",
                "prompt_tokens",
                "requests"
            ]
        );
        assert_eq!(row["properties"]["key"]["type"], json!(["string", "null"]));
        assert_eq!(
            row["required"].as_array().unwrap().len(),
            6,
            "key is null, never absent"
        );
    }
}
