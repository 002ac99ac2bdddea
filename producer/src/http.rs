//! The HTTP API: `POST /v1/events` (the operations routes `/metrics`,
//! `/healthz` and `/readyz` are merged in by the service).
//!
//! A request carries the user's token as `Authorization: Bearer <JWT>`,
//! an optional `Idempotency-Key`, and a JSON body
//! `{"type": "...", "key": "...", "data": {...}}`. Success is `202
//! Accepted` with `{"id": "<message id>", ...}`, sent only after the broker
//! acknowledged the record. Errors are RFC 9457 problem documents.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use event_identity::contract::bearer_token;
use event_identity::{Rejection, VerifyError};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::metrics::RequestCounts;
use crate::publisher::{PublishError, PublishRequest, Publisher};

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_S: &str = "5";
/// Time allowed to receive a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The API's routes over `publisher`.
/// The API's routes over `publisher`; answers are counted in `requests`.
pub fn router(publisher: Arc<Publisher>, max_body_bytes: u64, requests: RequestCounts) -> Router {
    let max_body_bytes = usize::try_from(max_body_bytes).unwrap_or(usize::MAX);
    Router::new().route("/v1/events", post(publish)).with_state(Api {
        publisher,
        max_body_bytes,
        requests,
    })
}

#[derive(Clone)]
struct Api {
    publisher: Arc<Publisher>,
    max_body_bytes: usize,
    requests: RequestCounts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    #[serde(rename = "type")]
    event_type: String,
    key: String,
    /// Kept as the client wrote it: published byte for byte, so no number
    /// or string is rewritten on the way.
    data: Box<RawValue>,
}

async fn publish(State(api): State<Api>, headers: HeaderMap, body: Body) -> Response {
    let response = match handle(&api, &headers, body).await {
        Ok(response) => response,
        Err(error) => problem_response(&error),
    };
    let status = response.status().as_u16().to_string();
    api.requests.get_or_create(&vec![("status", status)]).inc();
    response
}

async fn handle(api: &Api, headers: &HeaderMap, body: Body) -> Result<Response, PublishError> {
    let publisher = &api.publisher;
    // Authentication comes first: an anonymous caller learns nothing about
    // the request's shape.
    let mut authorizations = headers.get_all(header::AUTHORIZATION).iter();
    let first = authorizations.next();
    if authorizations.next().is_some() {
        // Different readers would pick different ones: refuse to choose.
        return Err(PublishError::InvalidRequest("more than one Authorization header".into()));
    }
    let bearer = match first {
        None => None,
        Some(value) => Some(value.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            PublishError::Unauthenticated(VerifyError::Rejected {
                reason: Rejection::MalformedToken,
                detail: "Authorization is not a Bearer token".into(),
            })
        })?),
    };
    let (token, user) = publisher.authenticate(bearer).await?;

    // Read only now, and in bounded time: a client that trickles its body
    // must not hold a connection (or the shutdown) forever.
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, to_bytes(body, api.max_body_bytes));
    let body = match read.await {
        Err(_) => return Err(PublishError::RequestTimeout),
        Ok(Err(e)) if is_length_limit(&e) => return Err(PublishError::PayloadTooLarge),
        Ok(Err(e)) => {
            return Err(PublishError::InvalidRequest(format!("cannot read the body: {e}")));
        }
        Ok(Ok(body)) => body,
    };
    // Strict first (no member named twice at any depth), then the parts.
    let body: EventBody = event_identity::json::parse_strict(&body)
        .and_then(|_| serde_json::from_slice(&body))
        .map_err(|e| PublishError::InvalidRequest(format!("the body is not an event: {e}")))?;
    let mut keys = headers.get_all("idempotency-key").iter();
    let idempotency_key = match (keys.next(), keys.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(PublishError::InvalidRequest(
                "more than one Idempotency-Key header".into(),
            ));
        }
        (Some(value), None) => {
            let key = value.to_str().ok().filter(|k| {
                (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len())
                    && k.bytes().all(|b| b.is_ascii_graphic())
            });
            Some(key.ok_or_else(|| {
                PublishError::InvalidRequest(format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                ))
            })?)
        }
    };

    let request = PublishRequest {
        event_type: body.event_type,
        key: body.key,
        data: body.data,
        idempotency_key: idempotency_key.map(str::to_owned),
    };
    let event_type = request.event_type.clone();
    let published = publisher.publish(&token, &user, request).await?;
    let body = json!({
        "id": published.id,
        "type": event_type,
        "partition": published.partition,
        "offset": published.offset,
    });
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn problem_response(error: &PublishError) -> Response {
    let (status, code, detail) = match error {
        PublishError::Unauthenticated(VerifyError::Rejected { reason, detail }) => {
            (StatusCode::UNAUTHORIZED, reason.code(), detail.clone())
        }
        PublishError::Unauthenticated(VerifyError::Unavailable(why))
        | PublishError::Unavailable(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable", why.clone())
        }
        PublishError::Forbidden(why) => {
            (StatusCode::FORBIDDEN, Rejection::Forbidden.code(), why.clone())
        }
        PublishError::PayloadTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than the configured limit".to_owned(),
        ),
        PublishError::RequestTimeout => (
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
        ),
        PublishError::InvalidRequest(why) => {
            (StatusCode::BAD_REQUEST, "invalid_request", why.clone())
        }
        PublishError::TokenExchange(why) => {
            (StatusCode::BAD_GATEWAY, "token_exchange_failed", why.clone())
        }
    };
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), code, %detail, "publish failed");
    } else {
        tracing::debug!(status = status.as_u16(), code, %detail, "publish refused");
    }

    let body = json!({
        "type": format!("urn:event-identity:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    if status == StatusCode::UNAUTHORIZED {
        // RFC 6750 section 3: tells the client to refresh its token.
        let challenge = if code == Rejection::MissingToken.code() {
            "Bearer".to_owned()
        } else {
            format!("Bearer error=\"invalid_token\", error_description=\"{code}\"")
        };
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    }
    response
}
