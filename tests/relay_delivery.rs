//! The relay moves committed outbox rows to Kafka: every event, in order per
//! aggregate, with its headers; rolled-back rows never; routed by a column.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_operator::api::RouteBy;
use outbox_operator::relay::lsn::Lsn;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_in_order_per_aggregate() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "relay-10k", 8).await;
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");

    let ids = fx.insert_events(&client, 100, 100, 50).await;
    assert_eq!(ids.len(), 10_000);
    let after_inserts: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let expect: HashSet<String> = ids.into_iter().collect();

    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order");
    assert!(records.len() >= expect.len());
    let r = &records[0];
    assert_eq!(r.event_type.as_deref(), Some("OrderCreated"));
    assert!(r.key.as_deref().is_some_and(|k| k.starts_with("agg-")), "{r:?}");

    // The slot moves past everything once Kafka acknowledged it.
    let target: Lsn = after_inserts.parse().expect("lsn");
    eventually(
        Duration::from_secs(30),
        "confirmed_flush_lsn to pass the inserts",
        || async {
            let c = fx.slot_confirmed_flush().await?;
            (c.parse::<Lsn>().ok()? >= target).then_some(())
        },
    )
    .await;
    let text = worker.handle.metrics.encode();
    assert!(
        text.contains("outbox_relay_events_total{outcome=\"relayed\"}"),
        "{text}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_rows_never_appear() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "relay-rollback", 1).await;
    let worker = fx.start_worker();
    let mut client = bed.pg.client(&fx.db).await.expect("connect");

    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'ghost', 'OrderCreated', '{}')",
        &[],
    )
    .await
    .expect("insert");
    tx.rollback().await.expect("rollback");
    let committed: String = client
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'real', 'OrderCreated', '{}') RETURNING id::text",
            &[],
        )
        .await
        .expect("insert")
        .get(0);

    let expect = HashSet::from([committed]);
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(2)).await;
    assert_all_delivered(&records, &expect);
    assert!(
        records.iter().all(|r| r.key.as_deref() != Some("ghost")),
        "a rolled-back row was published: {records:?}"
    );
    assert_eq!(records.len(), 1, "{records:?}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_column_and_carries_headers() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "relay-route", 1).await;
    let prefix = fx.name.clone();
    fx.spec.kafka.topic = None;
    fx.spec.kafka.route_by = Some(RouteBy {
        column: "aggregatetype".into(),
        topic_template: format!("{prefix}.${{routedByValue}}"),
    });
    fx.spec.outbox.columns.headers = Some("headers".into());
    for t in ["Order", "Payment"] {
        bed.kafka
            .create_topic(&format!("{prefix}.{t}"), 1)
            .await
            .expect("topic");
    }
    let worker = fx.start_worker();
    let mut client = bed.pg.client(&fx.db).await.expect("connect");

    let order: String = client
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, headers)
             VALUES ('Order', 'o-1', 'OrderCreated', '{\"total\": 10}', '{\"traceparent\": \"00-abc-01\", \"tenant\": 7}')
             RETURNING id::text",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    // Insert and delete in one transaction: the table never grows, the WAL still
    // carries the insert, and the event is published.
    let tx = client.transaction().await.expect("begin");
    let payment: String = tx
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('Payment', 'p-1', 'PaymentTaken', '{\"amount\": 3}') RETURNING id::text",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    tx.execute("DELETE FROM public.outbox WHERE aggregateid = 'p-1'", &[])
        .await
        .expect("delete");
    tx.commit().await.expect("commit");

    let orders = consume_async(
        &fx.bootstrap,
        &format!("{prefix}.Order"),
        &HashSet::from([order.clone()]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    let o = &orders[0];
    assert_eq!(o.key.as_deref(), Some("o-1"));
    assert_eq!(o.id.as_deref(), Some(order.as_str()));
    assert_eq!(o.headers.get("traceparent").map(String::as_str), Some("00-abc-01"));
    assert_eq!(o.headers.get("tenant").map(String::as_str), Some("7"));
    let payload: serde_json::Value = serde_json::from_slice(o.payload.as_deref().unwrap_or_default()).expect("json");
    assert_eq!(payload, serde_json::json!({"total": 10}));

    let payments = consume_async(
        &fx.bootstrap,
        &format!("{prefix}.Payment"),
        &HashSet::from([payment.clone()]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(payments[0].event_type.as_deref(), Some("PaymentTaken"));
    let left: i64 = client
        .query_one("SELECT count(*) FROM public.outbox WHERE aggregateid = 'p-1'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_payload_is_sent_as_stored() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "relay-bytea", 1).await;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    client
        .batch_execute("ALTER TABLE public.outbox ALTER payload TYPE bytea USING convert_to(payload::text, 'UTF8')")
        .await
        .expect("alter");
    let worker = fx.start_worker();
    let id: String = client
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('Blob', 'b-1', 'BlobStored', '\\x00ff7f0a'::bytea) RETURNING id::text",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let records = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([id]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload.as_deref(), Some(&[0x00u8, 0xff, 0x7f, 0x0a][..]));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_relay_empties_the_table() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "relay-retention", 2).await;
    fx.spec.outbox.delete_after_relay = true;
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let ids = fx.insert_events(&client, 10, 50, 25).await;
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(500)).await;
    assert_all_delivered(&records, &expect);
    eventually(Duration::from_secs(30), "relayed rows to be deleted", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM public.outbox", &[])
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_in_flight_budget_still_delivers_everything_in_order() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "relay-budget", 4).await;
    let mut cfg = fx.config();
    // A few records at a time: reading pauses and resumes on every ack.
    cfg.tuning.max_in_flight_bytes = 2048;
    let worker = fx.start_worker_with(cfg);
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let expect: HashSet<String> = fx.insert_events(&client, 20, 50, 100).await.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(500)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order");
    worker.shutdown().await;
}
