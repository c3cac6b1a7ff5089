//! No password in the clear: against a private server whose pg_hba.conf asks for
//! `password` (cleartext) authentication, neither the operator's SQL connections nor
//! the worker's replication connection send the password over plaintext (`Prefer`
//! falling back, or `Disable`) unless the spec opts in; over TLS they do.

use std::time::{Duration, Instant};

use outbox_operator::api::PgSslMode;
use outbox_operator::postgres::{self, PgConnectConfig, PgError};
use outbox_operator::relay::replication::{ReplicationConfig, ReplicationConnection};
use outbox_testbed::{Components, Postgres};

/// A private server (its pg_hba.conf is changed) that asks every TCP login for a
/// cleartext password.
async fn password_server() -> Postgres {
    let components = Components::locate().unwrap_or_else(|e| panic!("{e}"));
    let pg = Postgres::start(&components).await.expect("start private postgres");
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    // The first matching line wins: these go before the bed's scram-sha-256 lines.
    std::fs::write(
        &hba,
        format!("host all all 127.0.0.1/32 password\nhost replication all 127.0.0.1/32 password\n{old}"),
    )
    .expect("write pg_hba.conf");
    let admin = pg.client("postgres").await.expect("connect over the socket");
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    pg
}

fn sql(pg: &Postgres, mode: PgSslMode, allow: bool) -> PgConnectConfig {
    PgConnectConfig {
        host: pg.host().to_string(),
        port: pg.port(),
        dbname: "postgres".to_string(),
        user: pg.user().to_string(),
        password: Some(pg.password().to_string()),
        ssl_mode: mode,
        ca_pem: None,
        application_name: "cleartext-test".to_string(),
        allow_cleartext_password: allow,
    }
}

fn replication(pg: &Postgres, mode: PgSslMode, allow: bool) -> ReplicationConfig {
    let mut c = ReplicationConfig::from_connect(&sql(pg, mode, allow));
    c.connect_timeout = Duration::from_secs(10);
    c
}

/// Whether the session is encrypted, from the server's side.
async fn connected_with_tls(cfg: &PgConnectConfig) -> Result<bool, PgError> {
    let client = postgres::connect(cfg).await?;
    Ok(client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .expect("read pg_stat_ssl")
        .get(0))
}

#[tokio::test]
async fn cleartext_password_is_sent_only_over_tls_or_with_the_opt_in() {
    let pg = password_server().await;

    // The reload is asynchronous: wait until the server asks for a cleartext
    // password (until then it asks for SCRAM, which succeeds).
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match postgres::connect(&sql(&pg, PgSslMode::Prefer, false)).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the server never asked for a cleartext password"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Prefer fell back to plaintext (the server has no TLS): refused, with the way out.
    assert_eq!(refused.category(), "CleartextPasswordRefused", "{refused}");
    let message = refused.to_string();
    for want in ["in clear text", "Require", "scram-sha-256", "allowCleartextPassword"] {
        assert!(message.contains(want), "{want:?} missing in: {message}");
    }
    let e = postgres::connect(&sql(&pg, PgSslMode::Disable, false))
        .await
        .expect_err("Disable without the opt-in");
    assert_eq!(e.category(), "CleartextPasswordRefused", "{e}");

    // The worker's replication connection: the same refusal.
    let e = ReplicationConnection::connect(&replication(&pg, PgSslMode::Prefer, false))
        .await
        .expect_err("replication without the opt-in");
    assert_eq!(e.category(), "CleartextPasswordRefused", "{e}");

    // With the opt-in both log in, and the server really took a cleartext password.
    assert!(
        !connected_with_tls(&sql(&pg, PgSslMode::Prefer, true))
            .await
            .expect("opted in")
    );
    let mut conn = ReplicationConnection::connect(&replication(&pg, PgSslMode::Prefer, true))
        .await
        .expect("replication with the opt-in");
    conn.identify_system().await.expect("IDENTIFY_SYSTEM");

    // A wrong password with the opt-in is the server's rejection, not ours.
    let mut wrong = sql(&pg, PgSslMode::Prefer, true);
    wrong.password = Some("wrong".into());
    let e = postgres::connect(&wrong).await.expect_err("wrong password");
    assert_eq!(e.category(), "AuthenticationFailed", "{e}");
}

#[tokio::test]
async fn over_tls_the_cleartext_password_is_sent_without_the_opt_in() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    let pg = password_server().await;
    let owner = std::fs::metadata(pg.data_dir()).expect("data dir");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args([
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .current_dir(pg.data_dir())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["server.crt", "server.key"] {
        let path = pg.data_dir().join(f);
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let admin = pg.client("postgres").await.expect("connect over the socket");
    // Two statements: ALTER SYSTEM refuses to run inside a batch's transaction.
    admin
        .batch_execute("ALTER SYSTEM SET ssl = on")
        .await
        .expect("enable ssl");
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");

    // Prefer now gets TLS, and the cleartext request is answered inside it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connected_with_tls(&sql(&pg, PgSslMode::Prefer, false)).await {
            Ok(true) => break,
            other => {
                assert!(Instant::now() < deadline, "never connected over TLS: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        connected_with_tls(&sql(&pg, PgSslMode::Require, false))
            .await
            .expect("Require")
    );
    let mut conn = ReplicationConnection::connect(&replication(&pg, PgSslMode::Require, false))
        .await
        .expect("replication over TLS");
    conn.identify_system().await.expect("IDENTIFY_SYSTEM");

    // Disable is still plaintext: still refused.
    let e = postgres::connect(&sql(&pg, PgSslMode::Disable, false))
        .await
        .expect_err("Disable");
    assert_eq!(e.category(), "CleartextPasswordRefused", "{e}");
}
