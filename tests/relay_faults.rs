//! Faults around the relay: Kafka down and back, PostgreSQL restarted,
//! a second worker as hot standby. Each fault test has private servers so
//! stopping them disturbs nobody else.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_operator::relay::state::Phase;
use outbox_testbed::{Components, Kafka, Postgres};
use support::*;

const WAIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_stalls_keeps_the_wal_and_resumes() {
    let bed = outbox_testbed::shared().await;
    let kafka = Kafka::start(&Components::locate().expect("components"))
        .await
        .expect("private kafka");
    let fx = Fixture::new(&bed.pg, &kafka, "kafka-outage", 4).await;
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");

    let mut ids = fx.insert_events(&client, 20, 25, 20).await;
    let first: HashSet<String> = ids.iter().cloned().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &first, WAIT, Duration::ZERO).await;
    assert_all_delivered(&records, &first);
    eventually(Duration::from_secs(20), "first batch confirmed", || async {
        (worker
            .handle
            .metrics
            .encode()
            .contains("outbox_relay_in_flight_events 0"))
        .then_some(())
    })
    .await;

    kafka.stop().await.expect("stop kafka");
    // One transaction first, then the WAL position right after its commit: whatever the
    // slot confirms while Kafka is away must stay before that commit. (Not simply
    // "unchanged": with nothing in flight, keepalives rightly move the slot over
    // WAL of other databases on the shared server.)
    ids.extend(fx.insert_events_from(&client, 20, 1, 20, 26).await);
    let after_first: outbox_operator::relay::lsn::Lsn = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal lsn")
        .get::<_, String>(0)
        .parse()
        .expect("lsn");
    ids.extend(fx.insert_events_from(&client, 20, 24, 20, 27).await);

    let why = eventually(
        Duration::from_secs(30),
        "the worker to report itself stalled",
        || async { worker.handle.state.readiness().err() },
    )
    .await;
    assert!(why.contains("stalled"), "{why}");
    // Nothing new is confirmed while Kafka is away: the WAL stays on the server.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let confirmed: outbox_operator::relay::lsn::Lsn =
        fx.slot_confirmed_flush().await.expect("slot").parse().expect("lsn");
    assert!(
        confirmed < after_first,
        "confirmed {confirmed} passed an unacknowledged commit (before {after_first})"
    );

    kafka.start_again().await.expect("start kafka");
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("order across the outage");
    eventually(Duration::from_secs(30), "readiness to recover", || async {
        worker.handle.state.readiness().ok()
    })
    .await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_mid_stream_reconnects_and_resumes() {
    let bed = outbox_testbed::shared().await;
    let pg = Postgres::start(&Components::locate().expect("components"))
        .await
        .expect("private postgres");
    let fx = Fixture::new(&pg, &bed.kafka, "pg-restart", 4).await;
    let worker = fx.start_worker();
    let client = pg.client(&fx.db).await.expect("connect");
    let mut ids = fx.insert_events(&client, 20, 50, 20).await;
    drop(client);

    // Crash (immediate shutdown, recovery on start) while the worker streams.
    pg.kill().await.expect("kill postgres");
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.start_again().await.expect("start postgres");

    let client = pg.client(&fx.db).await.expect("reconnect");
    ids.extend(fx.insert_events_from(&client, 20, 50, 20, 51).await);
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("order across the restart");
    let text = worker.handle.metrics.encode();
    let sessions = text
        .lines()
        .find_map(|l| l.strip_prefix("outbox_relay_sessions_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(sessions >= 2, "expected a reconnect, metrics:\n{text}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_worker_waits_as_standby_and_takes_over() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "standby", 2).await;
    let a = fx.start_worker();
    eventually(Duration::from_secs(30), "worker a to stream", || async {
        (a.handle.state.phase() == Phase::Streaming).then_some(())
    })
    .await;
    let b = fx.start_worker();
    eventually(Duration::from_secs(30), "worker b to become standby", || async {
        (b.handle.state.phase() == Phase::Standby).then_some(())
    })
    .await;
    assert_eq!(a.handle.state.phase(), Phase::Streaming, "exactly one active worker");
    assert!(b.handle.state.readiness().is_ok(), "a standby is healthy");

    let client = bed.pg.client(&fx.db).await.expect("connect");
    let mut ids = fx.insert_events(&client, 10, 20, 10).await;

    // The active worker dies (its task and connection vanish at once).
    a.task.abort();
    let _ = a.task.await;
    ids.extend(fx.insert_events_from(&client, 10, 20, 10, 21).await);
    eventually(Duration::from_secs(60), "worker b to take over", || async {
        (b.handle.state.phase() == Phase::Streaming).then_some(())
    })
    .await;

    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("order across the takeover");
    b.shutdown().await;
}
