// The extension's flows over the generated client: the hand-written layer adds
// only what the document cannot say (retries that are safe to repeat, holds
// around a model call, typed errors). Anything else: `client.api`, fully typed.
import createClient, { type Client } from "openapi-fetch";

import { ApiError, errorOf, networkError } from "./errors.js";
import type { components, paths } from "./generated/schema.js";
import { DEFAULT_RETRY, retryDelayMs, type RetryPolicy } from "./retry.js";

type Schemas = components["schemas"];
export type SessionBody = Schemas["SessionValidateBody"];
export type Session = Schemas["SessionValidateAnswer"];
export type UsageEvent = Schemas["Event"];
export type TrackAnswer = Schemas["TrackAnswer"];
export type ConsumeBody = Schemas["ConsumeBody"];
export type ConsumeAnswer = Schemas["ConsumeAnswer"];
export type HoldBody = Schemas["HoldBody"];
export type Hold = Schemas["HoldAnswer"];
export type SettleBody = Schemas["SettleBody"];
export type Settlement = Schemas["SettleAnswer"];
export type Balance = Schemas["BalanceAnswer"];
export type Analytics = Schemas["AnalyticsAnswer"];

export interface ClientOptions {
  /** The gateway, e.g. `https://api.example.com` (no trailing `/api`). */
  baseUrl: string;
  /** The bearer token, or a function asked before every request (for refreshing tokens). */
  token: string | (() => string | Promise<string>);
  /** The token's `sub`; learned from `validateSession` or `GET /api/auth/user-info` when not given. */
  userId?: string;
  fetch?: typeof globalThis.fetch;
  /** How retries wait; tests inject a recorder. Default: `setTimeout`. */
  sleep?: (ms: number) => Promise<void>;
  retry?: Partial<RetryPolicy>;
  /** New event ids and idempotency keys. Default: `crypto.randomUUID`. */
  newId?: () => string;
}

/** What a request answered, with the headers a caller may want (`Idempotent-Replayed`, RateLimit). */
export interface Answer<T> {
  data: T;
  response: Response;
}

interface Sent<T> {
  data?: T;
  error?: unknown;
  response: Response;
}

/** Options of one credit call. */
export interface CallOptions {
  /** Reuse a key to make a later, separate call a replay; by default each logical call gets a new one. */
  idempotencyKey?: string;
}

