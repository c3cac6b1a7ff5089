//! Logical decoding message → Kafka record, for `source: Messages`. Pure: no I/O.
//!
//! # The envelope
//!
//! A message's content is one line of JSON (the header), a newline (`\n`, byte
//! 0x0A), then the payload's raw bytes up to the end of the content:
//!
//! ```text
//! {"id":"5f0c…","aggregateType":"order","aggregateId":"42","type":"OrderPlaced","headers":{"tenant":"a"}}\n{"total":12}
//! ```
//!
//! Header fields: `id` (string, required: the `id` header consumers deduplicate on),
//! `aggregateId` (string, required: the record key), `aggregateType` (string,
//! required with `routeBy`: the routing value), `type` (string, optional: the
//! `type` header), `headers` (object, optional: its entries become record
//! headers, strings as they are, other values as JSON text). Unknown fields are
//! ignored, so the format can grow. An empty payload is a tombstone.
//!
//! Why this shape: the relay finds the header with one scan for the first newline
//! (JSON escapes every newline inside strings, so the first raw one ends the
//! header) and never parses or copies the payload, which may be anything (JSON,
//! Avro, Protobuf). Any language, and plain SQL (`json_build_object(..)::text ||
//! E'\n' || payload`), can write it.
//!
//! A message that does not decode is not dropped: it becomes an unmapped event
//! ([`super::core::Row::Unmapped`]) that the poison policy stops at or parks,
//! with the content kept in the park table.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use thiserror::Error;

use super::envelope::CloudEvents;
use super::mapping::{Destination, Mapped, OutboxRecord, ROUTED_BY_VALUE, valid_topic};
use super::pgoutput::{LogicalMessage, PgTimestamp};

/// Largest header line looked at; a longer one is refused rather than scanned.
const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    #[error("message content has no newline ending the JSON header (within its first {MAX_HEADER_BYTES} bytes)")]
    NoHeader,
    #[error("message header is not the envelope's JSON object: {0}")]
    InvalidHeader(String),
    #[error("message header of event {event_id} has no aggregateType, which routeBy needs to pick a topic")]
    NullRoute { event_id: String },
    #[error("routed topic {topic:?} for event {event_id} is not a valid Kafka topic name")]
    InvalidTopic { topic: String, event_id: String },
}

impl MessageError {
    /// Stable category: condition reason, metric label and park reason.
    pub fn category(&self) -> &'static str {
        match self {
            MessageError::NoHeader | MessageError::InvalidHeader(_) => "InvalidEnvelope",
            MessageError::NullRoute { .. } | MessageError::InvalidTopic { .. } => "InvalidTopic",
        }
    }
}

/// What this relay does with a message from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Transactional, with our prefix: an event of its transaction.
    Relay,
    /// Another prefix: not ours, passed over.
    NotOurs,
    /// Our prefix but not transactional: it was written outside any transaction's
    /// fate (it would be there even if the writer rolled back), so relaying it would
    /// break "committed events only". Refused, counted and logged.
    Refused,
}

