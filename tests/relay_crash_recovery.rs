//! A worker killed with SIGKILL mid-stream, again and again, loses nothing:
//! the restarted worker resumes from the slot's confirmed position, so every
//! event arrives at least once and each aggregate's order holds.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    let bed = outbox_testbed::shared().await;
    let fx = Fixture::new(&bed.pg, &bed.kafka, "crash", 4).await;
    let dir = tempfile::tempdir().expect("tempdir");

    // A writer keeps committing while the worker is killed under it.
    let writer = {
        let client = bed.pg.client(&fx.db).await.expect("connect");
        let fixture = fx.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..20 {
                ids.extend(fixture.insert_events_from(&client, 50, 6, 30, round * 6 + 1).await);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            ids
        })
    };

    let mut kills = 0;
    let mut confirmed_before_kill = Vec::new();
    for round in 0..4 {
        let mut child = fx.spawn_worker_process(dir.path());
        // Let it stream for a moment, then crash it without warning.
        tokio::time::sleep(Duration::from_millis(900 + round * 300)).await;
        confirmed_before_kill.push(fx.slot_confirmed_flush().await);
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        kills += 1;
    }
    let ids = writer.await.expect("writer");
    // A last worker drains the rest.
    let mut child = fx.spawn_worker_process(dir.path());
    let expect: HashSet<String> = ids.into_iter().collect();
    assert_eq!(expect.len(), 20 * 300);
    let records = consume_async(
        &fx.bootstrap,
        &fx.topic,
        &expect,
        Duration::from_secs(180),
        Duration::from_secs(1),
    )
    .await;
    child.kill().expect("kill");
    let _ = child.wait();

    assert_eq!(kills, 4);
    assert_all_delivered(&records, &expect);
    check_per_key_order(&records).expect("per-key order across crashes");
    // The slot advanced between crashes (each worker confirmed some progress).
    let distinct: HashSet<_> = confirmed_before_kill.iter().flatten().collect();
    assert!(
        distinct.len() >= 2,
        "slot never advanced between kills: {confirmed_before_kill:?}"
    );
    let duplicates = records.len() - expect.len();
    eprintln!(
        "{} events, {} records read, {} duplicates after {kills} SIGKILLs",
        expect.len(),
        records.len(),
        duplicates
    );
}
