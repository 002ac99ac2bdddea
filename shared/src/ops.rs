//! What operators scrape and probe: `/metrics` (Prometheus text format),
//! `/healthz` (the process serves HTTP) and `/readyz` (the service can do
//! its work now), on one HTTP router that each binary serves.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::Verifier;

/// Tells whether a service can do its work now.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready; otherwise why not, in a short sentence.
    fn check(&self) -> Result<(), String>;
}

struct Ops {
    registry: Registry,
    readiness: Arc<dyn Readiness>,
}

/// The operators' routes: `GET /metrics`, `GET /healthz`, `GET /readyz`
/// (`200 ready`, or `503` with the reason).
pub fn router(registry: Registry, readiness: Arc<dyn Readiness>) -> Router {
    let ops = Arc::new(Ops { registry, readiness });
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(ops)
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &ops.registry) {
        tracing::error!(%error, "encoding metrics failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn ready(State(ops): State<Arc<Ops>>) -> Response {
    match ops.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response()
        }
    }
}

/// Buckets for latencies from 0.1 ms to about 13 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18)
}

/// Exposes a verifier's key-set fetches and key count:
/// `jwks_refreshes_total{result="ok"|"error"}` and `jwks_keys`.
#[derive(Clone)]
pub struct JwksMetrics(pub Verifier);

impl std::fmt::Debug for JwksMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwksMetrics")
    }
}

impl Collector for JwksMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let keys = self.0.keys();
        let (ok, failed) = keys.refresh_counts();
        let help = "Fetches of the issuer's key set, by result.";
        let mut family = encoder.encode_descriptor(
            "jwks_refreshes",
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (result, count) in [("ok", ok), ("error", failed)] {
            ConstCounter::new(count).encode(family.encode_family(&[("result", result)])?)?;
        }

        let gauge = ConstGauge::new(keys.key_count() as i64);
        let help = "Signing keys in the issuer's current key set.";
        gauge.encode(encoder.encode_descriptor("jwks_keys", help, None, gauge.metric_type())?)?;
        Ok(())
    }
}
