//! Rows the mapping cannot turn into a record: a headers column holding a JSON
//! array, a mapped column dropped from the table. Under Stop the relay stops and
//! says why (the event, or the column); under DeadLetter an unmappable row is
//! parked with every column's text and goes to the dead-letter topic.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_operator::api::PoisonPolicy;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

async fn insert(client: &tokio_postgres::Client, headers: &str) -> String {
    client
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload, headers)
             VALUES ('Order', 'a', 'Created', '{\"n\": 1}', $1::text::jsonb) RETURNING id::text",
            &[&headers],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_as_a_json_array_stop_the_relay_naming_the_event() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "unmappable-stop", 1).await;
    fx.spec.outbox.columns.headers = Some("headers".into());
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let ok = insert(&client, "{\"trace\": \"t1\"}").await;
    let bad = insert(&client, "[1, 2]").await;
    let after = insert(&client, "{}").await;
    let why = eventually(Duration::from_secs(60), "InvalidHeaders", || async {
        worker
            .handle
            .state
            .readiness()
            .err()
            .filter(|w| w.starts_with("InvalidHeaders"))
    })
    .await;
    assert!(why.contains(&format!("{bad}@")), "names the event: {why}");
    assert!(why.contains("outbox.dev/skip-event="), "says the way out: {why}");
    let got = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([ok.clone()]),
        WAIT,
        Duration::from_secs(1),
    )
    .await;
    let ids: Vec<_> = got.iter().filter_map(|r| r.id.clone()).collect();
    assert!(
        ids.contains(&ok) && !ids.contains(&bad) && !ids.contains(&after),
        "{ids:?}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmappable_row_under_dead_letter_is_parked_with_every_column() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "unmappable-dlq", 1).await;
    let dlq = format!("{}.dlq", fx.name);
    bed.kafka.create_topic(&dlq, 1).await.expect("dlq");
    fx.spec.outbox.columns.headers = Some("headers".into());
    fx.spec.delivery.poison_policy = PoisonPolicy::DeadLetter;
    fx.spec.delivery.dead_letter_topic = Some(dlq.clone());
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let bad = insert(&client, "[1, 2]").await;
    let after = insert(&client, "{}").await;
    let got = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([after.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    assert_all_delivered(&got, &HashSet::from([after]));
    let dead = consume_async(&fx.bootstrap, &dlq, &HashSet::from([bad.clone()]), WAIT, Duration::ZERO).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].headers.get("outbox-error-kind").map(String::as_str),
        Some("InvalidHeaders")
    );
    let row = fx
        .sql()
        .await
        .query_one(
            "SELECT reason, row_data->>'headers', row_data->>'aggregateid' FROM public.outbox_parked WHERE event_id = $1",
            &[&bad],
        )
        .await
        .expect("parked");
    assert_eq!(row.get::<_, String>(0), "InvalidHeaders");
    assert_eq!(row.get::<_, String>(1), "[1, 2]", "every column's text is kept");
    assert_eq!(row.get::<_, String>(2), "a");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mapped_column_is_reported_not_looped_on_silently() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "unmappable-column", 1).await;
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let first = insert(&client, "{}").await;
    let got = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([first.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    assert_all_delivered(&got, &HashSet::from([first]));
    client
        .batch_execute("ALTER TABLE public.outbox DROP COLUMN type")
        .await
        .expect("drop column");
    client
        .execute(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, payload) VALUES ('Order', 'a', '{}')",
            &[],
        )
        .await
        .expect("insert");
    let why = eventually(Duration::from_secs(60), "ColumnMissing", || async {
        worker
            .handle
            .state
            .readiness()
            .err()
            .filter(|w| w.starts_with("ColumnMissing"))
    })
    .await;
    assert!(why.contains("\"type\"") && why.contains("spec.outbox.columns"), "{why}");
    worker.shutdown().await;
}
