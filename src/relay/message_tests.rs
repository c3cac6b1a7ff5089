use super::*;
use crate::relay::lsn::Lsn;

fn msg(flags: u8, prefix: &str, content: &str) -> LogicalMessage {
    LogicalMessage {
        flags,
        lsn: Lsn::from(0x1_0000_0010),
        prefix: prefix.into(),
        content: Bytes::from(content.to_string()),
    }
}

fn static_mapper() -> MessageMapper {
    MessageMapper::new(&Destination::Static("orders".into()), None)
}

const T: PgTimestamp = PgTimestamp(1_000_000);

#[test]
fn only_transactional_messages_with_our_prefix_are_relayed() {
    assert_eq!(disposition(&msg(1, "outbox", ""), "outbox"), Disposition::Relay);
    assert_eq!(disposition(&msg(0, "outbox", ""), "outbox"), Disposition::Refused);
    assert_eq!(disposition(&msg(1, "other", ""), "outbox"), Disposition::NotOurs);
    // A prefix is compared whole, not as a prefix of the message's prefix.
    assert_eq!(disposition(&msg(1, "outbox2", ""), "outbox"), Disposition::NotOurs);
    assert_eq!(disposition(&msg(0, "other", ""), "outbox"), Disposition::NotOurs);
}

#[test]
fn the_envelope_maps_to_a_record() {
    let content = "{\"id\":\"e1\",\"aggregateType\":\"order\",\"aggregateId\":\"42\",\"type\":\"Placed\",\
                   \"headers\":{\"tenant\":\"a\",\"n\":3}}\n{\"total\":12}";
    let m = static_mapper().map(&Bytes::from(content), T).unwrap();
    let r = m.record;
    assert_eq!(&*r.topic, "orders");
    assert_eq!(r.key.as_deref(), Some(&b"42"[..]));
    assert_eq!(r.event_id.as_deref(), Some(&b"e1"[..]));
    assert_eq!(r.event_type.as_deref(), Some(&b"Placed"[..]));
    assert_eq!(r.payload.as_deref(), Some(&b"{\"total\":12}"[..]));
    assert_eq!(r.timestamp, T);
    assert_eq!(r.partition, None);
    assert_eq!(
        r.extra_headers,
        vec![("n".into(), Bytes::from("3")), ("tenant".into(), Bytes::from("a"))]
    );
    assert!(m.fallbacks.is_empty());
}

#[test]
fn the_payload_is_raw_bytes_after_the_first_newline() {
    // Newlines inside JSON strings are escaped, so the first raw one ends the header;
    // the payload may contain newlines and non-UTF-8 bytes.
    let mut content = b"{\"id\":\"a\\nb\",\"aggregateId\":\"k\"}\n".to_vec();
    content.extend_from_slice(&[0xff, b'\n', 0x00]);
    let r = static_mapper().map(&Bytes::from(content), T).unwrap().record;
    assert_eq!(r.event_id.as_deref(), Some(&b"a\nb"[..]));
    assert_eq!(r.payload.as_deref(), Some(&[0xff, b'\n', 0x00][..]));
    assert_eq!(r.event_type, None);
    assert!(r.extra_headers.is_empty());
}

#[test]
fn an_empty_payload_is_a_tombstone() {
    let r = static_mapper()
        .map(
            &Bytes::from("{\"id\":\"a\",\"aggregateId\":\"k\",\"headers\":null}\n"),
            T,
        )
        .unwrap()
        .record;
    assert_eq!(r.payload, None);
}

#[test]
fn routing_uses_the_aggregate_type() {
    let mut m = MessageMapper::new(
        &Destination::Routed {
            column: "aggregatetype".into(),
            template: "ev.${routedByValue}".into(),
        },
        None,
    );
    let ok = m
        .map(
            &Bytes::from("{\"id\":\"a\",\"aggregateType\":\"order\",\"aggregateId\":\"k\"}\nx"),
            T,
        )
        .unwrap();
    assert_eq!(&*ok.record.topic, "ev.order");
    let none = m
        .map(&Bytes::from("{\"id\":\"a\",\"aggregateId\":\"k\"}\nx"), T)
        .unwrap_err();
    assert_eq!(none.category(), "InvalidTopic");
    let bad = m
        .map(
            &Bytes::from("{\"id\":\"a\",\"aggregateType\":\"a b\",\"aggregateId\":\"k\"}\nx"),
            T,
        )
        .unwrap_err();
    assert!(matches!(bad, MessageError::InvalidTopic { ref topic, .. } if topic == "ev.a b"));
}

#[test]
fn cloud_events_headers_come_first() {
    let ce = CloudEvents::new("shop", "orders", None, None);
    let mut m = MessageMapper::new(&Destination::Static("t".into()), Some(&ce));
    let r = m
        .map(
            &Bytes::from("{\"id\":\"a\",\"aggregateId\":\"k\",\"type\":\"X\",\"headers\":{\"h\":\"v\"}}\n{}"),
            T,
        )
        .unwrap()
        .record;
    assert_eq!(r.extra_headers.first().map(|h| h.0.as_str()), Some("ce_specversion"));
    assert_eq!(r.extra_headers.last().map(|h| h.0.as_str()), Some("h"));
}

#[test]
fn undecodable_content_is_an_error_with_a_stable_category() {
    let mut m = static_mapper();
    for bad in [
        "no newline at all",
        "not json\npayload",
        "[1,2]\npayload",
        "{\"aggregateId\":\"k\"}\nmissing id",
        "{\"id\":\"a\"}\nmissing key",
        "{\"id\":1,\"aggregateId\":\"k\"}\nid not a string",
        "{\"id\":\"a\",\"aggregateId\":\"k\",\"headers\":[1]}\nheaders not an object",
    ] {
        let e = m.map(&Bytes::from(bad), T).unwrap_err();
        assert_eq!(e.category(), "InvalidEnvelope", "{bad}: {e}");
    }
    // A header line longer than the bound is refused, not scanned to the end.
    let long = format!("{{\"id\":\"{}\"}}\n", "a".repeat(MAX_HEADER_BYTES));
    assert_eq!(m.map(&Bytes::from(long), T).unwrap_err(), MessageError::NoHeader);
}

#[test]
fn a_refused_message_keeps_its_content_for_the_park_table() {
    let (id, row) = raw_row(&msg(1, "outbox", "{\"id\":\"e9\",\"aggregateId\":1}\npayload"));
    assert_eq!(id.as_deref(), Some("e9"));
    assert_eq!(row["prefix"], "outbox");
    assert_eq!(row["message_lsn"], "1/10");
    assert_eq!(row["content"], "{\"id\":\"e9\",\"aggregateId\":1}\npayload");
    let mut binary = msg(1, "outbox", "");
    binary.content = Bytes::from_static(&[0xff, 0x00]);
    let (id, row) = raw_row(&binary);
    assert_eq!(id, None);
    assert_eq!(row["content"], "\\xff00");
    binary.content = Bytes::from_static(b"a\0");
    assert_eq!(raw_row(&binary).1["content"], "\\x6100");
}
