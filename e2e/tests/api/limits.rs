//! Limits on what a client (or a slow dependency) can make the gateway hold:
//! the request deadline, header size and count, slow clients, the connection
//! cap. Raw sockets where an HTTP client would hide what happens on the wire.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Reads one HTTP/1.1 response (head and `Content-Length` body) from a
/// keep-alive connection; fails the test if none is complete by `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("a complete response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a complete response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
    let mut buf = Vec::new();
    let r = tokio::time::timeout(within, stream.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "the server did not close the connection within {within:?}"
    );
    String::from_utf8_lossy(&buf).into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n";

// ---- request deadline -------------------------------------------------------

#[tokio::test]
async fn a_request_stuck_on_a_hanging_postgres_gets_503_problem_json_at_its_deadline() {
    let app = spawn_app().await;
    // Known to the gateways (in Redis): its profile read needs Postgres.
    let (known, known_token) = new_user();
    let r = app
        .post(
            "/api/vscode/usage/track",
            &known_token,
            &json!({"kind": "feature", "feature": "warm"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let hole = BlackHole::start().await;
    let stuck = spawn_twin_with(&app, |v| {
        v.insert(
            "DATABASE_URL".into(),
            format!("postgres://postgres@{}/hangs", hole.addr),
        );
        // Postgres's own bound is far away: only the deadline can answer.
        v.insert("APP__DATABASE__ACQUIRE_TIMEOUT_MS".into(), "120000".into());
        v.insert("APP__GATEWAY__REQUEST_TIMEOUT_MS".into(), "400".into());
    })
    .await;

    // A first-seen user needs Postgres to be provisioned.
    let (stranger, stranger_token) = new_user();
    let r = stuck
        .post(
            "/api/vscode/usage/track",
            &stranger_token,
            &json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": "x"}),
        )
        .await;
    assert_problem_at_deadline(r, 400).await;
    // A read that needs Postgres.
    let r = stuck
        .get(&format!("/api/users/{known}/profile"), &known_token)
        .await;
    assert_problem_at_deadline(r, 400).await;

    // Nothing was written: the stranger was never provisioned.
    let n: i64 = sqlx::query_scalar("select count(*) from users where id = $1")
        .bind(&stranger)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // The gateway itself still answers (nothing is stuck on the hang).
    let r = stuck
        .client
        .get(stuck.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = stuck
        .client
        .get(stuck.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "http_request_deadline_total{route=\"/api/users/{id}/profile\",outcome=\"cut\"}"
        ),
        "{metrics}"
    );
}

async fn assert_problem_at_deadline(r: reqwest::Response, after_ms: u64) {
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(r.headers().contains_key("retry-after"));
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["code"], "unavailable");
    assert_eq!(p["status"], 503);
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("{after_ms} ms")), "{detail}");
}