export const defaultSleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export class VscClient {
  /** The generated client, with the token set: every route of the document, typed. */
  readonly api: Client<paths>;
  private readonly policy: RetryPolicy;
  private readonly sleep: (ms: number) => Promise<void>;
  private readonly newId: () => string;
  private userId: string | undefined;

  constructor(options: ClientOptions) {
    const clientOptions: Parameters<typeof createClient>[0] = { baseUrl: options.baseUrl };
    if (options.fetch !== undefined) clientOptions.fetch = options.fetch;
    this.api = createClient<paths>(clientOptions);
    const token = options.token;
    this.api.use({
      async onRequest({ request }) {
        const value = typeof token === "string" ? token : await token();
        request.headers.set("Authorization", `Bearer ${value}`);
        return request;
      },
    });
    this.policy = { ...DEFAULT_RETRY, ...options.retry };
    this.sleep = options.sleep ?? defaultSleep;
    this.newId = options.newId ?? (() => crypto.randomUUID());
    this.userId = options.userId;
  }

  /**
   * Sends `attempt` until it succeeds, retrying 429/503 after their `Retry-After` and lost answers,
   * at most `maxRetries` times; the final failure is thrown as its typed error. `attempt` must build
   * the same request every time (the same event ids, the same `Idempotency-Key`).
   */
  async send<T>(attempt: () => Promise<Sent<T>>): Promise<Answer<T>> {
    for (let n = 0; ; n++) {
      let error: ApiError;
      try {
        const sent = await attempt();
        if (sent.response.ok) return { data: sent.data as T, response: sent.response };
        error = errorOf(sent.response.status, sent.error, sent.response.headers);
      } catch (e) {
        if (e instanceof ApiError) throw e;
        error = networkError(e);
      }
      const delay = retryDelayMs(error, n, this.policy);
      if (delay === undefined) throw error;
      await this.sleep(delay);
    }
  }

  /** 5.1: creates or slides the session; remembers the caller's id for the credit calls. */
  async validateSession(body: SessionBody): Promise<Session> {
    const { data } = await this.send(() => this.api.POST("/api/vscode/session/validate", { body }));
    this.userId = data.user.user_id;
    return data;
  }

  /**
   * 5.2: one request of 1..=500 events. Events without an `event_id` get one first, so every retry
   * (and a later resend of the same array) carries the same ids and the gateway stores each once.
   */
  async track(events: UsageEvent[]): Promise<TrackAnswer> {
    const withIds = this.withEventIds(events);
    const { data } = await this.send(() => this.api.POST("/api/vscode/usage/track", { body: { events: withIds } }));
    return data;
  }

  /** The events with an `event_id` each (kept when present). */
  withEventIds(events: UsageEvent[]): UsageEvent[] {
    return events.map((e) => (e.event_id ? e : { ...e, event_id: this.newId() }));
  }

  /** `GET /api/vscode/user/balance`: what the caller can spend now, and what is held. */
  async balance(): Promise<Balance> {
    const { data } = await this.send(() => this.api.GET("/api/vscode/user/balance"));
    return data;
  }

  /** 5.3: the caller's analytics over the last `days` days. */
  async analytics(days?: number): Promise<Analytics> {
    const query = days === undefined ? {} : { days };
    const { data } = await this.send(() => this.api.GET("/api/vscode/analytics", { params: { query } }));
    return data;
  }

  /** 5.5: charges `body.amount` once, however often the call is retried. */
  async consume(body: ConsumeBody, options: CallOptions = {}): Promise<Answer<ConsumeAnswer>> {
    const id = await this.callerId();
    const key = options.idempotencyKey ?? this.newId();
    return this.send(() =>
      this.api.POST("/api/users/{id}/credits/consume", { params: { path: { id }, header: { "Idempotency-Key": key } }, body }),
    );
  }

  /** 5.5b: holds `body.amount` (once, however often retried) until settled, released or expired. */
  async hold(body: HoldBody, options: CallOptions = {}): Promise<Answer<Hold>> {
    const id = await this.callerId();
    const key = options.idempotencyKey ?? this.newId();
    return this.send(() =>
      this.api.POST("/api/users/{id}/credits/holds", { params: { path: { id }, header: { "Idempotency-Key": key } }, body }),
    );
  }

  /** 5.5b: charges `body.amount` (≤ the hold) and returns the rest; settling again answers the first settlement. */
  async settle(holdId: string, body: SettleBody): Promise<Settlement> {
    const id = await this.callerId();
    const path = { id, hold_id: holdId };
    const { data } = await this.send(() => this.api.POST("/api/users/{id}/credits/holds/{hold_id}/settle", { params: { path }, body }));
    return data;
  }

  /** 5.5b: returns the whole hold to the balance. */
  async release(holdId: string): Promise<void> {
    const id = await this.callerId();
    const path = { id, hold_id: holdId };
    await this.send(() => this.api.DELETE("/api/users/{id}/credits/holds/{hold_id}", { params: { path } }));
  }

  /**
   * Hold → call → settle: holds `amount` (an upper bound of the call's cost), runs `fn`, and settles
   * what `fn` says it cost (a number, or a settle body with the model and tokens). When `fn` throws,
   * the hold is released and the error rethrown; when the release fails too, the hold expires by itself.
   * A 402 (`InsufficientCreditsError`) is thrown before `fn` runs.
   */
  async withHold<T>(
    amount: number,
    fn: (hold: Hold) => Promise<{ result: T; cost: number | SettleBody }>,
    hold: Omit<HoldBody, "amount"> = {},
  ): Promise<{ result: T; settlement: Settlement; hold: Hold }> {
    const { data: held } = await this.hold({ ...hold, amount });
    let outcome: { result: T; cost: number | SettleBody };
    try {
      outcome = await fn(held);
    } catch (e) {
      await this.release(held.hold_id).catch(() => undefined);
      throw e;
    }
    const body = typeof outcome.cost === "number" ? { amount: outcome.cost } : outcome.cost;
    const settlement = await this.settle(held.hold_id, body);
    return { result: outcome.result, settlement, hold: held };
  }

  /** The caller's user id (the token's `sub`). */
  async callerId(): Promise<string> {
    if (this.userId === undefined) {
      const { data } = await this.send(() => this.api.GET("/api/auth/user-info"));
      this.userId = data.user_id;
    }
    return this.userId;
  }
}
