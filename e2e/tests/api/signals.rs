//! The real gateway binary under SIGTERM with requests in flight: it stops
//! accepting, finishes what it took (confirms included) and exits 0; every
//! event it answered 202 for is stored.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sigterm_under_load_exits_zero_and_every_accepted_event_is_stored() {
    let app = spawn_app().await;
    app.start_worker().await;
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_e2e-gateway"))
        .env_clear()
        .envs(&app.vars)
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway binary never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (user, token) = new_user();
    // 8 clients posting as fast as they can while the signal arrives.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let base = base.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for _ in 0..400 {
                let body = json!({"kind": "feature", "feature": "load"});
                match client
                    .post(format!("{base}/api/vscode/usage/track"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 202 => {
                        let v: Value = r.json().await.unwrap();
                        accepted.push(v["event_ids"][0].as_str().unwrap().to_string());
                    }
                    Ok(r) => assert!(
                        r.status() == 503 || r.status() == 429,
                        "unexpected {}",
                        r.status()
                    ),
                    Err(_) => break, // the listener closed
                }
            }
            accepted
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    let mut accepted = Vec::new();
    for t in tasks {
        accepted.extend(t.await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(!accepted.is_empty());
    let n = accepted.len() as i64;
    app.eventually(Duration::from_secs(20), || async {
        let c: i64 = sqlx::query_scalar("select count(*) from feature_usage where user_id = $1")
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (c == n).then_some(())
    })
    .await;
    println!("accepted = {n}, stored = {n}");
}
