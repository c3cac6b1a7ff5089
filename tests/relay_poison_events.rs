//! Events Kafka refuses for good (too large, unknown topic). The default policy
//! stops at the event and reports it, losing nothing; `DeadLetter` moves it to a
//! dead-letter topic with the reason in headers and goes on.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_operator::api::{PoisonPolicy, RouteBy};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

async fn insert(client: &tokio_postgres::Client, key: &str, pad: usize) -> String {
    client
        .query_one(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('Order', $1, 'OrderCreated', jsonb_build_object('pad', repeat('x', $2::int)))
             RETURNING id::text",
            &[&key, &(pad as i32)],
        )
        .await
        .expect("insert")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_stops_the_relay_and_is_kept() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "poison-stop", 1).await;
    fx.spec.kafka.producer.max_message_bytes = 2048;
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");

    let small = insert(&client, "a", 10).await;
    let big = insert(&client, "a", 8000).await;
    let after = insert(&client, "a", 10).await;

    let records = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([small.clone()]),
        WAIT,
        Duration::from_secs(2),
    )
    .await;
    let ids: Vec<_> = records.iter().filter_map(|r| r.id.clone()).collect();
    assert!(ids.contains(&small));
    assert!(
        !ids.contains(&big) && !ids.contains(&after),
        "nothing passes the poison event: {ids:?}"
    );
    let why = eventually(Duration::from_secs(20), "not ready with the reason", || async {
        worker
            .handle
            .state
            .readiness()
            .err()
            .filter(|w| w.contains("MessageTooLarge"))
    })
    .await;
    assert!(why.contains(&big), "reason names the event: {why}");
    assert!(
        worker
            .handle
            .metrics
            .encode()
            .contains("outbox_relay_errors_total{kind=\"MessageTooLarge\"}"),
    );
    worker.shutdown().await;

    // The user raises the limit: the same events flow from the slot, in order.
    fx.spec.kafka.producer.max_message_bytes = 1_048_576;
    let worker = fx.start_worker();
    let expect = HashSet::from([small, big.clone(), after.clone()]);
    let records = consume_async(&fx.bootstrap, &fx.topic, &expect, WAIT, Duration::from_millis(500)).await;
    assert_all_delivered(&records, &expect);
    let order: Vec<_> = records.iter().filter_map(|r| r.id.clone()).collect();
    let pos = |id: &str| order.iter().position(|x| x == id);
    assert!(pos(&big) < pos(&after), "{order:?}");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_policy_moves_poison_aside_and_goes_on() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "poison-dlq", 1).await;
    let dlq = format!("{}.dlq", fx.name);
    bed.kafka.create_topic(&dlq, 1).await.expect("dlq topic");
    fx.spec.kafka.producer.max_message_bytes = 2048;
    fx.spec.delivery.poison_policy = PoisonPolicy::DeadLetter;
    fx.spec.delivery.dead_letter_topic = Some(dlq.clone());
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");

    let small = insert(&client, "a", 10).await;
    let big = insert(&client, "a", 8000).await;
    let after = insert(&client, "a", 10).await;

    let main = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([small, after]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(main.len(), 2, "{main:?}");
    let dead = consume_async(
        &fx.bootstrap,
        &dlq,
        &HashSet::from([big.clone()]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.key.as_deref(), Some("a"));
    assert_eq!(
        d.headers.get("outbox-error-kind").map(String::as_str),
        Some("MessageTooLarge")
    );
    assert_eq!(d.headers.get("outbox-original-topic"), Some(&fx.topic));
    assert_eq!(d.payload, None, "the oversized payload itself is left out");
    assert!(worker.handle.state.readiness().is_ok());
    let text = worker.handle.metrics.encode();
    assert!(
        text.contains("outbox_relay_events_total{outcome=\"dead_lettered\"} 1"),
        "{text}"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_reported_and_delivered_once_created() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "poison-topic", 1).await;
    let prefix = fx.name.clone();
    fx.spec.kafka.topic = None;
    fx.spec.kafka.route_by = Some(RouteBy {
        column: "aggregatetype".into(),
        topic_template: format!("{prefix}.${{routedByValue}}"),
    });
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let id = insert(&client, "a", 10).await;

    let why = eventually(Duration::from_secs(60), "UnknownTopic in readiness", || async {
        worker
            .handle
            .state
            .readiness()
            .err()
            .filter(|w| w.contains("UnknownTopic"))
    })
    .await;
    assert!(why.contains(&id), "{why}");

    let topic = format!("{prefix}.Order");
    bed.kafka.create_topic(&topic, 1).await.expect("topic");
    let records = consume_async(
        &fx.bootstrap,
        &topic,
        &HashSet::from([id]),
        WAIT,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    worker.shutdown().await;
}

/// Stop means stop: an event for a topic that does not exist is refused before
/// sending (from metadata), and no event after it reaches Kafka, even one for a
/// topic that exists, until the cause is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_after_a_refused_event_reaches_kafka_under_stop() {
    let bed = outbox_testbed::shared().await;
    let mut fx = Fixture::new(&bed.pg, &bed.kafka, "poison-stopstop", 1).await;
    let prefix = fx.name.clone();
    fx.spec.kafka.topic = None;
    fx.spec.kafka.route_by = Some(RouteBy {
        column: "aggregatetype".into(),
        topic_template: format!("{prefix}.${{routedByValue}}"),
    });
    let existing = format!("{prefix}.Order");
    bed.kafka.create_topic(&existing, 1).await.expect("topic");
    let worker = fx.start_worker();
    let client = bed.pg.client(&fx.db).await.expect("connect");
    let insert_to = |agg: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                     VALUES ($1, 'a', 'Created', '{}') RETURNING id::text",
                    &[&agg],
                )
                .await
                .expect("insert")
                .get::<_, String>(0)
        }
    };
    let before = insert_to("Order").await;
    let got = consume_async(
        &fx.bootstrap,
        &existing,
        &HashSet::from([before.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    assert_all_delivered(&got, &HashSet::from([before.clone()]));
    let poison = insert_to("Missing").await;
    let after = insert_to("Order").await;

    let why = eventually(Duration::from_secs(60), "UnknownTopic", || async {
        worker
            .handle
            .state
            .readiness()
            .err()
            .filter(|w| w.contains("UnknownTopic"))
    })
    .await;
    assert!(why.contains(&poison) && why.contains("does not exist"), "{why}");
    // Several retries (backoff up to 2 s here) later, still nothing after it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got = consume_async(
        &fx.bootstrap,
        &existing,
        &HashSet::from([before.clone()]),
        WAIT,
        Duration::from_secs(2),
    )
    .await;
    let ids: Vec<_> = got.iter().filter_map(|r| r.id.clone()).collect();
    assert_eq!(
        ids,
        vec![before.clone()],
        "the event after the refused one never reached Kafka"
    );

    bed.kafka
        .create_topic(&format!("{prefix}.Missing"), 1)
        .await
        .expect("topic");
    let got = consume_async(
        &fx.bootstrap,
        &existing,
        &HashSet::from([after.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    assert_all_delivered(&got, &HashSet::from([after]));
    worker.shutdown().await;
}
