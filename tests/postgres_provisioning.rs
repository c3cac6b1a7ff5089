//! Provisioning against a real PostgreSQL: prerequisites, publication, slot, slot
//! status, clean-up, and how connection failures are classified.
//!
//! Each test works in its own database of the shared test bed. Slots are
//! cluster-wide, so slot and role names carry the unique database name too. Tests
//! that need a differently configured server (wal_level, TLS) start a private one.

use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox_operator::api::{ColumnMapping, LagThresholds, PgSslMode};
use outbox_operator::postgres::{
    self, LagLevel, PgConnectConfig, PgError, Provisioned, QualifiedTable, check_prerequisites, drop_publication,
    drop_slot, ensure_publication, ensure_slot, quote_ident, quote_literal, slot_status,
};
use outbox_testbed::{Components, Postgres, shared, unique_name};
use tokio_postgres::Client;

const OUTBOX_DDL: &str = "CREATE TABLE public.outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)";

fn config(pg: &Postgres, db: &str) -> PgConnectConfig {
    PgConnectConfig {
        host: pg.host().to_string(),
        port: pg.port(),
        dbname: db.to_string(),
        user: pg.user().to_string(),
        password: Some(pg.password().to_string()),
        // The bed's server has no TLS: Prefer must fall back to plaintext.
        ssl_mode: PgSslMode::Prefer,
        ca_pem: None,
        application_name: "provisioning-test".to_string(),
        allow_cleartext_password: false,
    }
}

/// A fresh database on the shared bed, a superuser client on it, and names for
/// the objects a test creates.
struct TestDb {
    pg: &'static Postgres,
    name: String,
    /// Cluster-wide unique, valid as a slot or role name.
    slot: String,
    client: Client,
}

impl TestDb {
    async fn new(prefix: &str) -> Self {
        let bed = shared().await;
        let name = unique_name(prefix);
        bed.pg.create_database(&name).await.expect("create database");
        let client = postgres::connect(&config(&bed.pg, &name)).await.expect("connect");
        Self {
            pg: &bed.pg,
            slot: name.replace('-', "_"),
            name,
            client,
        }
    }

    async fn with_outbox(prefix: &str) -> Self {
        let db = Self::new(prefix).await;
        db.client.batch_execute(OUTBOX_DDL).await.expect("create outbox table");
        db
    }

    fn config(&self) -> PgConnectConfig {
        config(self.pg, &self.name)
    }

    async fn other_client(&self) -> Client {
        postgres::connect(&self.config()).await.expect("connect")
    }
}

fn outbox() -> QualifiedTable {
    QualifiedTable::parse("public.outbox").expect("table name")
}

