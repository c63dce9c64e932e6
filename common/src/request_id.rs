//! The request id (SPEC §5): the caller's `X-Request-Id` when it is 1..=128
//! of `[A-Za-z0-9._:-]`, else a new one. The gateway's outermost layer decides
//! it once and runs the request inside [`scope`], so whatever the request does
//! (logs, the events it publishes, audit rows) can read it with [`current`]
//! without passing it down every call.

use std::future::Future;

/// The header, lower-case as `http` spells it.
pub const HEADER: &str = "x-request-id";

/// Longest caller id kept.
pub const MAX_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Whether the caller's id is kept as it is.
pub fn is_valid(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new id: a UUID v7 in its simple form (32 hex digits, time-ordered).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The request's id: the caller's when valid, else a new one.
pub fn accept(caller: Option<&str>) -> String {
    match caller {
        Some(id) if is_valid(id) => id.to_string(),
        _ => new_id(),
    }
}

/// Runs `fut` with `id` as the current request's id.
pub async fn scope<F: Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// The id of the request this task serves, if any (set by [`scope`]; a task
/// spawned from the request does not inherit it).
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_id_is_kept_only_when_well_formed() {
        for good in ["a", "req-123", "A.b_c:d-E", &"x".repeat(128)] {
            assert_eq!(accept(Some(good)), good);
        }
        for bad in ["", "has space", "é", "a/b", "a\"b", &"x".repeat(129)] {
            let id = accept(Some(bad));
            assert_ne!(id, bad);
            assert!(is_valid(&id), "{id}");
        }
        let fresh = accept(None);
        assert_eq!(fresh.len(), 32);
        assert!(fresh.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(fresh, new_id());
    }

    #[tokio::test]
    async fn the_id_is_current_inside_its_scope_only() {
        assert_eq!(current(), None);
        let inside = scope("r-1".into(), async { current() }).await;
        assert_eq!(inside.as_deref(), Some("r-1"));
        assert_eq!(current(), None);
    }
}