pub fn disposition(msg: &LogicalMessage, prefix: &str) -> Disposition {
    if msg.prefix != prefix {
        Disposition::NotOurs
    } else if msg.transactional() {
        Disposition::Relay
    } else {
        Disposition::Refused
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    aggregate_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    aggregate_id: std::borrow::Cow<'a, str>,
    #[serde(default, rename = "type", borrow)]
    event_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    headers: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Turns messages into records: the destination and CloudEvents settings, and a
/// small cache of routed topic names.
#[derive(Debug)]
pub struct MessageMapper {
    destination: Destination,
    cloud_events: Option<CloudEvents>,
    topics: std::collections::HashMap<String, Arc<str>>,
    static_topic: Option<Arc<str>>,
}

/// Bound on distinct routed topic names kept.
const TOPIC_CACHE_LIMIT: usize = 10_000;

impl MessageMapper {
    pub fn new(destination: &Destination, cloud_events: Option<&CloudEvents>) -> Self {
        let static_topic = match destination {
            Destination::Static(t) => Some(Arc::from(t.as_str())),
            Destination::Routed { .. } => None,
        };
        Self {
            destination: destination.clone(),
            cloud_events: cloud_events.cloned(),
            topics: std::collections::HashMap::new(),
            static_topic,
        }
    }

    /// Maps one message's content, of a transaction committed at `commit_time`.
    pub fn map(&mut self, content: &Bytes, commit_time: PgTimestamp) -> Result<Mapped, MessageError> {
        let (header, payload) = split(content)?;
        let h: Header<'_> = serde_json::from_slice(header).map_err(|e| MessageError::InvalidHeader(e.to_string()))?;
        let event_id = Bytes::from(h.id.clone().into_owned());
        let event_type = h.event_type.map(|t| Bytes::from(t.into_owned()));
        let topic = match &self.static_topic {
            Some(t) => t.clone(),
            None => {
                let route = h.aggregate_type.as_deref().ok_or_else(|| MessageError::NullRoute {
                    event_id: h.id.to_string(),
                })?;
                self.routed_topic(route).map_err(|topic| MessageError::InvalidTopic {
                    topic,
                    event_id: h.id.to_string(),
                })?
            }
        };
        let mut extra_headers = Vec::new();
        if let Some(ce) = &self.cloud_events {
            ce.headers(Some(&event_id), event_type.as_ref(), commit_time, &mut extra_headers);
        }
        for (k, v) in h.headers.into_iter().flatten() {
            let b = match v {
                serde_json::Value::String(s) => Bytes::from(s),
                other => Bytes::from(other.to_string()),
            };
            extra_headers.push((k, b));
        }
        Ok(Mapped {
            record: OutboxRecord {
                topic,
                key: Some(Bytes::from(h.aggregate_id.into_owned())),
                // The payload is a slice of the message: no copy.
                payload: (!payload.is_empty()).then_some(payload),
                event_id: Some(event_id),
                event_type,
                extra_headers,
                timestamp: commit_time,
                partition: None,
            },
            fallbacks: Vec::new(),
        })
    }

    fn routed_topic(&mut self, value: &str) -> Result<Arc<str>, String> {
        if let Some(t) = self.topics.get(value) {
            return Ok(t.clone());
        }
        let Destination::Routed { template, .. } = &self.destination else {
            return Err(String::new());
        };
        let topic = template.replace(ROUTED_BY_VALUE, value);
        if !valid_topic(&topic) {
            return Err(topic);
        }
        if self.topics.len() >= TOPIC_CACHE_LIMIT {
            self.topics.clear();
        }
        let topic: Arc<str> = Arc::from(topic);
        self.topics.insert(value.to_string(), topic.clone());
        Ok(topic)
    }
}

/// The header line and the payload (a zero-copy slice of `content`).
fn split(content: &Bytes) -> Result<(&[u8], Bytes), MessageError> {
    let window = &content[..content.len().min(MAX_HEADER_BYTES)];
    let nl = window.iter().position(|&b| b == b'\n').ok_or(MessageError::NoHeader)?;
    Ok((&content[..nl], content.slice(nl + 1..)))
}

/// What the park table keeps of a message that did not decode: its id when the
/// header names one, and its prefix, LSN and whole content (as text when it is
/// UTF-8, else hex), so a DBA can re-emit it by hand.
pub fn raw_row(msg: &LogicalMessage) -> (Option<String>, serde_json::Value) {
    let id = split(&msg.content)
        .ok()
        .and_then(|(h, _)| serde_json::from_slice::<serde_json::Value>(h).ok())
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
    // jsonb holds no NUL character, so content with one is kept as hex too.
    let content = match std::str::from_utf8(&msg.content) {
        Ok(s) if !s.contains('\0') => serde_json::Value::String(s.to_string()),
        _ => {
            let hex: String = msg.content.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::Value::String(format!("\\x{hex}"))
        }
    };
    let row = serde_json::json!({
        "prefix": msg.prefix,
        "message_lsn": msg.lsn.to_string(),
        "content": content,
    });
    (id, row)
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