async fn published_tables(client: &Client, publication: &str) -> Vec<String> {
    client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .expect("read publication tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// (insert, update, delete, truncate, via_root)
async fn publication_options(client: &Client, publication: &str) -> (bool, bool, bool, bool, bool) {
    let r = client
        .query_one(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .expect("read publication");
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

#[tokio::test]
async fn happy_path_provisions_and_is_idempotent() {
    let db = TestDb::with_outbox("prov-happy").await;
    let facts = check_prerequisites(&db.client, &outbox(), &ColumnMapping::default(), &db.slot)
        .await
        .expect("prerequisites hold");
    assert!(facts.server_version_num >= 130_000, "{facts:?}");
    assert!(facts.current_wal_lsn.contains('/'), "{facts:?}");
    assert_eq!(facts.database, db.name);
    assert!(facts.is_superuser);
    assert!(!facts.slot_exists);
    assert!(!facts.table_partitioned);

    assert_eq!(
        ensure_publication(&db.client, "outbox_pub", &outbox())
            .await
            .expect("publication"),
        Provisioned::Created
    );
    assert_eq!(
        ensure_slot(&db.client, &db.slot).await.expect("slot"),
        Provisioned::Created
    );

    // Everything again: nothing to do.
    assert_eq!(
        ensure_publication(&db.client, "outbox_pub", &outbox())
            .await
            .expect("publication"),
        Provisioned::Unchanged
    );
    assert_eq!(
        ensure_slot(&db.client, &db.slot).await.expect("slot"),
        Provisioned::Unchanged
    );
    let again = check_prerequisites(&db.client, &outbox(), &ColumnMapping::default(), &db.slot)
        .await
        .expect("prerequisites still hold");
    assert!(again.slot_exists);

    assert_eq!(published_tables(&db.client, "outbox_pub").await, ["public.outbox"]);
    assert_eq!(
        publication_options(&db.client, "outbox_pub").await,
        (true, false, false, false, true),
        "inserts only, via partition root"
    );
    let info = slot_status(&db.client, &db.slot)
        .await
        .expect("status")
        .expect("slot exists");
    assert_eq!(info.plugin.as_deref(), Some("pgoutput"));
    assert_eq!(info.database.as_deref(), Some(db.name.as_str()));
    assert!(!info.active);

    assert!(drop_slot(&db.client, &db.slot).await.expect("drop slot"));
    assert!(!drop_slot(&db.client, &db.slot).await.expect("drop missing slot"));
    assert!(
        drop_publication(&db.client, "outbox_pub")
            .await
            .expect("drop publication")
    );
    assert!(
        !drop_publication(&db.client, "outbox_pub")
            .await
            .expect("drop missing publication")
    );
    assert!(slot_status(&db.client, &db.slot).await.expect("status").is_none());
}

#[tokio::test]
async fn concurrent_callers_both_succeed() {
    let db = TestDb::with_outbox("prov-race").await;
    let other = db.other_client().await;
    let table = outbox();
    let (a, b) = tokio::join!(
        ensure_publication(&db.client, "race_pub", &table),
        ensure_publication(&other, "race_pub", &table)
    );
    let (a, b) = (a.expect("first caller"), b.expect("second caller"));
    assert!(a == Provisioned::Created || b == Provisioned::Created, "{a:?} {b:?}");

    let (a, b) = tokio::join!(ensure_slot(&db.client, &db.slot), ensure_slot(&other, &db.slot));
    let (a, b) = (a.expect("first caller"), b.expect("second caller"));
    assert!(a == Provisioned::Created || b == Provisioned::Created, "{a:?} {b:?}");
    assert_ne!(a, b, "exactly one caller creates the slot");

    drop_slot(&db.client, &db.slot).await.expect("drop slot");
}

#[tokio::test]
async fn quoted_mixed_case_and_hostile_names_work() {
    let db = TestDb::new("prov-names").await;
    let table = QualifiedTable::new("Sales Dept", r#"Out"box; --"#).expect("table name");
    let columns = ColumnMapping {
        id: "Event Id".into(),
        aggregate_type: "AggType".into(),
        aggregate_id: "agg'id".into(),
        event_type: "type".into(),
        payload: "Payload \"Data\"".into(),
        headers: Some("hdrs".into()),
        ..ColumnMapping::default()
    };
    db.client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {table} ({id} bigserial PRIMARY KEY, {at} text, {ai} text, {ty} text, {pl} bytea, {h} json)",
            schema = quote_ident(&table.schema),
            id = quote_ident(&columns.id),
            at = quote_ident(&columns.aggregate_type),
            ai = quote_ident(&columns.aggregate_id),
            ty = quote_ident(&columns.event_type),
            pl = quote_ident(&columns.payload),
            h = quote_ident("hdrs"),
        ))
        .await
        .expect("create table with odd names");
    check_prerequisites(&db.client, &table, &columns, &db.slot)
        .await
        .expect("prerequisites hold");
    let publication = r#"Pub "one""#;
    assert_eq!(
        ensure_publication(&db.client, publication, &table)
            .await
            .expect("publication"),
        Provisioned::Created
    );
    assert_eq!(
        ensure_publication(&db.client, publication, &table)
            .await
            .expect("publication"),
        Provisioned::Unchanged
    );
    assert_eq!(
        published_tables(&db.client, publication).await,
        [r#"Sales Dept.Out"box; --"#]
    );

    // quote_literal round-trips through the server, backslashes included.
    for s in ["it's", r"back\slash'", "ünïcode"] {
        let back: String = db
            .client
            .query_one(&format!("SELECT {}::text", quote_literal(s)), &[])
            .await
            .expect("literal")
            .get(0);
        assert_eq!(back, s);
    }
}

#[tokio::test]
async fn missing_table_is_reported() {
    let db = TestDb::with_outbox("prov-notable").await;
    let err = check_prerequisites(
        &db.client,
        &QualifiedTable::parse("public.nope").expect("table name"),
        &ColumnMapping::default(),
        &db.slot,
    )
    .await
    .expect_err("table is missing");
    assert!(matches!(err, PgError::TableNotFound { .. }), "{err:?}");
    assert_eq!(err.category(), "TableNotFound");

    // Names are case-sensitive: "Outbox" is not "outbox".
    let err = check_prerequisites(
        &db.client,
        &QualifiedTable::parse("public.Outbox").expect("table name"),
        &ColumnMapping::default(),
        &db.slot,
    )
    .await
    .expect_err("wrong case");
    assert_eq!(err.category(), "TableNotFound");

    // The table can also vanish between the check and the DDL.
    let err = ensure_publication(
        &db.client,
        "nope_pub",
        &QualifiedTable::parse("public.nope").expect("table name"),
    )
    .await
    .expect_err("table is missing");
    assert!(matches!(err, PgError::TableNotFound { .. }), "{err:?}");

    db.client
        .batch_execute("CREATE VIEW public.outbox_view AS SELECT * FROM public.outbox")
        .await
        .expect("create view");
    let err = check_prerequisites(
        &db.client,
        &QualifiedTable::parse("public.outbox_view").expect("table name"),
        &ColumnMapping::default(),
        &db.slot,
    )
    .await
    .expect_err("a view is not a table");
    assert!(matches!(err, PgError::NotATable { kind: "view", .. }), "{err:?}");
    assert_eq!(err.category(), "TableNotFound");
}

#[tokio::test]
async fn envelope_columns_are_checked_for_existence_and_type() {
    let db = TestDb::with_outbox("prov-envelope").await;
    db.client
        .batch_execute(
            "ALTER TABLE public.outbox ADD COLUMN shard int4, ADD COLUMN traceparent text, ADD COLUMN tenant uuid",
        )
        .await
        .expect("alter");
    let good = ColumnMapping {
        // created_at (timestamptz) is in the test bed's outbox table.
        timestamp: Some("created_at".into()),
        partition: Some("shard".into()),
        traceparent: Some("traceparent".into()),
        header_columns: vec![outbox_operator::api::HeaderColumn {
            column: "tenant".into(),
            header: "x-tenant".into(),
        }],
        ..ColumnMapping::default()
    };
    check_prerequisites(&db.client, &outbox(), &good, &db.slot)
        .await
        .expect("envelope columns of usable types");

    let text_partition = ColumnMapping {
        partition: Some("traceparent".into()),
        ..ColumnMapping::default()
    };
    let err = check_prerequisites(&db.client, &outbox(), &text_partition, &db.slot)
        .await
        .expect_err("a text partition column");
    assert!(
        matches!(err, PgError::UnsupportedColumnType { field: "partition", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("int2, int4, int8"), "{err}");

    let integer_timestamp = ColumnMapping {
        timestamp: Some("shard".into()),
        ..ColumnMapping::default()
    };
    let err = check_prerequisites(&db.client, &outbox(), &integer_timestamp, &db.slot)
        .await
        .expect_err("an integer timestamp column");
    assert!(
        matches!(err, PgError::UnsupportedColumnType { field: "timestamp", .. }),
        "{err:?}"
    );

    let missing_header = ColumnMapping {
        header_columns: vec![outbox_operator::api::HeaderColumn {
            column: "region".into(),
            header: "x-region".into(),
        }],
        ..ColumnMapping::default()
    };
    let err = check_prerequisites(&db.client, &outbox(), &missing_header, &db.slot)
        .await
        .expect_err("a missing header column");
    assert!(
        matches!(err, PgError::ColumnNotFound { field: "headerColumns", ref column, .. } if column == "region"),
        "{err:?}"
    );
}

#[tokio::test]
async fn missing_or_unsuitable_columns_are_reported() {
    let db = TestDb::with_outbox("prov-cols").await;
    let columns = ColumnMapping {
        aggregate_id: "aggregate_id".into(),
        ..ColumnMapping::default()
    };
    let err = check_prerequisites(&db.client, &outbox(), &columns, &db.slot)
        .await
        .expect_err("column is missing");
    match &err {
        PgError::ColumnNotFound { column, field, .. } => {
            assert_eq!(column, "aggregate_id");
            assert_eq!(*field, "aggregateId");
        }
        other => panic!("expected ColumnNotFound, got {other:?}"),
    }
    assert_eq!(err.category(), "ColumnNotFound");

    let headers = ColumnMapping {
        headers: Some("headers".into()),
        ..ColumnMapping::default()
    };
    let err = check_prerequisites(&db.client, &outbox(), &headers, &db.slot)
        .await
        .expect_err("headers column is missing");
    assert!(
        matches!(err, PgError::ColumnNotFound { field: "headers", .. }),
        "{err:?}"
    );

    db.client
        .batch_execute(
            "CREATE TABLE public.bad_payload (id bigint, aggregatetype text, aggregateid text, type text, payload integer);
             CREATE DOMAIN event_body AS jsonb;
             CREATE TABLE public.domain_payload (id bigint, aggregatetype text, aggregateid text, type text, payload event_body);
             CREATE TABLE public.generated_payload (id bigint, aggregatetype text, aggregateid text, type text,
                 payload text GENERATED ALWAYS AS (type || '!') STORED);",
        )
        .await
        .expect("create tables");
    let err = check_prerequisites(
        &db.client,
        &QualifiedTable::parse("public.bad_payload").expect("table name"),
        &ColumnMapping::default(),
        &db.slot,
    )
    .await
    .expect_err("integer payload");
    assert!(
        matches!(err, PgError::UnsupportedColumnType { field: "payload", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("integer"), "{err}");
    assert_eq!(err.category(), "UnsupportedColumnType");

    check_prerequisites(
        &db.client,
        &QualifiedTable::parse("public.domain_payload").expect("table name"),
        &ColumnMapping::default(),
        &db.slot,
    )
    .await
    .expect("a domain over jsonb is a fine payload");

    let err = check_prerequisites(
        &db.client,
        &QualifiedTable::parse("public.generated_payload").expect("table name"),
        &ColumnMapping::default(),
        &db.slot,
    )
    .await
    .expect_err("generated columns are not replicated");
    assert!(err.to_string().contains("generated"), "{err}");
}

#[tokio::test]
async fn role_without_replication_is_refused() {
    let db = TestDb::with_outbox("prov-priv").await;
    let role = format!("{}_role", db.slot);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            quote_ident(&role),
            quote_literal("role-pw")
        ))
        .await
        .expect("create role");
    let cfg = PgConnectConfig {
        user: role.clone(),
        password: Some("role-pw".into()),
        ..db.config()
    };
    let client = postgres::connect(&cfg).await.expect("connect as the role");
    let err = check_prerequisites(&client, &outbox(), &ColumnMapping::default(), &db.slot)
        .await
        .expect_err("no REPLICATION attribute");
    assert!(matches!(err, PgError::InsufficientPrivilege { .. }), "{err:?}");
    assert_eq!(err.category(), "InsufficientPrivilege");
    assert!(err.to_string().contains("REPLICATION"), "{err}");

    // With REPLICATION it passes, but creating a publication for someone else's
    // table still needs ownership: the server's 42501 keeps its category.
    db.client
        .batch_execute(&format!("ALTER ROLE {} REPLICATION", quote_ident(&role)))
        .await
        .expect("grant replication");
    let client = postgres::connect(&cfg).await.expect("connect as the role");
    check_prerequisites(&client, &outbox(), &ColumnMapping::default(), &db.slot)
        .await
        .expect("prerequisites hold with REPLICATION");
    let err = ensure_publication(&client, "priv_pub", &outbox())
        .await
        .expect_err("not the table's owner");
    assert_eq!(err.category(), "InsufficientPrivilege", "{err:?}");
    assert_eq!(
        ensure_slot(&client, &db.slot).await.expect("slot"),
        Provisioned::Created
    );
    assert!(drop_slot(&client, &db.slot).await.expect("drop slot"));
    drop(client);
    // Best effort: the role's session may still be closing.
    let _ = db
        .client
        .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&role)))
        .await;
}

#[tokio::test]
async fn wrong_credentials_are_authentication_failures() {
    let db = TestDb::new("prov-auth").await;
    let wrong = PgConnectConfig {
        password: Some("definitely-wrong".into()),
        ..db.config()
    };
    let err = postgres::connect(&wrong).await.expect_err("wrong password");
    assert!(matches!(err, PgError::AuthenticationFailed { .. }), "{err:?}");
    assert_eq!(err.category(), "AuthenticationFailed");

    let none = PgConnectConfig {
        password: None,
        ..db.config()
    };
    let err = postgres::connect(&none).await.expect_err("no password");
    assert_eq!(err.category(), "AuthenticationFailed", "{err:?}");

    let unknown_user = PgConnectConfig {
        user: format!("{}_nobody", db.slot),
        ..db.config()
    };
    let err = postgres::connect(&unknown_user).await.expect_err("unknown user");
    assert_eq!(err.category(), "AuthenticationFailed", "{err:?}");
}

#[tokio::test]
async fn missing_database_is_reported() {
    let bed = shared().await;
    let err = postgres::connect(&config(&bed.pg, &unique_name("prov-nodb")))
        .await
        .expect_err("no such database");
    assert!(matches!(err, PgError::DatabaseNotFound { .. }), "{err:?}");
    assert_eq!(err.category(), "DatabaseNotFound");
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let bed = shared().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cfg = PgConnectConfig {
        port,
        ..config(&bed.pg, "postgres")
    };
    let started = Instant::now();
    let err = postgres::connect(&cfg).await.expect_err("nothing listens");
    assert!(matches!(err, PgError::DatabaseUnreachable { .. }), "{err:?}");
    assert_eq!(err.category(), "DatabaseUnreachable");
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5), "refused must fail fast");
}

#[tokio::test]
async fn silent_server_times_out_as_unreachable() {
    // Accepts TCP connections and never answers, like a black-holed proxy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let cfg = PgConnectConfig {
        host: "127.0.0.1".into(),
        port,
        dbname: "postgres".into(),
        user: "postgres".into(),
        password: Some("x".into()),
        ssl_mode: PgSslMode::Prefer,
        ca_pem: None,
        application_name: "provisioning-test".into(),
        allow_cleartext_password: false,
    };
    let started = Instant::now();
    let err = postgres::connect(&cfg).await.expect_err("no answer");
    assert_eq!(err.category(), "DatabaseUnreachable", "{err:?}");
    let waited = started.elapsed();
    assert!(
        waited >= postgres::CONNECT_TIMEOUT && waited < postgres::CONNECT_TIMEOUT * 2,
        "{waited:?}"
    );
    holder.abort();
}

