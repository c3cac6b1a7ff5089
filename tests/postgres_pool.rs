//! The operator's kept connections, against a real PostgreSQL: a released
//! connection is reused (same server backend) under the operator's application
//! name, a dropped one is closed and never handed out again, a connection the
//! server ended is replaced, and another database or role never gets it.

use std::time::{Duration, Instant};

use outbox_operator::api::PgSslMode;
use outbox_operator::postgres::pool::{APPLICATION_NAME, MAX_IDLE_PER_KEY, Pool};
use outbox_operator::postgres::{PgConnectConfig, connect};
use outbox_testbed::{Postgres, shared, unique_name};

fn config(pg: &Postgres, db: &str) -> PgConnectConfig {
    PgConnectConfig {
        host: pg.host().to_string(),
        port: pg.port(),
        dbname: db.to_string(),
        user: pg.user().to_string(),
        password: Some(pg.password().to_string()),
        ssl_mode: PgSslMode::Disable,
        ca_pem: None,
        application_name: "outbox-relay/shop/orders".to_string(),
        allow_cleartext_password: false,
    }
}

async fn backend(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0)
}

/// Whether the server still has backend `pid`; waits a little for it to go.
async fn backend_gone(admin: &tokio_postgres::Client, pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .expect("activity")
            .get(0);
        if n == 0 {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn released_connections_are_reused_and_dropped_ones_are_closed() {
    let bed = shared().await;
    let (db, other) = (unique_name("pool"), unique_name("pool-other"));
    bed.pg.create_database(&db).await.expect("database");
    bed.pg.create_database(&other).await.expect("database");
    let admin = bed.pg.client("postgres").await.expect("admin");
    let pool = Pool::new();
    let cfg = config(&bed.pg, &db);

    let first = pool.get(&cfg).await.expect("connect");
    assert!(!first.reused);
    let pid = backend(&first).await;
    let name: String = first
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .expect("name")
        .get(0);
    assert_eq!(
        name, APPLICATION_NAME,
        "kept connections carry the operator's name, not a relay's"
    );
    first.release();
    assert_eq!(pool.idle(), 1);

    // Released: the next reconcile of any relay of that database gets it.
    let mut relay_b = cfg.clone();
    relay_b.application_name = "outbox-relay/shop/payments".into();
    let again = pool.get(&relay_b).await.expect("reuse");
    assert!(again.reused);
    assert_eq!(backend(&again).await, pid, "the same server backend");
    // Another database never gets it.
    let elsewhere = pool.get(&config(&bed.pg, &other)).await.expect("connect");
    assert!(!elsewhere.reused);
    assert_ne!(backend(&elsewhere).await, pid);
    elsewhere.release();

    // Dropped (as a timed-out step drops it): closed, not kept.
    drop(again);
    assert!(
        backend_gone(&admin, pid).await,
        "a dropped connection stays open on the server"
    );
    let fresh = pool.get(&cfg).await.expect("connect");
    assert!(!fresh.reused, "a dropped connection was handed out again");
    let fresh_pid = backend(&fresh).await;
    fresh.release();

    // The server ends a kept connection: the pool notices and connects anew.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&fresh_pid])
        .await
        .expect("terminate");
    assert!(backend_gone(&admin, fresh_pid).await);
    let replaced = pool.get(&cfg).await.expect("reconnect");
    assert_ne!(backend(&replaced).await, fresh_pid);
    replaced.release();

    // At most MAX_IDLE_PER_KEY kept per database, however many were in use at once.
    let mut held = Vec::new();
    for _ in 0..MAX_IDLE_PER_KEY + 2 {
        held.push(pool.get(&cfg).await.expect("connect"));
    }
    let pids: Vec<i32> = futures::future::join_all(held.iter().map(|c| backend(c))).await;
    for c in held {
        c.release();
    }
    assert_eq!(
        pool.idle(),
        MAX_IDLE_PER_KEY + 1,
        "per database, plus the other database's one"
    );
    // The ones not kept are closed on the server (a backend takes a moment to exit).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[&pids])
            .await
            .expect("activity")
            .get(0);
        if open as usize <= MAX_IDLE_PER_KEY {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of the released connections are still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A plain connect is unaffected by the pool (the workers' path).
    assert!(connect(&cfg).await.is_ok());
}
