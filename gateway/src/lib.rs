//! The gateway: authenticates, rate-limits, answers what it can from Redis and
//! publishes events to RabbitMQ with confirms.
//!
//! # Layout
//! - `http/`: routes, extractors, the guard, `ApiError` (the only `IntoResponse`),
//!   `target` (the one "may the caller act on user :id" rule);
//! - `error`: the domain error, no HTTP in it; `decode`: JSON values into typed bodies;
//! - `credits/`, `usage`, `analytics/`, `users`, `sessions`, `admin`, `audit`,
//!   `operator`, `rate_limit`: the domain, returning `error::Error`;
//! - `alerts`: spend-alert configuration and the alerts raised (the worker decides and delivers);
//! - `api_keys`: extension API keys (generation, hashing, scopes, the Redis-backed verification);
//! - `profile`: the profile and its Redis cache, with the original's `user`, `usage`, `recentTransactions`;
//! - `auth`, `publisher`, `redis_link`, `metrics`: plumbing; `state`: `AppState` and the
//!   handles domain functions take (`CreditStore`, `UserStore`, `SessionStore`, `Limiter`);
//! - `credits/pricing`: the price book, its in-memory cache and the amount it computes;
//! - `server`, `startup`, `main.rs`: wiring.

pub mod admin;
pub mod alerts;
pub mod analytics;
pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod credits;
pub mod decode;
pub mod error;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod orgs;

pub mod profile;
pub mod publisher;
pub mod rate_limit;
pub mod reads;
pub mod redis_link;
pub mod server;
pub mod sessions;
pub mod startup;
pub mod state;
pub mod usage;
pub mod users;