/// The deadline does not cut a request that has published: its answer waits
/// for the broker's confirm (bounded by `amqp.confirm_timeout_ms`), so a 202
/// is never turned into a 503 for events the broker has, and a confirm that
/// never comes is a 503 whose events a resend with the same ids stores once.
#[tokio::test]
async fn usage_track_past_its_deadline_still_answers_202_once_the_broker_confirms() {
    let relay = Relay::start("127.0.0.1:5672").await;
    let deadline_ms = 300;
    let app = spawn_app_with(|v| {
        v.insert(
            "AMQP_URL".into(),
            format!("amqp://guest:guest@{}/%2f", relay.addr),
        );
        v.insert(
            "APP__GATEWAY__REQUEST_TIMEOUT_MS".into(),
            deadline_ms.to_string(),
        );
        v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
    })
    .await;
    // The worker reaches the broker directly: only the gateway's replies are held.
    let mut worker_settings = app.settings.clone();
    worker_settings.amqp.url = "amqp://guest:guest@127.0.0.1:5672/%2f".into();
    app.start_worker_with(worker_settings).await;
    let (user, token) = new_user();
    let r = app
        .post(
            "/api/vscode/usage/track",
            &token,
            &json!({"kind": "feature", "feature": "warm"}),
        )
        .await;
    assert_eq!(r.status(), 202);

    // 1. The confirm comes late, after the deadline: still a 202.
    let events: Vec<Value> = (0..3)
        .map(|_| json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": "late"}))
        .collect();
    let ids: Vec<Value> = events.iter().map(|e| e["event_id"].clone()).collect();
    relay.hold_replies();
    let sent = Instant::now();
    let request = {
        let (client, url, token) = (
            app.client.clone(),
            app.url("/api/vscode/usage/track"),
            token.clone(),
        );
        let body = json!({"events": events});
        tokio::spawn(async move { client.post(url).bearer_auth(token).json(&body).send().await })
    };
    app.eventually(Duration::from_secs(10), || async {
        (relay.held_replies() > 0).then_some(())
    })
    .await;
    // Let the deadline pass while the broker's answer is held back.
    tokio::time::sleep_until((sent + Duration::from_millis(3 * deadline_ms)).into()).await;
    assert!(
        !request.is_finished(),
        "the request must still be waiting for its confirm"
    );
    relay.release_replies();
    let r = request.await.unwrap().unwrap();
    assert!(sent.elapsed() > Duration::from_millis(deadline_ms));
    assert_eq!(r.status(), 202, "a confirmed publish is never denied");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["event_ids"], json!(ids));

    // 2. The confirm never comes: the publisher's own bound answers 503.
    let event =
        json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": "lost-confirm"});
    relay.hold_replies();
    let r = app.post("/api/vscode/usage/track", &token, &event).await;
    assert_eq!(r.status(), 503);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["code"], "unavailable");
    assert_eq!(p["detail"], "rabbitmq is unavailable");
    relay.release_replies();
    // The client resends the same event: accepted, and stored once.
    let r = app.post("/api/vscode/usage/track", &token, &event).await;
    assert_eq!(r.status(), 202);

    let stored = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from feature_usage where user_id = $1")
            .bind(&user)
            .fetch_one(&app.pg)
            .await
            .unwrap()
    };
    app.eventually(Duration::from_secs(20), || async {
        (stored().await == 5).then_some(())
    })
    .await;
    let once: i64 = sqlx::query_scalar("select count(*) from feature_usage where id = $1")
        .bind(uuid::Uuid::parse_str(event["event_id"].as_str().unwrap()).unwrap())
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(once, 1);
    println!("accepted = 5, stored = {}", stored().await);
}

