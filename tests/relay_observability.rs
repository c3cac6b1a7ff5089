//! The worker process serves `/healthz`, `/readyz` and Prometheus `/metrics`,
//! and `/readyz` tells a standby from a broken worker.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use outbox_testbed::http_get;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_serves_probes_and_metrics() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "observe", 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = fx.spawn_worker_process_on(dir.path(), &addr);

    let (code, body) = eventually(Duration::from_secs(30), "/readyz to answer 200", || async {
        http_get(&addr, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    assert_eq!((code, body.as_str()), (200, "Streaming"));
    assert_eq!(http_get(&addr, "/healthz").await.map(|r| r.0), Some(200));

    let client = bed.pg.client(&fx.db).await.expect("connect");
    let ids: HashSet<String> = fx.insert_events(&client, 5, 10, 5).await.into_iter().collect();
    let records = consume_async(&fx.bootstrap, &fx.topic, &ids, Duration::from_secs(60), Duration::ZERO).await;
    assert_all_delivered(&records, &ids);

    let metrics = eventually(Duration::from_secs(20), "metrics to count 50 events", || async {
        let (_, body) = http_get(&addr, "/metrics").await?;
        body.contains("outbox_relay_events_total{outcome=\"relayed\"} 50")
            .then_some(body)
    })
    .await;
    let bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outbox_relay_payload_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(bytes > 50 * 64, "payload bytes counted: {bytes}");
    for name in [
        "outbox_relay_transaction_events_bucket",
        "outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_confirmed_lsn",
        "outbox_relay_active 1",
        "outbox_relay_in_flight_events",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }

    // A second worker on the same slot is a healthy standby, not a failure.
    let addr2 = format!("127.0.0.1:{}", free_port());
    let mut standby = fx.spawn_worker_process_on(dir.path(), &addr2);
    let (_, body) = eventually(Duration::from_secs(30), "the standby's /readyz", || async {
        http_get(&addr2, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await;
    assert_eq!(body, "Standby");
    let (_, m2) = http_get(&addr2, "/metrics").await.expect("standby metrics");
    assert!(m2.contains("outbox_relay_active 0"), "{m2}");

    for c in [&mut child, &mut standby] {
        c.kill().expect("kill");
        let _ = c.wait();
    }
}
