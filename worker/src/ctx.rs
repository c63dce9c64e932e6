//! The handles every consumer, job and command shares: settings, the
//! Postgres pool, the Redis pool, key names and the AMQP topology. Its own
//! module so that consumers and jobs depend on it, not on `startup`.

use std::sync::Arc;

use common::amqp::topology::Topology;
use common::redis::keys::Keys;
use common::settings::Settings;
use sqlx::PgPool;

/// What every consumer and job shares.
#[derive(Clone)]
pub struct Ctx {
    pub settings: Arc<Settings>,
    pub pg: PgPool,
    pub redis: common::redis::Pool,
    pub keys: Keys,
    pub topology: Topology,
}

impl Ctx {
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        Ok(Self {
            pg: common::db::pg_pool(&settings)?,
            redis: common::redis::redis_pool(&settings)?,
            keys: Keys::new(&settings.redis.key_prefix),
            topology: Topology::new(&settings.amqp.namespace, settings.amqp.delivery_limit),
            settings: Arc::new(settings),
        })
    }
}
