//! Slot lag as the operator reports it: events written while no worker streams
//! push the lag past `warningBytes` (SlotHealthy=False, LagWarning, relay still
//! Ready) and past `criticalBytes` (Ready=False, LagCritical); once the slot catches
//! up, SlotHealthy turns True again. The gauge follows the lag.

mod operator_support;

use kube::api::{Patch, PatchParams};
use operator_support::{Harness, condition};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_beyond_thresholds_is_reported_and_clears() {
    let h = Harness::start("op-lag").await;
    let (slot, _) = h.default_names("orders");
    let lag = json!({"replication": {"lag": {"warningBytes": 4096, "criticalBytes": 1_000_000_000}}});
    h.create_relay("orders", h.spec(lag)).await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    h.await_deployment("orders-relay").await;
    h.set_available("orders-relay", 1).await;
    h.await_condition("orders", "Ready", "True", Some("Relaying")).await;

    // Nobody streams the slot: every inserted byte of WAL is lag.
    h.sql()
        .await
        .batch_execute(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'Order', i::text, 'OrderCreated', jsonb_build_object('pad', repeat('x', 200))
             FROM generate_series(1, 200) i",
        )
        .await
        .expect("insert events");
    let r = h
        .await_condition("orders", "SlotHealthy", "False", Some("LagWarning"))
        .await;
    let (_, _, message) = condition(&r, "SlotHealthy");
    assert!(message.contains("4096"), "{message}");
    // A warning alone keeps the relay Ready.
    assert_eq!(condition(&r, "Ready").0, "True");
    let reported = r
        .status
        .as_ref()
        .and_then(|s| s.slot.as_ref())
        .and_then(|s| s.lag_bytes);
    assert!(reported.is_some_and(|l| l >= 4096), "{reported:?}");
    let labels = format!("{{namespace=\"{}\",name=\"orders\"}}", h.ns);
    assert!(
        h.metric(&format!("outbox_operator_slot_lag_bytes{labels}"))
            .unwrap_or(0.0)
            >= 4096.0
    );
    h.await_event("orders", "LagWarning").await;

    // Past the critical threshold the relay is not Ready.
    h.relays()
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replication": {"lag": {"warningBytes": 1024, "criticalBytes": 2048}}}})),
        )
        .await
        .expect("lower thresholds");
    let r = h.await_condition("orders", "Ready", "False", Some("LagCritical")).await;
    assert_eq!(condition(&r, "SlotHealthy").1, "LagCritical");

    // The slot catches up (as if a worker had confirmed everything): healthy again.
    h.sql()
        .await
        .query_one(
            "SELECT 1 FROM pg_replication_slot_advance($1, pg_current_wal_lsn())",
            &[&slot],
        )
        .await
        .expect("advance slot");
    let r = h
        .await_condition("orders", "SlotHealthy", "True", Some("LagWithinThresholds"))
        .await;
    assert_eq!(condition(&r, "Ready").0, "True");
    h.stop().await;
}
