//! `mode: Polling` on real PostgreSQL and Kafka: every committed row arrives in
//! order per key and leaves the table only after Kafka acknowledged it; rows that
//! commit late with a smaller order value are still relayed; a second worker waits
//! as a hot standby; SIGKILLs lose nothing; a poison row stops the relay at itself
//! (named, still in the table) or is parked and deleted under `DeadLetter`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_operator::api::{PoisonPolicy, PollingSpec, RelayMode};
use outbox_operator::relay::state::Phase;
use outbox_testbed::{Components, Kafka, OUTBOX_DDL, Postgres};
use support::proxy::SilentProxy;
use support::*;

const WAIT: Duration = Duration::from_secs(90);

/// The testbed's outbox table plus the order column polling needs.
fn ddl() -> String {
    format!("{OUTBOX_DDL}; ALTER TABLE public.outbox ADD COLUMN seq bigserial UNIQUE")
}

async fn polling_fixture(pg: &Postgres, kafka: &Kafka, prefix: &str, partitions: i32) -> Fixture {
    let mut fx = Fixture::unprovisioned(pg, kafka, prefix, partitions, &ddl()).await;
    fx.spec.mode = RelayMode::Polling;
    let mut p = PollingSpec::with_order_column("seq");
    p.batch_size = 200;
    fx.spec.polling = Some(p);
    fx
}

async fn rows_left(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM public.outbox", &[])
        .await
        .expect("count")
        .get(0)
}

