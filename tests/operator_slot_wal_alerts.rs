//! Before a slot is lost: with `max_slot_wal_keep_size` set, the operator exports the
//! slot's `safe_wal_size` and `wal_status`; when the retained WAL passes the limit
//! (`unreserved`, removable at the next checkpoint, not yet removed) the relay is
//! `LagCritical`, the gauges say `unreserved` and a negative `safe_wal_size`, and the
//! chart's rules, evaluated by promtool on the operator's live exposition, fire
//! `OutboxRelaySlotUnreserved` — all before PostgreSQL invalidates the slot.

mod operator_support;
mod tools;

use std::time::{Duration, Instant};

use operator_support::{Harness, Options, condition};
use outbox_testbed::{Postgres, shared};
use serde_json::json;
use tools::{chart_rules, run, tool};

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// promtool input series from the operator's exposition: every `outbox_operator_slot_*`
/// and `outbox_operator_ready` sample of the relay, held for a few minutes.
fn series_of(exposition: &str, ns: &str) -> String {
    let mut out = String::new();
    for line in exposition.lines() {
        if !(line.starts_with("outbox_operator_slot_") || line.starts_with("outbox_operator_ready"))
            || !line.contains(&format!("namespace=\"{ns}\""))
        {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        out.push_str(&format!("      - series: '{series}'\n        values: '{value}x5'\n"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreserved_slot_is_exported_and_alerted_before_it_is_lost() {
    // A private server: max_slot_wal_keep_size applies to every slot on it.
    let bed = shared().await;
    let components = outbox_testbed::Components::locate().expect("components");
    let pg: &'static Postgres = Box::leak(Box::new(
        Postgres::start(&components).await.expect("private PostgreSQL"),
    ));
    let h = Harness::start_on(pg, bed, "walrisk", Options::default()).await;
    h.create_relay("orders", h.spec(json!({}))).await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;

    let admin = pg.client("postgres").await.expect("connect");
    // One statement each: ALTER SYSTEM refuses to run inside a multi-statement batch.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '32MB'",
        "ALTER SYSTEM SET wal_keep_size = 0",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("limit slot WAL");
    }
    let labels = format!("{{namespace=\"{}\",name=\"orders\"}}", h.ns);
    let status = |s: &str| {
        format!(
            "outbox_operator_slot_wal_status{{namespace=\"{}\",name=\"orders\",wal_status=\"{s}\"}}",
            h.ns
        )
    };
    let safe = format!("outbox_operator_slot_safe_wal_size_bytes{labels}");

    // Within the limit: reserved, and room left.
    let room = until("a positive safe_wal_size", || {
        h.metric(&safe)
            .filter(|v| *v > 0.0)
            .filter(|_| h.metric(&status("reserved")) == Some(1.0))
    })
    .await;
    println!("safe_wal_size while reserved: {room}");
    // PostgreSQL counts in whole 16 MB segments from the current one's end.
    assert!(room <= 48.0 * 1024.0 * 1024.0, "{room}");
    assert_eq!(
        h.metric(&format!("outbox_operator_slot_lag_warning_bytes{labels}")),
        Some(268_435_456.0)
    );

    // Nobody reads the slot; ~64 MB of WAL pass it. No CHECKPOINT, and the server's
    // max_wal_size (1 GB) triggers none, so the WAL is still there: unreserved.
    let db = h.sql().await;
    db.batch_execute("CREATE TABLE filler (x text)").await.expect("filler");
    for _ in 0..3 {
        db.batch_execute(
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal();",
        )
        .await
        .expect("write WAL");
    }
    let on_server: String = admin
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&h.default_names("orders").0],
        )
        .await
        .expect("slot")
        .get(0);
    assert_eq!(
        on_server, "unreserved",
        "the slot should be past the limit and not yet invalidated"
    );

    let r = h.await_condition("orders", "Ready", "False", Some("LagCritical")).await;
    let (_, _, message) = condition(&r, "Ready");
    println!("unreserved: {message}");
    assert!(message.contains("wal_status unreserved"), "{message}");
    let left = until("the gauges to say unreserved", || {
        (h.metric(&status("unreserved")) == Some(1.0) && h.metric(&status("reserved")) == Some(0.0))
            .then(|| h.metric(&safe))
            .flatten()
    })
    .await;
    assert!(left < 0.0, "safe_wal_size is negative past the limit: {left}");
    assert_eq!(h.metric(&format!("outbox_operator_slot_wal_lost{labels}")), Some(0.0));

    // The chart's rules on exactly these series.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.yaml"), chart_rules()).expect("rules");
    let cases = format!(
        "rule_files: [rules.yaml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}    \
         alert_rule_test:\n      - eval_time: 1m\n        alertname: OutboxRelaySlotUnreserved\n        exp_alerts:\n          \
         - exp_labels: {{severity: critical, namespace: {ns}, name: orders, wal_status: unreserved}}\n            \
         exp_annotations:\n              summary: \"Slot of {ns}/orders is unreserved: PostgreSQL may remove its WAL at the next checkpoint\"\n      \
         - eval_time: 1m\n        alertname: OutboxRelayWalLost\n        exp_alerts: []\n",
        series_of(&h.handle.metrics.encode(), &h.ns),
        ns = h.ns,
    );
    let file = dir.path().join("live.test.yaml");
    std::fs::write(&file, &cases).expect("cases");
    let out = run(
        "promtool test rules on the live exposition",
        std::process::Command::new(tool("promtool"))
            .args(["test", "rules"])
            .arg(&file),
    );
    assert!(out.contains("SUCCESS"), "{out}\n{cases}");
    h.stop().await;
}
