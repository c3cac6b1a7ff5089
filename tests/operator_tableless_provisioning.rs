//! The operator provisions a tableless relay (`source: Messages`) in a database
//! without an outbox table: a publication listing no table, the slot and the emit
//! function, reported in the status; deleting the relay drains (peeking for
//! messages), drops slot and publication, and leaves the function applications call.

mod operator_support;

use operator_support::{Harness, condition, env_of};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_relay_needs_no_table_and_gets_its_function() {
    let h = Harness::start("op-msg").await;
    let sql = h.sql().await;
    sql.batch_execute("DROP TABLE public.outbox")
        .await
        .expect("no outbox table");
    let (slot, publication) = h.default_names("orders");
    let mut spec = h.spec(json!({}));
    spec["outbox"] = json!({"source": "Messages", "messages": {"prefix": "orders", "function": "public.orders_emit"}});
    h.create_relay("orders", spec).await;

    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(
        message.contains("emit function public.orders_emit() is in place"),
        "{message}"
    );
    assert!(h.slot_exists(&slot).await, "slot {slot}");
    assert!(h.publication_exists(&publication).await);
    assert!(h.publication_tables(&publication).await.is_empty());
    let lsn: Option<String> = sql
        .query_one(
            "SELECT public.orders_emit('Order', '1', 'OrderPlaced', '{}'::jsonb)::text",
            &[],
        )
        .await
        .expect("the function works")
        .get(0);
    assert!(lsn.is_some());

    // The worker gets the source in its spec.
    let d = h.await_deployment("orders-relay").await;
    let env = env_of(&d);
    let worker_spec: serde_json::Value =
        serde_json::from_str(env["OUTBOX_RELAY_SPEC"]["value"].as_str().expect("spec env")).expect("json");
    assert_eq!(worker_spec["outbox"]["source"], "Messages");

    // Deleting it: the message just emitted is pending, so force the end of the drain.
    h.annotate("orders", "outbox.dev/force-delete", "true").await;
    h.relays().delete("orders", &Default::default()).await.expect("delete");
    h.await_gone("orders").await;
    assert!(!h.slot_exists(&slot).await, "slot dropped");
    assert!(!h.publication_exists(&publication).await, "publication dropped");
    let function: i64 = sql
        .query_one("SELECT count(*) FROM pg_proc WHERE proname = 'orders_emit'", &[])
        .await
        .expect("pg_proc")
        .get(0);
    assert_eq!(function, 1, "applications still call it: the function stays");
    let dropped = h.events("orders").await;
    assert!(
        dropped
            .iter()
            .any(|(reason, msg)| reason == "DroppedUnrelayed" && msg.contains("emitted with prefix \"orders\"")),
        "{dropped:?}"
    );
    h.stop().await;
}
