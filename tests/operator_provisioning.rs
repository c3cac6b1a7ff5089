//! The operator turns an `OutboxRelay` into a publication and slot in PostgreSQL and
//! a worker Deployment, reports it in the status, writes the status only when it
//! changes, and scales the worker to zero on suspend while keeping the slot.
//!
//! One test in this binary, on purpose: the no-op check wants a server whose WAL
//! position barely moves, and other tests on the same server would move it.

mod operator_support;

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use operator_support::{Harness, IMAGE, SECRET, condition, env_of};
use outbox_operator::api::OutboxRelay;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_is_provisioned_reported_and_suspended() {
    let h = Harness::start("op-prov").await;
    let (slot, publication) = h.default_names("orders");
    h.create_relay("orders", h.spec(json!({}))).await;

    // The finalizer comes first: nothing outside Kubernetes is created without it.
    let r = h
        .await_relay("orders", "the cleanup finalizer", |r| {
            r.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == "outbox.dev/cleanup"))
        })
        .await;
    assert!(r.metadata.finalizers.as_ref().is_some_and(|f| f.len() == 1));

    let r = h
        .await_condition("orders", "DatabaseReady", "True", Some("Provisioned"))
        .await;
    assert!(h.slot_exists(&slot).await, "slot {slot} exists");
    assert!(
        h.publication_exists(&publication).await,
        "publication {publication} exists"
    );

    // No pods on the bed, so no worker is available yet and the relay is not Ready.
    let (status, reason, _) = condition(&r, "WorkerAvailable");
    assert_eq!(status, "False", "{:?}", r.status);
    assert!(
        reason == "WorkerProgressing" || reason == "WorkerUnavailable",
        "{reason}"
    );
    assert_eq!(condition(&r, "Ready").0, "False");
    assert_eq!(condition(&r, "SlotHealthy").0, "True");
    let st = r.status.clone().unwrap_or_default();
    assert_eq!(st.observed_generation, r.metadata.generation);
    assert_eq!(st.destination.as_deref(), Some("orders.events"));
    let slot_status = st.slot.clone().expect("status.slot");
    assert_eq!(slot_status.name, slot);
    assert!(!slot_status.active);
    assert!(
        slot_status.confirmed_flush_lsn.is_some() && slot_status.lag_bytes.is_some(),
        "{slot_status:?}"
    );
    for c in &st.conditions {
        assert_eq!(c.observed_generation, r.metadata.generation, "{c:?}");
        assert!(!c.message.is_empty(), "{c:?}");
    }

    // The worker Deployment as rendered.
    let d = h.await_deployment("orders-relay").await;
    let owner = &d.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("OutboxRelay", "orders"));
    assert_eq!(owner.controller, Some(true));
    assert_eq!(Some(owner.uid.clone()), r.metadata.uid);
    let labels = d.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "outbox-operator");
    assert_eq!(labels["app.kubernetes.io/instance"], "orders");
    let spec = d.spec.clone().expect("deployment spec");
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.clone().expect("pod spec");
    assert_eq!(pod.containers[0].image.as_deref(), Some(IMAGE));
    let env = env_of(&d);
    assert_eq!(env["OUTBOX_RELAY_NAME"]["value"], "orders");
    assert_eq!(env["OUTBOX_RELAY_NAMESPACE"]["value"], h.ns.as_str());
    for (var, key) in [("OUTBOX_DB_USERNAME", "username"), ("OUTBOX_DB_PASSWORD", "password")] {
        assert_eq!(
            env[var]["valueFrom"]["secretKeyRef"],
            json!({"name": SECRET, "key": key, "optional": false})
        );
        assert!(env[var].get("value").is_none(), "{var} must not be inline");
    }
    let worker_spec: serde_json::Value =
        serde_json::from_str(env["OUTBOX_RELAY_SPEC"]["value"].as_str().expect("spec env")).expect("spec json");
    assert_eq!(worker_spec["replication"]["slotName"], slot.as_str());
    let hash = spec.template.metadata.and_then(|m| m.annotations).unwrap_or_default();
    assert!(hash.contains_key("outbox.dev/credentials-hash"), "{hash:?}");

    // The bed has no kubelet: report a pod as the Deployment controller would.
    h.set_available("orders-relay", 1).await;
    let r = h.await_condition("orders", "Ready", "True", Some("Relaying")).await;
    assert_eq!(condition(&r, "WorkerAvailable").0, "True");

    // Steady state: reconciles keep coming (requeue every 2 s) but write only when
    // something changed. The server's WAL position can still move a little (the
    // background writer logs running transactions), which is a real lag change.
    let written = |h: &Harness| {
        h.metric("outbox_operator_status_updates_total{outcome=\"written\"}")
            .unwrap_or(0.0)
    };
    let skipped = |h: &Harness| {
        h.metric("outbox_operator_status_updates_total{outcome=\"unchanged\"}")
            .unwrap_or(0.0)
    };
    // Let the reconcile triggered by the last write run out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deployment_before = h.deployments().get("orders-relay").await.expect("get");
    let confirmed = |h: &Harness| {
        h.metric("outbox_operator_database_passes_total{pass=\"confirmed\"}")
            .unwrap_or(0.0)
    };
    let (w0, s0, c0) = (written(&h), skipped(&h), confirmed(&h));
    let mut seen: Vec<OutboxRelay> = vec![h.relays().get("orders").await.expect("get")];
    let window = Instant::now() + Duration::from_secs(9);
    while Instant::now() < window {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = h.relays().get("orders").await.expect("get");
        if seen.last().map(|l| &l.metadata.resource_version) != Some(&r.metadata.resource_version) {
            seen.push(r);
        }
    }
    let deployment_after = h.deployments().get("orders-relay").await.expect("get");
    assert!(
        skipped(&h) >= s0 + 2.0,
        "reconciles kept running without writing\n{}",
        h.dump("orders").await
    );
    // A steady relay's database side is confirmed from the database's shared
    // snapshot, not from statements of its own every pass.
    assert!(
        confirmed(&h) >= c0 + 2.0,
        "steady passes were not confirmed from the shared snapshot\n{}",
        h.dump("orders").await
    );
    let writes = written(&h) - w0;
    assert!(
        writes <= (seen.len() - 1) as f64,
        "{writes} status writes but only {} changes of the relay: writes that change nothing\n{}",
        seen.len() - 1,
        h.dump("orders").await
    );
    for pair in seen.windows(2) {
        let (a, b) = (
            pair[0].status.clone().unwrap_or_default(),
            pair[1].status.clone().unwrap_or_default(),
        );
        assert_ne!(
            a.slot, b.slot,
            "a status write without a slot change\nbefore: {a:?}\nafter: {b:?}"
        );
        for c in &b.conditions {
            let old = a
                .conditions
                .iter()
                .find(|o| o.type_ == c.type_)
                .expect("same conditions");
            assert_eq!(
                (&old.status, &old.last_transition_time),
                (&c.status, &c.last_transition_time),
                "a lag change must not flip or re-time {}",
                c.type_
            );
        }
    }
    assert_eq!(
        deployment_before.metadata.resource_version, deployment_after.metadata.resource_version,
        "re-applying the Deployment is a no-op"
    );

    // Metrics for this relay.
    let labels = format!("{{namespace=\"{}\",name=\"orders\"}}", h.ns);
    assert_eq!(h.metric(&format!("outbox_operator_ready{labels}")), Some(1.0));
    assert_eq!(h.metric(&format!("outbox_operator_slot_active{labels}")), Some(0.0));
    assert_eq!(h.metric(&format!("outbox_operator_slot_wal_lost{labels}")), Some(0.0));
    assert!(h.metric(&format!("outbox_operator_slot_lag_bytes{labels}")).is_some());
    assert!(
        h.metric(&format!("outbox_operator_slot_retained_bytes{labels}"))
            .is_some()
    );
    assert!(
        h.metric("outbox_operator_reconcile_duration_seconds_count")
            .unwrap_or(0.0)
            >= 3.0
    );
    assert!(h.handle.is_ready());

    // Suspend: zero replicas, slot kept, Ready with reason Suspended.
    h.relays()
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .expect("suspend");
    let r = h
        .await_condition("orders", "WorkerAvailable", "False", Some("Suspended"))
        .await;
    assert_eq!(condition(&r, "Ready").1, "Suspended");
    let d = h.deployments().get("orders-relay").await.expect("get");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(0));
    assert!(h.slot_exists(&slot).await, "the slot outlives a suspension");
    h.await_event("orders", "Suspended").await;

    h.stop().await;
}
