//! The producer's Prometheus metrics and readiness, served next to the API
//! on the same port.
//!
//! Metrics (prefix `event_producer_`): `requests_total{status}` (HTTP
//! answers of `POST /v1/events`), `events_published_total`,
//! `token_exchanges_total{result}`, `token_exchange_seconds`,
//! `event_token_cache_hits_total`, and `jwks_refreshes_total{result}` and
//! `jwks_keys` for the issuer's keys. Ready means the issuer's keys are
//! loaded and a broker answered the last probe.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_identity::ops::{JwksMetrics, Readiness};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::Publisher;

/// How often the broker is probed for readiness.
const BROKER_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Counts of `POST /v1/events` answers by status code.
pub type RequestCounts = Family<Vec<(&'static str, String)>, Counter>;

/// The producer's metrics registry, with the request counts the API fills.
pub fn registry(publisher: &Arc<Publisher>) -> (Registry, RequestCounts) {
    let mut registry = Registry::with_prefix("event_producer");
    let requests = RequestCounts::default();
    registry.register("requests", "Answers of POST /v1/events, by status.", requests.clone());
    registry.register(
        "token_exchange_seconds",
        "Time of one token-exchange request.",
        publisher.event_tokens().exchange_seconds().clone(),
    );
    registry.register_collector(Box::new(PublisherMetrics(publisher.clone())));
    registry.register_collector(Box::new(JwksMetrics(publisher.user_verifier().clone())));
    (registry, requests)
}

struct PublisherMetrics(Arc<Publisher>);

impl std::fmt::Debug for PublisherMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublisherMetrics")
    }
}

impl Collector for PublisherMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tokens = self.0.event_tokens();
        let (exchanges, failed) = (tokens.exchange_count(), tokens.exchange_failure_count());
        for (name, help, value) in [
            ("events_published", "Events the broker acknowledged.", self.0.published_count()),
            (
                "event_token_cache_hits",
                "Event tokens served from the cache.",
                tokens.cache_hit_count(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }

        let help = "Token-exchange requests, by result.";
        let mut family =
            encoder.encode_descriptor("token_exchanges", help, None, MetricType::Counter)?;
        for (result, count) in [("ok", exchanges - failed.min(exchanges)), ("error", failed)] {
            ConstCounter::new(count).encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// Ready when the issuer's keys are loaded and the last broker probe was
/// answered.
pub struct ProducerReadiness {
    publisher: Arc<Publisher>,
    broker: Arc<Mutex<Result<(), String>>>,
}

impl ProducerReadiness {
    /// Readiness of `publisher`, probing the broker in the background until
    /// `stop` is cancelled; await the handle after cancelling, so that the
    /// probe's hold on the publisher ends before the caller drops it.
    pub fn start(
        publisher: Arc<Publisher>,
        stop: tokio_util::sync::CancellationToken,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let broker = Arc::new(Mutex::new(Err("the broker has not been probed yet".into())));
        let readiness = Arc::new(Self { publisher: publisher.clone(), broker: broker.clone() });
        let probe = tokio::spawn(async move {
            loop {
                let answer = publisher.broker_reachable(BROKER_PROBE_INTERVAL).await;
                *broker.lock().unwrap_or_else(|e| e.into_inner()) = answer;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BROKER_PROBE_INTERVAL) => {}
                }
            }
        });
        (readiness, probe)
    }
}

impl Readiness for ProducerReadiness {
    fn check(&self) -> Result<(), String> {
        let keys = self.publisher.user_verifier().keys();
        if !keys.is_loaded() || keys.key_count() == 0 {
            return Err("the issuer's keys are not loaded".into());
        }
        self.broker.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
