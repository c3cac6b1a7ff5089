//! Unit tests of the row → record mapping, envelope options included.

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
        None,
    )
    .unwrap()
}

/// Maps a row of a transaction committed at PostgreSQL's epoch; the record only.
fn map(m: &mut Mapper, r: &TupleData) -> Result<OutboxRecord, MappingError> {
    m.map(r, PgTimestamp(0)).map(|m| m.record)
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
    let r = map(
        &mut m,
        &row(&[
            Some("e1"),
            Some("Order"),
            Some("o-42"),
            Some("OrderCreated"),
            Some(r#"{"a":1}"#),
            None,
        ]),
    )
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
    let mut m = Mapper::new(&debezium_relation(25), &ColumnMapping::default(), &dest, None).unwrap();
    let r = map(
        &mut m,
        &row(&[Some("e1"), Some("Order"), Some("k"), Some("t"), Some("p"), None]),
    )
    .unwrap();
    assert_eq!(&*r.topic, "outbox.event.Order");
    let again = map(
        &mut m,
        &row(&[Some("e2"), Some("Order"), Some("k"), Some("t"), Some("p"), None]),
    )
    .unwrap();
    assert!(Arc::ptr_eq(&r.topic, &again.topic), "topic strings are cached");
    let bad = map(
        &mut m,
        &row(&[Some("e3"), Some("Or der"), Some("k"), Some("t"), Some("p"), None]),
    );
    assert!(matches!(bad, Err(MappingError::InvalidTopic { .. })), "{bad:?}");
    let null = map(&mut m, &row(&[Some("e4"), None, Some("k"), Some("t"), Some("p"), None]));
    assert!(matches!(null, Err(MappingError::NullRoute { .. })));
}

#[test]
fn bytea_payload_is_decoded() {
    let mut m = static_mapper(BYTEA_OID, "t");
    let r = map(
        &mut m,
        &row(&[Some("e"), Some("A"), Some("k"), Some("t"), Some("\\x00ff10"), None]),
    )
    .unwrap();
    assert_eq!(r.payload.as_deref(), Some(&[0u8, 0xff, 0x10][..]));
    let bad = map(
        &mut m,
        &row(&[Some("e"), Some("A"), Some("k"), Some("t"), Some("\\x0"), None]),
    );
    assert!(matches!(bad, Err(MappingError::InvalidBytea { .. })));
}

#[test]
fn headers_column_becomes_headers() {
    let cols = ColumnMapping {
        headers: Some("headers".into()),
        ..ColumnMapping::default()
    };
    let mut m = Mapper::new(&debezium_relation(25), &cols, &Destination::Static("t".into()), None).unwrap();
    let r = map(
        &mut m,
        &row(&[
            Some("e"),
            Some("A"),
            Some("k"),
            Some("t"),
            Some("p"),
            Some(r#"{"trace":"abc","n":3}"#),
        ]),
    )
    .unwrap();
    assert_eq!(
        r.extra_headers,
        vec![
            ("n".to_string(), Bytes::from("3")),
            ("trace".to_string(), Bytes::from("abc"))
        ]
    );
    let bad = map(
        &mut m,
        &row(&[Some("e"), Some("A"), Some("k"), Some("t"), Some("p"), Some("[1]")]),
    );
    assert!(matches!(bad, Err(MappingError::InvalidHeaders { .. })));
}

#[test]
fn null_payload_is_a_tombstone_and_null_key_is_unkeyed() {
    let mut m = static_mapper(25, "t");
    let r = map(&mut m, &row(&[Some("e"), Some("A"), None, Some("t"), None, None])).unwrap();
    assert_eq!(r.payload, None);
    assert_eq!(r.key, None);
}

#[test]
fn missing_column_names_the_column_and_the_alternatives() {
    let cols = ColumnMapping {
        payload: "body".into(),
        ..ColumnMapping::default()
    };
    let err = Mapper::new(&debezium_relation(25), &cols, &Destination::Static("t".into()), None).unwrap_err();
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

/// The Debezium table plus one column per envelope option.
fn envelope_relation() -> Relation {
    relation(&[
        ("id", 2950),
        ("aggregatetype", 25),
        ("aggregateid", 25),
        ("type", 25),
        ("payload", 3802),
        ("headers", 3802),
        ("occurred_at", 1184),
        ("shard", 23),
        ("traceparent", 25),
        ("tracestate", 25),
        ("tenant", 25),
        ("blob", BYTEA_OID),
    ])
}

fn envelope_columns() -> ColumnMapping {
    ColumnMapping {
        headers: Some("headers".into()),
        timestamp: Some("occurred_at".into()),
        partition: Some("shard".into()),
        traceparent: Some("traceparent".into()),
        tracestate: Some("tracestate".into()),
        header_columns: vec![
            crate::api::HeaderColumn {
                column: "tenant".into(),
                header: "x-tenant".into(),
            },
            crate::api::HeaderColumn {
                column: "blob".into(),
                header: "x-blob".into(),
            },
        ],
        ..ColumnMapping::default()
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const COMMIT: PgTimestamp = PgTimestamp(1_000_000);

/// An envelope row: occurred_at, shard, traceparent, tracestate, tenant, blob.
fn envelope_row(envelope: [Option<&str>; 6]) -> TupleData {
    let mut values = vec![
        Some("e1"),
        Some("Order"),
        Some("o-1"),
        Some("OrderCreated"),
        Some("{}"),
        None,
    ];
    values.extend(envelope);
    row(&values)
}

fn envelope_mapper(cloud_events: Option<&CloudEvents>) -> Mapper {
    Mapper::new(
        &envelope_relation(),
        &envelope_columns(),
        &Destination::Static("t".into()),
        cloud_events,
    )
    .unwrap()
}

fn header<'a>(r: &'a OutboxRecord, name: &str) -> Option<&'a str> {
    r.extra_headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

#[test]
fn without_envelope_columns_the_record_has_the_commit_time_and_no_partition() {
    let mut m = static_mapper(25, "t");
    let mapped = m
        .map(
            &row(&[Some("e"), Some("A"), Some("k"), Some("t"), Some("p"), None]),
            COMMIT,
        )
        .unwrap();
    assert_eq!(mapped.record.timestamp, COMMIT);
    assert_eq!(mapped.record.partition, None);
    assert!(mapped.fallbacks.is_empty());
}

#[test]
fn timestamp_column_sets_the_record_time_and_bad_values_fall_back_to_the_commit_time() {
    let mut m = envelope_mapper(None);
    let ok = m
        .map(
            &envelope_row([Some("2024-05-06 07:08:09.5+02"), None, None, None, None, None]),
            COMMIT,
        )
        .unwrap();
    assert_eq!(ok.record.timestamp.to_string(), "2024-05-06T05:08:09.500000Z");
    assert!(ok.fallbacks.is_empty());
    let null = m
        .map(&envelope_row([None, None, None, None, None, None]), COMMIT)
        .unwrap();
    assert_eq!(
        (null.record.timestamp, null.fallbacks.len()),
        (COMMIT, 0),
        "NULL: not given"
    );
    for bad in [Some("infinity"), Some("1960-01-01 00:00:00+00")] {
        let mapped = m
            .map(&envelope_row([bad, None, None, None, None, None]), COMMIT)
            .unwrap();
        assert_eq!(mapped.record.timestamp, COMMIT, "{bad:?}");
        let kinds: Vec<&str> = mapped.fallbacks.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, ["InvalidTimestamp"], "{bad:?}");
    }
}

#[test]
fn partition_column_fixes_the_partition_and_bad_values_leave_it_to_the_key() {
    let mut m = envelope_mapper(None);
    let at = |m: &mut Mapper, v: Option<&str>| {
        m.map(
            &envelope_row([Some("2024-01-01 00:00:00+00"), v, None, None, None, None]),
            COMMIT,
        )
        .unwrap()
    };
    let fixed = at(&mut m, Some("2"));
    assert_eq!((fixed.record.partition, fixed.fallbacks.len()), (Some(2), 0));
    let null = at(&mut m, None);
    assert_eq!(
        (null.record.partition, null.fallbacks.len()),
        (None, 0),
        "NULL is not an error"
    );
    let negative = at(&mut m, Some("-1"));
    assert_eq!(negative.record.partition, None);
    assert_eq!(negative.fallbacks[0].kind, "InvalidPartition");
}

#[test]
fn trace_context_is_copied_when_valid_and_dropped_alone_when_not() {
    let mut m = envelope_mapper(None);
    let ts = Some("2024-01-01 00:00:00+00");
    let good = m
        .map(
            &envelope_row([ts, None, Some(TRACEPARENT), Some("rojo=1"), None, None]),
            COMMIT,
        )
        .unwrap();
    assert_eq!(header(&good.record, "traceparent"), Some(TRACEPARENT));
    assert_eq!(header(&good.record, "tracestate"), Some("rojo=1"));
    assert!(good.fallbacks.is_empty());

    let bad = m
        .map(
            &envelope_row([ts, None, Some("00-abc-01"), Some("rojo=1"), None, None]),
            COMMIT,
        )
        .unwrap();
    assert_eq!(header(&bad.record, "traceparent"), None);
    assert_eq!(
        header(&bad.record, "tracestate"),
        None,
        "no tracestate without its traceparent"
    );
    assert_eq!(bad.fallbacks.len(), 1);
    assert_eq!(bad.fallbacks[0].kind, "InvalidTraceparent");
    assert_eq!(
        bad.record.payload.as_deref(),
        Some(&b"{}"[..]),
        "the event itself is intact"
    );

    let long_state = "a=".to_string() + &"b".repeat(600);
    let state = m
        .map(
            &envelope_row([ts, None, Some(TRACEPARENT), Some(&long_state), None, None]),
            COMMIT,
        )
        .unwrap();
    assert_eq!(header(&state.record, "traceparent"), Some(TRACEPARENT));
    assert_eq!(header(&state.record, "tracestate"), None);
    assert_eq!(state.fallbacks[0].kind, "InvalidTracestate");

    let none = m
        .map(&envelope_row([ts, None, None, Some("rojo=1"), None, None]), COMMIT)
        .unwrap();
    assert_eq!(header(&none.record, "tracestate"), None);
    assert!(none.fallbacks.is_empty(), "a NULL traceparent is not an error");
}

#[test]
fn header_columns_become_headers_under_their_names() {
    let mut m = envelope_mapper(None);
    let ts = Some("2024-01-01 00:00:00+00");
    let r = m
        .map(
            &envelope_row([ts, None, None, None, Some("acme"), Some("\\x00ff")]),
            COMMIT,
        )
        .unwrap()
        .record;
    assert_eq!(header(&r, "x-tenant"), Some("acme"));
    let blob = r
        .extra_headers
        .iter()
        .find(|(k, _)| k == "x-blob")
        .map(|(_, v)| v.clone());
    assert_eq!(blob.as_deref(), Some(&[0u8, 0xff][..]), "bytea as its bytes");
    let null = m
        .map(&envelope_row([ts, None, None, None, None, None]), COMMIT)
        .unwrap()
        .record;
    assert_eq!(header(&null, "x-tenant"), None, "NULL sends no header");
    assert!(r.size() > null.size(), "headers count towards the record size");
}

#[test]
fn cloud_events_headers_carry_id_type_source_and_the_record_time() {
    let ce = CloudEvents::new("shop", "orders", None, None);
    let mut m = envelope_mapper(Some(&ce));
    let r = m
        .map(
            &envelope_row([Some("2024-05-06 07:08:09+00"), None, None, None, None, None]),
            COMMIT,
        )
        .unwrap()
        .record;
    assert_eq!(header(&r, "ce_specversion"), Some("1.0"));
    assert_eq!(header(&r, "ce_id"), Some("e1"));
    assert_eq!(header(&r, "ce_type"), Some("OrderCreated"));
    assert_eq!(header(&r, "ce_source"), Some("/outbox/shop/orders"));
    assert_eq!(header(&r, "ce_time"), Some("2024-05-06T07:08:09.000000Z"));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    // ce_time follows the fallback too.
    let fallback = m
        .map(&envelope_row([Some("garbage"), None, None, None, None, None]), COMMIT)
        .unwrap()
        .record;
    assert_eq!(header(&fallback, "ce_time"), Some(COMMIT.to_string().as_str()));
}

#[test]
fn envelope_columns_must_exist() {
    let cols = ColumnMapping {
        partition: Some("shard_no".into()),
        ..ColumnMapping::default()
    };
    let err = Mapper::new(&envelope_relation(), &cols, &Destination::Static("t".into()), None).unwrap_err();
    assert!(
        matches!(err, MappingError::ColumnMissing { ref column, .. } if column == "shard_no"),
        "{err}"
    );
}
