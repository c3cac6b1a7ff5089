//! The operator provisions a polling relay (`mode: Polling`) without a slot or a
//! publication: it checks the table, the order column and the role's rights,
//! creates the unique index the poller needs, reports the backlog, refuses bad
//! input with a condition that names it, keeps two pollers off one table, and
//! on deletion drops nothing (unrelayed events are still rows in the table).

mod operator_support;

use operator_support::{Harness, Options, condition, env_of};
use outbox_testbed::{Components, Postgres, shared};
use serde_json::json;

fn polling_spec(h: &Harness, order_column: &str) -> serde_json::Value {
    let mut spec = h.spec(json!({}));
    spec["mode"] = json!("Polling");
    spec["polling"] = json!({"orderColumn": order_column});
    spec
}

async fn index_exists(h: &Harness, name: &str) -> bool {
    h.sql()
        .await
        .query_one("SELECT count(*) FROM pg_indexes WHERE indexname = $1", &[&name])
        .await
        .expect("pg_indexes")
        .get::<_, i64>(0)
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_relay_gets_an_index_and_no_slot() {
    let h = Harness::start("op-poll").await;
    let sql = h.sql().await;
    sql.batch_execute(
        "ALTER TABLE public.outbox ADD COLUMN seq bigserial;
         INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
         SELECT 'Order', 'a', 'OrderCreated', '{}' FROM generate_series(1, 3)",
    )
    .await
    .expect("order column and a backlog");
    h.create_relay("orders", polling_spec(&h, "seq")).await;

    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(message.contains("polling mode"), "{message}");
    let (status, reason, message) = condition(&r, "SlotHealthy");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Polling"), "{message}");
    assert!(
        message.contains("3 rows wait"),
        "the backlog is in the status: {message}"
    );
    assert!(
        index_exists(&h, "outbox_seq_poll").await,
        "the unique index was created"
    );

    let (slot, publication) = h.default_names("orders");
    assert!(!h.slot_exists(&slot).await, "no slot for a poller");
    assert!(!h.publication_exists(&publication).await, "no publication for a poller");
    let status = r.status.clone().unwrap_or_default();
    assert!(status.slot.is_none() && status.binding.is_none(), "{status:?}");

    let d = h.await_deployment("orders-relay").await;
    let env = env_of(&d);
    let worker_spec: serde_json::Value =
        serde_json::from_str(env["OUTBOX_RELAY_SPEC"]["value"].as_str().expect("spec env")).expect("json");
    assert_eq!(worker_spec["mode"], "Polling");
    assert_eq!(worker_spec["polling"]["orderColumn"], "seq");

    // A second polling relay of the same table yields to the first.
    h.create_relay("orders-too", polling_spec(&h, "seq")).await;
    let r2 = h
        .await_condition("orders-too", "DatabaseReady", "False", Some("Conflict"))
        .await;
    let (_, _, message) = condition(&r2, "DatabaseReady");
    assert!(
        message.contains("polled outbox table") && message.contains("orders"),
        "{message}"
    );

    // Deleting: nothing to drain or drop; the rows (the unrelayed events) stay.
    h.relays()
        .delete("orders-too", &Default::default())
        .await
        .expect("delete");
    h.relays().delete("orders", &Default::default()).await.expect("delete");
    h.await_gone("orders").await;
    let left: i64 = sql
        .query_one("SELECT count(*) FROM public.outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 3, "deleting a polling relay deletes no event");
    let events = h.events("orders").await;
    assert!(
        events
            .iter()
            .any(|(reason, msg)| reason == "RowsLeftInTable" && msg.contains("public.outbox")),
        "{events:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_order_column_is_named_in_the_status() {
    let h = Harness::start("op-poll-bad").await;
    let sql = h.sql().await;
    sql.batch_execute("ALTER TABLE public.outbox ADD COLUMN label text")
        .await
        .expect("a text column");

    h.create_relay("missing", polling_spec(&h, "seq")).await;
    let r = h
        .await_condition("missing", "DatabaseReady", "False", Some("ColumnNotFound"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(
        message.contains("\"seq\"") && message.contains("polling.orderColumn"),
        "{message}"
    );
    // One polling relay per table: the next one comes after this one is gone.
    h.relays().delete("missing", &Default::default()).await.expect("delete");
    h.await_gone("missing").await;

    h.create_relay("text-order", polling_spec(&h, "label")).await;
    let r = h
        .await_condition("text-order", "DatabaseReady", "False", Some("UnsupportedColumnType"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(message.contains("integer"), "{message}");
    h.stop().await;
}

/// Where a replication relay gets `WalLevelNotLogical`, a polling relay of the
/// same table is provisioned: the mode needs nothing of the WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_is_provisioned_where_wal_level_is_not_logical() {
    let components = Components::locate().expect("test bed components");
    let pg: &'static Postgres = Box::leak(Box::new(
        Postgres::with_wal_level(&components, "replica")
            .await
            .expect("private postgres"),
    ));

    let h = Harness::start_on(pg, shared().await, "op-poll-wal", Options::default()).await;
    h.sql()
        .await
        .batch_execute("ALTER TABLE public.outbox ADD COLUMN seq bigserial")
        .await
        .expect("order column");
    h.create_relay("streaming", h.spec(json!({}))).await;
    h.await_condition("streaming", "DatabaseReady", "False", Some("WalLevelNotLogical"))
        .await;
    h.create_relay("polling", polling_spec(&h, "seq")).await;
    let r = h
        .await_condition("polling", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let (_, reason, _) = condition(&r, "SlotHealthy");
    assert_eq!(reason, "Polling");
    h.stop().await;
}
