//! The replication client against a real PostgreSQL.
//!
//! One private server for this test binary (some tests switch TLS on, which
//! must not surprise tests in other binaries); each test works in its own
//! database with its own slot and publication.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outbox_operator::api::PgSslMode;
use outbox_operator::relay::lsn::Lsn;
use outbox_operator::relay::pgoutput::{self, ColumnValue, PgOutputMessage};
use outbox_operator::relay::replication::{
    ReplicationConfig, ReplicationConnection, ReplicationMessage, ReplicationReader, publication_names,
};
use outbox_testbed::{Components, Postgres, unique_name};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(20);

static PG: OnceCell<Postgres> = OnceCell::const_new();

async fn pg() -> &'static Postgres {
    PG.get_or_init(|| async {
        let components = Components::locate().expect("locating test bed components");
        Postgres::start(&components).await.expect("starting PostgreSQL")
    })
    .await
}

fn config(pg: &Postgres, db: &str) -> ReplicationConfig {
    let mut c = ReplicationConfig::new(pg.host(), pg.port(), pg.user(), db);
    c.password = Some(pg.password().to_owned());
    c.ssl_mode = PgSslMode::Disable;
    c.application_name = "replication-protocol-test".to_owned();
    c.connect_timeout = Duration::from_secs(10);
    c
}

/// A database with an outbox table, a publication and a logical slot.
struct Fixture {
    pg: &'static Postgres,
    db: String,
    slot: String,
    client: tokio_postgres::Client,
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        let pg = pg().await;
        let db = unique_name(prefix);
        pg.create_database(&db).await.expect("creating database");
        let client = pg.client(&db).await.expect("connecting");
        let slot = db.replace('-', "_");
        client
            .batch_execute(
                "CREATE TABLE outbox (
                     id bigint PRIMARY KEY,
                     topic text NOT NULL,
                     payload jsonb,
                     note text
                 );
                 CREATE PUBLICATION outbox_pub FOR TABLE outbox;",
            )
            .await
            .expect("creating schema");
        client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .expect("creating slot");
        Fixture { pg, db, slot, client }
    }

    fn config(&self) -> ReplicationConfig {
        config(self.pg, &self.db)
    }

    async fn start(&self) -> ReplicationReaderAndWriter {
        let conn = ReplicationConnection::connect(&self.config())
            .await
            .expect("connecting for replication");
        let pubs = publication_names(&["outbox_pub"]).unwrap();
        let stream = conn
            .start_logical(
                &self.slot,
                Lsn::ZERO,
                &[("proto_version", "1"), ("publication_names", &pubs)],
            )
            .await
            .expect("starting replication");
        stream.split()
    }

    async fn confirmed_flush(&self) -> Lsn {
        let row = self
            .client
            .query_one(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("reading the slot");
        row.get(0)
    }
}

type ReplicationReaderAndWriter = (
    ReplicationReader,
    outbox_operator::relay::replication::ReplicationWriter,
);

/// The next pgoutput message, skipping keepalives.
async fn next_change(reader: &mut ReplicationReader) -> (Lsn, PgOutputMessage) {
    let deadline = Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), reader.next())
            .await
            .expect("timed out waiting for a change")
            .expect("reading the stream")
            .expect("stream ended");
        if let ReplicationMessage::XLogData { wal_start, data, .. } = msg {
            let decoded = pgoutput::decode(&data).expect("decoding pgoutput");
            return (wal_start, decoded);
        }
    }
}

fn text(v: &ColumnValue) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a text value: {v:?}"))
}

#[tokio::test]
async fn scram_login_and_identify_system() {
    let pg = pg().await;
    let db = unique_name("identify");
    pg.create_database(&db).await.expect("creating database");

    let mut conn = ReplicationConnection::connect(&config(pg, &db))
        .await
        .expect("SCRAM login");
    assert!(conn.backend_pid().is_some());
    assert!(conn.parameter("server_version").is_some());
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert!(!conn.is_tls());

    let id = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
    assert_ne!(id.system_id, 0);
    assert!(id.timeline >= 1);
    assert!(id.xlog_pos > Lsn::ZERO);
    assert_eq!(id.dbname.as_deref(), Some(db.as_str()));

    // Still usable after a failing command.
    let err = conn
        .simple_query("NOT A REPLICATION COMMAND")
        .await
        .expect_err("syntax error");
    assert_eq!(err.sqlstate(), Some("42601"), "{err}");
    let again = conn.identify_system().await.expect("IDENTIFY_SYSTEM again");
    assert_eq!(again.system_id, id.system_id);
    conn.close().await.expect("closing");
}

