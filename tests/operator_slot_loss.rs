//! A relay's slot that disappears, or whose WAL the server removed, is reported
//! (`Ready=False`, reason `SlotLost`, a Warning Event, `outbox_operator_slot_lost`)
//! and never silently recreated: the message says from which position events may be
//! missing and what to do. Only a new value of `outbox.dev/recreate-slot` makes a
//! new slot, once.

mod operator_support;

use std::time::{Duration, Instant};

use operator_support::{Harness, Options, condition};
use outbox_testbed::{Postgres, shared};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_behind_the_operators_back_is_reported_not_recreated() {
    let h = Harness::start("loss").await;
    let (slot, _) = h.default_names("orders");
    h.create_relay("orders", h.spec(json!({}))).await;
    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let before = r.status.and_then(|s| s.binding).expect("status.binding");
    assert_eq!(before.slot, slot);
    assert!(!before.system_identifier.is_empty() && !before.slot_created_lsn.is_empty());
    h.await_event("orders", "SlotCreated").await;

    // Events nobody relays (no worker runs), then the slot goes.
    h.sql()
        .await
        .batch_execute(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'Order', 'o-' || i, 'OrderCreated', '{}' FROM generate_series(1, 5) i",
        )
        .await
        .expect("insert");
    let confirmed = h
        .await_relay("orders", "status.slot to show the confirmed position", |r| {
            r.status
                .as_ref()
                .and_then(|s| s.slot.as_ref())
                .is_some_and(|s| s.confirmed_flush_lsn.is_some())
        })
        .await
        .status
        .and_then(|s| s.slot)
        .and_then(|s| s.confirmed_flush_lsn)
        .expect("confirmed position");
    // The relay is in its steady state: its passes are confirmed from the shared
    // snapshot of the database, which may be a requeue interval old when the slot
    // goes. The loss must still be found and reported.
    let confirmed_passes = "outbox_operator_database_passes_total{pass=\"confirmed\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.metric(confirmed_passes).unwrap_or(0.0) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no steady pass confirmed from a snapshot\n{}",
            h.dump("orders").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.drop_slot_behind_the_operators_back(&slot).await;

    let r = h.await_condition("orders", "Ready", "False", Some("SlotLost")).await;
    let (_, _, message) = condition(&r, "Ready");
    println!("slot dropped: {message}");
    for want in [
        format!("Replication slot {slot:?}"),
        format!("created at LSN {}", before.slot_created_lsn),
        format!("after its last confirmed position {confirmed}"),
        "may never have reached Kafka".to_string(),
        "outbox.dev/recreate-slot".to_string(),
    ] {
        assert!(message.contains(&want), "{want:?} missing in: {message}");
    }
    assert_eq!(condition(&r, "SlotHealthy").1, "SlotLost");
    let note = h.await_event("orders", "SlotLost").await;
    assert!(note.contains("may never have reached Kafka"), "{note}");
    let labels = format!("{{namespace=\"{}\",name=\"orders\"}}", h.ns);
    assert_eq!(h.metric(&format!("outbox_operator_slot_lost{labels}")), Some(1.0));

    // Reconciles go on (requeue 2 s): the slot stays gone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !h.slot_exists(&slot).await,
        "the operator never recreates a lost slot on its own"
    );
    let r = h.await_condition("orders", "Ready", "False", Some("SlotLost")).await;
    assert_eq!(
        r.status.and_then(|s| s.binding),
        Some(before.clone()),
        "the lost identity stays recorded"
    );

    // The explicit way back: a new value of the annotation, echoed in status.
    h.annotate("orders", "outbox.dev/recreate-slot", "ticket-1").await;
    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    let after = r.status.and_then(|s| s.binding).expect("binding");
    assert_eq!(after.recreated_for.as_deref(), Some("ticket-1"));
    assert_ne!(after.slot_created_lsn, before.slot_created_lsn, "a new start position");
    assert!(h.slot_exists(&slot).await);
    let note = h.await_event("orders", "SlotRecreated").await;
    println!("recreated: {note}");
    assert!(note.contains("ticket-1") && note.contains("were not relayed"), "{note}");
    assert_eq!(h.metric(&format!("outbox_operator_slot_lost{labels}")), Some(0.0));

    // The annotation stays in place (as in Git): a later loss is reported again,
    // not repaired with the old value.
    h.drop_slot_behind_the_operators_back(&slot).await;
    h.await_condition("orders", "Ready", "False", Some("SlotLost")).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!h.slot_exists(&slot).await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_whose_wal_was_removed_is_slot_lost() {
    // A private server: max_slot_wal_keep_size would invalidate the neighbours' slots.
    let bed = shared().await;
    let components = outbox_testbed::Components::locate().expect("components");
    let pg: &'static Postgres = Box::leak(Box::new(
        Postgres::start(&components).await.expect("private PostgreSQL"),
    ));
    let h = Harness::start_on(pg, bed, "walloss", Options::default()).await;
    let (slot, _) = h.default_names("orders");
    h.create_relay("orders", h.spec(json!({}))).await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    // No worker reads the slot; the server may keep at most 1 MB of WAL for it.
    let admin = pg.client("postgres").await.expect("connect");
    // One statement each: ALTER SYSTEM refuses to run inside a multi-statement batch.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "ALTER SYSTEM SET wal_keep_size = 0",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("limit slot WAL");
    }
    let db = h.sql().await;
    db.batch_execute("CREATE TABLE filler (x text)").await.expect("filler");
    let mut wal_status = String::new();
    for _ in 0..12 {
        db.batch_execute(
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal();",
        )
        .await
        .expect("write WAL");
        admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
        wal_status = admin
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("slot")
            .get(0);
        if wal_status == "lost" {
            break;
        }
    }
    assert_eq!(wal_status, "lost", "the server removed the slot's WAL");

    let r = h.await_condition("orders", "Ready", "False", Some("SlotLost")).await;
    let (_, _, message) = condition(&r, "Ready");
    println!("WAL removed: {message}");
    assert!(
        message.contains("wal_status lost") && message.contains("max_slot_wal_keep_size"),
        "{message}"
    );
    h.await_event("orders", "SlotLost").await;
    // A lost slot is dropped and replaced only on request.
    h.annotate("orders", "outbox.dev/recreate-slot", "after-wal-loss").await;
    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    assert_eq!(
        r.status.and_then(|s| s.slot).and_then(|s| s.wal_status).as_deref(),
        Some("reserved")
    );
    h.stop().await;
}
