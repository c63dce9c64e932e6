// When to retry a request, and after how long: pure, so it is unit-tested.
import type { ApiError } from "./errors.js";

export interface RetryPolicy {
  /** Retries after the first attempt (so at most `maxRetries + 1` requests). Default 3. */
  maxRetries: number;
  /** Delay before the first retry when the answer gave no `Retry-After`, doubled each time. Default 200 ms. */
  baseDelayMs: number;
  /** A `Retry-After` longer than this is not waited for: the error is thrown at once. Default 60 s. */
  maxRetryAfterSecs: number;
  /** No computed backoff is longer than this. Default 5 s. */
  maxBackoffMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxRetries: 3, baseDelayMs: 200, maxRetryAfterSecs: 60, maxBackoffMs: 5000 };

/**
 * Milliseconds to wait before retrying after `error` on attempt `attempt` (0 = the first request),
 * or `undefined` when the error is final. Retried: 429 and 503 (after their `Retry-After`), and no
 * answer at all. The flows retry only what is safe to repeat: events keep their ids, consume and
 * hold their `Idempotency-Key`, a settle answers the first settlement again (a repeated
 * `validateSession` without a `session_id` may create a second session, which is harmless).
 */
export function retryDelayMs(error: ApiError, attempt: number, policy: RetryPolicy): number | undefined {
  if (attempt >= policy.maxRetries) return undefined;
  const retryable = error.status === 429 || error.status === 503 || error.code === "network";
  if (!retryable) return undefined;
  if (error.retryAfterSecs !== undefined) {
    if (error.retryAfterSecs > policy.maxRetryAfterSecs) return undefined;
    return error.retryAfterSecs * 1000;
  }
  return Math.min(policy.maxBackoffMs, policy.baseDelayMs * 2 ** attempt);
}