#[tokio::test]
async fn bad_credentials_are_reported_as_such() {
    let pg = pg().await;
    let mut wrong = config(pg, "postgres");
    wrong.password = Some("certainly-not-the-password".to_owned());
    let err = ReplicationConnection::connect(&wrong)
        .await
        .expect_err("wrong password");
    assert!(err.is_auth_failed(), "{err}");
    assert_eq!(err.category(), "AuthFailed");

    let mut none = config(pg, "postgres");
    none.password = None;
    let err = ReplicationConnection::connect(&none).await.expect_err("no password");
    assert_eq!(err.category(), "PasswordRequired", "{err}");

    let mut closed = config(pg, "postgres");
    closed.port = 1;
    let err = ReplicationConnection::connect(&closed)
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.category(), "ConnectFailed", "{err}");
}

#[tokio::test]
async fn md5_cleartext_and_trust_logins() {
    let pg = pg().await;
    let client = pg.client("postgres").await.unwrap();
    let suffix = unique_name("r").replace('-', "_");
    let (md5, clear, trust) = (
        format!("md5_{suffix}"),
        format!("clear_{suffix}"),
        format!("trust_{suffix}"),
    );
    client
        .batch_execute(&format!(
            "SET password_encryption = 'md5';
             CREATE ROLE {md5} LOGIN REPLICATION PASSWORD 'md5-secret';
             RESET password_encryption;
             CREATE ROLE {clear} LOGIN REPLICATION PASSWORD 'clear-secret';
             CREATE ROLE {trust} LOGIN REPLICATION;"
        ))
        .await
        .unwrap();
    // The first matching line wins, so these go in front of the bed's
    // scram-sha-256 lines.
    let hba_file: String = client
        .query_one("SELECT current_setting('hba_file')", &[])
        .await
        .unwrap()
        .get(0);
    let old = std::fs::read_to_string(&hba_file).unwrap();
    std::fs::write(
        &hba_file,
        format!(
            "host all {md5} 127.0.0.1/32 md5\n\
             host all {clear} 127.0.0.1/32 password\n\
             host all {trust} 127.0.0.1/32 trust\n{old}"
        ),
    )
    .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").await.unwrap();

    for (user, password) in [
        (&md5, Some("md5-secret")),
        (&clear, Some("clear-secret")),
        (&trust, None),
    ] {
        let mut c = config(pg, "postgres");
        c.user = user.clone();
        c.password = password.map(str::to_owned);
        // Cleartext over this plaintext connection only with the explicit opt-in
        // (tests/postgres_cleartext_password.rs shows the refusal).
        c.allow_cleartext_password = *user == clear;
        // The reload is asynchronous; the first attempts may still see the
        // old rules.
        let deadline = Instant::now() + WAIT;
        let mut conn = loop {
            match ReplicationConnection::connect(&c).await {
                Ok(conn) => break conn,
                Err(e) if Instant::now() < deadline && (e.is_auth_failed() || e.category() == "PasswordRequired") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{user}: {e}"),
            }
        };
        conn.identify_system().await.unwrap();

        if let Some(p) = password {
            c.password = Some(format!("{p}-wrong"));
            let err = ReplicationConnection::connect(&c).await.expect_err("wrong password");
            assert!(err.is_auth_failed(), "{user}: {err}");
        }
    }
}

