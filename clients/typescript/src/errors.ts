// problem+json answers (SPEC 5) as typed exceptions: one class with `code`,
// `status`, `detail`, and a subclass per code a caller acts on differently.
import type { components } from "./generated/schema.js";

export type Problem = components["schemas"]["Problem"];
export type ProblemCode = components["schemas"]["Code"];

/** Every error answer of the gateway, and a transport failure (`status` 0). */
export class ApiError extends Error {
  /** The problem's `code`; `network` when no answer came, `http_error` when the body was not a problem. */
  readonly code: ProblemCode | "network" | "http_error";
  readonly status: number;
  readonly detail: string;
  /** The parsed problem body, when there was one. */
  readonly problem: Problem | undefined;
  /** `Retry-After` in seconds, when the answer carried one. */
  readonly retryAfterSecs: number | undefined;
  /** `X-Request-Id` of the answer: quote it when reporting a problem. */
  readonly requestId: string | undefined;

  constructor(init: ErrorInit) {
    super(`${init.status} ${init.code}: ${init.detail}`, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code;
    this.status = init.status;
    this.detail = init.detail;
    this.problem = init.problem;
    this.retryAfterSecs = init.retryAfterSecs;
    this.requestId = init.requestId;
  }
}

export interface ErrorInit {
  code: ApiError["code"];
  status: number;
  detail: string;
  problem?: Problem | undefined;
  retryAfterSecs?: number | undefined;
  requestId?: string | undefined;
  cause?: unknown;
}

/** 401 `unauthorized`: no, bad or expired token. */
export class UnauthorizedError extends ApiError {}
/** 403 `forbidden`, `account_suspended`, `account_deleted`. */
export class ForbiddenError extends ApiError {}
/** 404 `not_found`. */
export class NotFoundError extends ApiError {}
/** 400/422 `validation_failed`; `field` names the member (`events[3].model`). */
export class ValidationError extends ApiError {
  readonly field: string | undefined;
  constructor(init: ErrorInit) {
    super(init);
    this.field = init.problem?.field ?? undefined;
  }
}
/** 402 `insufficient_credits`: nothing was reserved. */
export class InsufficientCreditsError extends ApiError {
  /** What the user can spend now. */
  readonly balance: number;
  /** The amount asked for. */
  readonly required: number;
  constructor(init: ErrorInit) {
    super(init);
    this.balance = init.problem?.balance ?? 0;
    this.required = init.problem?.required ?? 0;
  }
}
/** 409 `idempotency_conflict`: the key was used with another body, or its first request is still running. */
export class IdempotencyConflictError extends ApiError {}
/** 409 `hold_expired`: the hold was settled, released or expired. */
export class HoldExpiredError extends ApiError {}
/** 426 `upgrade_required`: the extension is below `min_extension_version`. */
export class UpgradeRequiredError extends ApiError {
  readonly minExtensionVersion: string | undefined;
  constructor(init: ErrorInit) {
    super(init);
    this.minExtensionVersion = init.problem?.min_extension_version ?? undefined;
  }
}
/** 429 `rate_limited`, after the client's own retries gave up. */
export class RateLimitedError extends ApiError {}
/** 503 `unavailable` (a dependency is down), after the client's own retries gave up. */
export class UnavailableError extends ApiError {}
/** No answer at all (connection refused, reset, DNS), after the client's own retries gave up. */
export class NetworkError extends ApiError {}

const BY_CODE: Partial<Record<ApiError["code"], new (init: ErrorInit) => ApiError>> = {
  unauthorized: UnauthorizedError,
  forbidden: ForbiddenError,
  account_suspended: ForbiddenError,
  account_deleted: ForbiddenError,
  not_found: NotFoundError,
  validation_failed: ValidationError,
  insufficient_credits: InsufficientCreditsError,
  idempotency_conflict: IdempotencyConflictError,
  hold_expired: HoldExpiredError,
  upgrade_required: UpgradeRequiredError,
  rate_limited: RateLimitedError,
  unavailable: UnavailableError,
  network: NetworkError,
};

/** The code of an answer whose body is not a problem (a proxy's page), from its status. */
function codeOfStatus(status: number): ApiError["code"] {
  switch (status) {
    case 401:
      return "unauthorized";
    case 429:
      return "rate_limited";
    case 503:
      return "unavailable";
    default:
      return "http_error";
  }
}

function isProblem(body: unknown): body is Problem {
  if (typeof body !== "object" || body === null) return false;
  const b = body as Record<string, unknown>;
  return typeof b["code"] === "string" && typeof b["status"] === "number";
}

/** The typed error of one error answer. */
export function errorOf(status: number, body: unknown, headers: Headers | undefined, nowMs = Date.now()): ApiError {
  const problem = isProblem(body) ? body : undefined;
  const code: ApiError["code"] = problem?.code ?? codeOfStatus(status);
  const detail = problem?.detail ?? (typeof body === "string" && body.length > 0 ? body.slice(0, 200) : `HTTP ${status}`);
  const init: ErrorInit = {
    code,
    status,
    detail,
    problem,
    retryAfterSecs: parseRetryAfter(headers?.get("retry-after") ?? null, nowMs),
    requestId: headers?.get("x-request-id") ?? undefined,
  };
  const Class = BY_CODE[code] ?? ApiError;
  return new Class(init);
}

/** The error of a request that got no answer. */
export function networkError(cause: unknown): NetworkError {
  const detail = cause instanceof Error ? cause.message : String(cause);
  return new NetworkError({ code: "network", status: 0, detail, cause });
}

/** `Retry-After` (RFC 9110 10.2.3): delay-seconds or an HTTP date; seconds from now, never negative. */
export function parseRetryAfter(value: string | null, nowMs: number): number | undefined {
  if (value === null) return undefined;
  const v = value.trim();
  if (/^\d+$/.test(v)) return Number(v);
  // An HTTP date names its day and month ("Wed, 21 Oct 2015 07:28:00 GMT"); "-1" is not one.
  if (!/[a-z]/i.test(v)) return undefined;
  const at = Date.parse(v);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, Math.ceil((at - nowMs) / 1000));
}
