//! A handler that forwards each verified event, with the identity it
//! carried, to an HTTP endpoint: for services not written in Rust.
//!
//! The request is a `POST` of a JSON document (see [`ForwardEvents`]) with
//! an `Idempotency-Key` header: a UUID (v5) of the verified subject and the
//! message ID, the same pair the inbox deduplicates on, so two users'
//! records that share a message ID never collide. The call runs inside
//! the inbox transaction: the marker commits only after a `2xx`, so a
//! message is forwarded until the endpoint accepts it once. A crash between
//! the endpoint's answer and the commit forwards it again, so the endpoint
//! must treat a repeated `Idempotency-Key` as done. `408`, `425`, `429`,
//! `5xx` and network failures are transient (retried in place with
//! backoff); any other status is permanent and dead-letters the message as
//! `handler_rejected` with the status in the detail. The event token itself
//! is never forwarded.

use std::time::Duration;

use event_identity::http::read_prefix;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::AnyConnection;
use uuid::Uuid;

use crate::inbox::{Event, Handler, HandlerError, HandlerFuture};

/// Longest part of an endpoint's error body kept in a detail.
const MAX_BODY_IN_DETAIL: usize = 200;

/// Forwards events to an HTTP endpoint. The body is:
///
/// ```json
/// {"id": "<message ID>", "type": "...", "source": "...", "time": "...",
///  "data": {...},
///  "identity": {"subject": "...", "issuer": "...", "token_id": "...",
///               "claims": {...all verified claims...}},
///  "kafka": {"topic": "...", "partition": 0, "offset": 42}}
/// ```
pub struct ForwardEvents {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl ForwardEvents {
    /// A forwarder to `url` (HTTPS, or plain HTTP to loopback unless
    /// `allow_plain_http`), each request bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration, allow_plain_http: bool) -> Result<Self, String> {
        let url = event_identity::http::check_url(url, allow_plain_http)?;
        Ok(Self { client: event_identity::http::client(timeout), url })
    }

    async fn forward(&self, event: &Event) -> Result<(), HandlerError> {
        // The data goes out as the record carried it.
        let data: &RawValue = serde_json::from_str(&event.data_text)
            .map_err(|e| HandlerError::Permanent(format!("the event data is not JSON: {e}")))?;
        let body = Forwarded {
            id: event.id,
            event_type: &event.event_type,
            source: &event.source,
            time: event.time.as_deref(),
            data,
            identity: Identity {
                subject: &event.claims.subject,
                issuer: &event.claims.issuer,
                token_id: event.claims.token_id.as_deref(),
                claims: &event.claims.claims,
            },
            kafka: Position {
                topic: &event.topic,
                partition: event.partition,
                offset: event.offset,
            },
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| HandlerError::Permanent(format!("cannot encode the event: {e}")))?;
        let response = self
            .client
            .post(self.url.clone())
            .header("idempotency-key", idempotency_key(event).to_string())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| HandlerError::Transient(format!("forwarding failed: {e}")))?;

        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // Only what the detail shows is read: an endpoint's error page may
        // be of any size.
        let prefix = read_prefix(response, 4 * MAX_BODY_IN_DETAIL + 4).await;
        let text = String::from_utf8_lossy(&prefix);
        let mut excerpt: String = text.chars().take(MAX_BODY_IN_DETAIL).collect();
        if excerpt.len() < text.len() {
            excerpt.push('…');
        }
        let detail = format!("the endpoint answered {status}: {excerpt}");
        if is_transient(status) {
            Err(HandlerError::Transient(detail))
        } else {
            Err(HandlerError::Permanent(detail))
        }
    }
}

/// The forwarded body (see [`ForwardEvents`]).
#[derive(Serialize)]
struct Forwarded<'a> {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    source: &'a str,
    time: Option<&'a str>,
    data: &'a RawValue,
    identity: Identity<'a>,
    kafka: Position<'a>,
}

#[derive(Serialize)]
struct Identity<'a> {
    subject: &'a str,
    issuer: &'a str,
    token_id: Option<&'a str>,
    claims: &'a serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct Position<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429)
}

/// The key the endpoint deduplicates on: a UUID v5 of the subject and the
/// message ID.
pub fn idempotency_key(event: &Event) -> Uuid {
    let name = format!("{}\0{}", event.claims.subject, event.id);
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
}

impl Handler for ForwardEvents {
    fn handle<'a>(&'a self, event: &'a Event, _tx: &'a mut AnyConnection) -> HandlerFuture<'a> {
        Box::pin(self.forward(event))
    }

    fn batched(&self) -> bool {
        false
    }
}
