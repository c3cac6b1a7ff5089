//! Outbox row → Kafka record. Pure: no I/O, no Kafka types.
//!
//! pgoutput (protocol 1, text mode) sends every column in its type's text form:
//! json, jsonb, text and varchar are the stored text already; bytea arrives as
//! `\x` + hex and is decoded back to the stored bytes. The envelope options
//! (timestamp, partition, trace context, CloudEvents, header columns) are read
//! here too, through the pure helpers of [`super::envelope`].

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use super::envelope::{self, CloudEvents, Fallback};
use super::pgoutput::{ColumnValue, PgTimestamp, Relation, TupleData};
use crate::api::ColumnMapping;

/// PostgreSQL type oid of `bytea`.
const BYTEA_OID: u32 = 17;
/// Placeholder replaced by the routing column's value.
pub const ROUTED_BY_VALUE: &str = "${routedByValue}";
/// Bound on distinct routed topic names kept in the cache.
const TOPIC_CACHE_LIMIT: usize = 10_000;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MappingError {
    #[error("outbox table {table} has no column {column:?} (columns are {available})")]
    ColumnMissing {
        table: String,
        column: String,
        available: String,
    },
    #[error("routing column {column:?} is NULL for event {event_id}; cannot pick a topic")]
    NullRoute { column: String, event_id: String },
    #[error("routed topic {topic:?} for event {event_id} is not a valid Kafka topic name")]
    InvalidTopic { topic: String, event_id: String },
    #[error("headers column of event {event_id} is not a JSON object: {reason}")]
    InvalidHeaders { event_id: String, reason: String },
    #[error("bytea payload of event {event_id} is not in hex format")]
    InvalidBytea { event_id: String },
    #[error("column {column:?} of event {event_id} is an unchanged TOAST value, which an insert never has")]
    UnexpectedToast { column: String, event_id: String },
}

impl MappingError {
    pub fn category(&self) -> &'static str {
        match self {
            MappingError::ColumnMissing { .. } => "ColumnMissing",
            MappingError::NullRoute { .. } | MappingError::InvalidTopic { .. } => "InvalidTopic",
            MappingError::InvalidHeaders { .. } => "InvalidHeaders",
            MappingError::InvalidBytea { .. } => "InvalidPayload",
            MappingError::UnexpectedToast { .. } => "InvalidPayload",
        }
    }
}

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Static(String),
    Routed { column: String, template: String },
}

/// One Kafka record made from one outbox row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    pub topic: Arc<str>,
    /// Aggregate id: one key, one partition, commit order kept.
    pub key: Option<Bytes>,
    /// `None` (a NULL payload) becomes a tombstone.
    pub payload: Option<Bytes>,
    pub event_id: Option<Bytes>,
    pub event_type: Option<Bytes>,
    /// Headers after `id` and `type`: CloudEvents, trace context, header columns,
    /// then the headers column's entries.
    pub extra_headers: Vec<(String, Bytes)>,
    /// The record timestamp: the commit time, or the timestamp column's value.
    pub timestamp: PgTimestamp,
    /// The partition the partition column asks for; `None`: the key's hash decides.
    pub partition: Option<i32>,
}

impl OutboxRecord {
    /// Bytes Kafka has to store for this record (without protocol overhead).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.payload.as_ref().map_or(0, Bytes::len)
            + self.event_id.as_ref().map_or(0, Bytes::len)
            + self.event_type.as_ref().map_or(0, Bytes::len)
            + self.extra_headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    /// The event id for logs and error messages.
    pub fn event_id_str(&self) -> String {
        self.event_id
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "<null id>".into())
    }
}

/// A mapped row, and the envelope values that had to be replaced or left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub record: OutboxRecord,
    pub fallbacks: Vec<Fallback>,
}

/// Column positions of the outbox table, resolved from a Relation message.
/// Relation messages are re-sent after every schema change, so this is rebuilt
/// whenever one arrives; the positions are then used for every row.
#[derive(Debug)]
pub struct Mapper {
    id: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_is_bytea: bool,
    headers: Option<usize>,
    timestamp: Option<usize>,
    partition: Option<usize>,
    traceparent: Option<usize>,
    tracestate: Option<usize>,
    /// Position, header name, and whether the column is bytea (sent as its bytes).
    header_columns: Vec<(usize, String, bool)>,
    cloud_events: Option<CloudEvents>,
    route: Route,
    topics: HashMap<Bytes, Arc<str>>,
}

