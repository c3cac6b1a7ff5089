//! A replication connection that goes silent without closing (a loopback proxy
//! that stops forwarding but keeps both sockets open) is found and replaced:
//! the status updates ask the server for a reply, and no answer within the
//! deadline ends the session; a new connection resumes from the slot. If the
//! session itself were stuck, `/healthz` fails so the kubelet restarts the pod.
//! Both detection times are measured and printed.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_operator::relay::config::Tuning;
use outbox_testbed::{free_port, http_get};
use support::proxy::SilentProxy;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

async fn insert_one(fx: &Fixture, client: &tokio_postgres::Client) -> String {
    fx.insert_events(client, 1, 1, 1).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replication_connection_is_found_and_replaced() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "hung", 1).await;
    let proxy = SilentProxy::start(&fx.pg_host, fx.pg_port).await;
    let mut cfg = fx.config();
    cfg.replication.host = "127.0.0.1".into();
    cfg.replication.port = proxy.port;
    // The production defaults: a status update asking for a reply every 10 s,
    // 10 s for the answer. Detection takes at most their sum.
    let defaults = Tuning::default();
    cfg.tuning.status_interval = defaults.status_interval;
    cfg.tuning.reply_timeout = defaults.reply_timeout;
    let bound = defaults.status_interval + defaults.reply_timeout;
    let worker = fx.start_worker_with(cfg);
    let client = bed.pg.client(&fx.db).await.expect("connect");

    let first = insert_one(&fx, &client).await;
    let got = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([first.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    assert_all_delivered(&got, &HashSet::from([first.clone()]));

    proxy.freeze();
    let frozen_at = Instant::now();
    let (category, message) = eventually(bound + Duration::from_secs(15), "ReplicationTimeout", || async {
        worker
            .handle
            .state
            .last_error()
            .filter(|(c, _)| *c == "ReplicationTimeout")
    })
    .await;
    let detected = frozen_at.elapsed();
    println!(
        "detected a silent replication connection after {} ms (status interval {:?}, reply timeout {:?})",
        detected.as_millis(),
        defaults.status_interval,
        defaults.reply_timeout
    );
    assert_eq!(category, "ReplicationTimeout");
    assert!(message.contains("went silent"), "{message}");
    assert!(detected <= bound + Duration::from_secs(2), "{detected:?} > {bound:?}");
    assert!(
        detected >= defaults.reply_timeout,
        "{detected:?}: found by the reply deadline, not by a closed socket"
    );

    // A new connection (the proxy forwards new ones) resumes delivery. The old
    // connection's walsender still holds the slot until the server's
    // wal_sender_timeout (60 s); the worker ends it instead of waiting.
    let detected_at = Instant::now();
    let second = insert_one(&fx, &client).await;
    let got = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &HashSet::from([first, second.clone()]),
        WAIT,
        Duration::ZERO,
    )
    .await;
    assert_all_delivered(&got, &HashSet::from([second]));
    let resumed = detected_at.elapsed();
    println!("delivering again {} ms after the detection", resumed.as_millis());
    assert!(
        resumed < Duration::from_secs(30),
        "{resumed:?}: the stale walsender was waited out instead of ended"
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_a_streaming_session_hears_nothing() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "hung-healthz", 1).await;
    let proxy = SilentProxy::start(&fx.pg_host, fx.pg_port).await;
    let mut cfg = fx.config();
    cfg.replication.host = "127.0.0.1".into();
    cfg.replication.port = proxy.port;
    // Take the session's own deadline out of the picture: this is the net
    // under it, for a session stuck in a way the deadline does not see.
    cfg.tuning.status_interval = Duration::from_secs(1);
    cfg.tuning.reply_timeout = Duration::from_secs(3600);
    cfg.tuning.liveness_bound = Duration::from_secs(5);
    let worker = fx.start_worker_with(cfg);
    let addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let listener = outbox_operator::http::bind(addr.parse().expect("addr"))
        .await
        .expect("bind");
    let (stop_http, rx) = tokio::sync::watch::channel(false);
    let http = tokio::spawn(outbox_operator::http::serve(listener, worker.handle.clone(), rx));

    eventually(Duration::from_secs(30), "streaming", || async {
        worker.handle.state.readiness().ok()
    })
    .await;
    // Healthy while the server answers (it replies to every status update).
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        http_get(&addr, "/healthz").await.map(|r| r.0),
        Some(200),
        "a live idle stream is healthy"
    );

    proxy.freeze();
    let frozen_at = Instant::now();
    let body = eventually(Duration::from_secs(30), "/healthz 503", || async {
        http_get(&addr, "/healthz")
            .await
            .filter(|(c, _)| *c == 503)
            .map(|r| r.1)
    })
    .await;
    let detected = frozen_at.elapsed();
    println!(
        "/healthz failed {} ms after the connection went silent (bound 5 s)",
        detected.as_millis()
    );
    assert!(body.contains("nothing heard from PostgreSQL"), "{body}");
    // Counted from the last message heard, up to one status interval (1 s) before the freeze.
    assert!(detected >= Duration::from_secs(3), "{detected:?}");

    let _ = stop_http.send(true);
    let _ = http.await;
    worker.shutdown().await;
}
