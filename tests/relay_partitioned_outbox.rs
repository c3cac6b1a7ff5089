//! A range-partitioned outbox table: rows of every partition arrive under the
//! table's own name (the publication publishes via the partition root), and
//! rotating partitions while events flow loses nothing. The rotation follows
//! the rule the operator's partition manager keeps: a partition is detached only
//! once no row can land in it any more, the WAL position right after the detach
//! is recorded, and it is dropped only when the slot confirmed that position.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use outbox_operator::relay::lsn::Lsn;
use support::*;
use tokio::sync::{Mutex, watch};

const WAIT: Duration = Duration::from_secs(120);
const AGGREGATES: usize = 20;
const TXNS_PER_ROUND: usize = 20;
const ROWS_PER_TXN: usize = 25;

/// Partitioned by day of `created_at`; the primary key must hold the partition key.
const PARTITIONED_DDL: &str = "CREATE TABLE public.outbox (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text,
    type text NOT NULL,
    payload jsonb,
    headers jsonb,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE public.outbox_d0 PARTITION OF public.outbox FOR VALUES FROM ('2030-01-01 00:00+00') TO ('2030-01-02 00:00+00');
CREATE TABLE public.outbox_d1 PARTITION OF public.outbox FOR VALUES FROM ('2030-01-02 00:00+00') TO ('2030-01-03 00:00+00');";

/// Start of day `d` (day 0 is 2030-01-01), as a timestamptz literal.
fn day(d: usize) -> String {
    format!("'2030-01-01 00:00+00'::timestamptz + interval '{d} days'")
}

/// Creates day `d`'s partition: directly for even days, for odd ones as a
/// standalone table attached afterwards (how a DBA pre-loads or moves one in).
async fn create_partition(client: &tokio_postgres::Client, d: usize) {
    let (from, to) = (day(d), day(d + 1));
    let sql = if d.is_multiple_of(2) {
        format!("CREATE TABLE public.outbox_d{d} PARTITION OF public.outbox FOR VALUES FROM ({from}) TO ({to})")
    } else {
        format!(
            "CREATE TABLE public.outbox_d{d} (LIKE public.outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
             ALTER TABLE public.outbox ATTACH PARTITION public.outbox_d{d} FOR VALUES FROM ({from}) TO ({to})"
        )
    };
    client.batch_execute(&sql).await.expect("create partition");
}

/// Detaches day `d`'s partition and returns the WAL position right after the
/// detach committed: every row of the partition was committed before it.
async fn detach(client: &tokio_postgres::Client, d: usize) -> Lsn {
    client
        .batch_execute(&format!(
            "ALTER TABLE public.outbox DETACH PARTITION public.outbox_d{d}"
        ))
        .await
        .expect("detach");
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    lsn.parse().expect("lsn")
}

/// Inserts one round of events dated `d`; `next` numbers rows across rounds so
/// each aggregate's `seq` grows in commit order.
async fn write_round(client: &tokio_postgres::Client, d: usize, next: &mut usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..TXNS_PER_ROUND {
        let n = *next;
        let sql = format!(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, created_at)
             SELECT 'Order', 'agg-' || (i % {AGGREGATES}), 'OrderCreated',
                    jsonb_build_object('seq', i / {AGGREGATES} + 1), {} + interval '1 hour'
             FROM generate_series({n}, {}) AS i ORDER BY i RETURNING id::text",
            day(d),
            n + ROWS_PER_TXN - 1
        );
        let rows = client.query(sql.as_str(), &[]).await.expect("insert events");
        ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        *next += ROWS_PER_TXN;
    }
    ids
}

async fn confirmed(fx: &Fixture) -> Lsn {
    fx.slot_confirmed_flush()
        .await
        .and_then(|c| c.parse().ok())
        .unwrap_or(Lsn::ZERO)
}