/// A write waits at most `amqp.confirm_timeout_ms` for the broker, also when
/// all the publisher's slots are taken by messages whose confirms never come
/// (docs/api.md "Outages"): a request queued behind them answers 503 by its own deadline,
/// not after a slot frees plus a confirm timeout of its own.
#[tokio::test]
async fn a_write_queued_behind_unconfirmed_messages_answers_503_within_the_confirm_timeout() {
    let relay = Relay::start("127.0.0.1:5672").await;
    let app = spawn_app_with(|v| {
        v.insert(
            "AMQP_URL".into(),
            format!("amqp://guest:guest@{}/%2f", relay.addr),
        );
        v.insert("APP__AMQP__CONFIRM_TIMEOUT_MS".into(), "2000".into());
        v.insert("APP__AMQP__MAX_IN_FLIGHT".into(), "1".into());
    })
    .await;
    let (_, token) = new_user();
    let track = |feature: &'static str| {
        let (client, url, token) = (
            app.client.clone(),
            app.url("/api/vscode/usage/track"),
            token.clone(),
        );
        tokio::spawn(async move {
            let sent = Instant::now();
            let r = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"kind": "feature", "feature": feature}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), sent.elapsed())
        })
    };
    let r = app
        .post(
            "/api/vscode/usage/track",
            &token,
            &json!({"kind": "feature", "feature": "warm"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    relay.hold_replies();
    // The first takes the only slot and its confirm never comes.
    let first = track("first");
    app.eventually(Duration::from_secs(10), || async {
        (relay.held_replies() > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The second waits for that slot, which frees only at the first's timeout.
    let second = track("second");
    let (status, waited) = first.await.unwrap();
    assert_eq!(status, 503);
    assert!(waited < Duration::from_millis(2600), "first: {waited:?}");
    let (status, waited) = second.await.unwrap();
    relay.release_replies();
    assert_eq!(status, 503);
    assert!(
        waited < Duration::from_millis(2600),
        "second answered after {waited:?}, past the 2 s confirm timeout"
    );
}

#[tokio::test]
async fn a_body_trickled_slower_than_the_deadline_gets_503_problem_json() {
    let app = spawn_app_with(|v| {
        v.insert("APP__GATEWAY__REQUEST_TIMEOUT_MS".into(), "500".into());
    })
    .await;
    let (user, token) = new_user();
    let body =
        json!({"event_id": uuid::Uuid::new_v4(), "kind": "feature", "feature": "slow"}).to_string();
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/vscode/usage/track HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let bytes = body.into_bytes();
    // One byte every 100 ms: the whole body would take seconds.
    let trickle = tokio::spawn(async move {
        for b in bytes.iter().take(bytes.len() - 1) {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while find(&buf, b"\r\n\r\n").is_none() || !buf.ends_with(b"}") {
        let n = tokio::time::timeout_at(deadline, rd.read(&mut chunk))
            .await
            .expect("an answer before the body is complete")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
    trickle.abort();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text
        .to_ascii_lowercase()
        .contains("content-type: application/problem+json"));
    assert!(text.contains("\"code\":\"unavailable\""), "{text}");
    let n: i64 = sqlx::query_scalar("select count(*) from users where id = $1")
        .bind(&user)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert!(n <= 1, "at most provisioned, never anything else");
}

// ---- headers and slow clients ----------------------------------------------

#[tokio::test]
async fn an_oversized_header_section_gets_431_and_the_connection_is_closed() {
    let app = spawn_app_with(|v| {
        v.insert("APP__GATEWAY__MAX_HEADER_BYTES".into(), "8192".into());
    })
    .await;
    // Under the limit: served.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let fits = format!(
        "GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(6000)
    );
    s.write_all(fits.as_bytes()).await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // Over it: 431, and hyper closes the connection.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let r = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r:?}");

    // Many small headers, under the byte limit but over the count: 431 too.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: gw\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let _ = s.write_all(many.as_bytes()).await;
    let r = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r:?}");

    // The gateway serves on.
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off_without_an_answer() {
    let app = spawn_app_with(|v| {
        v.insert("APP__GATEWAY__HEADER_READ_TIMEOUT_MS".into(), "500".into());
    })
    .await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // A header line, one byte every 100 ms, never finished: the kind of
    // client that holds a connection for ever with a few bytes a minute.
    let trickle = tokio::spawn(async move {
        let mut sent = 0usize;
        for b in b"X-Slow: ".iter().chain([b'a'; 400].iter()) {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow client was not cut off");
    assert!(
        buf.is_empty(),
        "a cut-off client gets no answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let sent = trickle.await.unwrap();
    assert!(
        sent < 408,
        "cut off before the header was complete ({sent} bytes)"
    );

    // An idle connection (nothing sent at all) is closed too.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(read_to_close(&mut idle, Duration::from_secs(30)).await, "");

    // And so is a keep-alive connection left idle after its request.
    let mut ka = TcpStream::connect(app.addr).await.unwrap();
    ka.write_all(HEALTHZ).await.unwrap();
    let r = read_response(&mut ka, Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(read_to_close(&mut ka, Duration::from_secs(30)).await, "");
}

// ---- connection cap ---------------------------------------------------------

#[tokio::test]
async fn past_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let cap = 3;
    let app = spawn_app_with(|v| {
        v.insert("APP__GATEWAY__MAX_CONNECTIONS".into(), cap.to_string());
        v.insert(
            "APP__GATEWAY__HEADER_READ_TIMEOUT_MS".into(),
            "60000".into(),
        );
    })
    .await;
    // Fill the cap with keep-alive connections, each served once.
    let mut open = Vec::new();
    for _ in 0..cap {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(HEALTHZ).await.unwrap();
        let r = read_response(&mut s, Duration::from_secs(10)).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        open.push(s);
    }
    // Two more: the kernel completes their handshakes (backlog), the gateway
    // does not take them while the cap is full.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(HEALTHZ).await.unwrap();
        waiting.push(s);
    }
    let mut probe = [0u8; 1];
    for s in &mut waiting {
        let r = tokio::time::timeout(Duration::from_millis(700), s.read(&mut probe)).await;
        assert!(r.is_err(), "served past the cap");
    }
    // The open ones are still served meanwhile.
    open[0].write_all(HEALTHZ).await.unwrap();
    let r = read_response(&mut open[0], Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // One closes: exactly one waiting connection is taken and answered.
    drop(open.pop());
    let r = read_response(&mut waiting[0], Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = tokio::time::timeout(Duration::from_millis(700), waiting[1].read(&mut probe)).await;
    assert!(r.is_err(), "the cap still holds for the other one");
    // Another closes: the last one is answered.
    drop(open.pop());
    let r = read_response(&mut waiting[1], Duration::from_secs(10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}
