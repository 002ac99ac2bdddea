//! The producer of identity-bearing events.
//!
//! A user's command arrives with the user's access token. The producer
//! verifies that token itself, checks that the user may publish the event
//! type, exchanges the token at the authorization server for an event token
//! (RFC 8693) reduced to the event's one scope and addressed to its
//! consumers, and publishes a CloudEvents record carrying that token. The
//! caller learns the message ID only after the broker acknowledged the
//! record.
//!
//! - [`Publisher`] does this for any Rust service.
//! - [`http`] puts it behind an HTTP endpoint; [`run`] is that service.
//! - [`config`] is the service's one configuration struct.

pub mod config;
pub mod event_tokens;
pub mod http;
pub mod metrics;
pub mod publisher;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use event_identity::service::serve_http;
use tokio::net::TcpListener;

pub use config::ProducerConfig;
pub use publisher::{PublishError, PublishRequest, Published, Publisher};

/// A producer service bound to its port, not yet serving. The port serves
/// the API and the operations routes (`/metrics`, `/healthz`, `/readyz`).
pub struct Service {
    listener: TcpListener,
    publisher: Arc<Publisher>,
    config: ProducerConfig,
}

impl Service {
    /// Builds the publisher (discovery, keys, Kafka client) and binds the
    /// HTTP port. Fails with a message naming the setting at fault.
    pub async fn bind(config: ProducerConfig) -> anyhow::Result<Self> {
        let publisher = Publisher::from_config(&config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("--listen {}: cannot bind", config.listen))?;
        Ok(Self { listener, publisher: Arc::new(publisher), config })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The publisher behind the HTTP layer.
    pub fn publisher(&self) -> Arc<Publisher> {
        self.publisher.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting requests,
    /// lets requests in flight finish, and flushes queued records within
    /// the configured shutdown timeout.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<ShutdownReport> {
        let probing = tokio_util::sync::CancellationToken::new();
        let (registry, requests) = metrics::registry(&self.publisher);
        let (readiness, probe) =
            metrics::ProducerReadiness::start(self.publisher.clone(), probing.clone());
        let app = http::router(self.publisher.clone(), self.config.max_body_bytes, requests)
            .merge(event_identity::ops::router(registry, readiness));
        tracing::info!(addr = %self.local_addr(), "producer listening");
        let (requested_tx, requested) = tokio::sync::oneshot::channel();
        let server = serve_http(self.listener, app, async move {
            shutdown.await;
            let _ = requested_tx.send(());
        });
        let mut server = tokio::spawn(server);

        // Until shutdown is requested, the server runs on its own.
        tokio::select! {
            result = &mut server => {
                probing.cancel();
                result?;
                return Ok(ShutdownReport { undelivered: 0 });
            }
            _ = requested => {}
        }

        // No new requests now. Requests in flight finish when their records
        // are acknowledged; give them the shutdown budget. What is still
        // running then is failed (its queued records purged, so its client
        // gets 503) rather than left waiting: no client is told 202 for a
        // record that was not written.
        let budget = self.config.shutdown_timeout();
        let undelivered = match tokio::time::timeout(budget, &mut server).await {
            Ok(joined) => {
                joined?;
                self.publisher.flush(budget).await
            }
            Err(_) => {
                let undelivered = self.publisher.in_progress().max(self.publisher.undelivered());
                tracing::error!(
                    undelivered,
                    "events undelivered at the end of the shutdown budget"
                );
                self.publisher.purge();
                if tokio::time::timeout(Duration::from_secs(1), &mut server).await.is_err() {
                    server.abort();
                }
                undelivered
            }
        };
        probing.cancel();
        let _ = probe.await;
        if undelivered == 0 {
            tracing::info!("every accepted event was delivered");
        }
        tracing::info!("producer stopped");
        Ok(ShutdownReport { undelivered })
    }
}

/// How long a broker has to answer when the service starts.
const KAFKA_CHECK: Duration = Duration::from_secs(10);

/// What a producer's shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Records still undelivered when the shutdown budget ran out; none of
    /// their requests was answered 202.
    pub undelivered: usize,
}

/// Runs the producer service until `shutdown` completes. Unlike
/// [`Service::bind`] alone, it first requires a broker to answer within
/// 10 s, so that a service that cannot publish does not claim to start.
pub async fn run(
    config: ProducerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Settings that need no request are checked before any service is.
    let (jwks_url, token_endpoint) = (config.jwks_url.as_deref(), config.token_endpoint.as_deref());
    event_identity::discovery::check_settings(
        &config.issuer,
        jwks_url,
        token_endpoint,
        config.allow_plain_http,
    )
    .map_err(anyhow::Error::msg)?;
    let brokers = event_identity::service::check_kafka(&config.kafka_bootstrap, KAFKA_CHECK)
        .await
        .map_err(|e| anyhow::anyhow!("--kafka-bootstrap: {e}"))?;
    tracing::info!(bootstrap = %config.kafka_bootstrap, brokers, "Kafka reachable");
    Service::bind(config).await?.serve(shutdown).await?;
    Ok(())
}
