// Credits: holds around a model call, idempotent consumes, 402 and 409 as typed errors.
import { describe, expect, it } from "vitest";

import { IdempotencyConflictError, InsufficientCreditsError } from "../../src/index.js";
import { clientFor, newUser, recordingFetch, rejection } from "./helpers.js";

describe("withHold", () => {
  it("holds the bound during the call, then settles the actual cost", async () => {
    const client = clientFor(newUser("hold"));
    await client.validateSession({ extension_version: "1.2.3" });
    const start = (await client.balance()).balance;
    const { result, settlement } = await client.withHold(30, async (hold) => {
      expect(hold.amount).toBe(30);
      const during = await client.balance();
      expect([during.balance, during.held]).toEqual([start - 30, 30]);
      return { result: "the model's answer", cost: { amount: 12, model: "gpt-test", prompt_tokens: 100, completion_tokens: 20 } };
    });
    expect(result).toBe("the model's answer");
    expect([settlement.amount, settlement.released, settlement.balance]).toEqual([12, 18, start - 12]);
    const after = await client.balance();
    expect([after.balance, after.held]).toEqual([start - 12, 0]);
  });

  it("releases the hold when the call fails", async () => {
    const client = clientFor(newUser("release"));
    const start = (await client.balance()).balance;
    const failure = new Error("the model is down");
    const e = await rejection(() =>
      client.withHold(25, async () => {
        throw failure;
      }),
    );
    expect(e).toBe(failure);
    const after = await client.balance();
    expect([after.balance, after.held]).toEqual([start, 0]);
  });

  it("refuses a hold over the balance with a typed 402, before the call", async () => {
    const client = clientFor(newUser("hold402"));
    const start = (await client.balance()).balance;
    let called = false;
    const e = await rejection(() =>
      client.withHold(start + 1_000_000, async () => {
        called = true;
        return { result: null, cost: 0 };
      }),
    );
    expect(e).toBeInstanceOf(InsufficientCreditsError);
    const err = e as InsufficientCreditsError;
    expect([err.status, err.code, err.balance, err.required]).toEqual([402, "insufficient_credits", start, start + 1_000_000]);
    expect(called).toBe(false);
  });
});

describe("consume", () => {
  it("retries a lost answer with the same Idempotency-Key and charges once", async () => {
    const { fetch, calls } = recordingFetch((path, n) => path.endsWith("/credits/consume") && n === 0);
    const client = clientFor(newUser("consume"), { fetch, sleep: async () => {} });
    const start = (await client.balance()).balance;
    const { data, response } = await client.consume({ amount: 7, feature: "chat" });
    const sent = calls.filter((c) => c.path.endsWith("/credits/consume"));
    expect(sent.map((c) => c.status)).toEqual(["lost", 200]);
    const keys = sent.map((c) => c.headers.get("idempotency-key"));
    expect(keys[0]).toBeTruthy();
    expect(keys[1]).toBe(keys[0]);
    expect(response.headers.get("idempotent-replayed")).toBe("true");
    expect(data.balance).toBe(start - 7);
    expect((await client.balance()).balance).toBe(start - 7);
  });

  it("gives each logical call its own key", async () => {
    const { fetch, calls } = recordingFetch();
    const client = clientFor(newUser("twice"), { fetch });
    const start = (await client.balance()).balance;
    await client.consume({ amount: 2 });
    await client.consume({ amount: 2 });
    const keys = calls.filter((c) => c.path.endsWith("/credits/consume")).map((c) => c.headers.get("idempotency-key"));
    expect(new Set(keys).size).toBe(2);
    expect((await client.balance()).balance).toBe(start - 4);
  });

  it("answers a balance too small with a typed 402 carrying balance and required", async () => {
    const client = clientFor(newUser("c402"));
    const start = (await client.balance()).balance;
    const e = await rejection(() => client.consume({ amount: start + 1 }));
    expect(e).toBeInstanceOf(InsufficientCreditsError);
    const err = e as InsufficientCreditsError;
    expect([err.status, err.balance, err.required]).toEqual([402, start, start + 1]);
    expect((await client.balance()).balance).toBe(start);
  });

  it("answers a key reused with another body with a typed 409", async () => {
    const client = clientFor(newUser("c409"));
    const key = crypto.randomUUID();
    await client.consume({ amount: 1 }, { idempotencyKey: key });
    const replay = await client.consume({ amount: 1 }, { idempotencyKey: key });
    expect(replay.response.headers.get("idempotent-replayed")).toBe("true");
    const e = await rejection(() => client.consume({ amount: 2 }, { idempotencyKey: key }));
    expect(e).toBeInstanceOf(IdempotencyConflictError);
    expect([(e as IdempotencyConflictError).status, (e as IdempotencyConflictError).code]).toEqual([409, "idempotency_conflict"]);
  });
});
