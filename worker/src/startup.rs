//! Builds the worker from settings: one consumer task per queue, the scheduled
//! jobs, and the health/metrics listener.

use common::settings::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Kept here too: tests and the gateway's tests name `worker::startup::Ctx`.
pub use crate::ctx::Ctx;

pub struct Worker {
    ctx: Ctx,
    listener: TcpListener,
    shutdown: CancellationToken,
}

impl Worker {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        common::tls::init(&settings)?;
        let listener = TcpListener::bind(&settings.worker.listen).await?;
        Ok(Self {
            ctx: Ctx::new(settings)?,
            listener,
            shutdown,
        })
    }

    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Runs consumers and jobs until shutdown; consumers finish their batch,
    /// ack, and only then does this return.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        crate::metrics::init(&self.ctx.settings);
        let metrics = crate::http::metrics_handle();
        let ready = crate::http::Readiness::new(self.ctx.pg.clone(), &self.ctx.settings.amqp.url);
        let app = crate::http::router(metrics, std::sync::Arc::new(ready));
        let stop = self.shutdown.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(self.listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        let mut tasks = Vec::new();
        for q in &self.ctx.settings.worker.queues {
            let n = if q == "usage" {
                self.ctx.settings.worker.usage_consumers.max(1)
            } else {
                1
            };
            for _ in 0..n {
                tasks.push(tokio::spawn(crate::consumer::run(
                    self.ctx.clone(),
                    q.clone(),
                    self.shutdown.clone(),
                )));
            }
        }
        tasks.push(tokio::spawn(crate::jobs::run(
            self.ctx.clone(),
            self.shutdown.clone(),
        )));
        // The webhook delivery job (alerts uses `jobs::locked`, so it is started here).
        tasks.push(tokio::spawn(crate::alerts::run(
            self.ctx.clone(),
            self.shutdown.clone(),
        )));
        tracing::info!(queues = ?self.ctx.settings.worker.queues, "worker running");
        for t in tasks {
            let _ = t.await;
        }
        let _ = server.await;
        tracing::info!("worker stopped");
        Ok(())
    }
}
