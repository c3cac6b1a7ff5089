//! Provisioning a tableless relay (`source: Messages`) against a real PostgreSQL:
//! no outbox table is needed, the publication lists no table, and the emit
//! function writes transactional messages in the relay's envelope.

use outbox_operator::api::PgSslMode;
use outbox_operator::postgres::{self, PgConnectConfig, Provisioned, QualifiedTable, messages};
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
        application_name: "message-provisioning-test".to_string(),
        allow_cleartext_password: false,
    }
}

#[tokio::test]
async fn messages_need_no_table_and_get_an_empty_publication_and_the_emit_function() {
    let bed = shared().await;
    let name = unique_name("msgprov");
    bed.pg.create_database(&name).await.expect("create database");
    let client = postgres::connect(&config(&bed.pg, &name)).await.expect("connect");
    let slot = name.replace('-', "_");

    // A database without any table passes.
    let facts = postgres::check_message_prerequisites(&client, &slot)
        .await
        .expect("prerequisites without a table");
    assert!(facts.server_version_num >= 140_000);

    assert_eq!(
        messages::ensure_publication(&client, "msg_pub").await.expect("create"),
        Provisioned::Created
    );
    assert_eq!(
        messages::ensure_publication(&client, "msg_pub").await.expect("again"),
        Provisioned::Unchanged
    );
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'msg_pub'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 0);
    // A publication that lists a table is not silently taken over.
    client
        .batch_execute("CREATE TABLE public.t (id int); CREATE PUBLICATION busy_pub FOR TABLE public.t")
        .await
        .expect("busy publication");
    let err = messages::ensure_publication(&client, "busy_pub")
        .await
        .expect_err("refused");
    assert_eq!(err.category(), "PublicationConflict", "{err}");

    // The function, in a schema of our choice, quoted as written.
    client.batch_execute("CREATE SCHEMA \"App\"").await.expect("schema");
    let function = QualifiedTable::new("App", "emit").expect("name");
    messages::ensure_emit_function(&client, &function, "orders")
        .await
        .expect("function");
    // Idempotent: run on every reconcile.
    messages::ensure_emit_function(&client, &function, "orders")
        .await
        .expect("again");
    postgres::ensure_slot(&client, &slot).await.expect("slot");

    let mut client = client;
    let tx = client.transaction().await.expect("begin");
    let lsn: Option<String> = tx
        .query_one(
            "SELECT \"App\".emit('Order', '42', 'OrderPlaced', '{\"total\": 12}'::jsonb, '{\"tenant\": \"a\"}'::jsonb)::text",
            &[],
        )
        .await
        .expect("emit")
        .get(0);
    assert!(lsn.is_some_and(|l| l.contains('/')));
    tx.commit().await.expect("commit");
    let err = client
        .query_one("SELECT \"App\".emit('Order', NULL, 'OrderPlaced', '{}'::jsonb)", &[])
        .await
        .expect_err("a NULL key fails the caller");
    assert!(format!("{err:?}").contains("aggregate_id must not be NULL"), "{err:?}");

    // What the slot holds is one transactional message in the envelope.
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'msg_pub', 'messages', 'true')",
            &[&slot],
        )
        .await
        .expect("peek");
    let mut found = Vec::new();
    for r in &rows {
        let data: Vec<u8> = r.get(0);
        if let Ok(outbox_operator::relay::pgoutput::PgOutputMessage::Message(m)) =
            outbox_operator::relay::pgoutput::decode(&bytes::Bytes::from(data))
        {
            found.push(m);
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    let m = &found[0];
    assert!(m.transactional());
    assert_eq!(m.prefix, "orders");
    let mut mapper = outbox_operator::relay::message::MessageMapper::new(
        &outbox_operator::relay::mapping::Destination::Static("t".into()),
        None,
    );
    let record = mapper
        .map(&m.content, outbox_operator::relay::pgoutput::PgTimestamp(0))
        .expect("the function writes what the relay decodes")
        .record;
    assert_eq!(record.key.as_deref(), Some(&b"42"[..]));
    assert_eq!(record.event_type.as_deref(), Some(&b"OrderPlaced"[..]));
    assert_eq!(record.payload.as_deref(), Some(&b"{\"total\": 12}"[..]));
    assert_eq!(
        record.extra_headers,
        vec![("tenant".to_string(), bytes::Bytes::from("a"))]
    );
    assert_eq!(record.event_id.as_ref().map(|i| i.len()), Some(36), "a uuid");

    postgres::drop_slot(&client, &slot).await.expect("drop slot");
}
