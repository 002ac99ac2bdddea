//! The message contract, version 1: a CloudEvents 1.0 record in binary
//! content mode, as the CloudEvents Kafka protocol binding lays it out.
//!
//! | part | value |
//! |---|---|
//! | key | the partition key: the entity the event is about |
//! | `ce_specversion` | `1.0` |
//! | `ce_id` | the message ID, a UUID |
//! | `ce_type` | the event type |
//! | `ce_source` | the producer's URI |
//! | `ce_time` | RFC 3339 time of publication |
//! | `content-type` | `application/json` |
//! | `authorization` | `Bearer <event token>` |
//! | value | the event data, JSON |
//!
//! Who the user is comes from the verified token, never from these headers
//! or the payload.

use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

use crate::reason::Rejection;
use crate::secret::Secret;

/// Header names of the contract.
pub mod header {
    /// CloudEvents spec version.
    pub const SPEC_VERSION: &str = "ce_specversion";
    /// Message ID.
    pub const ID: &str = "ce_id";
    /// Event type.
    pub const TYPE: &str = "ce_type";
    /// Producer URI.
    pub const SOURCE: &str = "ce_source";
    /// Publication time.
    pub const TIME: &str = "ce_time";
    /// Media type of the value.
    pub const CONTENT_TYPE: &str = "content-type";
    /// `Bearer <event token>`.
    pub const AUTHORIZATION: &str = "authorization";
}

/// The CloudEvents version this contract uses.
pub const SPEC_VERSION: &str = "1.0";
/// The only content type of version 1.
pub const CONTENT_TYPE: &str = "application/json";

/// Derives message IDs.
///
/// Without an `Idempotency-Key` a message ID is a UUID v7. With one, it is
/// a UUID v8 made from an HMAC-SHA256, under this producer's secret, of the
/// request's parts (the user's subject, the event type, the record key and
/// the data as sent) and the key: a retried request yields the same ID; two
/// users' keys never collide; a key reused for another request (another
/// event type, another order) gives another ID, so that request is not
/// dropped as a duplicate of the first; and nobody without the secret can
/// predict an ID and publish a record under it first.
#[derive(Clone)]
pub struct MessageIds {
    secret: Secret,
}

impl MessageIds {
    /// IDs keyed by `secret`, which every replica of a producer must share.
    pub fn new(secret: Secret) -> Self {
        Self { secret }
    }