async fn wait_confirmed(fx: &Fixture, target: Lsn, what: &str) {
    eventually(WAIT, what, || async { (confirmed(fx).await >= target).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_partitions_mid_stream_loses_nothing() {
    const ROUNDS: usize = 6;
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::with_ddl(&bed.pg, &bed.kafka, "relay-parts", 4, PARTITIONED_DDL).await;
    // Deleting through the root reaches the partitions; with detached ones it
    // simply finds nothing (they are dropped whole).
    fx.spec.outbox.delete_after_relay = true;
    let worker = fx.start_worker();
    let ddl = bed.pg.client(&fx.db).await.expect("connect");

    // The writer inserts round after round while the rotator, concurrently,
    // makes the next partition and retires the one the writer left.
    let ids = Arc::new(Mutex::new(Vec::new()));
    let (round_tx, mut round_rx) = watch::channel(0usize);
    let (ready_tx, mut ready_rx) = watch::channel(1usize);
    let writer = {
        let client = bed.pg.client(&fx.db).await.expect("connect");
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut next = 0;
            for r in 0..ROUNDS {
                ready_rx.wait_for(|ready| *ready >= r).await.expect("rotator");
                round_tx.send_replace(r);
                let round = write_round(&client, r, &mut next).await;
                ids.lock().await.extend(round);
            }
            next
        })
    };
    for r in 1..ROUNDS {
        round_rx.wait_for(|w| *w >= r).await.expect("writer");
        create_partition(&ddl, r + 1).await;
        ready_tx.send_replace(r + 1);
        // The writer moved on to day r: nothing lands in day r - 1 any more.
        let detached_at = detach(&ddl, r - 1).await;
        wait_confirmed(&fx, detached_at, "the slot to confirm past the detach").await;
        ddl.batch_execute(&format!("DROP TABLE public.outbox_d{}", r - 1))
            .await
            .expect("drop partition");
    }
    let mut next = writer.await.expect("writer");

    // A partition detached while the relay is down still delivers: its rows are
    // in the WAL, decoded with the catalog as it was when they were written.
    worker.shutdown().await;
    let offline = write_round(&ddl, ROUNDS, &mut next).await;
    ids.lock().await.extend(offline);
    create_partition(&ddl, ROUNDS + 1).await;
    let last_round_detached = detach(&ddl, ROUNDS - 1).await;
    let offline_detached = {
        // Day ROUNDS's rows committed before its detach; none can land in it now.
        detach(&ddl, ROUNDS).await
    };
    assert!(
        confirmed(&fx).await < offline_detached,
        "nothing confirmed the offline round yet: it must not be dropped"
    );
    let worker = fx.start_worker();
    wait_confirmed(
        &fx,
        last_round_detached.max(offline_detached),
        "the restarted relay to confirm",
    )
    .await;
    for d in [ROUNDS - 1, ROUNDS] {
        ddl.batch_execute(&format!("DROP TABLE public.outbox_d{d}"))
            .await
            .expect("drop partition");
    }

    let expect: HashSet<String> = ids.lock().await.iter().cloned().collect();
    assert_eq!(expect.len(), (ROUNDS + 1) * TXNS_PER_ROUND * ROWS_PER_TXN);
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order");

    // Only the still-attached partition is left, and `deleteAfterRelay` emptied it.
    let left: Vec<String> = ddl
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'public.outbox'::regclass ORDER BY 1",
            &[],
        )
        .await
        .expect("partitions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [format!("outbox_d{}", ROUNDS + 1)]);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_relay_deletes_through_the_root() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::with_ddl(&bed.pg, &bed.kafka, "relay-parts-del", 1, PARTITIONED_DDL).await;
    fx.spec.outbox.delete_after_relay = true;
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let mut next = 0;
    let mut ids = write_round(&client, 0, &mut next).await;
    ids.extend(write_round(&client, 1, &mut next).await);
    let expect: HashSet<String> = ids.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_secs(1)).await;
    assert_all_delivered(&records, &expect);
    eventually(WAIT, "delivered rows deleted from both partitions", || async {
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
