//! No policy destroys the only copy of an event. An oversized event, under each
//! poison policy, with and without `deleteAfterRelay`, and with the
//! insert-and-delete pattern (the row never stays in the table): it is either
//! kept in the WAL (Stop: the slot's position stays before it) or parked whole in
//! `<outbox>_parked` before the position passes it (DeadLetter, or a skip request).

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_operator::api::PoisonPolicy;
use support::*;

const WAIT: Duration = Duration::from_secs(120);
const LIMIT: i32 = 2048;
const BIG: usize = 8000;

#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// The row stays in the table.
    Keep,
    /// `deleteAfterRelay: true`.
    DeleteAfterRelay,
    /// Inserted and deleted in the same transaction.
    InsertAndDelete,
}

async fn insert(client: &mut tokio_postgres::Client, key: &str, pad: usize, pattern: Pattern) -> String {
    let tx = client.transaction().await.expect("begin");
    let id: String = tx
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('Order', $1, 'OrderCreated', jsonb_build_object('pad', repeat('x', $2::int)))
             RETURNING id::text",
            &[&key, &(pad as i32)],
        )
        .await
        .expect("insert")
        .get(0);
    if let Pattern::InsertAndDelete = pattern {
        tx.execute("DELETE FROM public.outbox WHERE id = $1::text::uuid", &[&id])
            .await
            .expect("delete");
    }
    tx.commit().await.expect("commit");
    id
}

struct ParkedRow {
    reason: String,
    payload: String,
    commit_lsn: String,
    skipped: bool,
    topic: Option<String>,
    record_key: Option<Vec<u8>>,
}

async fn parked(fx: &Fixture, id: &str) -> Vec<ParkedRow> {
    let client = fx.sql().await;
    let rows = client
        .query(
            "SELECT reason, convert_from(payload, 'UTF8'), commit_lsn::text, skipped, topic, record_key
             FROM public.outbox_parked WHERE event_id = $1",
            &[&id],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| ParkedRow {
            reason: r.get(0),
            payload: r.get(1),
            commit_lsn: r.get(2),
            skipped: r.get(3),
            topic: r.get(4),
            record_key: r.get(5),
        })
        .collect()
}