#[tokio::test]
async fn committed_inserts_arrive_and_rollbacks_do_not() {
    let fx = Fixture::new("stream").await;

    // Written before streaming starts: the slot keeps it for us.
    let mut tx = fx.pg.client(&fx.db).await.expect("connecting");
    let t = tx.transaction().await.unwrap();
    t.execute("INSERT INTO outbox VALUES (100, 'rolled-back', NULL, NULL)", &[])
        .await
        .unwrap();
    t.rollback().await.unwrap();

    let t = tx.transaction().await.unwrap();
    t.execute(
        "INSERT INTO outbox VALUES (1, 'orders', '{\"n\": 1}', NULL), (2, 'orders', '[]', 'zwei ✓')",
        &[],
    )
    .await
    .unwrap();
    let xid: i64 = t.query_one("SELECT txid_current()", &[]).await.unwrap().get(0);
    t.commit().await.unwrap();

    let (mut reader, _writer) = fx.start().await;

    let (_, begin) = next_change(&mut reader).await;
    let PgOutputMessage::Begin(begin) = begin else {
        panic!("expected Begin, got {begin:?}")
    };
    assert_eq!(i64::from(begin.xid), xid, "the rolled-back transaction leaked");

    let (_, rel) = next_change(&mut reader).await;
    let PgOutputMessage::Relation(rel) = rel else {
        panic!("expected Relation, got {rel:?}")
    };
    assert_eq!((rel.namespace.as_str(), rel.name.as_str()), ("public", "outbox"));
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "topic", "payload", "note"]);

    for (id, payload, note) in [("1", r#"{"n": 1}"#, None), ("2", "[]", Some("zwei ✓"))] {
        let (_, ins) = next_change(&mut reader).await;
        let PgOutputMessage::Insert(ins) = ins else {
            panic!("expected Insert, got {ins:?}")
        };
        assert_eq!(ins.relation_id, rel.id);
        let c = &ins.new.columns;
        assert_eq!(text(&c[0]), id);
        assert_eq!(text(&c[1]), "orders");
        assert_eq!(text(&c[2]), payload);
        match note {
            Some(n) => assert_eq!(text(&c[3]), n),
            None => assert!(c[3].is_null()),
        }
    }

    let (_, commit) = next_change(&mut reader).await;
    let PgOutputMessage::Commit(commit) = commit else {
        panic!("expected Commit, got {commit:?}")
    };
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);

    // Nothing else is pending: only keepalives until the next write.
    fx.client
        .execute("INSERT INTO outbox VALUES (3, 'later', NULL, NULL)", &[])
        .await
        .unwrap();
    let (_, next) = next_change(&mut reader).await;
    assert!(matches!(next, PgOutputMessage::Begin(_)), "{next:?}");
    let (_, ins) = next_change(&mut reader).await;
    let PgOutputMessage::Insert(ins) = ins else {
        panic!("expected Insert, got {ins:?}")
    };
    assert_eq!(text(&ins.new.columns[0]), "3");
}

#[tokio::test]
async fn flush_position_advances_only_when_sent() {
    let fx = Fixture::new("flush").await;
    let created = fx.confirmed_flush().await;
    fx.client
        .execute("INSERT INTO outbox VALUES (1, 't', NULL, NULL)", &[])
        .await
        .unwrap();

    let (mut reader, mut writer) = fx.start().await;
    // Read in another task, the way the relay does, while this one confirms.
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let reading = tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(ReplicationMessage::XLogData { data, .. })) => {
                    if let Ok(PgOutputMessage::Commit(c)) = pgoutput::decode(&data) {
                        let _ = tx.send(c.end_lsn).await;
                    }
                }
                Ok(Some(ReplicationMessage::PrimaryKeepalive { .. })) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let end = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for the commit")
        .expect("reader stopped");

    // Receiving a transaction confirms nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fx.confirmed_flush().await, created);

    // Confirming "received but not flushed" does not move the slot either.
    writer.send_status(end, Lsn::ZERO, Lsn::ZERO, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fx.confirmed_flush().await, created);

    writer.send_status(end, end, end, false).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = fx.confirmed_flush().await;
        if now == end {
            break;
        }
        assert!(now < end, "slot moved past what we confirmed: {now} > {end}");
        assert!(Instant::now() < deadline, "slot stuck at {now}, expected {end}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Ending from our side: the server answers CopyDone and the reader ends.
    writer.finish().await.unwrap();
    tokio::time::timeout(WAIT, reading)
        .await
        .expect("reader did not end after finish")
        .unwrap()
        .expect("reader ended with an error");
}

