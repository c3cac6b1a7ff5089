//! A tableless relay (`source: Messages`): events emitted with the provisioned SQL
//! function inside committed transactions arrive in order per key; a rolled-back
//! transaction's message never arrives; a non-transactional message with the
//! relay's prefix is counted, not relayed; a worker killed mid-stream loses
//! nothing. Also prints the WAL each way of writing an event costs.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_operator::api::OutboxRelaySpec;
use outbox_operator::postgres::{self, messages};
use outbox_testbed::unique_name;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// A database with no outbox table, a topic, and the objects the operator
/// provisions for `source: Messages` (empty publication, emit function, slot).
async fn messages_fixture(prefix: &str, partitions: i32) -> Fixture {
    let bed = outbox_testbed::shared().await;
    let (pg, kafka) = (&bed.pg, &bed.kafka);
    let name = unique_name(prefix);
    let db = name.replace('-', "_");
    pg.create_database(&db).await.expect("create database");
    let topic = format!("{name}.events");
    kafka.create_topic(&topic, partitions).await.expect("create topic");
    let spec: OutboxRelaySpec = serde_json::from_value(serde_json::json!({
        "database": {
            "host": pg.host(), "port": pg.port(), "database": db,
            "tls": {"mode": "Disable"},
            "credentialsSecretRef": {"name": "unused-in-tests"}
        },
        "outbox": {"source": "Messages"},
        "kafka": {"bootstrapServers": kafka.bootstrap(), "topic": topic, "producer": {"lingerMs": 2}}
    }))
    .expect("spec");
    let fx = Fixture {
        name,
        db,
        topic,
        spec,
        pg_host: pg.host().to_string(),
        pg_port: pg.port(),
        pg_user: pg.user().to_string(),
        pg_password: pg.password().to_string(),
        bootstrap: kafka.bootstrap(),
    };
    let cfg = fx.config();
    let m = cfg.messages.clone().expect("messages source");
    let client = fx.sql().await;
    postgres::check_message_prerequisites(&client, &cfg.slot)
        .await
        .expect("prerequisites");
    messages::ensure_publication(&client, &cfg.publication)
        .await
        .expect("publication");
    messages::ensure_emit_function(&client, &m.function, &m.prefix)
        .await
        .expect("function");
    postgres::ensure_slot(&client, &cfg.slot).await.expect("slot");
    fx
}

/// Emits `per_aggregate` events for each of `aggregates` aggregates through the
/// emit function, `per_txn` per transaction; payload `{"seq": n}` numbers each
/// aggregate's events from `first_seq` in commit order.
async fn emit(
    client: &tokio_postgres::Client,
    aggregates: usize,
    per_aggregate: usize,
    per_txn: usize,
    first_seq: usize,
) {
    let total = aggregates * per_aggregate;
    let mut n = 0;
    while n < total {
        let rows = per_txn.min(total - n);
        let sql = format!(
            "SELECT public.outbox_emit('Order', 'agg-' || (i % {aggregates}), 'OrderCreated',
                    jsonb_build_object('seq', i / {aggregates} + {first_seq}))
             FROM generate_series({n}, {}) AS i ORDER BY i",
            n + rows - 1
        );
        client.batch_execute(&sql).await.expect("emit");
        n += rows;
    }
}

/// Reads the topic until `count` distinct (key, seq) events were seen.
async fn read_events(fx: &Fixture, count: usize) -> Vec<Consumed> {
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        records = consume_async(&fx.bootstrap, &fx.topic, &HashSet::new(), WAIT, Duration::from_secs(2)).await;
        if distinct(&records).len() >= count {
            break;
        }
    }
    records
}

