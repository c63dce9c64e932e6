//! The process-wide Prometheus recorder (shared with the worker in tests).

pub fn handle() -> metrics_exporter_prometheus::PrometheusHandle {
    common::telemetry::metrics_handle()
}