#[tokio::test]
async fn require_tls_against_plaintext_server_fails_clearly() {
    let db = TestDb::new("prov-notls").await;
    let cfg = PgConnectConfig {
        ssl_mode: PgSslMode::Require,
        ..db.config()
    };
    let err = postgres::connect(&cfg).await.expect_err("server has no TLS");
    assert_eq!(err.category(), "TlsHandshakeFailed", "{err:?}");
    assert!(err.to_string().contains("does not support TLS"), "{err}");
}

#[tokio::test]
async fn slot_status_reports_growing_lag() {
    let db = TestDb::with_outbox("prov-lag").await;
    ensure_publication(&db.client, "lag_pub", &outbox())
        .await
        .expect("publication");
    ensure_slot(&db.client, &db.slot).await.expect("slot");
    let before = slot_status(&db.client, &db.slot)
        .await
        .expect("status")
        .expect("slot exists");
    let lag_before = before.lag_bytes.expect("lag is known");
    assert!(lag_before >= 0);
    assert_eq!(before.wal_status.as_deref(), Some("reserved"));
    assert!(before.confirmed_flush_lsn.as_deref().is_some_and(|l| l.contains('/')));
    assert!(before.restart_lsn.is_some());

    db.client
        .batch_execute(
            "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'order', g::text, 'created', jsonb_build_object('pad', repeat('x', 1000), 'n', g)
             FROM generate_series(1, 2000) g",
        )
        .await
        .expect("insert events");

    let after = slot_status(&db.client, &db.slot)
        .await
        .expect("status")
        .expect("slot exists");
    let lag_after = after.lag_bytes.expect("lag is known");
    assert!(
        lag_after > lag_before + 1_000_000,
        "before {lag_before}, after {lag_after}"
    );
    assert!(after.retained_bytes.expect("retained is known") >= lag_after);
    assert_eq!(after.confirmed_flush_lsn, before.confirmed_flush_lsn, "nobody consumed");

    let thresholds = LagThresholds {
        warning_bytes: 1_000_000,
        critical_bytes: 1_000_000_000,
    };
    assert_eq!(after.lag_level(&thresholds), LagLevel::Warning);
    assert_eq!(after.lag_level(&LagThresholds::default()), LagLevel::Ok);
    assert_eq!(after.to_status().lag_bytes, Some(lag_after));

    drop_slot(&db.client, &db.slot).await.expect("drop slot");
}

