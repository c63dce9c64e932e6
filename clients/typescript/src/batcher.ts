// Client-side batching of usage events: queue, flush on size or interval,
// resend a failed batch with the same event ids (the gateway stores each once).
import type { ApiError } from "./errors.js";
import type { TrackAnswer, UsageEvent, VscClient } from "./client.js";

/** The gateway's bound on one request (SPEC 5.2). */
export const MAX_BATCH = 500;

export interface BatcherOptions {
  /** Flush when this many events are queued (1..=500). Default 500. */
  maxBatch?: number;
  /** Flush this long after the first queued event. Default 5000 ms. */
  flushIntervalMs?: number;
  /** Oldest events are dropped (and reported) beyond this. Default 10 000. */
  maxQueued?: number;
  /** A batch the gateway refused for good (422), or events dropped from a full queue. */
  onDrop?: (events: UsageEvent[], reason: ApiError | "queue_full") => void;
  /** A batch that failed after the client's retries; it stays queued with its ids. */
  onError?: (error: unknown) => void;
}

/** What to do with a batch whose send failed: keep it (same ids) for the next flush, or drop it. */
export function afterFailure(error: unknown): "requeue" | "drop" {
  const e = error as Partial<ApiError>;
  // The whole batch was refused and would be again: 400/413/415/422. Auth and everything else may pass later.
  if (e.status === 400 || e.status === 413 || e.status === 415 || e.status === 422) return "drop";
  return "requeue";
}

export class UsageBatcher {
  private queue: UsageEvent[] = [];
  private timer: ReturnType<typeof setTimeout> | undefined;
  private inFlight: Promise<void> = Promise.resolve();
  private readonly maxBatch: number;
  private readonly flushIntervalMs: number;
  private readonly maxQueued: number;

  constructor(
    private readonly client: VscClient,
    private readonly options: BatcherOptions = {},
  ) {
    this.maxBatch = Math.min(MAX_BATCH, Math.max(1, options.maxBatch ?? MAX_BATCH));
    this.flushIntervalMs = options.flushIntervalMs ?? 5000;
    this.maxQueued = Math.max(this.maxBatch, options.maxQueued ?? 10_000);
  }

  /** Events waiting to be sent. */
  get pending(): number {
    return this.queue.length;
  }

  /** Queues an event (it gets its `event_id` now); returns the id. */
  add(event: UsageEvent): string {
    const [withId] = this.client.withEventIds([event]);
    if (withId === undefined) throw new Error("unreachable: one event in, one out");
    this.queue.push(withId);
    if (this.queue.length > this.maxQueued) {
      this.options.onDrop?.(this.queue.splice(0, this.queue.length - this.maxQueued), "queue_full");
    }
    if (this.queue.length >= this.maxBatch) {
      this.flushInBackground();
    } else if (this.timer === undefined) {
      this.timer = setTimeout(() => this.flushInBackground(), this.flushIntervalMs);
      this.timer.unref?.();
    }
    return withId.event_id as string;
  }

  /**
   * Sends what is queued, one batch of at most `maxBatch` at a time (flushes never overlap).
   * Resolves with the answers of the batches sent; a failed batch is requeued (or dropped on a 4xx
   * that would repeat) and reported to `onError`, and the flush stops there.
   */
  flush(): Promise<TrackAnswer[]> {
    const run = this.inFlight.then(() => this.drain());
    this.inFlight = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** Stops the timer and sends everything queued. */
  async close(): Promise<TrackAnswer[]> {
    this.clearTimer();
    return this.flush();
  }

  private async drain(): Promise<TrackAnswer[]> {
    this.clearTimer();
    const answers: TrackAnswer[] = [];
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0, this.maxBatch);
      try {
        answers.push(await this.client.track(batch));
      } catch (e) {
        if (afterFailure(e) === "drop") {
          this.options.onDrop?.(batch, e as ApiError);
        } else {
          this.queue.unshift(...batch);
          this.options.onError?.(e);
          this.schedule();
          break;
        }
      }
    }
    return answers;
  }

  private flushInBackground(): void {
    this.flush().catch((e: unknown) => this.options.onError?.(e));
  }

  private schedule(): void {
    if (this.timer === undefined && this.queue.length > 0) {
      this.timer = setTimeout(() => this.flushInBackground(), this.flushIntervalMs);
      this.timer.unref?.();
    }
  }

  private clearTimer(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }
}
