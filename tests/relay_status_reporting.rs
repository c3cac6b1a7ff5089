//! Every stop is explained in the resource's status. The worker writes its own
//! `Delivering` condition (field manager `outbox-relay-worker`) through the
//! per-relay ServiceAccount and Role the operator renders; the operator folds a
//! False `Delivering` into `Ready`. The way out of a Stop is the
//! `outbox.dev/skip-event` annotation: the named event is parked, the relay goes
//! on, and status and a Warning Event record it. Real API server, PostgreSQL and
//! Kafka; the worker runs in-process, authenticated as its ServiceAccount.

mod operator_support;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use outbox_operator::api::OutboxRelay;
use outbox_operator::api::conditions::{find, types};
use outbox_operator::relay::config::{Credentials, RelayConfig, Tuning};
use outbox_operator::relay::worker::{self, RelayHandle};
use serde_json::json;
use tokio::sync::watch;

/// A client that acts as the worker's ServiceAccount (impersonation), so the
/// test proves the rendered Role is enough, and no more than that.
async fn worker_client(ns: &str, sa: &str) -> kube::Client {
    let bed = outbox_testbed::shared().await;
    let kc = Kubeconfig::read_from(bed.kube.kubeconfig_path()).expect("kubeconfig");
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{sa}"));
    kube::Client::try_from(cfg).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_is_explained_in_status_and_a_skip_annotation_gets_past_it() {
    let bed = outbox_testbed::shared().await;
    let h = operator_support::Harness::start("status-report").await;
    let topic = format!("{}.events", h.ns);
    bed.kafka.create_topic(&topic, 1).await.expect("topic");
    let name = "orders";
    let spec = h.spec(
        json!({"kafka": {"bootstrapServers": bed.kafka.bootstrap(), "topic": topic,
        "producer": {"maxMessageBytes": 2048, "lingerMs": 2}}}),
    );
    h.create_relay(name, spec).await;
    let deployment = h
        .await_deployment(&outbox_operator::controller::build::deployment_name(name))
        .await;
    let sa = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.service_account_name.clone())
        .expect("the worker runs as its own ServiceAccount");
    let dname = deployment.metadata.name.clone().expect("name");
    h.set_available(&dname, 1).await;
    h.await_condition(name, types::READY, "True", Some("Relaying")).await;

    // The worker, as the pod would run it, reporting as its ServiceAccount.
    let relay: OutboxRelay = h.relays().get(name).await.expect("relay");
    let creds = Credentials {
        db_username: h.pg.user().into(),
        db_password: Some(h.pg.password().into()),
        ..Credentials::default()
    };
    let mut cfg = RelayConfig::from_spec(&h.ns, name, &relay.spec, &creds).expect("config");
    cfg.report_status = true;
    cfg.tuning = Tuning {
        min_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
        ..Tuning::default()
    };
    let client = worker_client(&h.ns, &sa).await;
    // Least privilege, on the real API server: its own relay yes, anything else no.
    let own: kube::Api<OutboxRelay> = kube::Api::namespaced(client.clone(), &h.ns);
    assert!(own.get(name).await.is_ok(), "get its own relay");
    assert!(own.list(&Default::default()).await.is_err(), "list relays: forbidden");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), &h.ns);
    assert!(
        secrets.get(operator_support::SECRET).await.is_err(),
        "Secrets: forbidden"
    );

    let handle = RelayHandle::new();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(worker::run_with(cfg, handle.clone(), rx, Some(client)));
    h.await_condition(name, types::DELIVERING, "True", Some("Relaying"))
        .await;

    let sql = h.sql().await;
    let insert = |pad: i32| {
        let sql = &sql;
        async move {
            sql.query_one(
                "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                 VALUES ('Order', 'a', 'OrderCreated', jsonb_build_object('pad', repeat('x', $1::int)))
                 RETURNING id::text",
                &[&pad],
            )
            .await
            .expect("insert")
            .get::<_, String>(0)
        }
    };
    let big = insert(8000).await;
    let after = insert(10).await;

    // The worker's condition names the event and the way out; Ready follows it.
    let r = h
        .await_condition(name, types::DELIVERING, "False", Some("MessageTooLarge"))
        .await;
    let c = find(&r.status.as_ref().expect("status").conditions, types::DELIVERING).expect("Delivering");
    println!(
        "Delivering: status={} reason={} message={}",
        c.status, c.reason, c.message
    );
    assert!(c.message.contains(&big), "{}", c.message);
    let skip = c
        .message
        .split_whitespace()
        .find_map(|w| w.strip_prefix("outbox.dev/skip-event="))
        .map(|w| w.trim_end_matches(['.', ',']).to_string())
        .expect("skip hint");
    let r = h
        .await_condition(name, types::READY, "False", Some("MessageTooLarge"))
        .await;
    let ready = find(&r.status.as_ref().expect("status").conditions, types::READY).expect("Ready");
    println!(
        "Ready: status={} reason={} message={}",
        ready.status, ready.reason, ready.message
    );
    assert!(ready.message.contains(&skip), "{}", ready.message);
    let managers: Vec<String> = r
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.iter().any(|m| m == "outbox-relay-worker"), "{managers:?}");

    // The way out: annotate; the next retry parks exactly that event.
    let patch = json!({"metadata": {"annotations": {"outbox.dev/skip-event": skip}}});
    h.relays()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
    let r = h
        .await_relay(name, "lastSkippedEvent", |r| {
            r.status.as_ref().and_then(|s| s.last_skipped_event.as_deref()) == Some(skip.as_str())
        })
        .await;
    assert!(r.status.is_some());
    h.await_condition(name, types::DELIVERING, "True", Some("Relaying"))
        .await;
    h.await_condition(name, types::READY, "True", Some("Relaying")).await;
    let note = h.await_event(name, "EventSkipped").await;
    println!("Event EventSkipped: {note}");
    assert!(note.contains(&skip), "{note}");
    let got = support::consume_async(
        &bed.kafka.bootstrap(),
        &topic,
        &HashSet::from([after.clone()]),
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let ids: Vec<_> = got.iter().filter_map(|r| r.id.clone()).collect();
    assert!(ids.contains(&after) && !ids.contains(&big), "{ids:?}");
    let parked = sql
        .query_one(
            "SELECT count(*) FROM public.outbox_parked WHERE event_id = $1 AND skipped",
            &[&big],
        )
        .await
        .expect("park table");
    assert_eq!(parked.get::<_, i64>(0), 1);

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    h.stop().await;
}