    /// The message ID of a new event whose request has `parts` (subject,
    /// event type, record key, data).
    pub fn derive(&self, parts: &[&[u8]], idempotency_key: Option<&str>) -> Uuid {
        let Some(key) = idempotency_key else {
            return Uuid::now_v7();
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(key.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_custom_bytes(bytes).into_uuid()
    }
}

/// The contract headers of an incoming record, checked for shape.
pub struct IncomingHeaders {
    /// `ce_id`.
    pub id: Uuid,
    /// `ce_type`.
    pub event_type: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_time`, as sent.
    pub time: Option<String>,
    /// The bearer token from `authorization`.
    pub token: Secret,
}

/// A record that does not follow the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct ContractError {
    /// `missing_token`, `malformed_token` (an `authorization` header that
    /// is not a Bearer token) or `malformed_payload`.
    pub reason: Rejection,
    /// What is wrong, without header values.
    pub detail: String,
}

fn malformed(detail: impl Into<String>) -> ContractError {
    ContractError { reason: Rejection::MalformedPayload, detail: detail.into() }
}

/// Reads the contract headers from `(name, value)` pairs. A header that
/// appears twice is refused: a second `authorization` must not be able to
/// shadow the first one in some reader.
pub fn parse_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Result<IncomingHeaders, ContractError> {
    let mut found: [Option<&'a [u8]>; KNOWN.len()] = [None; KNOWN.len()];
    for (name, value) in headers {
        let Some(index) = KNOWN.iter().position(|known| known.eq_ignore_ascii_case(name)) else {
            continue;
        };
        if found[index].replace(value.unwrap_or_default()).is_some() {
            return Err(malformed(format!("header {} appears more than once", KNOWN[index])));
        }
    }
    let text = |name: &'static str| -> Result<Option<&'a str>, ContractError> {
        let index = KNOWN.iter().position(|known| *known == name).expect("a contract header");
        let Some(value) = found[index] else { return Ok(None) };
        let value = std::str::from_utf8(value)
            .map_err(|_| malformed(format!("header {name} is not UTF-8")))?;
        // CloudEvents strings exclude control characters; a NUL in one
        // would also be refused by PostgreSQL on every retry.
        if has_control(value) {
            return Err(malformed(format!("header {name} holds a control character")));
        }
        Ok(Some(value))
    };
    let required = |name: &'static str| -> Result<&'a str, ContractError> {
        text(name)?
            .filter(|v| !v.is_empty())
            .ok_or_else(|| malformed(format!("header {name} is missing")))
    };

    let token = match text(header::AUTHORIZATION)? {
        None | Some("") => {
            return Err(ContractError {
                reason: Rejection::MissingToken,
                detail: "no authorization header".into(),
            });
        }
        Some(value) => bearer_token(value).ok_or_else(|| ContractError {
            reason: Rejection::MalformedToken,
            detail: "authorization is not a Bearer token".into(),
        })?,
    };
    if required(header::SPEC_VERSION)? != SPEC_VERSION {
        return Err(malformed(format!("{} is not {SPEC_VERSION}", header::SPEC_VERSION)));
    }
    let id =
        Uuid::parse_str(required(header::ID)?).map_err(|_| malformed("ce_id is not a UUID"))?;
    let event_type = required(header::TYPE)?.to_owned();
    let source = required(header::SOURCE)?.to_owned();
    let time = text(header::TIME)?.map(str::to_owned);
    if let Some(content_type) = text(header::CONTENT_TYPE)? {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        if !media.eq_ignore_ascii_case(CONTENT_TYPE) {
            return Err(malformed(format!("content-type {media:?} is not {CONTENT_TYPE}")));
        }
    }
    Ok(IncomingHeaders { id, event_type, source, time, token: Secret::new(token) })
}

/// A Kafka topic name: 1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
pub fn topic_name(name: &str) -> Result<String, String> {
    let legal = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if name.is_empty() || name.len() > 249 || !legal || name == "." || name == ".." {
        return Err(format!("{name:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"));
    }
    Ok(name.to_owned())
}

/// Parses the record value as the event's JSON data; returns the value as
/// text too (what is stored and forwarded, unchanged) beside the parsed
/// data.
pub fn parse_data(value: Option<&[u8]>) -> Result<(&str, Value), ContractError> {
    let bytes = value.ok_or_else(|| malformed("the record has no value"))?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| malformed(format!("the value is not UTF-8: {e}")))?;
    let data = crate::json::parse_strict_str(text)
        .map_err(|e| malformed(format!("the value is not strict JSON: {e}")))?;
    Ok((text, data))
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is
/// case-insensitive, as RFC 6750 allows).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// The headers the contract reads; names match case-insensitively.
const KNOWN: [&str; 7] = [
    header::SPEC_VERSION,
    header::ID,
    header::TYPE,
    header::SOURCE,
    header::TIME,
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
];

/// Whether `value` holds a control character (Unicode category Cc).
/// Printable ASCII (the token, most of a record's header bytes) is
/// recognised in one pass without decoding.
fn has_control(value: &str) -> bool {
    let printable = value.bytes().fold(true, |all, b| all & (b' '..=b'~').contains(&b));
    !printable && value.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Vec<(&'static str, Option<&'static [u8]>)> {
        vec![
            ("ce_specversion", Some(b"1.0".as_slice())),
            ("ce_id", Some(b"9f1c0000-0000-7000-8000-000000000001".as_slice())),
            ("ce_type", Some(b"com.example.order.created".as_slice())),
            ("ce_source", Some(b"/event-producer".as_slice())),
            ("content-type", Some(b"application/json".as_slice())),
            ("authorization", Some(b"Bearer abc.def.ghi".as_slice())),
        ]
    }

    #[test]
    fn reads_a_valid_record() {
        let parsed = parse_headers(valid()).unwrap();
        assert_eq!(parsed.id.to_string(), "9f1c0000-0000-7000-8000-000000000001");
        assert_eq!(parsed.event_type, "com.example.order.created");
        assert_eq!(parsed.token.expose(), "abc.def.ghi");
    }

    #[test]
    fn a_missing_authorization_is_missing_token() {
        let headers = valid().into_iter().filter(|(n, _)| *n != "authorization");
        assert_eq!(parse_headers(headers).err().unwrap().reason, Rejection::MissingToken);
    }

    #[test]
    fn a_second_authorization_header_is_refused() {
        let mut headers = valid();
        headers.push(("Authorization", Some(b"Bearer other.token.here".as_slice())));
        let err = parse_headers(headers).err().unwrap();
        assert_eq!(err.reason, Rejection::MalformedPayload);
    }

    #[test]
    fn a_bad_id_is_malformed_payload() {
        let mut headers = valid();
        headers[1].1 = Some(b"not-a-uuid".as_slice());
        assert_eq!(parse_headers(headers).err().unwrap().reason, Rejection::MalformedPayload);
    }

    #[test]
    fn control_characters_in_a_header_are_malformed_payload() {
        let cases = [(3, "/evil\u{0}source"), (2, "type\nx"), (2, "t\u{7f}"), (3, "/sé\u{85}")];
        for (index, value) in cases {
            let mut headers = valid();
            headers[index].1 = Some(value.as_bytes());
            let err = parse_headers(headers).err().unwrap();
            assert_eq!(err.reason, Rejection::MalformedPayload, "{value:?}");
            assert!(err.detail.contains("control character"), "{}", err.detail);
        }
        let mut headers = valid();
        headers[3].1 = Some("/sé\u{a0}".as_bytes());
        assert_eq!(parse_headers(headers).unwrap().source, "/sé\u{a0}");
    }

    #[test]
    fn non_json_data_is_malformed_payload() {
        let err = parse_data(Some(&[0xFF, 0xFE, 0x00])).unwrap_err();
        assert_eq!(err.reason, Rejection::MalformedPayload);
        assert!(err.detail.starts_with("the value is not UTF-8: invalid utf-8"), "{}", err.detail);
        let (text, data) = parse_data(Some(br#"{"a": 1}"#)).unwrap();
        assert_eq!((text, &data["a"]), (r#"{"a": 1}"#, &serde_json::json!(1)));
        let err = parse_data(Some(b"{} x")).unwrap_err();
        assert!(err.detail.starts_with("the value is not strict JSON"), "{}", err.detail);
    }

    #[test]
    fn idempotency_keys_give_one_id_per_request() {
        let ids = MessageIds::new(Secret::new("producer-secret"));
        let id = |parts: [&str; 3], key| ids.derive(&parts.map(str::as_bytes), key);
        let a = id(["user-1", "created", "{}"], Some("key-1"));
        assert_eq!(a, id(["user-1", "created", "{}"], Some("key-1")));
        assert_ne!(a, id(["user-2", "created", "{}"], Some("key-1")));
        assert_ne!(a, id(["user-1", "created", "{}"], Some("key-2")));
        assert_ne!(a, id(["user-1", "cancelled", "{}"], Some("key-1")));
        assert_ne!(a, id(["user-1", "created", "{\"n\":2}"], Some("key-1")));
        assert_ne!(id(["ab", "t", "{}"], Some("c")), id(["a", "bt", "{}"], Some("c")));
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(id(["user-1", "created", "{}"], None).get_version_num(), 7);
    }

    #[test]
    fn ids_cannot_be_predicted_without_the_secret() {
        let ours = MessageIds::new(Secret::new("producer-secret"));
        let guess = MessageIds::new(Secret::new("another-secret"));
        let parts: [&[u8]; 2] = [b"u", b"t"];
        assert_ne!(ours.derive(&parts, Some("o-2")), guess.derive(&parts, Some("o-2")));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("bearer x.y.z"), Some("x.y.z"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