#[tokio::test]
async fn second_reader_of_an_active_slot_is_slot_in_use() {
    let fx = Fixture::new("in-use").await;
    let (_reader, _writer) = fx.start().await;

    let conn = ReplicationConnection::connect(&fx.config()).await.unwrap();
    let pubs = publication_names(&["outbox_pub"]).unwrap();
    let err = conn
        .start_logical(
            &fx.slot,
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", &pubs)],
        )
        .await
        .expect_err("slot is already streaming");
    assert!(err.is_slot_in_use(), "{err}");
    assert!(!err.is_slot_missing());
    assert_eq!(err.category(), "SlotInUse");
}

#[tokio::test]
async fn missing_slot_is_slot_missing() {
    let fx = Fixture::new("missing").await;
    let conn = ReplicationConnection::connect(&fx.config()).await.unwrap();
    let err = conn
        .start_logical(
            "no_such_slot",
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", "\"outbox_pub\"")],
        )
        .await
        .expect_err("slot does not exist");
    assert!(err.is_slot_missing(), "{err}");
    assert!(!err.is_slot_in_use());
    assert_eq!(err.category(), "SlotMissing");
}

#[tokio::test]
async fn keepalive_replies_keep_the_session_alive() {
    let fx = Fixture::new("keepalive").await;
    // A short timeout makes the server ask for a reply after ~1 s of silence
    // and give up on us after 2 s.
    fx.client
        .batch_execute(&format!("ALTER DATABASE \"{}\" SET wal_sender_timeout = '2s'", fx.db))
        .await
        .unwrap();

    let (mut reader, mut writer) = fx.start().await;
    let mut replies = 0;
    let mut last_end = Lsn::ZERO;
    let started = Instant::now();
    // Well past the timeout: only our replies keep the walsender from
    // dropping us.
    while started.elapsed() < Duration::from_secs(6) {
        let msg = tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("no keepalive")
            .expect("session dropped although we replied")
            .expect("stream ended");
        if let ReplicationMessage::PrimaryKeepalive {
            wal_end,
            reply_requested,
            server_time,
        } = msg
        {
            assert!(wal_end >= last_end);
            last_end = wal_end;
            let skew = server_time.unix_micros() / 1_000_000
                - i64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs(),
                )
                .unwrap();
            assert!(skew.abs() < 60, "server time decoded wrongly: {server_time}");
            if reply_requested {
                writer.send_status(wal_end, Lsn::ZERO, Lsn::ZERO, false).await.unwrap();
                replies += 1;
            }
        }
    }
    assert!(replies >= 2, "server asked for only {replies} replies");

    // Without replies the server ends the session.
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match tokio::time::timeout_at(deadline.into(), reader.next())
            .await
            .expect("server kept a silent client")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("server ended the stream cleanly"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err.category(), "ConnectionClosed" | "Io" | "ServerError"),
        "{err}"
    );
}