#[tokio::test]
async fn drop_slot_frees_a_slot_held_by_a_streaming_session() {
    let db = TestDb::with_outbox("prov-drop").await;
    ensure_publication(&db.client, "drop_pub", &outbox())
        .await
        .expect("publication");
    ensure_slot(&db.client, &db.slot).await.expect("slot");

    let mut receiver = tokio::process::Command::new(db.pg.bin_dir().join("pg_recvlogical"))
        .arg("--dbname")
        .arg(format!(
            "host={} port={} user={} dbname={}",
            db.pg.host(),
            db.pg.port(),
            db.pg.user(),
            db.name
        ))
        .args(["--slot", &db.slot, "--start", "--no-loop", "--file", "-"])
        .args(["--option", "proto_version=1", "--option", "publication_names=drop_pub"])
        .env("PGPASSWORD", db.pg.password())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start pg_recvlogical");

    let deadline = Instant::now() + Duration::from_secs(20);
    let holder = loop {
        let info = slot_status(&db.client, &db.slot)
            .await
            .expect("status")
            .expect("slot exists");
        if info.active {
            break info.active_pid.expect("an active slot has a pid");
        }
        assert!(Instant::now() < deadline, "pg_recvlogical never took the slot");
        assert!(
            receiver.try_wait().expect("poll child").is_none(),
            "pg_recvlogical exited early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(holder > 0);

    assert!(drop_slot(&db.client, &db.slot).await.expect("drop active slot"));
    assert!(slot_status(&db.client, &db.slot).await.expect("status").is_none());
    let status = tokio::time::timeout(Duration::from_secs(10), receiver.wait())
        .await
        .expect("pg_recvlogical ends once its session is terminated")
        .expect("wait for pg_recvlogical");
    assert!(!status.success());
}

#[tokio::test]
async fn publication_drift_is_repaired() {
    let db = TestDb::with_outbox("prov-drift").await;
    let server_version: i32 = db
        .client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .expect("version")
        .get(0);
    db.client
        .batch_execute(
            "CREATE TABLE public.other (id int PRIMARY KEY);
             CREATE PUBLICATION wide FOR TABLE public.outbox, public.other
                 WITH (publish = 'insert, update, delete, truncate');
             CREATE PUBLICATION empty;
             CREATE PUBLICATION only_other FOR TABLE public.other WITH (publish = 'insert');",
        )
        .await
        .expect("create drifted publications");

    for name in ["wide", "empty", "only_other"] {
        assert_eq!(
            ensure_publication(&db.client, name, &outbox()).await.expect("repair"),
            Provisioned::Updated,
            "{name}"
        );
        assert_eq!(published_tables(&db.client, name).await, ["public.outbox"], "{name}");
        assert_eq!(
            publication_options(&db.client, name).await,
            (true, false, false, false, true),
            "{name}"
        );
        assert_eq!(
            ensure_publication(&db.client, name, &outbox()).await.expect("recheck"),
            Provisioned::Unchanged,
            "{name}"
        );
    }

    // Row filters and TABLES IN SCHEMA exist from PostgreSQL 15 on.
    if server_version >= 150_000 {
        db.client
            .batch_execute(
                "CREATE PUBLICATION filtered FOR TABLE public.outbox WHERE (type = 'x')
                     WITH (publish = 'insert', publish_via_partition_root = true);
                 CREATE PUBLICATION by_schema FOR TABLES IN SCHEMA public
                     WITH (publish = 'insert', publish_via_partition_root = true);",
            )
            .await
            .expect("create filtered publications");
        for name in ["filtered", "by_schema"] {
            assert_eq!(
                ensure_publication(&db.client, name, &outbox()).await.expect("repair"),
                Provisioned::Updated,
                "{name}"
            );
            assert_eq!(
                ensure_publication(&db.client, name, &outbox()).await.expect("recheck"),
                Provisioned::Unchanged,
                "{name}"
            );
            assert_eq!(published_tables(&db.client, name).await, ["public.outbox"], "{name}");
        }
        let filters: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                 WHERE p.pubname = 'filtered' AND pr.prqual IS NOT NULL",
                &[],
            )
            .await
            .expect("read row filters")
            .get(0);
        assert_eq!(filters, 0, "the row filter is gone");
    }

    db.client
        .batch_execute("CREATE PUBLICATION everything FOR ALL TABLES")
        .await
        .expect("create FOR ALL TABLES publication");
    let err = ensure_publication(&db.client, "everything", &outbox())
        .await
        .expect_err("cannot narrow FOR ALL TABLES");
    assert_eq!(err.category(), "PublicationConflict", "{err:?}");
}

#[tokio::test]
async fn partitioned_outbox_is_published_via_its_root() {
    let db = TestDb::new("prov-part").await;
    db.client
        .batch_execute(
            "CREATE TABLE public.outbox (id bigint, aggregatetype text, aggregateid text, type text,
                 payload jsonb, created_at date NOT NULL) PARTITION BY RANGE (created_at);
             CREATE TABLE public.outbox_2026 PARTITION OF public.outbox
                 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
        )
        .await
        .expect("create partitioned table");
    let facts = check_prerequisites(&db.client, &outbox(), &ColumnMapping::default(), &db.slot)
        .await
        .expect("prerequisites hold");
    assert!(facts.table_partitioned);
    assert_eq!(
        ensure_publication(&db.client, "part_pub", &outbox())
            .await
            .expect("publication"),
        Provisioned::Created
    );
    assert_eq!(published_tables(&db.client, "part_pub").await, ["public.outbox"]);
}

