//! Outbox row → Kafka record. Pure: no I/O, no Kafka types.
//!
//! pgoutput (protocol 1, text mode) sends every column in its type's text form:
//! json, jsonb, text and varchar are the stored text already; bytea arrives as
//! `\x` + hex and is decoded back to the stored bytes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use super::pgoutput::{ColumnValue, Relation, TupleData};
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
    pub extra_headers: Vec<(String, Bytes)>,
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
    pub fn new(relation: &Relation, columns: &ColumnMapping, destination: &Destination) -> Result<Self, MappingError> {
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
        Ok(Self {
            id: find(&columns.id)?,
            aggregate_id: find(&columns.aggregate_id)?,
            event_type: find(&columns.event_type)?,
            payload,
            payload_is_bytea: relation.columns[payload].type_oid == BYTEA_OID,
            headers: columns.headers.as_deref().map(find).transpose()?,
            route,
            topics: HashMap::new(),
        })
    }

    /// Maps one inserted row.
    pub fn map(&mut self, row: &TupleData) -> Result<OutboxRecord, MappingError> {
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
        let extra_headers = match self.headers {
            Some(i) => match value(row, i, "headers", Some(&id_for_errors))? {
                Some(raw) => parse_headers(&raw).map_err(|reason| MappingError::InvalidHeaders {
                    event_id: id_for_errors(),
                    reason,
                })?,
                None => Vec::new(),
            },
            None => Vec::new(),
        };
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
        Ok(OutboxRecord {
            topic,
            key,
            payload,
            event_id,
            event_type,
            extra_headers,
        })
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
pub(crate) mod tests {
    use super::*;
    use crate::relay::pgoutput::{RelationColumn, ReplicaIdentity};

    pub fn relation(cols: &[(&str, u32)]) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|(n, t)| RelationColumn {
                    flags: 0,
                    name: (*n).into(),
                    type_oid: *t,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn debezium_relation(payload_oid: u32) -> Relation {
        relation(&[
            ("id", 2950),
            ("aggregatetype", 25),
            ("aggregateid", 25),
            ("type", 25),
            ("payload", payload_oid),
            ("headers", 3802),
        ])
    }

    /// A mapper for the Debezium table with default columns and one static topic.
    fn static_mapper(payload_oid: u32, topic: &str) -> Mapper {
        Mapper::new(
            &debezium_relation(payload_oid),
            &ColumnMapping::default(),
            &Destination::Static(topic.into()),
        )
        .unwrap()
    }

    fn row(values: &[Option<&str>]) -> TupleData {
        TupleData {
            columns: values
                .iter()
                .map(|v| match v {
                    Some(s) => ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                    None => ColumnValue::Null,
                })
                .collect(),
        }
    }

    #[test]
    fn maps_debezium_columns_to_a_record() {
        let mut m = static_mapper(3802, "orders");
        let r = m
            .map(&row(&[
                Some("e1"),
                Some("Order"),
                Some("o-42"),
                Some("OrderCreated"),
                Some(r#"{"a":1}"#),
                None,
            ]))
            .unwrap();
        assert_eq!(&*r.topic, "orders");
        assert_eq!(r.key.as_deref(), Some(&b"o-42"[..]));
        assert_eq!(r.payload.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(r.event_id.as_deref(), Some(&b"e1"[..]));
        assert_eq!(r.event_type.as_deref(), Some(&b"OrderCreated"[..]));
        assert!(
            r.extra_headers.is_empty(),
            "headers column not mapped unless configured"
        );
    }

    #[test]
    fn routes_by_column_through_the_template() {
        let dest = Destination::Routed {
            column: "aggregatetype".into(),
            template: "outbox.event.${routedByValue}".into(),
        };
        let mut m = Mapper::new(&debezium_relation(25), &ColumnMapping::default(), &dest).unwrap();
        let r = m
            .map(&row(&[
                Some("e1"),
                Some("Order"),
                Some("k"),
                Some("t"),
                Some("p"),
                None,
            ]))
            .unwrap();
        assert_eq!(&*r.topic, "outbox.event.Order");
        let again = m
            .map(&row(&[
                Some("e2"),
                Some("Order"),
                Some("k"),
                Some("t"),
                Some("p"),
                None,
            ]))
            .unwrap();
        assert!(Arc::ptr_eq(&r.topic, &again.topic), "topic strings are cached");
        let bad = m.map(&row(&[
            Some("e3"),
            Some("Or der"),
            Some("k"),
            Some("t"),
            Some("p"),
            None,
        ]));
        assert!(matches!(bad, Err(MappingError::InvalidTopic { .. })), "{bad:?}");
        let null = m.map(&row(&[Some("e4"), None, Some("k"), Some("t"), Some("p"), None]));
        assert!(matches!(null, Err(MappingError::NullRoute { .. })));
    }

    #[test]
    fn bytea_payload_is_decoded() {
        let mut m = static_mapper(BYTEA_OID, "t");
        let r = m
            .map(&row(&[
                Some("e"),
                Some("A"),
                Some("k"),
                Some("t"),
                Some("\\x00ff10"),
                None,
            ]))
            .unwrap();
        assert_eq!(r.payload.as_deref(), Some(&[0u8, 0xff, 0x10][..]));
        let bad = m.map(&row(&[Some("e"), Some("A"), Some("k"), Some("t"), Some("\\x0"), None]));
        assert!(matches!(bad, Err(MappingError::InvalidBytea { .. })));
    }

    #[test]
    fn headers_column_becomes_headers() {
        let cols = ColumnMapping {
            headers: Some("headers".into()),
            ..ColumnMapping::default()
        };
        let mut m = Mapper::new(&debezium_relation(25), &cols, &Destination::Static("t".into())).unwrap();
        let r = m
            .map(&row(&[
                Some("e"),
                Some("A"),
                Some("k"),
                Some("t"),
                Some("p"),
                Some(r#"{"trace":"abc","n":3}"#),
            ]))
            .unwrap();
        assert_eq!(
            r.extra_headers,
            vec![
                ("n".to_string(), Bytes::from("3")),
                ("trace".to_string(), Bytes::from("abc"))
            ]
        );
        let bad = m.map(&row(&[
            Some("e"),
            Some("A"),
            Some("k"),
            Some("t"),
            Some("p"),
            Some("[1]"),
        ]));
        assert!(matches!(bad, Err(MappingError::InvalidHeaders { .. })));
    }

    #[test]
    fn null_payload_is_a_tombstone_and_null_key_is_unkeyed() {
        let mut m = static_mapper(25, "t");
        let r = m
            .map(&row(&[Some("e"), Some("A"), None, Some("t"), None, None]))
            .unwrap();
        assert_eq!(r.payload, None);
        assert_eq!(r.key, None);
    }

    #[test]
    fn missing_column_names_the_column_and_the_alternatives() {
        let cols = ColumnMapping {
            payload: "body".into(),
            ..ColumnMapping::default()
        };
        let err = Mapper::new(&debezium_relation(25), &cols, &Destination::Static("t".into())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"body\"") && msg.contains("payload"), "{msg}");
    }

    #[test]
    fn topic_validation() {
        assert!(valid_topic("a.b-c_D9"));
        assert!(!valid_topic(""));
        assert!(!valid_topic(".."));
        assert!(!valid_topic("a/b"));
        assert!(!valid_topic(&"a".repeat(250)));
    }
}
