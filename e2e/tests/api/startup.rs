//! The built gateway binary refuses a bad configuration at start with one
//! line naming the key (README.md "Configuration", §4).

use std::time::Duration;

/// Runs the gateway binary with exactly these variables (nothing inherited)
/// in an empty directory; returns its exit status and stderr.
async fn run_gateway(vars: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = std::env::temp_dir().join(format!("gw-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e-gateway"));
    cmd.env_clear()
        .current_dir(&dir)
        // Should it start after all, it must not take a real port, and it dies with the test.
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("the gateway should have refused to start")
        .expect("run the gateway binary");
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_naming(stderr: &str, key: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got {stderr:?}");
    assert!(lines[0].contains(key), "{:?} should name {key}", lines[0]);
}

#[tokio::test]
async fn the_gateway_refuses_to_start_in_production_with_dev_tokens() {
    let (status, stderr) = run_gateway(&[
        ("APP_ENV", "production"),
        ("AUTH_DEV_TOKENS", "true"),
        ("JWT_SECRET", "a-secret-that-would-otherwise-do"),
    ])
    .await;
    assert!(!status.success(), "exit status {status}");
    assert_one_line_naming(&stderr, "AUTH_DEV_TOKENS");
}

#[tokio::test]
async fn the_gateway_refuses_to_start_without_a_jwt_key_source() {
    let (status, stderr) = run_gateway(&[]).await;
    assert!(!status.success(), "exit status {status}");
    assert_one_line_naming(&stderr, "JWT_SECRET");
    let (status, stderr) = run_gateway(&[("APP_ENV", "production"), ("JWT_SECRET", "")]).await;
    assert!(!status.success(), "exit status {status}");
    assert_one_line_naming(&stderr, "JWT_SECRET");
}

#[tokio::test]
async fn the_gateway_refuses_an_unparseable_value_naming_its_key() {
    let (status, stderr) = run_gateway(&[
        ("JWT_SECRET", "s3cret"),
        ("APP__RATE_LIMIT__CLASSES__USAGE__LIMIT", "lots"),
    ])
    .await;
    assert!(!status.success(), "exit status {status}");
    assert_one_line_naming(&stderr, "rate_limit.classes.usage.limit");
}

#[tokio::test]
async fn the_gateway_refuses_to_start_in_production_with_a_plain_http_jwks_or_a_short_secret() {
    let (status, stderr) = run_gateway(&[
        ("APP_ENV", "production"),
        ("JWKS_URL", "http://clerk.example.com/.well-known/jwks.json"),
    ])
    .await;
    assert!(!status.success(), "exit status {status}");
    assert_one_line_naming(&stderr, "JWKS_URL");
    let (status, stderr) = run_gateway(&[
        ("APP_ENV", "production"),
        ("JWT_SECRET", "thirty-one-bytes-is-too-short.."),
    ])
    .await;
    assert!(!status.success(), "exit status {status}");
    assert_one_line_naming(&stderr, "JWT_SECRET");
}