#[tokio::test]
async fn foreign_slots_with_our_name_are_conflicts() {
    let db = TestDb::with_outbox("prov-conflict").await;
    let other_db = TestDb::new("prov-conflict-other").await;

    // Same name, other database.
    other_db
        .client
        .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&db.slot])
        .await
        .expect("create slot in the other database");
    let err = ensure_slot(&db.client, &db.slot)
        .await
        .expect_err("slot of another database");
    assert_eq!(err.category(), "SlotConflict", "{err:?}");
    assert!(err.to_string().contains(&other_db.name), "{err}");
    drop_slot(&db.client, &db.slot).await.expect("drop");

    // Same name, other plugin.
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&db.slot],
        )
        .await
        .expect("create test_decoding slot");
    let err = ensure_slot(&db.client, &db.slot).await.expect_err("wrong plugin");
    assert_eq!(err.category(), "SlotConflict", "{err:?}");
    assert!(err.to_string().contains("test_decoding"), "{err}");
    drop_slot(&db.client, &db.slot).await.expect("drop");

    // Same name, physical.
    db.client
        .execute("SELECT pg_create_physical_replication_slot($1)", &[&db.slot])
        .await
        .expect("create physical slot");
    let err = ensure_slot(&db.client, &db.slot).await.expect_err("physical slot");
    assert_eq!(err.category(), "SlotConflict", "{err:?}");
    drop_slot(&db.client, &db.slot).await.expect("drop");

    let err = ensure_slot(&db.client, "Not-Valid").await.expect_err("bad slot name");
    assert_eq!(err.category(), "InvalidSpec");
}

