//! The credit reconciler (docs/credits.md "Reconciler") through the real
//! stack: drift planted in Redis is repaired from the ledger, stale
//! reservations without an event are given back, and `worker reconcile`
//! reports what it repaired.

use common::redis::keys::Keys;
use redis::AsyncCommands;

use crate::credits::{api_balance, consume, drained, pending_len};
use crate::helpers::*;

#[tokio::test]
async fn the_reconciler_repairs_a_drifted_balance_and_releases_stale_reservations() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    assert_eq!(consume(&app, &user, &token, 10, None).await.0, 200);
    drained(&app, &user, 90).await;
    let ctx = worker::startup::Ctx::new(app.settings.clone()).unwrap();
    assert_eq!(
        worker::reconcile::reconcile_user(&ctx, &user)
            .await
            .unwrap(),
        None
    );

    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut c = app.redis.get().await.unwrap();
    // Drift: bal off by 7.
    let _: () = c.hset(keys.credits(&user), "bal", 83).await.unwrap();
    let r = worker::reconcile::reconcile_user(&ctx, &user)
        .await
        .unwrap()
        .expect("repair");
    assert_eq!((r.from, r.to), (83, 90));
    // A reservation whose event never reached the broker (a gateway died
    // between reserving and publishing), and one already settled whose HDEL
    // was lost.
    let _: () = c.hset(keys.credits(&user), "bal", 85).await.unwrap();
    let _: () = c
        .hset(keys.pending(&user), uuid::Uuid::new_v4().to_string(), "5:1")
        .await
        .unwrap();
    let settled: uuid::Uuid = sqlx::query_scalar(
        "select id from credit_transactions where user_id = $1 and kind = 'consume'",
    )
    .bind(&user)
    .fetch_one(&app.pg)
    .await
    .unwrap();
    let _: () = c
        .hset(keys.pending(&user), settled.to_string(), "10:1")
        .await
        .unwrap();
    assert_eq!(
        worker::reconcile::reconcile_user(&ctx, &user)
            .await
            .unwrap(),
        None,
        "the books agree once both are gone"
    );
    assert_eq!(pending_len(&app, &user).await, 0);
    assert_eq!(api_balance(&app, &token).await["balance"], 90);
}

/// `worker reconcile --user` (the operator command) repairs a drift planted
/// in Redis and reports it.
#[tokio::test]
async fn the_reconcile_command_repairs_a_planted_drift_and_reports_it() {
    let app = spawn_app().await;
    app.start_worker().await;
    let (user, token) = new_user();
    assert_eq!(consume(&app, &user, &token, 10, None).await.0, 200);
    drained(&app, &user, 90).await;
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut c = app.redis.get().await.unwrap();
    let _: () = c.hset(keys.credits(&user), "bal", 71).await.unwrap();
    // The worker binary sits beside this test binary's directory.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("worker");
    assert!(
        bin.exists(),
        "{} is built with the workspace",
        bin.display()
    );
    let out = std::process::Command::new(&bin)
        .args(["reconcile", "--user", &user])
        .env_clear()
        .envs(&app.vars)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("repaired {user}: balance 71 -> 90")),
        "{text}"
    );
    assert!(text.contains("1 repaired"), "{text}");
    assert_eq!(api_balance(&app, &token).await["balance"], 90);
}
