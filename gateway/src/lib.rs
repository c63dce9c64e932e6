//! The gateway: authenticates, rate-limits, answers what it can from Redis and
//! publishes events to RabbitMQ with confirms.

pub mod admin;
pub mod analytics;
pub mod audit;
pub mod auth;
pub mod credits;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod publisher;
pub mod rate_limit;
pub mod redis_link;
pub mod server;
pub mod sessions;
pub mod startup;
pub mod state;
pub mod usage;
pub mod users;
