//! What a user gets wrong shows up on the resource: `Ready=False` with a reason to
//! grep for and a message that names the object and says what to do, plus a
//! Warning Event with the same reason. Fixing the cause heals the relay without a
//! restart of the operator.

mod operator_support;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use operator_support::{Harness, Options, SECRET, closed_port, condition};
use outbox_testbed::{Components, Postgres, shared};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_is_named_and_healed_when_created() {
    let h = Harness::start_with(
        "op-nosecret",
        Options {
            secret: false,
            ..Options::default()
        },
    )
    .await;
    h.create_relay("orders", h.spec(json!({}))).await;
    let r = h
        .await_condition("orders", "Ready", "False", Some("SecretNotFound"))
        .await;
    let (_, _, message) = condition(&r, "Ready");
    assert!(message.contains(&format!("\"{SECRET}\"")), "{message}");
    assert!(message.contains("create it"), "{message}");
    assert_eq!(condition(&r, "DatabaseReady").1, "SecretNotFound");
    let note = h.await_event("orders", "SecretNotFound").await;
    assert!(note.contains(SECRET), "{note}");
    // Nothing was rendered without credentials.
    assert!(h.deployments().get_opt("orders-relay").await.expect("get").is_none());

    // Creating the Secret triggers a reconcile through the Secret watch (the requeue
    // backoff alone would take longer than this wait allows after a few failures).
    h.create_secret(SECRET, h.pg.user(), h.pg.password()).await;
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    h.await_deployment("orders-relay").await;

    // The operator guards the Secret its cleanup needs: a delete leaves it in place
    // (Terminating) while the relay lives, like a PersistentVolumeClaim in use.
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &h.ns);
    let guarded = secrets.get(SECRET).await.expect("get secret");
    assert!(
        guarded
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "outbox.dev/in-use"),
        "{:?}",
        guarded.metadata.finalizers
    );

    // A Secret without the key the spec names.
    let patch = json!({"data": {"password": null}});
    secrets
        .patch(SECRET, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("drop the password key");
    let r = h
        .await_condition("orders", "Ready", "False", Some("SecretKeyMissing"))
        .await;
    let (_, _, message) = condition(&r, "Ready");
    assert!(message.contains("\"password\""), "{message}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_table_not_found() {
    let h = Harness::start_with(
        "op-notable",
        Options {
            table: false,
            ..Options::default()
        },
    )
    .await;
    h.create_relay("orders", h.spec(json!({}))).await;
    let r = h
        .await_condition("orders", "Ready", "False", Some("TableNotFound"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(message.contains("public.outbox"), "{message}");
    assert!(message.contains("spec.outbox.table"), "{message}");
    assert_eq!(condition(&r, "SlotHealthy").0, "False");
    h.await_event("orders", "TableNotFound").await;
    // The Deployment is still applied: the worker's settings do not wait for the database.
    h.await_deployment("orders-relay").await;

    // Creating the table heals it on the next retry.
    h.sql()
        .await
        .batch_execute(operator_support::OUTBOX_DDL)
        .await
        .expect("create table");
    h.await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_is_database_unreachable() {
    let h = Harness::start("op-unreach").await;
    let port = closed_port();
    h.create_relay("orders", h.spec(json!({"database": {"port": port}})))
        .await;
    let r = h
        .await_condition("orders", "Ready", "False", Some("DatabaseUnreachable"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(
        h.metric("outbox_operator_reconcile_errors_total{kind=\"DatabaseUnreachable\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_wal_level_not_logical() {
    // wal_level cannot change on the shared server; this test gets a private one.
    let components = Components::locate().expect("test bed components");
    let pg: &'static Postgres = Box::leak(Box::new(
        Postgres::with_wal_level(&components, "replica")
            .await
            .expect("private postgres"),
    ));

    let h = Harness::start_on(pg, shared().await, "op-wal", Options::default()).await;
    h.create_relay("orders", h.spec(json!({}))).await;
    let r = h
        .await_condition("orders", "Ready", "False", Some("WalLevelNotLogical"))
        .await;
    let (_, _, message) = condition(&r, "DatabaseReady");
    assert!(
        message.contains("wal_level = logical") && message.contains("restart"),
        "{message}"
    );
    h.stop().await;
}
