//! `scripts/dev.sh` as a newcomer meets it: from a clean checkout of HEAD, with
//! its own ports, database, Redis key prefix and AMQP namespace. It must build,
//! migrate, announce readiness, print curl lines that work as printed (the
//! track answers 202 and the read-back shows the event), and stop on SIGINT
//! with exit status 0, leaving no gateway or worker behind.
//!
//! Slow (it compiles the workspace crates of the checkout), so
//! `.config/nextest.toml` runs it alone with a longer timeout and
//! `scripts/test.sh` runs it in a step of its own after the suite.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

/// Building the checkout's crates on a shared 2-core machine can be slow.
const READY_DEADLINE: Duration = Duration::from_secs(900);
const LANDED_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The target directory these tests were built in (…/target/debug/worker):
/// the checkout builds there, so only the workspace crates compile again.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_worker"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The ids of live processes in process group `pgid` (read from /proc).
fn group_members(pgid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may hold spaces, so split after ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        // A zombie is gone already; only its parent has not reaped it yet.
        if fields.first() == Some(&"Z") {
            continue;
        }
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
            out.push((pid, comm.to_string()));
        }
    }
    out
}

/// Kills what is left of the script's process group and removes the
/// checkout, also when an assertion failed half-way.
struct Cleanup {
    pgid: Option<u32>,
    checkout: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            if !group_members(pgid).is_empty() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.checkout);
    }
}

/// The child's exit status, or `None` if it still runs after `timeout`.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one printed curl line in a shell, as a reader would paste it, with
/// the status code appended on a last line of its own.
async fn run_curl(line: &str) -> (u16, String) {
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{line} -w '\\n%{{http_code}}'"))
        .output()
        .await
        .expect("bash");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Whether an analytics answer counts exactly the one tracked model event.
fn shows_the_event(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return false;
    };
    let by_model = v["by_model"].as_array().cloned().unwrap_or_default();
    v["totals"]["requests"] == 1
        && by_model.iter().any(|m| {
            m["provider"] == "openai"
                && m["model"] == "gpt-4o"
                && m["requests"] == 1
                && m["prompt_tokens"] == 120
                && m["completion_tokens"] == 30
        })
}

#[tokio::test]
async fn the_dev_stack_starts_from_a_clean_checkout_answers_its_curl_lines_and_stops_on_sigint() {
    let started = std::time::Instant::now();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    // Not `t_…`: engineers' older scripts/ensure-services.sh drop every t_*
    // database whenever they run, and this one sits idle through the build.
    let stack = testkit::Stack::unmigrated("devstack", &[]).await;
    let checkout = std::env::temp_dir().join(format!("devstack-{}", uuid::Uuid::new_v4().simple()));
    let mut cleanup = Cleanup {
        pgid: None,
        checkout: checkout.clone(),
    };
    let cloned = tokio::process::Command::new("git")
        .args(["clone", "--quiet"])
        .arg(workspace)
        .arg(&checkout)
        .status()
        .await
        .expect("git");
    assert!(cloned.success(), "git clone of {}", workspace.display());

    let (gateway_port, worker_port) = (free_port(), free_port());
    let s = &stack.settings;
    // SIGINT at its default disposition even if this test runs under a
    // shell that ignores it (a background job): bash cannot trap a signal
    // ignored on entry. `env` execs bash, so the pid stays the script's.
    let mut child = std::process::Command::new("env")
        .arg("--default-signal=INT")
        .arg("bash")
        .arg(checkout.join("scripts/dev.sh"))
        .current_dir(&checkout)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{gateway_port}"))
        .env("WORKER_LISTEN", format!("127.0.0.1:{worker_port}"))
        .env("DATABASE_URL", &stack.db.url)
        .env("REDIS_URL", &s.redis.url)
        .env("AMQP_URL", &s.amqp.url)
        .env("APP__REDIS__KEY_PREFIX", &s.redis.key_prefix)
        .env("APP__AMQP__NAMESPACE", &s.amqp.namespace)
        .env("RUST_LOG", "warn")
        .env("DEV_READY_TIMEOUT_S", "120")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: the signal goes to the script alone, and
        // whatever it started can be found (and, on failure, killed) by group.
        .process_group(0)
        .spawn()
        .expect("env bash scripts/dev.sh");
    let pgid = child.id();
    cleanup.pgid = Some(pgid);

    // Every stdout line goes to the channel, and to a transcript for failures.
    let transcript = Arc::new(Mutex::new(Vec::<String>::new()));
    let (tx, mut lines) = mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let t = transcript.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            t.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let log = || transcript.lock().unwrap().join("\n");

    // Ready, then the curl lines up to the closing hint.
    let mut ready = false;
    let mut curls = Vec::new();
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("dev.sh ended before it was ready:\n{}", log()),
            Err(_) => panic!("dev.sh not ready within {READY_DEADLINE:?}:\n{}", log()),
        };
        if line.starts_with("dev: ready") {
            ready = true;
        } else if ready && line.starts_with("curl ") {
            curls.push(line);
        } else if ready && line.starts_with("dev: Ctrl-C") {
            break;
        }
    }
    let ready_after = started.elapsed();
    assert_eq!(curls.len(), 2, "two curl lines:\n{}", log());
    let (track, read_back) = (&curls[0], &curls[1]);
    assert!(track.contains("/api/vscode/usage/track"), "{track}");

    let (code, body) = run_curl(track).await;
    assert_eq!(code, 202, "{track}\n{body}");
    let accepted: Value = serde_json::from_str(&body).expect("track answer");
    assert_eq!(accepted["accepted"], 1, "{body}");

    let deadline = tokio::time::Instant::now() + LANDED_DEADLINE;
    loop {
        let (code, body) = run_curl(read_back).await;
        if code == 200 && shows_the_event(&body) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the read-back never showed the event; last answer {code}: {body}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Ctrl-C, as a terminal would send it to the script.
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &pgid.to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = wait_exit(&mut child, STOP_DEADLINE)
        .await
        .unwrap_or_else(|| panic!("dev.sh did not exit within {STOP_DEADLINE:?}:\n{}", log()));
    assert_eq!(status.code(), Some(0), "{}", log());
    // The pipe closes once every process that held it (the script, gateway,
    // worker) is gone.
    let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => panic!("dev.sh's stdout is still open: something it started runs on"),
        }
    }
    assert!(log().contains("dev: stopped (exit 0)"), "{}", log());
    let left = group_members(pgid);
    assert!(
        left.is_empty(),
        "still running after dev.sh exited: {left:?}"
    );
    for port in [gateway_port, worker_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still answers"
        );
    }
    eprintln!(
        "devstack: ready after {:.0?} (clone, build, migrate, start), whole test {:.0?}",
        ready_after,
        started.elapsed()
    );
    drop(cleanup);
}