fn distinct(records: &[Consumed]) -> HashSet<(String, i64)> {
    records
        .iter()
        .map(|r| (r.key.clone().unwrap_or_default(), r.seq()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_arrive_in_order_and_nothing_else_does() {
    let bed = outbox_testbed::shared().await;
    let fx = messages_fixture("msg-relay", 4).await;
    let worker = fx.start_worker();
    let mut client = bed.pg.client(&fx.db).await.expect("connect");

    // Noise around the events: a rolled-back transaction, a non-transactional
    // message with our prefix, a message with another prefix.
    let tx = client.transaction().await.expect("begin");
    tx.batch_execute("SELECT public.outbox_emit('Order', 'ghost', 'OrderCreated', '{\"seq\": 1}')")
        .await
        .expect("emit");
    tx.rollback().await.expect("rollback");
    client
        .batch_execute(
            "SELECT pg_logical_emit_message(false, 'outbox', '{\"id\":\"nontx\",\"aggregateId\":\"nontx\"}' || E'\\n' || '{\"seq\":1}');
             SELECT pg_logical_emit_message(true, 'not-ours', '{\"id\":\"other\",\"aggregateId\":\"other\"}' || E'\\n' || '{\"seq\":1}')",
        )
        .await
        .expect("noise");
    emit(&client, 20, 25, 10, 1).await;

    let records = read_events(&fx, 500).await;
    let seen = distinct(&records);
    assert_eq!(seen.len(), 500, "{} distinct events of 500", seen.len());
    check_per_key_order(&records).expect("per-key order");
    for r in &records {
        let key = r.key.as_deref().unwrap_or_default();
        assert!(
            key.starts_with("agg-"),
            "only committed, transactional, own-prefix events: {r:?}"
        );
        assert_eq!(r.event_type.as_deref(), Some("OrderCreated"));
        assert_eq!(r.id.as_ref().map(String::len), Some(36), "{r:?}");
    }
    let text = eventually(Duration::from_secs(10), "the refusal to be counted", || async {
        let text = worker.handle.metrics.encode();
        text.contains("outbox_relay_nontransactional_messages_total 1")
            .then_some(text)
    })
    .await;
    assert!(
        text.contains("outbox_relay_events_total{outcome=\"relayed\"} 500"),
        "{text}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_parked_not_dropped() {
    let bed = outbox_testbed::shared().await;
    let mut fx = messages_fixture("msg-park", 1).await;
    fx.spec.delivery.poison_policy = outbox_operator::api::PoisonPolicy::DeadLetter;
    fx.spec.delivery.dead_letter_topic = Some(format!("{}.dlq", fx.topic));
    bed.kafka
        .create_topic(&format!("{}.dlq", fx.topic), 1)
        .await
        .expect("dlq topic");
    let cfg = fx.config();
    let worker = fx.start_worker_with(cfg.clone());
    let client = bed.pg.client(&fx.db).await.expect("connect");
    client
        .batch_execute(
            "BEGIN; SELECT pg_logical_emit_message(true, 'outbox', 'no header line'); COMMIT;
             SELECT public.outbox_emit('Order', 'after', 'OrderCreated', '{\"seq\": 1}')",
        )
        .await
        .expect("emit");
    let records = read_events(&fx, 1).await;
    assert!(records.iter().any(|r| r.key.as_deref() == Some("after")), "{records:?}");
    let park = outbox_operator::relay::park::park_table_for(&cfg.table);
    assert_eq!(park.unquoted(), format!("public.{}_parked", cfg.slot));
    let row = eventually(Duration::from_secs(30), "the parked message", || async {
        client
            .query_opt(&format!("SELECT reason, row_data->>'content' FROM {park}"), &[])
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(row.get::<_, String>(0), "InvalidEnvelope");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("no header line"));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_message() {
    let bed = outbox_testbed::shared().await;
    let fx = messages_fixture("msg-crash", 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = {
        let client = bed.pg.client(&fx.db).await.expect("connect");
        tokio::spawn(async move {
            for round in 0..12 {
                emit(&client, 40, 5, 20, round * 5 + 1).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    for round in 0..3 {
        let mut child = fx.spawn_worker_process(dir.path());
        tokio::time::sleep(Duration::from_millis(900 + round * 300)).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
    writer.await.expect("writer");
    let mut child = fx.spawn_worker_process(dir.path());
    let records = read_events(&fx, 12 * 200).await;
    child.kill().expect("kill");
    let _ = child.wait();
    assert_eq!(distinct(&records).len(), 12 * 200, "every message arrived");
    check_per_key_order(&records).expect("per-key order");
}

/// WAL written per event by each way of writing one: an insert into the outbox
/// table, an insert the relay deletes afterwards (`deleteAfterRelay`: the delete is
/// WAL too), and a logical decoding message. Counted per statement with
/// `EXPLAIN (ANALYZE, WAL)`, which the bed's other tests writing at the same time
/// cannot inflate (a `pg_current_wal_lsn()` difference is cluster-wide); the commit
/// record, the same for each way, is left out. The first batch of each way warms
/// up (full-page images after the checkpoint) and is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_bytes_per_event_by_source() {
    let bed = outbox_testbed::shared().await;
    let fx = messages_fixture("msg-wal", 1).await;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    client
        .batch_execute(outbox_testbed::OUTBOX_DDL)
        .await
        .expect("outbox table");
    const BATCHES: i64 = 100;
    const PER_TXN: i64 = 10;
    let payload = "jsonb_build_object('seq', i, 'pad', repeat('x', 64))";
    let insert = format!(
        "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
         SELECT 'Order', 'agg-' || (i % 20), 'OrderCreated', {payload} FROM generate_series(1, {PER_TXN}) AS i"
    );
    // deleteAfterRelay deletes delivered rows by id, in a transaction of its own.
    let delete = "DELETE FROM public.outbox".to_string();
    let message = format!(
        "SELECT public.outbox_emit('Order', 'agg-' || (i % 20), 'OrderCreated', {payload}) FROM generate_series(1, {PER_TXN}) AS i"
    );
    let mut out = HashMap::new();
    for (way, statements) in [
        ("insert", vec![insert.clone()]),
        ("insert+delete", vec![insert.clone(), delete]),
        ("message", vec![message]),
    ] {
        let mut bytes = 0i64;
        for batch in 0..=BATCHES {
            for s in &statements {
                let w = wal_bytes(&client, s).await;
                if batch > 0 {
                    bytes += w;
                }
            }
        }
        out.insert(way, bytes as f64 / (BATCHES * PER_TXN) as f64);
    }
    println!(
        "WAL bytes per event ({} events, {PER_TXN} per statement, ~90-byte JSON payload, without the commit record):",
        BATCHES * PER_TXN
    );
    for way in ["insert", "insert+delete", "message"] {
        println!("  {way:<14} {:>7.0}", out[way]);
    }
    assert!(out["message"] < out["insert"], "{out:?}");
    assert!(out["insert"] < out["insert+delete"], "{out:?}");
}

/// WAL bytes one statement wrote, from `EXPLAIN (ANALYZE, WAL, FORMAT JSON)`.
async fn wal_bytes(client: &tokio_postgres::Client, sql: &str) -> i64 {
    let rows = client
        .simple_query(&format!("EXPLAIN (ANALYZE, WAL, FORMAT JSON) {sql}"))
        .await
        .expect("explain");
    let text = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("plan");
    let plan: serde_json::Value = serde_json::from_str(&text).expect("json plan");
    plan[0]["Plan"]["WAL Bytes"].as_i64().expect("WAL Bytes")
}