/// Starts a private server (the shared one must stay as it is).
async fn private_server() -> Postgres {
    let components = Components::locate().expect("test bed components");
    Postgres::start(&components).await.expect("start private postgres")
}

#[tokio::test]
async fn wal_level_replica_is_reported() {
    let components = Components::locate().expect("test bed components");
    let pg = Postgres::with_wal_level(&components, "replica")
        .await
        .expect("private postgres");

    let client = postgres::connect(&config(&pg, "postgres")).await.expect("connect");
    client.batch_execute(OUTBOX_DDL).await.expect("create outbox");
    let err = check_prerequisites(&client, &outbox(), &ColumnMapping::default(), "any_slot")
        .await
        .expect_err("wal_level is replica");
    assert_eq!(
        err,
        PgError::WalLevelNotLogical {
            actual: "replica".into()
        }
    );
    assert_eq!(err.category(), "WalLevelNotLogical");
    assert!(err.to_string().contains("restart"), "{err}");
    pg.stop().await.expect("stop");
}

#[tokio::test]
async fn slot_limit_is_reported() {
    let pg = private_server().await;
    let client = postgres::connect(&config(&pg, "postgres")).await.expect("connect");
    client.batch_execute(OUTBOX_DDL).await.expect("create outbox");
    let max: i64 = client
        .query_one("SELECT current_setting('max_replication_slots')::int8", &[])
        .await
        .expect("read max_replication_slots")
        .get(0);
    // Physical slots are cheap and count against the same limit.
    for i in 0..max {
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1)",
                &[&format!("filler_{i}")],
            )
            .await
            .expect("create filler slot");
    }
    let err = check_prerequisites(&client, &outbox(), &ColumnMapping::default(), "ours")
        .await
        .expect_err("no free slot");
    assert_eq!(err, PgError::SlotLimitReached { max, used: max });
    assert_eq!(err.category(), "SlotLimitReached");
    // Creating anyway (the limit was reached after the check) gives the same error.
    let err = ensure_slot(&client, "ours").await.expect_err("no free slot");
    assert_eq!(err.category(), "SlotLimitReached", "{err:?}");

    // An existing slot of ours needs no free one.
    drop_slot(&client, "filler_0").await.expect("drop filler");
    ensure_slot(&client, "ours").await.expect("slot");
    let facts = check_prerequisites(&client, &outbox(), &ColumnMapping::default(), "ours")
        .await
        .expect("our slot exists");
    assert!(facts.slot_exists);
    assert_eq!(facts.replication_slots_used, max);
    pg.stop().await.expect("stop");
}