/// Switches the server to TLS with the test certificates. Idempotent.
async fn enable_tls(pg: &Postgres) {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async {
        let client = pg.client("postgres").await.unwrap();
        // Into the data directory, owned by the server's user with the
        // private-key permissions it insists on. The test bed runs the
        // server as another user only when the tests run as root, and then
        // this process may hand the files over.
        let data_dir: String = client
            .query_one("SELECT current_setting('data_directory')", &[])
            .await
            .unwrap()
            .get(0);
        let owner = std::fs::metadata(&data_dir).unwrap();
        for (name, file) in [
            ("replication-test.crt", "server.crt"),
            ("replication-test.key", "server.key"),
        ] {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let path = std::path::Path::new(&data_dir).join(name);
            std::fs::write(&path, std::fs::read(fixture_path(file)).unwrap()).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        }
        // One statement per call: ALTER SYSTEM refuses to run in the implicit
        // transaction of a multi-statement string.
        for sql in [
            "ALTER SYSTEM SET ssl_cert_file = 'replication-test.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'replication-test.key'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await.unwrap();
        }
        // The reload is asynchronous: wait until new sessions see it.
        let deadline = Instant::now() + WAIT;
        loop {
            let fresh = pg.client("postgres").await.unwrap();
            let row = fresh
                .query_one("SELECT current_setting('ssl'), current_setting('ssl_cert_file')", &[])
                .await
                .unwrap();
            let (ssl, cert): (String, String) = (row.get(0), row.get(1));
            if ssl == "on" && cert == "replication-test.crt" {
                break;
            }
            assert!(Instant::now() < deadline, "TLS never came up: ssl={ssl} cert={cert}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn fixture_pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).expect("read CA fixture")
}

#[tokio::test]
async fn tls_modes() {
    let pg = pg().await;
    enable_tls(pg).await;
    let db = unique_name("tls");
    pg.create_database(&db).await.unwrap();

    let connect = |mode: PgSslMode, host: &str, root: Option<&str>| {
        let mut c = config(pg, &db);
        c.ssl_mode = mode;
        c.host = host.to_owned();
        c.ca_pem = root.map(fixture_pem);
        async move { ReplicationConnection::connect(&c).await }
    };

    // Encryption without verification, as libpq does for these modes.
    for mode in [PgSslMode::Prefer, PgSslMode::Require] {
        let mut conn = connect(mode, "127.0.0.1", None).await.unwrap();
        assert!(conn.is_tls(), "{mode:?}");
        conn.identify_system().await.unwrap();
    }
    let conn = connect(PgSslMode::Disable, "127.0.0.1", None).await.unwrap();
    assert!(!conn.is_tls());

    // The certificate names "localhost" only.
    let conn = connect(PgSslMode::VerifyCa, "127.0.0.1", Some("ca.crt")).await.unwrap();
    assert!(conn.is_tls());
    let mut conn = connect(PgSslMode::VerifyFull, "localhost", Some("ca.crt"))
        .await
        .unwrap();
    assert!(conn.is_tls());
    conn.identify_system().await.unwrap();
    let err = connect(PgSslMode::VerifyFull, "127.0.0.1", Some("ca.crt"))
        .await
        .expect_err("wrong name");
    assert_eq!(err.category(), "TlsHandshake", "{err}");

    // A CA that did not sign the server certificate.
    for mode in [PgSslMode::VerifyCa, PgSslMode::VerifyFull, PgSslMode::Require] {
        let err = connect(mode, "localhost", Some("other-ca.crt"))
            .await
            .expect_err("untrusted certificate");
        assert_eq!(err.category(), "TlsHandshake", "{mode:?}: {err}");
    }

    // Streaming over TLS.
    let fx = Fixture::new("tls-stream").await;
    fx.client
        .execute("INSERT INTO outbox VALUES (7, 'tls', NULL, NULL)", &[])
        .await
        .unwrap();
    let mut c = fx.config();
    c.ssl_mode = PgSslMode::VerifyFull;
    c.host = "localhost".to_owned();
    c.ca_pem = Some(fixture_pem("ca.crt"));
    let conn = ReplicationConnection::connect(&c).await.unwrap();
    let pubs = publication_names(&["outbox_pub"]).unwrap();
    let (mut reader, _writer) = conn
        .start_logical(
            &fx.slot,
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", &pubs)],
        )
        .await
        .unwrap()
        .split();
    let mut saw_insert = false;
    for _ in 0..3 {
        if let (_, PgOutputMessage::Insert(ins)) = next_change(&mut reader).await {
            assert_eq!(text(&ins.new.columns[1]), "tls");
            saw_insert = true;
            break;
        }
    }
    assert!(saw_insert);
}

#[tokio::test]
async fn large_transactions_stream_through_the_buffer() {
    let fx = Fixture::new("bulk").await;
    // Rows wider than one socket read, and many of them.
    fx.client
        .execute(
            "INSERT INTO outbox
             SELECT i, 'bulk', NULL, repeat(md5(i::text), 8000)
             FROM generate_series(1, 300) AS i",
            &[],
        )
        .await
        .unwrap();
    let (mut reader, _writer) = fx.start().await;
    let mut inserts = 0;
    loop {
        match next_change(&mut reader).await.1 {
            PgOutputMessage::Insert(ins) => {
                inserts += 1;
                assert_eq!(ins.new.columns[3].bytes().map(|b| b.len()), Some(256_000));
                assert_eq!(text(&ins.new.columns[0]), inserts.to_string());
            }
            PgOutputMessage::Commit(_) => break,
            _ => {}
        }
    }
    assert_eq!(inserts, 300);
}
