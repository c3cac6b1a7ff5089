//! The record envelope on real Kafka records: the timestamp from a column (or the
//! commit time), a partition fixed by a column, CloudEvents binary-mode headers, W3C
//! trace context and header columns. Bad envelope values never hold an event up:
//! they fall back, are counted, and the event arrives.

mod support;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox_operator::api::{CloudEventsSpec, HeaderColumn};
use outbox_operator::relay::pgoutput::PgTimestamp;
use support::*;

const WAIT: Duration = Duration::from_secs(120);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// RFC 3339 (UTC, microseconds) of a Kafka timestamp, as `ce_time` carries it.
fn rfc3339(ms: i64) -> String {
    PgTimestamp::from_unix_micros(ms * 1000).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_options_shape_the_kafka_record() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "relay-envelope", 3).await;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    client
        .batch_execute(
            "ALTER TABLE public.outbox
               ADD COLUMN occurred_at timestamptz,
               ADD COLUMN shard int4,
               ADD COLUMN traceparent text,
               ADD COLUMN tracestate text,
               ADD COLUMN tenant text",
        )
        .await
        .expect("alter");
    let c = &mut fx.spec.outbox.columns;
    c.timestamp = Some("occurred_at".into());
    c.partition = Some("shard".into());
    c.traceparent = Some("traceparent".into());
    c.tracestate = Some("tracestate".into());
    c.header_columns = vec![HeaderColumn {
        column: "tenant".into(),
        header: "x-tenant".into(),
    }];
    fx.spec.kafka.cloud_events = Some(CloudEventsSpec::default());
    // The operator's checks accept these columns and their types.
    fx.provision().await;
    let worker = fx.start_worker();

    let insert = "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, occurred_at, shard, traceparent, tracestate, tenant)
                  VALUES ('Order', $1, 'OrderCreated', '{}', $2::text::timestamptz, $3::text::int4, $4, $5, $6) RETURNING id::text";
    let good: String = client
        .query_one(
            insert,
            &[
                &"o-1",
                &Some("2024-05-06 07:08:09.123+02"),
                &Some("2"),
                &Some(TRACEPARENT),
                &Some("rojo=00f067aa0ba902b7"),
                &Some("acme"),
            ],
        )
        .await
        .expect("insert")
        .get(0);
    let before = now_ms();
    // Every envelope value bad or missing: the event still arrives.
    let bad: String = client
        .query_one(
            insert,
            &[
                &"o-2",
                &Some("infinity"),
                &Some("7"),
                &Some("00-abc-01"),
                &Some("rojo=1"),
                &None::<&str>,
            ],
        )
        .await
        .expect("insert")
        .get(0);
    let after = now_ms();

    let expect = HashSet::from([good.clone(), bad.clone()]);
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(500)).await;
    assert_all_delivered(&records, &expect);
    let get = |id: &str| records.iter().find(|r| r.id.as_deref() == Some(id)).expect("record");

    let g = get(&good);
    let h = |name: &str| g.headers.get(name).map(String::as_str);
    assert_eq!(
        g.timestamp,
        Some(1_714_972_089_123),
        "the timestamp column, with its offset"
    );
    assert_eq!(g.partition, 2, "the partition column");
    assert_eq!(h("traceparent"), Some(TRACEPARENT));
    assert_eq!(h("tracestate"), Some("rojo=00f067aa0ba902b7"));
    assert_eq!(h("x-tenant"), Some("acme"));
    assert_eq!(h("ce_specversion"), Some("1.0"));
    assert_eq!(h("ce_id"), Some(good.as_str()));
    assert_eq!(h("ce_type"), Some("OrderCreated"));
    let source = format!("/outbox/tests/{}", fx.name);
    assert_eq!(h("ce_source"), Some(source.as_str()));
    assert_eq!(h("ce_time"), Some("2024-05-06T05:08:09.123000Z"));
    assert_eq!(h("content-type"), Some("application/json"));

    let b = get(&bad);
    let h = |name: &str| b.headers.get(name).map(String::as_str);
    let ts = b.timestamp.expect("a record timestamp");
    // The commit time, from the server's clock on this machine.
    assert!(
        (before - 5_000..=after + 5_000).contains(&ts),
        "{ts} is not the commit time (inserted between {before} and {after})"
    );
    assert_eq!(
        h("ce_time").map(|t| &t[..23]),
        Some(&rfc3339(ts)[..23]),
        "ce_time is the record time"
    );
    assert!((0..3).contains(&b.partition));
    assert_eq!(h("traceparent"), None, "an invalid traceparent is dropped");
    assert_eq!(h("tracestate"), None, "and its tracestate with it");
    assert_eq!(h("x-tenant"), None, "a NULL column sends no header");
    assert_eq!(h("ce_id"), Some(bad.as_str()));

    let text = worker.handle.metrics.encode();
    for kind in ["InvalidTimestamp", "InvalidPartition", "InvalidTraceparent"] {
        // At least once: a restarted session maps the event again.
        let line = format!("outbox_relay_envelope_fallbacks_total{{kind=\"{kind}\"}} ");
        assert!(
            text.lines().any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line} missing in\n{text}"
        );
    }
    worker.shutdown().await;
}
