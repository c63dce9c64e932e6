// What the stack tests share: the gateway's address, fresh users, a fetch that
// records (and can lose answers), polling with a deadline.
import { randomBytes } from "node:crypto";

import { VscClient, type ClientOptions } from "../../src/index.js";

const base = process.env["VSC_BASE_URL"];
if (base === undefined || base === "") {
  throw new Error("VSC_BASE_URL is not set: run scripts/ts-client.sh test, which starts a gateway and a worker");
}
export const BASE_URL: string = base;

/** A user id no other test uses (dev tokens provision it on first use). */
export function newUser(name: string): string {
  return `ts_${name}_${randomBytes(4).toString("hex")}`;
}

export function clientFor(user: string, options: Partial<ClientOptions> = {}): VscClient {
  return new VscClient({ baseUrl: BASE_URL, token: `dev:${user}`, ...options });
}

export interface Call {
  method: string;
  path: string;
  headers: Headers;
  body: unknown;
  status: number | "lost";
  retryAfter: string | null;
}

/**
 * A real fetch that records every request; `lose(call, n)` makes the n-th request's answer (0-based)
 * vanish after the gateway has handled it, as a connection reset after the request was sent would.
 */
export function recordingFetch(lose: (path: string, n: number) => boolean = () => false) {
  const calls: Call[] = [];
  const f: typeof fetch = async (input, init) => {
    const request = new Request(input, init);
    const text = request.body === null ? "" : await request.clone().text();
    const path = new URL(request.url).pathname;
    const n = calls.filter((c) => c.path === path).length;
    const call: Call = { method: request.method, path, headers: request.headers, body: text ? JSON.parse(text) : undefined, status: "lost", retryAfter: null };
    calls.push(call);
    const response = await fetch(request);
    if (lose(path, n)) {
      await response.arrayBuffer();
      throw new TypeError("fetch failed: the test dropped this answer");
    }
    call.status = response.status;
    call.retryAfter = response.headers.get("retry-after");
    return response;
  };
  return { fetch: f, calls };
}

/** Polls `read` every 100 ms until `done` holds; fails with the last value after `ms`. */
export async function eventually<T>(what: string, read: () => Promise<T>, done: (v: T) => boolean, ms = 15_000): Promise<T> {
  const deadline = Date.now() + ms;
  let last: T | undefined;
  for (;;) {
    last = await read();
    if (done(last)) return last;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms; last: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** `fn`'s rejection, which the test expects. */
export async function rejection(fn: () => Promise<unknown>): Promise<unknown> {
  try {
    await fn();
  } catch (e) {
    return e;
  }
  throw new Error("expected a rejection, got an answer");
}
