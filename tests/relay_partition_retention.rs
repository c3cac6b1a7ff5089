//! The partition manager (`spec.outbox.partitions`) on a real server, with the
//! clock injected so hours pass in seconds: it creates upcoming partitions ahead
//! of the writer, detaches those past retention, and drops a detached partition
//! only once the slot confirmed the position recorded after its detach; events
//! keep flowing throughout and none is lost.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use outbox_operator::api::partitions::{PartitionInterval, PartitionsSpec};
use outbox_operator::postgres::QualifiedTable;
use outbox_operator::postgres::partitions::{self, State};
use outbox_operator::relay::lsn::Lsn;
use support::*;
use tokio::sync::Mutex;

const WAIT: Duration = Duration::from_secs(120);
const H: i64 = 3_600;
/// 2030-01-01 10:00 UTC.
const T0: i64 = 1_893_492_000;
const AGGREGATES: usize = 10;

const DDL: &str = "CREATE TABLE public.outbox (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text,
    type text NOT NULL,
    payload jsonb,
    headers jsonb,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at)";

fn spec() -> PartitionsSpec {
    PartitionsSpec {
        column: "created_at".into(),
        interval: PartitionInterval::Hourly,
        premake: 2,
        retention: "60m".into(),
    }
}

fn outbox() -> QualifiedTable {
    QualifiedTable::parse("public.outbox").expect("table")
}

async fn confirmed(fx: &Fixture) -> Option<Lsn> {
    fx.slot_confirmed_flush().await.and_then(|c| c.parse().ok())
}

/// One pass at `now`, checking the promise: nothing is dropped that the slot had
/// not confirmed past, and nothing attached is dropped.
async fn pass(fx: &Fixture, client: &tokio_postgres::Client, now: i64) -> partitions::Report {
    let before = partitions::read(client, &outbox()).await.expect("read partitions");
    let c = confirmed(fx).await;
    // The slot was made just now, in real time: long before the test's 2030 clock.
    let slot = partitions::SlotFacts {
        confirmed: c,
        created_at: Some(T0 - 24 * H),
    };
    let report = partitions::manage(client, &outbox(), &spec(), slot, now)
        .await
        .expect("partition pass");
    for name in &report.dropped {
        let p = before.iter().find(|p| &p.name == name).expect("dropped one existed");
        match p.state {
            State::Detached { lsn: Some(at) } => assert!(c.is_some_and(|c| c >= at), "{name} dropped unconfirmed"),
            other => panic!("{name} dropped in state {other:?}"),
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_partitions_are_dropped_only_after_their_events_were_confirmed() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::with_ddl(&bed.pg, &bed.kafka, "relay-retention", 2, DDL).await;
    let client = fx.sql().await;

    let first = pass(&fx, &client, T0).await;
    assert_eq!(
        first.created,
        ["outbox_p2030010110", "outbox_p2030010111", "outbox_p2030010112"]
    );

    // The writer dates its events by the injected clock, as an application would
    // by its own.
    let clock = Arc::new(AtomicI64::new(T0));
    let ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let (clock, ids, client) = (clock.clone(), ids.clone(), fx.sql().await);
        tokio::spawn(async move {
            let mut n = 0usize;
            while !*stop_rx.borrow() {
                let at = clock.load(Ordering::SeqCst) + 60;
                let sql = format!(
                    "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, created_at)
                     SELECT 'Order', 'agg-' || (i % {AGGREGATES}), 'OrderCreated',
                            jsonb_build_object('seq', i / {AGGREGATES} + 1), to_timestamp({at})
                     FROM generate_series({n}, {}) AS i ORDER BY i RETURNING id::text",
                    n + 19
                );
                let rows = client.query(sql.as_str(), &[]).await.expect("insert");
                ids.lock().await.extend(rows.iter().map(|r| r.get::<_, String>(0)));
                n += 20;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let worker = fx.start_worker();
    let mut dropped = Vec::new();
    // Hours 10 to 14 pass; at each, the writer moves on and the manager runs.
    for h in 1..=4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        clock.store(T0 + h * H, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = pass(&fx, &client, T0 + h * H + 600).await;
        dropped.extend(r.dropped);
    }
    // The relay stops: a partition detached now must wait for it.
    worker.shutdown().await;
    clock.store(T0 + 5 * H, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = pass(&fx, &client, T0 + 5 * H + 600).await;
    assert!(r.detached.contains(&"outbox_p2030010113".to_string()), "{r:?}");
    dropped.extend(r.dropped);
    let r = pass(&fx, &client, T0 + 5 * H + 900).await;
    assert!(
        !r.dropped.contains(&"outbox_p2030010113".to_string()),
        "dropped while the relay was down: {r:?}"
    );
    let waiting = r.to_status().retiring;
    assert!(
        waiting
            .iter()
            .any(|w| w.name == "outbox_p2030010113" && w.detached_at_lsn.is_some()),
        "{waiting:?}"
    );
    dropped.extend(r.dropped);

    let _ = stop_tx.send(true);
    writer.await.expect("writer");
    let worker = fx.start_worker();
    let expect: HashSet<String> = ids.lock().await.iter().cloned().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order");

    // Once the relay confirmed past them, the waiting partitions go too.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = pass(&fx, &client, T0 + 5 * H + 1200).await;
        dropped.extend(r.dropped.clone());
        if r.waiting.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still waiting: {:?}", r.waiting);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for h in 10..=13 {
        assert!(
            dropped.contains(&format!("outbox_p20300101{h}")),
            "hour {h} retired: {dropped:?}"
        );
    }
    let left: Vec<String> = partitions::read(&client, &outbox())
        .await
        .expect("read")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        left,
        [
            "outbox_p2030010114",
            "outbox_p2030010115",
            "outbox_p2030010116",
            "outbox_p2030010117"
        ]
    );
    worker.shutdown().await;
}
