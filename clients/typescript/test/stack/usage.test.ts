// Usage tracking and batching, seen through the analytics the worker writes.
import { describe, expect, it } from "vitest";

import { NetworkError, UsageBatcher, type UsageEvent, type VscClient } from "../../src/index.js";
import { clientFor, eventually, newUser, recordingFetch } from "./helpers.js";

const model = (n: number): UsageEvent => ({ kind: "model", provider: "openai", model: "gpt-test", prompt_tokens: 10 * n, completion_tokens: n });
const feature = (): UsageEvent => ({ kind: "feature", feature: "chat", action: "open" });

/** Waits for one fresh feature event to be counted: every event accepted before it has been written by then. */
async function settled(client: VscClient, featureEventsBefore: number) {
  await client.track([feature()]);
  return eventually(
    "analytics counts the sentinel",
    () => client.analytics(1),
    (a) => a.totals.feature_events === featureEventsBefore + 1,
  );
}

describe("track", () => {
  it("sends a batch that shows in analytics", async () => {
    const client = clientFor(newUser("track"));
    const session = await client.validateSession({ extension_version: "1.2.3" });
    const events = [model(1), model(2), model(3), feature(), feature()].map((e) => ({ ...e, session_id: session.session_id }));
    const answer = await client.track(events);
    expect(answer.accepted).toBe(5);
    expect(new Set(answer.event_ids).size).toBe(5);
    const a = await eventually(
      "analytics shows the batch",
      () => client.analytics(1),
      (a) => a.totals.requests === 3 && a.totals.feature_events === 2,
    );
    expect(a.totals.prompt_tokens).toBe(60);
    expect(a.totals.completion_tokens).toBe(6);
  });

  it("retries a lost answer with the same event ids, and the gateway stores them once", async () => {
    const { fetch, calls } = recordingFetch((path, n) => path === "/api/vscode/usage/track" && n === 0);
    const client = clientFor(newUser("retry"), { fetch, sleep: async () => {} });
    const answer = await client.track([model(1), model(1), model(1), model(1)]);
    const sent = calls.filter((c) => c.path === "/api/vscode/usage/track");
    expect(sent.map((c) => c.status)).toEqual(["lost", 202]);
    const ids = (c: (typeof sent)[number]) => (c.body as { events: UsageEvent[] }).events.map((e) => e.event_id);
    expect(ids(sent[1]!)).toEqual(ids(sent[0]!));
    expect(answer.event_ids).toEqual(ids(sent[0]!));
    const a = await settled(client, 0);
    expect(a.totals.requests).toBe(4);
  });
});

describe("UsageBatcher", () => {
  it("flushes at its batch size and on its interval", async () => {
    const { fetch, calls } = recordingFetch();
    const client = clientFor(newUser("batch"), { fetch });
    const batcher = new UsageBatcher(client, { maxBatch: 3, flushIntervalMs: 200 });
    for (let i = 0; i < 7; i++) batcher.add(model(1));
    await eventually("the batcher sends everything", async () => batcher.pending, (n) => n === 0, 5_000);
    await eventually("the last batch is answered", async () => calls.filter((c) => c.status === 202).length, (n) => n === 3, 5_000);
    const sizes = calls.map((c) => (c.body as { events: unknown[] }).events.length);
    expect(sizes).toEqual([3, 3, 1]);
    const a = await settled(client, 0);
    expect(a.totals.requests).toBe(7);
  });

  it("keeps a batch that failed and resends it with the same ids", async () => {
    const { fetch, calls } = recordingFetch((path, n) => path === "/api/vscode/usage/track" && n === 0);
    const client = clientFor(newUser("requeue"), { fetch, retry: { maxRetries: 0 } });
    const errors: unknown[] = [];
    const batcher = new UsageBatcher(client, { flushIntervalMs: 60_000, onError: (e) => errors.push(e) });
    const ids = [batcher.add(model(2)), batcher.add(model(2))];
    expect(await batcher.flush()).toEqual([]);
    expect(errors).toHaveLength(1);
    expect(errors[0]).toBeInstanceOf(NetworkError);
    expect(batcher.pending).toBe(2);
    const [answer] = await batcher.close();
    expect(answer?.event_ids).toEqual(ids);
    expect(calls.map((c) => (c.body as { events: UsageEvent[] }).events.map((e) => e.event_id))).toEqual([ids, ids]);
    const a = await settled(client, 0);
    expect(a.totals.requests).toBe(2);
  });
});
