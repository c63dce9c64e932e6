//! A fresh Postgres database per test, dropped (WITH FORCE) when the guard
//! drops, even while the test unwinds from a failed assertion.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use common::settings::Settings;
use sqlx::{Connection, PgPool};

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn db_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// Owns one `t_<uuid>` database; drops it on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// An empty database: no schema at all.
    pub async fn empty() -> Self {
        Self::empty_named("t").await
    }

    /// An empty database named `<prefix>_<uuid>`.
    pub async fn empty_named(prefix: &str) -> Self {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url())
            .await
            .expect("admin connection");
        sqlx::query(&format!("create database \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        let url = db_url(&name);
        Self { name, url }
    }

    /// A database with every migration applied.
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("test db");
        common::db::MIGRATOR
            .run(&mut conn)
            .await
            .expect("migrations");
        db
    }

    pub async fn pool(&self, max_connections: u32) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .expect("pool")
    }

    pub async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connection")
    }

    /// Settings pointing at this database (and nothing else the test needs).
    pub fn settings(&self) -> Settings {
        let vars: HashMap<String, String> = [
            ("DATABASE_URL".to_string(), self.url.clone()),
            (
                "JWT_SECRET".to_string(),
                "unused-in-these-tests".to_string(),
            ),
        ]
        .into();
        Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropping needs async IO; a thread with its own runtime works even
        // while the test's runtime is unwinding from a panic.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ =
                        sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

/// A migrated database plus an own Redis key prefix and AMQP namespace; the
/// database (via [`TestDb`]), the namespace's queues and exchanges and the
/// prefix's Redis keys are removed on drop.
pub struct Stack {
    pub vars: HashMap<String, String>,
    pub settings: Settings,
    // Declared last: dropped after the namespace cleanup below ran.
    pub db: TestDb,
}

impl Stack {
    /// `extra` variables are layered over the stack's own.
    pub async fn new(extra: &[(&str, &str)]) -> Self {
        Self::on(TestDb::migrated().await, extra)
    }

    /// The same with an empty database named `<db_prefix>_<uuid>`, for a
    /// test whose subject migrates it.
    pub async fn unmigrated(db_prefix: &str, extra: &[(&str, &str)]) -> Self {
        Self::on(TestDb::empty_named(db_prefix).await, extra)
    }

    fn on(db: TestDb, extra: &[(&str, &str)]) -> Self {
        let tag = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut vars: HashMap<String, String> = [
            ("DATABASE_URL", db.url.as_str()),
            ("JWT_SECRET", "unused-in-these-tests"),
            ("APP__REDIS__KEY_PREFIX", tag.as_str()),
            ("APP__AMQP__NAMESPACE", tag.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let settings = Settings::load_from(Path::new("/nonexistent"), &vars).expect("settings");
        Self { vars, settings, db }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let s = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(conn) = common::amqp::connect::connect(&s.amqp.url).await {
                    if let Ok(ch) = conn.create_channel().await {
                        let topo = common::amqp::topology::Topology::new(
                            &s.amqp.namespace,
                            s.amqp.delivery_limit,
                        );
                        let _ = topo.delete(&ch).await;
                    }
                    let _ = conn.close(200, "bye").await;
                }
                drop_redis_keys(&s.redis.url, &s.redis.key_prefix).await;
            });
        })
        .join();
    }
}

/// Deletes every key under `prefix:` (SCAN, so Redis is never blocked).
pub async fn drop_redis_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