async fn rows_in_outbox(fx: &Fixture, ids: &[&str]) -> Vec<String> {
    let client = fx.sql().await;
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    client
        .query(
            "SELECT id::text FROM public.outbox WHERE id::text = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn expected_payload() -> serde_json::Value {
    serde_json::json!({"pad": "x".repeat(BIG)})
}

async fn dead_letter_case(pattern: Pattern) {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "park-dlq", 1).await;
    let dlq = format!("{}.dlq", fx.name);
    bed.kafka.create_topic(&dlq, 1).await.expect("dlq topic");
    fx.spec.kafka.producer.max_message_bytes = LIMIT;
    fx.spec.delivery.poison_policy = PoisonPolicy::DeadLetter;
    fx.spec.delivery.dead_letter_topic = Some(dlq.clone());
    fx.spec.outbox.delete_after_relay = matches!(pattern, Pattern::DeleteAfterRelay);
    let worker = fx.start_worker();
    let mut client = bed.pg.client(&fx.db).await.expect("connect");

    let small = insert(&mut client, "a", 10, pattern).await;
    let big = insert(&mut client, "a", BIG, pattern).await;
    let after = insert(&mut client, "a", 10, pattern).await;

    let main = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([small.clone(), after.clone()]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_all_delivered(&main, &HashSet::from([small.clone(), after.clone()]));
    let dead = consume_async(
        &fx.bootstrap,
        &dlq,
        &HashSet::from([big.clone()]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(dead.len(), 1, "{pattern:?}: {dead:?}");
    assert_eq!(dead[0].payload, None, "{pattern:?}: a pointer, without the payload");
    assert_eq!(
        dead[0].headers.get("outbox-parked-in").map(String::as_str),
        Some("\"public\".\"outbox_parked\"")
    );

    // The whole event is in the park table, with its reason, once the position passed it.
    eventually(Duration::from_secs(20), "position past the big event", || async {
        worker
            .handle
            .metrics
            .encode()
            .contains("outbox_relay_events_total{outcome=\"parked\"} 1")
            .then_some(())
    })
    .await;
    let p = parked(&fx, &big).await;
    assert_eq!(p.len(), 1, "{pattern:?}: parked exactly once");
    assert_eq!(p[0].reason, "MessageTooLarge");
    assert!(!p[0].skipped);
    assert_eq!(p[0].topic.as_deref(), Some(fx.topic.as_str()));
    assert_eq!(p[0].record_key.as_deref(), Some(&b"a"[..]));
    let payload: serde_json::Value = serde_json::from_str(&p[0].payload).expect("payload is the stored json");
    assert_eq!(payload, expected_payload(), "{pattern:?}: every byte of the payload");
    assert!(parked(&fx, &small).await.is_empty(), "delivered events are not parked");

    // Relayed-row deletion removes delivered rows only.
    let left = eventually(Duration::from_secs(20), "deletions settled", || async {
        let left = rows_in_outbox(&fx, &[&small, &big, &after]).await;
        let settled = match pattern {
            Pattern::DeleteAfterRelay => left.len() == 1,
            Pattern::Keep => left.len() == 3,
            Pattern::InsertAndDelete => left.is_empty(),
        };
        settled.then_some(left)
    })
    .await;
    if let Pattern::DeleteAfterRelay = pattern {
        assert_eq!(left, vec![big.clone()], "the undelivered row is never deleted");
    }
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_parks_an_oversized_event_whole() {
    dead_letter_case(Pattern::Keep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_with_delete_after_relay_keeps_the_undelivered_row() {
    dead_letter_case(Pattern::DeleteAfterRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_with_insert_and_delete_still_parks_the_event() {
    dead_letter_case(Pattern::InsertAndDelete).await;
}

/// Under Stop the event stays in the WAL (the position does not pass it) until
/// a skip request names it; then it is parked whole and the relay goes on.
async fn stop_case(pattern: Pattern) {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "park-stop", 1).await;
    fx.spec.kafka.producer.max_message_bytes = LIMIT;
    fx.spec.outbox.delete_after_relay = matches!(pattern, Pattern::DeleteAfterRelay);
    let worker = fx.start_worker();
    let mut client = bed.pg.client(&fx.db).await.expect("connect");

    let small = insert(&mut client, "a", 10, pattern).await;
    let big = insert(&mut client, "a", BIG, pattern).await;
    let after = insert(&mut client, "a", 10, pattern).await;

    let why = eventually(Duration::from_secs(60), "stopped at the big event", || async {
        worker
            .handle
            .state
            .readiness()
            .err()
            .filter(|w| w.contains("MessageTooLarge"))
    })
    .await;
    // The message names the event as <id>@<commit LSN>: what the skip request takes.
    let skip = why
        .split_whitespace()
        .find_map(|w| w.strip_prefix("outbox.dev/skip-event="))
        .map(|w| w.trim_end_matches(['.', ',']).to_string())
        .unwrap_or_else(|| panic!("no skip hint in {why}"));
    assert!(skip.starts_with(&format!("{big}@")), "{skip} names {big}");
    let main = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([small.clone()]),
        WAIT,
        Duration::from_secs(1),
    )
    .await;
    let ids: Vec<_> = main.iter().filter_map(|r| r.id.clone()).collect();
    assert!(
        ids.contains(&small) && !ids.contains(&big) && !ids.contains(&after),
        "{ids:?}"
    );
    assert!(parked(&fx, &big).await.is_empty(), "Stop parks nothing by itself");
    // The slot still holds the event: its position is before the big event's commit.
    let confirmed: outbox_operator::relay::lsn::Lsn =
        fx.slot_confirmed_flush().await.expect("slot").parse().expect("lsn");
    let commit: outbox_operator::relay::lsn::Lsn = skip.rsplit_once('@').expect("@").1.parse().expect("lsn");
    assert!(confirmed < commit, "{confirmed} must stay before {commit}");
    if let Pattern::DeleteAfterRelay = pattern {
        let left = eventually(Duration::from_secs(20), "small row deleted", || async {
            let left = rows_in_outbox(&fx, &[&small, &big, &after]).await;
            (left.len() == 2).then_some(left)
        })
        .await;
        assert!(left.contains(&big) && left.contains(&after), "{left:?}");
    }
    worker.shutdown().await;

    // The way out: skip exactly that event.
    let cfg = fx.config().with_skip(Some(&skip)).expect("skip request");
    let worker = fx.start_worker_with(cfg);
    let main = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([small.clone(), after.clone()]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    let ids: Vec<_> = main.iter().filter_map(|r| r.id.clone()).collect();
    assert!(ids.contains(&after) && !ids.contains(&big), "{ids:?}");
    let p = eventually(Duration::from_secs(20), "parked", || async {
        let p = parked(&fx, &big).await;
        (!p.is_empty()).then_some(p)
    })
    .await;
    assert_eq!(p.len(), 1);
    assert!(p[0].skipped);
    assert_eq!(p[0].reason, "MessageTooLarge");
    assert_eq!(format!("{big}@{}", p[0].commit_lsn), skip);
    let payload: serde_json::Value = serde_json::from_str(&p[0].payload).expect("json");
    assert_eq!(payload, expected_payload());
    assert_eq!(worker.handle.state.skipped().map(|e| e.to_string()), Some(skip));
    if let Pattern::DeleteAfterRelay = pattern {
        let left = eventually(Duration::from_secs(20), "after row deleted", || async {
            let left = rows_in_outbox(&fx, &[&small, &big, &after]).await;
            (left.len() == 1).then_some(left)
        })
        .await;
        assert_eq!(left, vec![big.clone()], "the skipped row stays in the table");
    }
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_keeps_an_oversized_event_until_a_skip_request_parks_it() {
    stop_case(Pattern::Keep).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_delete_after_relay_keeps_the_row_and_the_wal() {
    stop_case(Pattern::DeleteAfterRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_insert_and_delete_keeps_the_event_in_the_wal() {
    stop_case(Pattern::InsertAndDelete).await;
}