#[derive(Debug)]
enum Route {
    Static(Arc<str>),
    Column {
        index: usize,
        column: String,
        template: String,
    },
}

impl Mapper {
    pub fn new(
        relation: &Relation,
        columns: &ColumnMapping,
        destination: &Destination,
        cloud_events: Option<&CloudEvents>,
    ) -> Result<Self, MappingError> {
        let find = |name: &str| {
            relation
                .columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| MappingError::ColumnMissing {
                    table: format!("{}.{}", relation.namespace, relation.name),
                    column: name.to_string(),
                    available: relation
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let payload = find(&columns.payload)?;
        let route = match destination {
            Destination::Routed { column, template } => Route::Column {
                index: find(column)?,
                column: column.clone(),
                template: template.clone(),
            },
            Destination::Static(t) => Route::Static(Arc::from(t.as_str())),
        };
        let header_columns = columns
            .header_columns
            .iter()
            .map(|h| {
                let i = find(&h.column)?;
                Ok((i, h.header.clone(), relation.columns[i].type_oid == BYTEA_OID))
            })
            .collect::<Result<Vec<_>, MappingError>>()?;
        Ok(Self {
            id: find(&columns.id)?,
            aggregate_id: find(&columns.aggregate_id)?,
            event_type: find(&columns.event_type)?,
            payload,
            payload_is_bytea: relation.columns[payload].type_oid == BYTEA_OID,
            headers: columns.headers.as_deref().map(find).transpose()?,
            timestamp: columns.timestamp.as_deref().map(find).transpose()?,
            partition: columns.partition.as_deref().map(find).transpose()?,
            traceparent: columns.traceparent.as_deref().map(find).transpose()?,
            tracestate: columns.tracestate.as_deref().map(find).transpose()?,
            header_columns,
            cloud_events: cloud_events.cloned(),
            route,
            topics: HashMap::new(),
        })
    }

    /// Maps one inserted row of a transaction committed at `commit_time`.
    pub fn map(&mut self, row: &TupleData, commit_time: PgTimestamp) -> Result<Mapped, MappingError> {
        let event_id = value(row, self.id, "id", None)?;
        let id_for_errors = || {
            event_id
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| "<null id>".into())
        };
        let key = value(row, self.aggregate_id, "aggregate id", Some(&id_for_errors))?;
        let event_type = value(row, self.event_type, "type", Some(&id_for_errors))?;
        let mut payload = value(row, self.payload, "payload", Some(&id_for_errors))?;
        if self.payload_is_bytea
            && let Some(p) = &payload
        {
            payload = Some(decode_bytea(p).ok_or_else(|| MappingError::InvalidBytea {
                event_id: id_for_errors(),
            })?);
        }
        let json_headers = match self.headers {
            Some(i) => match value(row, i, "headers", Some(&id_for_errors))? {
                Some(raw) => parse_headers(&raw).map_err(|reason| MappingError::InvalidHeaders {
                    event_id: id_for_errors(),
                    reason,
                })?,
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        let mut fallbacks = Vec::new();
        let timestamp = match self.timestamp {
            Some(i) => {
                let text = value(row, i, "timestamp", Some(&id_for_errors))?;
                let (t, fallback) = envelope::record_time(text.as_deref(), commit_time);
                fallbacks.extend(fallback);
                t
            }
            None => commit_time,
        };
        let partition = match self.partition {
            Some(i) => match value(row, i, "partition", Some(&id_for_errors))? {
                Some(text) => envelope::parse_partition(&text).map_err(|f| fallbacks.push(f)).ok(),
                None => None,
            },
            None => None,
        };
        let mut extra_headers = Vec::new();
        if let Some(ce) = &self.cloud_events {
            ce.headers(event_id.as_ref(), event_type.as_ref(), timestamp, &mut extra_headers);
        }
        self.trace_headers(row, &id_for_errors, &mut extra_headers, &mut fallbacks)?;
        for (i, header, is_bytea) in &self.header_columns {
            if let Some(mut v) = value(row, *i, header, Some(&id_for_errors))? {
                if *is_bytea {
                    v = decode_bytea(&v).ok_or_else(|| MappingError::InvalidBytea {
                        event_id: id_for_errors(),
                    })?;
                }
                extra_headers.push((header.clone(), v));
            }
        }
        extra_headers.extend(json_headers);
        let topic = match &self.route {
            Route::Static(t) => t.clone(),
            Route::Column { index, column, .. } => {
                let Some(v) = value(row, *index, column, Some(&id_for_errors))? else {
                    return Err(MappingError::NullRoute {
                        column: column.clone(),
                        event_id: id_for_errors(),
                    });
                };
                self.routed_topic(v).map_err(|topic| MappingError::InvalidTopic {
                    topic,
                    event_id: id_for_errors(),
                })?
            }
        };
        Ok(Mapped {
            record: OutboxRecord {
                topic,
                key,
                payload,
                event_id,
                event_type,
                extra_headers,
                timestamp,
                partition,
            },
            fallbacks,
        })
    }

    /// `traceparent` and `tracestate` from their columns, each only when valid; a
    /// tracestate goes only with a valid traceparent (W3C: without one it means nothing).
    fn trace_headers(
        &self,
        row: &TupleData,
        id_for_errors: &dyn Fn() -> String,
        out: &mut Vec<(String, Bytes)>,
        fallbacks: &mut Vec<Fallback>,
    ) -> Result<(), MappingError> {
        let Some(i) = self.traceparent else {
            return Ok(());
        };
        let Some(parent) = value(row, i, envelope::TRACEPARENT, Some(id_for_errors))? else {
            return Ok(());
        };
        if !envelope::valid_traceparent(&parent) {
            fallbacks.push(Fallback {
                kind: envelope::kinds::INVALID_TRACEPARENT,
                reason: format!(
                    "traceparent {} is not version-traceid-parentid-flags; the traceparent and tracestate headers are left out",
                    envelope::shown(&parent)
                ),
            });
            return Ok(());
        }
        out.push((envelope::TRACEPARENT.into(), parent));
        if let Some(j) = self.tracestate
            && let Some(state) = value(row, j, envelope::TRACESTATE, Some(id_for_errors))?
        {
            if envelope::valid_tracestate(&state) {
                out.push((envelope::TRACESTATE.into(), state));
            } else {
                fallbacks.push(Fallback {
                    kind: envelope::kinds::INVALID_TRACESTATE,
                    reason: "tracestate is longer than 512 characters or not printable ASCII; the header is left out"
                        .into(),
                });
            }
        }
        Ok(())
    }

    fn routed_topic(&mut self, value: Bytes) -> Result<Arc<str>, String> {
        if let Some(t) = self.topics.get(&value) {
            return Ok(t.clone());
        }
        let Route::Column { template, .. } = &self.route else {
            return Err(String::new());
        };
        let topic = template.replace(ROUTED_BY_VALUE, &String::from_utf8_lossy(&value));
        if !valid_topic(&topic) {
            return Err(topic);
        }
        if self.topics.len() >= TOPIC_CACHE_LIMIT {
            self.topics.clear();
        }
        let topic: Arc<str> = Arc::from(topic);
        self.topics.insert(value, topic.clone());
        Ok(topic)
    }
}

fn value(
    row: &TupleData,
    index: usize,
    column: &str,
    event_id: Option<&dyn Fn() -> String>,
) -> Result<Option<Bytes>, MappingError> {
    match row.get(index) {
        Some(ColumnValue::Text(b) | ColumnValue::Binary(b)) => Ok(Some(b.clone())),
        Some(ColumnValue::Null) | None => Ok(None),
        Some(ColumnValue::UnchangedToast) => Err(MappingError::UnexpectedToast {
            column: column.to_string(),
            event_id: event_id.map(|f| f()).unwrap_or_default(),
        }),
    }
}

/// Kafka's topic rule: 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Decodes bytea's hex output format (`\x0a1b…`).
fn decode_bytea(text: &[u8]) -> Option<Bytes> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// A JSON object's entries as headers: strings as they are, other values as JSON text.
fn parse_headers(raw: &[u8]) -> Result<Vec<(String, Bytes)>, String> {
    let v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(map) = v else {
        return Err("expected an object".into());
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let b = match v {
                serde_json::Value::String(s) => Bytes::from(s),
                other => Bytes::from(other.to_string()),
            };
            (k, b)
        })
        .collect())
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
pub(crate) mod tests;