async fn insert(client: &tokio_postgres::Client, key: &str, pad: i32) -> String {
    client
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('Order', $1, 'OrderCreated', jsonb_build_object('seq', 1, 'pad', repeat('x', $2)))
             RETURNING id::text",
            &[&key, &pad],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_rows_arrive_in_order_per_key_and_leave_the_table() {
    let bed = outbox_testbed::shared().await;
    let fx = polling_fixture(&bed.pg, &bed.kafka, "poll-order", 4).await;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    // A backlog before the worker starts, then writers while it runs.
    let mut ids = fx.insert_events(&client, 20, 10, 50).await;
    let worker = fx.start_worker();
    ids.extend(fx.insert_events_from(&client, 20, 10, 7, 11).await);
    let expect: HashSet<String> = ids.into_iter().collect();
    assert_eq!(expect.len(), 400);

    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(500)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order");
    eventually(Duration::from_secs(30), "relayed rows deleted", || async {
        (rows_left(&client).await == 0).then_some(())
    })
    .await;
    let text = worker.handle.metrics.encode();
    assert!(text.contains("outbox_relay_polled_rows_deleted_total 400"), "{text}");
    assert_eq!(worker.handle.state.phase(), Phase::Streaming);
    worker.shutdown().await;
}

/// Two writers whose transactions commit out of order-column order: the row
/// with the smaller value becomes visible after the poller already sent (and
/// deleted) a larger one. It is not skipped: nothing tracks "the highest value
/// seen", every poll reads what is left in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_late_with_a_smaller_order_value_is_not_skipped() {
    let bed = outbox_testbed::shared().await;
    let fx = polling_fixture(&bed.pg, &bed.kafka, "poll-late", 1).await;
    let worker = fx.start_worker();
    let mut slow = bed.pg.client(&fx.db).await.expect("connect");
    let fast = bed.pg.client(&fx.db).await.expect("connect");

    let tx = slow.transaction().await.expect("begin");
    let late: String = tx
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('Order', 'slow', 'OrderCreated', '{\"seq\":1}') RETURNING id::text",
            &[],
        )
        .await
        .expect("slow insert")
        .get(0);
    let early = insert(&fast, "fast", 4).await;
    // The later row (larger seq) is relayed and deleted while the earlier one is
    // still uncommitted.
    consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([early.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    eventually(Duration::from_secs(30), "the fast row deleted", || async {
        (rows_left(&fast).await == 0).then_some(())
    })
    .await;
    tx.commit().await.expect("commit the slow one");

    let records = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([early, late.clone()]),
        WAIT,
        Duration::from_millis(300),
    )
    .await;
    assert!(
        records.iter().any(|r| r.id.as_deref() == Some(late.as_str())),
        "{records:?}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_poller_waits_as_standby_and_takes_over() {
    let bed = outbox_testbed::shared().await;
    let fx = polling_fixture(&bed.pg, &bed.kafka, "poll-standby", 2).await;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let first = fx.start_worker();
    eventually(Duration::from_secs(30), "the first poller active", || async {
        (first.handle.state.phase() == Phase::Streaming).then_some(())
    })
    .await;
    let second = fx.start_worker();
    eventually(Duration::from_secs(30), "the second poller on standby", || async {
        (second.handle.state.phase() == Phase::Standby).then_some(())
    })
    .await;
    let mut ids = fx.insert_events(&client, 5, 10, 10).await;
    first.shutdown().await;
    ids.extend(fx.insert_events_from(&client, 5, 10, 10, 11).await);
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(500)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order across the takeover");
    assert_eq!(second.handle.state.phase(), Phase::Streaming);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing() {
    let bed = outbox_testbed::shared().await;
    let fx = polling_fixture(&bed.pg, &bed.kafka, "poll-crash", 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = {
        let client = bed.pg.client(&fx.db).await.expect("connect");
        let fixture = fx.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..12 {
                ids.extend(fixture.insert_events_from(&client, 30, 5, 25, round * 5 + 1).await);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            ids
        })
    };
    for round in 0..3 {
        let mut child = fx.spawn_worker_process(dir.path());
        tokio::time::sleep(Duration::from_millis(900 + round * 400)).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
    let ids = writer.await.expect("writer");
    let mut child = fx.spawn_worker_process(dir.path());
    let expect: HashSet<String> = ids.into_iter().collect();
    assert_eq!(expect.len(), 12 * 150);
    let records = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &expect,
        Duration::from_secs(180),
        Duration::from_secs(1),
    )
    .await;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    eventually(Duration::from_secs(30), "every row deleted", || async {
        (rows_left(&client).await == 0).then_some(())
    })
    .await;
    child.kill().expect("kill");
    let _ = child.wait();
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order across crashes");
    eprintln!("{} events, {} records after 3 SIGKILLs", expect.len(), records.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_stops_the_poller_at_itself_and_stays_in_the_table() {
    let bed = outbox_testbed::shared().await;
    let mut fx = polling_fixture(&bed.pg, &bed.kafka, "poll-stop", 1).await;
    fx.spec.kafka.producer.max_message_bytes = 2048;
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let before = insert(&client, "a", 10).await;
    let big = insert(&client, "a", 8000).await;
    let after = insert(&client, "a", 10).await;
    let worker = fx.start_worker();

    consume_async(&fx.bootstrap, &fx.topic, &HashSet::from([before]), WAIT, Duration::ZERO).await;
    let (kind, message) = eventually(Duration::from_secs(30), "the stop reported", || async {
        worker
            .handle
            .state
            .last_error()
            .filter(|(k, _)| *k == "MessageTooLarge")
    })
    .await;
    assert_eq!(kind, "MessageTooLarge");
    assert!(message.contains(&big), "the status names the event: {message}");
    assert!(
        message.contains("outbox.dev/skip-event="),
        "and says what to do: {message}"
    );
    // The row before the poison one is gone; the poison row and the one after it stay.
    let left: Vec<String> = client
        .query("SELECT id::text FROM public.outbox ORDER BY seq", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![big.clone(), after.clone()]);
    let records = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([after.clone()]),
        Duration::from_secs(3),
        Duration::ZERO,
    )
    .await;
    assert!(
        records.iter().all(|r| r.id.as_deref() != Some(after.as_str())),
        "nothing after the poison row may be sent"
    );
    worker.shutdown().await;

    // What the status says to do works: skip exactly that event (it is parked and
    // deleted), and the relay goes on.
    let named = message
        .split("outbox.dev/skip-event=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the message names the skip request");
    let cfg = fx.config().with_skip(Some(named)).expect("a valid skip request");
    let worker = fx.start_worker_with(cfg);
    consume_async(&fx.bootstrap, &fx.topic, &HashSet::from([after]), WAIT, Duration::ZERO).await;
    eventually(Duration::from_secs(30), "the outbox emptied", || async {
        (rows_left(&client).await == 0).then_some(())
    })
    .await;
    let parked: i64 = client
        .query_one(
            "SELECT count(*) FROM public.outbox_parked WHERE event_id = $1 AND skipped",
            &[&big],
        )
        .await
        .expect("park table")
        .get(0);
    assert_eq!(parked, 1, "the skipped event is kept whole in the park table");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_dead_letter_a_poison_row_is_parked_then_deleted() {
    let bed = outbox_testbed::shared().await;
    let mut fx = polling_fixture(&bed.pg, &bed.kafka, "poll-dlq", 1).await;
    let dlq = format!("{}.dlq", fx.name);
    bed.kafka.create_topic(&dlq, 1).await.expect("dlq topic");
    fx.spec.kafka.producer.max_message_bytes = 2048;
    fx.spec.delivery.poison_policy = PoisonPolicy::DeadLetter;
    fx.spec.delivery.dead_letter_topic = Some(dlq.clone());
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let small = insert(&client, "a", 10).await;
    let big = insert(&client, "a", 8000).await;
    let after = insert(&client, "a", 10).await;
    let worker = fx.start_worker();

    let main = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([small, after]),
        WAIT,
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(main.len(), 2, "{main:?}");
    let dead = consume_async(&fx.bootstrap, &dlq, &HashSet::from([big.clone()]), WAIT, Duration::ZERO).await;
    assert_eq!(dead.len(), 1);
    eventually(Duration::from_secs(30), "the outbox emptied", || async {
        (rows_left(&client).await == 0).then_some(())
    })
    .await;
    // The whole event is in the park table.
    let parked: i64 = client
        .query_one("SELECT count(*) FROM public.outbox_parked WHERE event_id = $1", &[&big])
        .await
        .expect("park table")
        .get(0);
    assert_eq!(parked, 1);
    worker.shutdown().await;
}

/// The reason the mode exists: a server with `wal_level = replica` and a role
/// with no REPLICATION attribute, holding only SELECT, UPDATE and DELETE on the
/// table (plus what the park table needs), relays every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_needs_no_logical_replication_and_no_replication_role() {
    let bed = outbox_testbed::shared().await;
    let components = Components::locate().expect("test bed components");
    let pg: &'static Postgres = Box::leak(Box::new(
        Postgres::with_wal_level(&components, "replica")
            .await
            .expect("private postgres"),
    ));

    let mut fx = polling_fixture(pg, &bed.kafka, "poll-replica", 2).await;
    let admin = pg.client(&fx.db).await.expect("connect");
    let wal_level: String = admin.query_one("SHOW wal_level", &[]).await.expect("show").get(0);
    assert_eq!(wal_level, "replica");
    admin
        .batch_execute(
            "CREATE ROLE poller LOGIN PASSWORD 'poller-secret' NOREPLICATION NOSUPERUSER;
             GRANT SELECT, UPDATE, DELETE ON public.outbox TO poller",
        )
        .await
        .expect("a plain role");
    fx.pg_user = "poller".into();
    fx.pg_password = "poller-secret".into();

    let mut ids = fx.insert_events(&admin, 10, 10, 20).await;
    let worker = fx.start_worker();
    ids.extend(fx.insert_events_from(&admin, 10, 10, 5, 11).await);
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(300)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order");
    eventually(Duration::from_secs(30), "relayed rows deleted", || async {
        (rows_left(&admin).await == 0).then_some(())
    })
    .await;
    worker.shutdown().await;
}

/// A poll connection that goes silent without closing: the statement bound ends
/// the session, and the next one ends the silent backend (which still holds the
/// poller's lock and the batch's row locks) instead of waiting on it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_poll_connection_is_found_and_replaced() {
    let bed = outbox_testbed::shared().await;
    let fx = polling_fixture(&bed.pg, &bed.kafka, "poll-hung", 1).await;
    let proxy = SilentProxy::start(&fx.pg_host, fx.pg_port).await;
    let mut cfg = fx.config();
    cfg.sql.host = "127.0.0.1".into();
    cfg.sql.port = proxy.port;
    cfg.tuning.poll_statement_timeout = Duration::from_secs(2);
    let worker = fx.start_worker_with(cfg);
    let client = bed.pg.client(&fx.db).await.expect("connect");

    let first = fx.insert_events(&client, 1, 1, 1).await;
    consume_async(
        &fx.bootstrap,
        &fx.topic,
        &first.iter().cloned().collect(),
        WAIT,
        Duration::ZERO,
    )
    .await;

    proxy.freeze();
    let (category, message) = eventually(Duration::from_secs(30), "PollTimeout", || async {
        worker.handle.state.last_error().filter(|(c, _)| *c == "PollTimeout")
    })
    .await;
    assert_eq!(category, "PollTimeout");
    assert!(message.contains("rolled back"), "{message}");

    // Written while the old connection hangs: relayed over a new one.
    let later = fx.insert_events(&client, 3, 5, 5).await;
    let expect: HashSet<String> = first.into_iter().chain(later).collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(300)).await;
    assert_all_delivered(&records, &expect);
    eventually(
        Duration::from_secs(30),
        "rows deleted over the new connection",
        || async { (rows_left(&client).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(worker.handle.state.phase(), Phase::Streaming);
    worker.shutdown().await;
}

/// Kafka away: a batch waits at most `poll_ack_timeout` with its transaction
/// open, then rolls back (its rows stay, the status says why) and is polled
/// again; once Kafka is back every event arrives and every row leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_outage_rolls_batches_back_and_loses_nothing() {
    let bed = outbox_testbed::shared().await;
    let kafka = Kafka::start(&Components::locate().expect("components"))
        .await
        .expect("private kafka");
    let fx = polling_fixture(&bed.pg, &kafka, "poll-outage", 2).await;
    let mut cfg = fx.config();
    cfg.tuning.poll_ack_timeout = Duration::from_secs(3);
    let worker = fx.start_worker_with(cfg);
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let mut ids = fx.insert_events(&client, 5, 4, 5).await;
    let first: HashSet<String> = ids.iter().cloned().collect();
    consume_async(&fx.bootstrap, &fx.topic, &first, WAIT, Duration::ZERO).await;
    eventually(Duration::from_secs(30), "the first rows deleted", || async {
        (rows_left(&client).await == 0).then_some(())
    })
    .await;

    kafka.stop().await.expect("stop kafka");
    ids.extend(fx.insert_events_from(&client, 5, 4, 5, 5).await);
    let (category, message) = eventually(Duration::from_secs(60), "a rolled-back batch reported", || async {
        worker
            .handle
            .state
            .last_error()
            .filter(|(_, m)| m.contains("rolled back"))
    })
    .await;
    assert_eq!(category, "KafkaError", "{message}");
    assert_eq!(
        rows_left(&client).await,
        20,
        "no row leaves the table while Kafka is away"
    );

    kafka.start_again().await.expect("start kafka");
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("order across the outage");
    eventually(
        Duration::from_secs(30),
        "every row deleted after the outage",
        || async { (rows_left(&client).await == 0).then_some(()) },
    )
    .await;
    worker.shutdown().await;
}
