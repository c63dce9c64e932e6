//! `worker demo` (`worker::demo::load`) against a real gateway and worker: its
//! users show non-empty analytics and usage statistics through the API, with
//! every event it sent counted once.

use std::time::Duration;

use serde_json::Value;
use worker::demo::{load, DemoPlan};

use crate::helpers::*;

#[tokio::test]
async fn the_demo_loaders_users_show_non_empty_analytics_and_stats_through_the_api() {
    let app = spawn_app().await;
    app.start_worker().await;
    let prefix = format!("demo_{}_", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let plan = DemoPlan {
        gateway: app.url(""),
        users: 3,
        days: 3,
        events_per_day: 20,
        user_prefix: prefix.clone(),
    };
    let report = load(&plan).await.expect("demo load");
    assert_eq!(report.users, 3);
    assert_eq!(report.events, 3 * 3 * 20);
    assert_eq!(report.grants, 3);
    assert!(report.consumes >= 3, "{report:?}");

    let per_user = (plan.days as usize * plan.events_per_day) as i64;
    for u in 0..plan.users {
        let user = format!("{prefix}{u}");
        let token = format!("dev:{user}");
        let (a, token) = (&app, token.as_str());
        // Everything landed: every usage event counted, every spend settled.
        let analytics: Value = a
            .eventually(Duration::from_secs(30), || async move {
                let r = a.get("/api/vscode/analytics?days=30", token).await;
                let v: Value = r.json().await.ok()?;
                let t = &v["totals"];
                let events = t["requests"].as_i64()? + t["feature_events"].as_i64()?;
                (events == per_user && t["credits_consumed"].as_i64()? > 0).then_some(v)
            })
            .await;
        let t = &analytics["totals"];
        assert!(t["requests"].as_i64().unwrap() > 0, "{analytics}");
        assert!(t["feature_events"].as_i64().unwrap() > 0, "{analytics}");
        assert!(t["total_tokens"].as_i64().unwrap() > 0, "{analytics}");
        assert!(t["sessions"].as_i64().unwrap() > 0, "{analytics}");
        for list in ["by_model", "by_provider", "by_feature"] {
            let n = analytics[list].as_array().map_or(0, Vec::len);
            assert!(n > 1, "{list}: {analytics}");
        }
        // Three days of history (each day's events spread over up to 10 h
        // before the same hour): at least two distinct dates.
        let days = analytics["daily"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["requests"].as_i64() > Some(0) || d["feature_events"].as_i64() > Some(0))
            .count();
        assert!(days >= 2, "{analytics}");

        // The usage statistics route tells the same story.
        for group_by in ["day", "model", "provider", "feature", "session"] {
            let r = a
                .get(
                    &format!("/api/users/{user}/usage/stats?group_by={group_by}"),
                    token,
                )
                .await;
            assert_eq!(r.status(), 200);
            let stats: Value = r.json().await.unwrap();
            assert!(
                !stats["rows"].as_array().unwrap().is_empty(),
                "{group_by}: {stats}"
            );
            let totals = &stats["totals"];
            assert_eq!(
                totals["requests"].as_i64().unwrap() + totals["feature_events"].as_i64().unwrap(),
                per_user,
                "{group_by}: {stats}"
            );
        }
    }
}
