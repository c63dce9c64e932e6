// The client's decisions, without a network: Retry-After, when to retry, which error class.
import { describe, expect, it } from "vitest";

import {
  afterFailure,
  ApiError,
  DEFAULT_RETRY,
  errorOf,
  HoldExpiredError,
  IdempotencyConflictError,
  InsufficientCreditsError,
  networkError,
  parseRetryAfter,
  RateLimitedError,
  retryDelayMs,
  UnauthorizedError,
  UnavailableError,
  ValidationError,
} from "../src/index.js";

const problem = (code: string, status: number, extra: object = {}) => ({
  type: `https://errors.vsc-backend.dev/${code}`,
  title: code,
  status,
  detail: `${code} detail`,
  code,
  error: code,
  message: `${code} detail`,
  ...extra,
});

describe("parseRetryAfter", () => {
  const now = Date.parse("2026-01-01T00:00:00Z");
  it("reads delay-seconds", () => {
    expect(parseRetryAfter("7", now)).toBe(7);
    expect(parseRetryAfter(" 0 ", now)).toBe(0);
  });
  it("reads an HTTP date, rounded up, never negative", () => {
    expect(parseRetryAfter("Thu, 01 Jan 2026 00:00:03 GMT", now)).toBe(3);
    expect(parseRetryAfter("Wed, 31 Dec 2025 23:59:00 GMT", now)).toBe(0);
  });
  it("ignores what it cannot read", () => {
    expect(parseRetryAfter(null, now)).toBeUndefined();
    expect(parseRetryAfter("-1", now)).toBeUndefined();
    expect(parseRetryAfter("soon", now)).toBeUndefined();
  });
});

describe("errorOf", () => {
  it("maps each code a caller acts on to its class", () => {
    const cases: [string, number, new (...a: never[]) => ApiError][] = [
      ["unauthorized", 401, UnauthorizedError],
      ["validation_failed", 422, ValidationError],
      ["idempotency_conflict", 409, IdempotencyConflictError],
      ["hold_expired", 409, HoldExpiredError],
      ["rate_limited", 429, RateLimitedError],
      ["unavailable", 503, UnavailableError],
    ];
    for (const [code, status, Class] of cases) {
      const e = errorOf(status, problem(code, status), new Headers());
      expect(e).toBeInstanceOf(Class);
      expect(e).toBeInstanceOf(ApiError);
      expect([e.code, e.status, e.detail]).toEqual([code, status, `${code} detail`]);
    }
  });
  it("keeps a 402's balance and required", () => {
    const e = errorOf(402, problem("insufficient_credits", 402, { balance: 5, required: 9 }), new Headers());
    expect(e).toBeInstanceOf(InsufficientCreditsError);
    expect((e as InsufficientCreditsError).balance).toBe(5);
    expect((e as InsufficientCreditsError).required).toBe(9);
  });
  it("keeps Retry-After, X-Request-Id and a 422's field", () => {
    const h = new Headers({ "retry-after": "2", "x-request-id": "r-1" });
    const e = errorOf(422, problem("validation_failed", 422, { field: "events[0].model" }), h);
    expect([e.retryAfterSecs, e.requestId, (e as ValidationError).field]).toEqual([2, "r-1", "events[0].model"]);
  });
  it("names a body that is not a problem by its status", () => {
    expect(errorOf(503, "<html>bad gateway</html>", new Headers()).code).toBe("unavailable");
    expect(errorOf(502, "", new Headers()).code).toBe("http_error");
    expect(errorOf(502, "", new Headers())).not.toBeInstanceOf(UnavailableError);
  });
});

describe("retryDelayMs", () => {
  const p = { ...DEFAULT_RETRY, maxRetries: 2 };
  const e = (status: number, retryAfter?: string) =>
    errorOf(status, problem(status === 429 ? "rate_limited" : "unavailable", status), new Headers(retryAfter ? { "retry-after": retryAfter } : {}));
  it("waits Retry-After on 429 and 503", () => {
    expect(retryDelayMs(e(429, "3"), 0, p)).toBe(3000);
    expect(retryDelayMs(e(503, "1"), 1, p)).toBe(1000);
  });
  it("backs off exponentially without Retry-After, and after a lost answer", () => {
    expect(retryDelayMs(e(503), 0, p)).toBe(200);
    expect(retryDelayMs(e(503), 1, p)).toBe(400);
    expect(retryDelayMs(networkError(new TypeError("reset")), 1, p)).toBe(400);
  });
  it("stops after maxRetries, and at a Retry-After longer than allowed", () => {
    expect(retryDelayMs(e(429, "1"), 2, p)).toBeUndefined();
    expect(retryDelayMs(e(429, "61"), 0, p)).toBeUndefined();
  });
  it("never retries an answer that would repeat", () => {
    for (const [code, status] of [["insufficient_credits", 402], ["idempotency_conflict", 409], ["unauthorized", 401], ["internal", 500]] as const) {
      expect(retryDelayMs(errorOf(status, problem(code, status), new Headers()), 0, p)).toBeUndefined();
    }
  });
});

describe("afterFailure", () => {
  it("drops a batch the gateway refused for good and keeps the rest", () => {
    expect(afterFailure(errorOf(422, problem("validation_failed", 422), new Headers()))).toBe("drop");
    expect(afterFailure(errorOf(413, problem("payload_too_large", 413), new Headers()))).toBe("drop");
    expect(afterFailure(errorOf(429, problem("rate_limited", 429), new Headers()))).toBe("requeue");
    expect(afterFailure(errorOf(401, problem("unauthorized", 401), new Headers()))).toBe("requeue");
    expect(afterFailure(networkError(new TypeError("reset")))).toBe("requeue");
  });
});
