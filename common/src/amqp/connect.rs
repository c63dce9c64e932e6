//! The AMQP connection, driven by the tokio runtime the binaries already run.

/// Opens an AMQP connection driven by tokio (not lapin's default executor).
pub async fn connect(url: &str) -> lapin::Result<lapin::Connection> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    lapin::Connection::connect(url, props).await
}
