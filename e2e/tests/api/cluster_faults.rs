//! A Redis Cluster master lost and back empty (issue 20): the users on its
//! slots go through the rebuild, the others never notice.
//!
//! Against the loopback cluster of `scripts/clusters.sh start redis-cluster`
//! (7001-7003, `cluster-require-full-coverage no`), with
//! `TEST_REDIS_CLUSTER_URLS` from `scripts/clusters.sh env redis-cluster`.
//! `#[ignore]`d: it kills a node, so it runs alone, with `CLUSTER_TESTS=1`:
//! `CLUSTER_TESTS=1 cargo nextest run -p e2e -E 'test(/^cluster_faults::/)' --run-ignored only`.

use std::path::Path;
use std::time::Duration;

use common::redis::keys::Keys;
use common::redis::slot::{key_slot, slot_of};
use serde_json::json;

use crate::credits::{consume, drained, read};
use crate::helpers::*;

/// `CLUSTER SLOTS` of the running cluster: (first slot, last slot, master port).
async fn slot_map(urls: &str) -> Vec<(u16, u16, u16)> {
    let first = urls.split(',').next().expect("a node URL").trim();
    let client = redis::Client::open(first).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c)
        .await
        .unwrap();
    ranges
        .into_iter()
        .map(|r| {
            let items: Vec<redis::Value> = redis::from_redis_value(&r).unwrap();
            let head = redis::Value::Array(items.into_iter().take(2).collect());
            let (from, to): (u16, u16) = redis::from_redis_value(&head).unwrap();
            (from, to, common::redis::conn::range_master(&r).unwrap().1)
        })
        .collect()
}

fn owner(map: &[(u16, u16, u16)], slot: u16) -> u16 {
    map.iter()
        .find(|(a, b, _)| (*a..=*b).contains(&slot))
        .map(|m| m.2)
        .expect("every slot has a master")
}

fn clusters_sh(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/clusters.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("scripts/clusters.sh");
    assert!(
        out.status.success(),
        "clusters.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
}

async fn grant(app: &TestApp, user: &str, amount: i64) -> i64 {
    let path = format!("/api/admin/users/{user}/credits/grant");
    let (s, body, _) = read(
        app.post(
            &path,
            &admin_token(),
            &json!({"amount": amount, "reason": "cluster test"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    body["balance"].as_i64().unwrap()
}

/// A user (id, token) whose slot's master is (`on`) or is not (`!on`) `port`.
fn user_where(map: &[(u16, u16, u16)], port: u16, on: bool) -> (String, String) {
    loop {
        let (id, token) = new_user();
        if (owner(map, slot_of(&id)) == port) == on {
            return (id, token);
        }
    }
}

#[tokio::test]
#[ignore = "kills a Redis Cluster master: CLUSTER_TESTS=1 after scripts/clusters.sh start redis-cluster"]
async fn a_master_back_empty_costs_only_the_users_of_its_slots_a_rebuild() {
    assert_eq!(
        std::env::var("CLUSTER_TESTS").as_deref(),
        Ok("1"),
        "run with CLUSTER_TESTS=1"
    );
    let urls = std::env::var("TEST_REDIS_CLUSTER_URLS")
        .expect("TEST_REDIS_CLUSTER_URLS (scripts/clusters.sh env redis-cluster)");
    let map = slot_map(&urls).await;
    // A prefix whose deployment-wide keys (sentinel, recovery, heartbeats)
    // share one master; another master is the one lost.
    let (tag, home) = loop {
        let tag = testkit::new_tag();
        let k = Keys::new(&tag);
        let shared = [
            k.sentinel(),
            k.recovery(),
            k.credit_consumers(),
            k.api_keys_loaded_all(),
        ];
        let ports: Vec<u16> = shared
            .iter()
            .map(|key| owner(&map, key_slot(key.as_bytes())))
            .collect();
        if ports.iter().all(|p| *p == ports[0]) {
            break (tag, ports[0]);
        }
    };
    let victim = map
        .iter()
        .map(|m| m.2)
        .find(|p| *p != home)
        .expect("three masters");
    let app = spawn_app_with(|v| {
        v.insert("APP__REDIS__KEY_PREFIX".into(), tag.clone());
        v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
        v.insert("APP__CREDITS__RECOVERY_GRACE_MS".into(), "500".into());
    })
    .await;
    assert!(
        app.settings.redis.cluster_nodes().len() >= 3,
        "the gateway runs on the cluster"
    );
    app.start_worker().await;
    let (lost, lost_token) = user_where(&map, victim, true);
    let (other, other_token) = user_where(&map, victim, false);
    let granted = 1000;
    assert_eq!(grant(&app, &lost, granted - 100).await, granted);
    assert_eq!(grant(&app, &other, granted - 100).await, granted);
    let (s, body, _) = consume(&app, &lost, &lost_token, 300, None).await;
    assert_eq!(s, 200, "{body}");
    drained(&app, &lost, granted - 300).await;

    clusters_sh(&["kill-redis-master", &victim.to_string()]);
    let (mut refused, mut other_spent) = (0, 0);
    for _ in 0..5 {
        let (s, body, _) = consume(&app, &lost, &lost_token, 1, None).await;
        assert_eq!(s, 503, "its master is gone: {body}");
        refused += 1;
        let (s, body, _) = consume(&app, &other, &other_token, 1, None).await;
        assert_eq!(s, 200, "another slot's user never notices: {body}");
        other_spent += 1;
    }
    clusters_sh(&["restart-redis-master", &victim.to_string()]);

    // Back empty: its slots' sentinels are gone, so the user is refused (its
    // scripts answer LOST) until the recovery has rebuilt it from the ledger.
    // The other user is served meanwhile; it then pauses, since the recovery
    // completes once the consumers have been idle a moment (docs/credits.md).
    let (s, body, _) = consume(&app, &lost, &lost_token, 1, None).await;
    assert_eq!(s, 503, "its slot lost its data: {body}");
    refused += 1;
    for _ in 0..5 {
        let (s, body, _) = consume(&app, &other, &other_token, 1, None).await;
        assert_eq!(s, 200, "another slot's user never notices: {body}");
        other_spent += 1;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        let (s, body, _) = consume(&app, &lost, &lost_token, 1, None).await;
        if s != 503 {
            break (s, body);
        }
        refused += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "not rebuilt within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(first.0, 200, "{}", first.1);
    let remainder = granted - 300 - 1;
    assert_eq!(
        first.1["balance"], remainder,
        "exactly the remainder is there"
    );
    let (s, body, _) = consume(&app, &lost, &lost_token, remainder, None).await;
    assert_eq!(s, 200, "the remainder is spendable: {body}");
    let (s, body, _) = consume(&app, &lost, &lost_token, 1, None).await;
    assert_eq!(s, 402, "nothing beyond it: {body}");
    let spent = 300 + 1 + remainder;

    let rest = granted - other_spent;
    let (s, body, _) = consume(&app, &other, &other_token, rest, None).await;
    assert_eq!(s, 200, "{body}");
    other_spent += rest;
    drained(&app, &lost, 0).await;
    drained(&app, &other, 0).await;
    let overspend = (spent - granted).max(0);
    assert_eq!(overspend, 0);
    eprintln!(
        "lost-slot user refused {refused} times then rebuilt, spent {spent} of {granted}; overspend {overspend}; \
         other-slot user consumed all {other_spent} (master {victim} lost, shared keys on {home})"
    );
}
