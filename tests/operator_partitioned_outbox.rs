//! The operator provisions a relay for a partitioned outbox table (the publication
//! lists the root, published via the root), and with `spec.outbox.partitions` keeps
//! the current and upcoming partitions in place and reports them in the status.

mod operator_support;

use operator_support::{Harness, Options, condition};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_table_is_provisioned_and_its_partitions_managed() {
    let h = Harness::start_with(
        "op-parts",
        Options {
            table: false,
            ..Options::default()
        },
    )
    .await;
    h.sql()
        .await
        .batch_execute(
            "CREATE TABLE public.outbox (
                 id uuid NOT NULL DEFAULT gen_random_uuid(), aggregatetype text NOT NULL,
                 aggregateid text, type text NOT NULL, payload jsonb,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (id, created_at)
             ) PARTITION BY RANGE (created_at)",
        )
        .await
        .expect("create partitioned table");
    let (_, publication) = h.default_names("orders");
    h.create_relay(
        "orders",
        h.spec(json!({"outbox": {"partitions": {
            "column": "created_at", "interval": "Daily", "premake": 2, "retention": "7d"
        }}})),
    )
    .await;

    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    assert_eq!(h.publication_tables(&publication).await, ["public.outbox"]);
    let r = if r.status.as_ref().and_then(|s| s.partitions.as_ref()).is_some() {
        r
    } else {
        h.await_relay("orders", "status.partitions", |r| {
            r.status.as_ref().and_then(|s| s.partitions.as_ref()).is_some()
        })
        .await
    };
    let parts = r
        .status
        .clone()
        .unwrap_or_default()
        .partitions
        .expect("status.partitions");
    assert_eq!(parts.attached, 3, "today and two days ahead: {parts:?}");
    assert!(parts.error.is_none() && parts.retiring.is_empty(), "{parts:?}");
    assert_eq!(condition(&r, "DatabaseReady").0, "True");

    // An application insert dated now lands in a partition the operator made.
    let n: i64 = h
        .sql()
        .await
        .query_one(
            "WITH i AS (INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                        VALUES ('Order', 'o-1', 'OrderCreated', '{}') RETURNING 1)
             SELECT count(*) FROM i",
            &[],
        )
        .await
        .expect("insert into today's partition")
        .get(0);
    assert_eq!(n, 1);
    h.stop().await;
}