/// Writes a CA and a server certificate for `localhost` (DNS name only, so a
/// connection to 127.0.0.1 matches the chain but not the name).
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for (name, cn) in [("ca", "provisioning-test-ca"), ("other-ca", "unrelated-ca")] {
        let subject = format!("/CN={cn}");
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subject]);
        run(&args);
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    run(&args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write extensions");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

#[tokio::test]
async fn tls_modes_follow_libpq() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    let pg = private_server().await;
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    // The server reads its key as its own user, which owns the data directory.
    let owner = std::fs::metadata(pg.data_dir()).expect("data dir");
    for f in ["server.crt", "server.key"] {
        let dest = pg.data_dir().join(f);
        std::fs::copy(certs.path().join(f), &dest).expect("copy certificate");
        std::os::unix::fs::chown(&dest, Some(owner.uid()), Some(owner.gid())).expect("chown");
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let admin = pg.client("postgres").await.expect("connect");
    // Two statements: ALTER SYSTEM refuses to run inside the implicit transaction of a batch.
    admin
        .batch_execute("ALTER SYSTEM SET ssl = on")
        .await
        .expect("enable ssl");
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    drop(admin);

    let ca = std::fs::read(certs.path().join("ca.crt")).expect("read CA");
    let other_ca = std::fs::read(certs.path().join("other-ca.crt")).expect("read CA");
    let cfg = |mode, ca_pem: Option<&Vec<u8>>, host: &str| PgConnectConfig {
        host: host.to_string(),
        ssl_mode: mode,
        ca_pem: ca_pem.cloned(),
        ..config(&pg, "postgres")
    };
    async fn uses_tls(cfg: &PgConnectConfig) -> Result<bool, PgError> {
        let client = postgres::connect(cfg).await?;
        Ok(client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .expect("read pg_stat_ssl")
            .get(0))
    }

    // The reload is asynchronous: wait until TLS is offered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !uses_tls(&cfg(PgSslMode::Prefer, None, "127.0.0.1"))
        .await
        .expect("connect")
    {
        assert!(Instant::now() < deadline, "server never offered TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let ok = |r: Result<bool, PgError>, what: &str| match r {
        Ok(tls) => tls,
        Err(e) => panic!("{what}: {e}"),
    };
    assert!(!ok(
        uses_tls(&cfg(PgSslMode::Disable, None, "127.0.0.1")).await,
        "disable"
    ));
    assert!(ok(
        uses_tls(&cfg(PgSslMode::Require, None, "127.0.0.1")).await,
        "require"
    ));
    assert!(ok(
        uses_tls(&cfg(PgSslMode::Require, Some(&ca), "127.0.0.1")).await,
        "require+CA"
    ));
    assert!(ok(
        uses_tls(&cfg(PgSslMode::VerifyCa, Some(&ca), "127.0.0.1")).await,
        "verify-ca, name mismatch"
    ));
    assert!(ok(
        uses_tls(&cfg(PgSslMode::VerifyFull, Some(&ca), "localhost")).await,
        "verify-full"
    ));

    let failures = [
        (cfg(PgSslMode::VerifyFull, Some(&ca), "127.0.0.1"), "not valid for name"),
        (cfg(PgSslMode::VerifyCa, Some(&other_ca), "127.0.0.1"), "UnknownIssuer"),
        // Require with a CA verifies the chain, as libpq does with a root certificate.
        (cfg(PgSslMode::Require, Some(&other_ca), "127.0.0.1"), "UnknownIssuer"),
    ];
    for (c, why) in failures {
        let err = uses_tls(&c).await.expect_err(why);
        assert_eq!(err.category(), "TlsHandshakeFailed", "{why}: {err:?}");
        assert!(err.to_string().contains(why), "{err}");
    }
    let err = postgres::connect(&cfg(PgSslMode::VerifyFull, None, "localhost"))
        .await
        .expect_err("no CA");
    assert_eq!(err.category(), "TlsConfigInvalid");
    pg.stop().await.expect("stop");
}
