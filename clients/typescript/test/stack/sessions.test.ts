// Sessions, authentication and the rate limiter, against the running gateway.
import { describe, expect, it } from "vitest";

import { RateLimitedError, UnauthorizedError, VscClient } from "../../src/index.js";
import { BASE_URL, clientFor, newUser, recordingFetch, rejection } from "./helpers.js";

describe("validateSession", () => {
  it("creates a session, then keeps the same one active", async () => {
    const user = newUser("session");
    const client = clientFor(user);
    const first = await client.validateSession({ extension_version: "1.2.3", platform: "linux" });
    expect(first.status).toBe("created");
    expect(first.user.user_id).toBe(user);
    expect(Number.isFinite(first.credits.balance)).toBe(true);
    const again = await client.validateSession({ extension_version: "1.2.3", session_id: first.session_id });
    expect(again.status).toBe("active");
    expect(again.session_id).toBe(first.session_id);
  });

  it("answers a bad token with a typed 401, not retried", async () => {
    const { fetch, calls } = recordingFetch();
    const client = new VscClient({ baseUrl: BASE_URL, token: "not-a-valid-token", fetch });
    const e = await rejection(() => client.validateSession({ extension_version: "1.2.3" }));
    expect(e).toBeInstanceOf(UnauthorizedError);
    const err = e as UnauthorizedError;
    expect([err.status, err.code]).toEqual([401, "unauthorized"]);
    expect(err.detail.length).toBeGreaterThan(0);
    expect(calls).toHaveLength(1);
  });
});

describe("429", () => {
  it("is a typed error with Retry-After, and the client waits that long and retries", async () => {
    const user = newUser("limited");
    // The test stack allows `session` a burst of a few requests, then one per second.
    const once = clientFor(user, { retry: { maxRetries: 0 } });
    let limited: RateLimitedError | undefined;
    for (let i = 0; i < 50 && limited === undefined; i++) {
      try {
        await once.validateSession({ extension_version: "1.2.3" });
      } catch (e) {
        if (!(e instanceof RateLimitedError)) throw e;
        limited = e;
      }
    }
    expect(limited, "the session class never answered 429").toBeInstanceOf(RateLimitedError);
    expect([limited?.status, limited?.code]).toEqual([429, "rate_limited"]);
    expect(limited?.retryAfterSecs).toBeGreaterThanOrEqual(1);

    const slept: number[] = [];
    const sleep = async (ms: number) => {
      slept.push(ms);
      await new Promise((r) => setTimeout(r, ms));
    };
    const { fetch, calls } = recordingFetch();
    const patient = clientFor(user, { fetch, sleep, retry: { maxRetries: 5 } });
    const answer = await patient.validateSession({ extension_version: "1.2.3" });
    expect(answer.user.user_id).toBe(user);
    // At least one 429 first (the burst is spent), each followed by a wait of exactly its Retry-After.
    const refused = calls.filter((c) => c.status === 429);
    expect(refused.length).toBeGreaterThanOrEqual(1);
    expect(slept).toEqual(refused.map((c) => Number(c.retryAfter) * 1000));
    expect(calls.at(-1)?.status).toBe(200);
  });
});
