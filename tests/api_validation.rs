//! The CRD installs into a real kube-apiserver, good resources are accepted and
//! listed by `kubectl get outboxrelays` with their printer columns, and bad ones
//! are refused by the API server itself with a message that names the field.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, Resource};
use outbox_operator::api::OutboxRelay;
use outbox_testbed::{shared, unique_name};
use serde_json::{Value, json};

async fn namespace(client: &Client) -> String {
    let ns = unique_name("api");
    let api: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create namespace");
    ns
}

fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxRelay",
        "metadata": {"name": name},
        "spec": {
            "database": {"host": "orders-db", "database": "orders", "credentialsSecretRef": {"name": "orders-db"}},
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": "kafka:9092", "topic": "orders.events"}
        }
    })
}

fn dynamic_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<OutboxRelay>(&());
    Api::namespaced_with(client.clone(), ns, &ar)
}

async fn create(api: &Api<DynamicObject>, obj: Value) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj).await
}

/// Sets `path` (dot-separated, under the object) to `value`; `Value::Null` removes it.
fn with(mut obj: Value, path: &str, value: Value) -> Value {
    let mut cur = &mut obj;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .as_object_mut()
            .expect("object")
            .entry(p.to_string())
            .or_insert_with(|| json!({}));
    }
    let last = parts[parts.len() - 1];
    let map = cur.as_object_mut().expect("object");
    if value.is_null() {
        map.remove(last);
    } else {
        map.insert(last.to_string(), value);
    }
    obj
}

#[tokio::test]
async fn valid_resource_is_accepted_and_listed_with_printer_columns() {
    let bed = shared().await;
    let client = bed.kube.client().await.expect("client");
    bed.kube.install_crd(&OutboxRelay::crd()).await.expect("install CRD");
    let ns = namespace(&client).await;
    let api = dynamic_api(&client, &ns);
    let created = create(&api, valid("orders")).await.expect("valid resource accepted");

    // Defaults are filled in by the API server from the schema.
    let spec = &created.data["spec"];
    assert_eq!(spec["database"]["port"], json!(5432));
    assert_eq!(spec["cleanupPolicy"], json!("Delete"));
    assert_eq!(spec["outbox"]["columns"]["aggregateId"], json!("aggregateid"));
    assert_eq!(spec["kafka"]["producer"]["compression"], json!("lz4"));

    // Status as the operator writes it, so the columns have something to show.
    let typed: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let status = json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "status": {
            "destination": "orders.events",
            "slot": {"name": "outbox_api_orders", "active": true, "lagBytes": 4096},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Relaying", "message": "events flow",
                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1
            }]
        }
    });
    typed
        .patch_status(
            "orders",
            &PatchParams::apply("outbox-tests").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("status patch");

    let out = bed
        .kube
        .kubectl()
        .args(["get", "outboxrelays", "-n", &ns])
        .output()
        .expect("kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "TABLE", "TOPIC", "LAG", "AGE"], "{text}");
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["orders", "True", "public.outbox", "orders.events", "4096"],
        "{text}"
    );

    // Short name and the wide view with the extra columns.
    let wide = bed
        .kube
        .kubectl()
        .args(["get", "obr", "-n", &ns, "-o", "wide"])
        .output()
        .expect("kubectl");
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert!(
        wide.contains("REASON") && wide.contains("Relaying") && wide.contains("outbox_api_orders"),
        "{wide}"
    );
}

/// A valid relay with `source: Messages` (no table).
fn messages() -> Value {
    let obj = with(valid("messages"), "spec.outbox", json!({"source": "Messages"}));
    with(obj, "metadata.name", json!("messages"))
}

/// Each case: what to change in a valid resource, and what the refusal must say.
fn invalid_cases() -> Vec<(&'static str, Value, &'static str)> {
    let v = || valid("bad");
    vec![
        (
            "missing host",
            with(v(), "spec.database.host", Value::Null),
            "spec.database.host: Required value",
        ),
        (
            "port out of range",
            with(v(), "spec.database.port", json!(70000)),
            "spec.database.port",
        ),
        (
            "unknown cleanup policy",
            with(v(), "spec.cleanupPolicy", json!("Destroy")),
            "spec.cleanupPolicy: Unsupported value",
        ),
        (
            "messages with a table",
            with(v(), "spec.outbox.source", json!("Messages")),
            "leave it out for source Messages",
        ),
        (
            "table source without a table",
            with(v(), "spec.outbox.table", Value::Null),
            "set spec.outbox.table for source Table",
        ),
        (
            "message settings with source Table",
            with(v(), "spec.outbox.messages", json!({"prefix": "orders"})),
            "only read with source Messages",
        ),
        (
            "messages deleting rows",
            with(messages(), "spec.outbox.deleteAfterRelay", json!(true)),
            "deleteAfterRelay needs a table",
        ),
        (
            "messages with managed partitions",
            with(
                messages(),
                "spec.outbox.partitions",
                json!({"column": "created_at", "interval": "Daily", "retention": "7d"}),
            ),
            "partitions need a table",
        ),
        (
            "messages routed by a column",
            with(
                with(messages(), "spec.kafka.topic", Value::Null),
                "spec.kafka.routeBy",
                json!({"column": "kind"}),
            ),
            "routes by the envelope's aggregateType",
        ),
        (
            "bad message prefix",
            with(messages(), "spec.outbox.messages", json!({"prefix": "has space"})),
            "spec.outbox.messages.prefix",
        ),
        (
            "table without schema",
            with(v(), "spec.outbox.table", json!("outbox")),
            "spec.outbox.table",
        ),
        (
            "topic and routeBy together",
            with(v(), "spec.kafka.routeBy", json!({"column": "aggregatetype"})),
            "set exactly one of topic and routeBy",
        ),
        (
            "neither topic nor routeBy",
            with(v(), "spec.kafka.topic", Value::Null),
            "set exactly one of topic and routeBy",
        ),
        (
            "template without placeholder",
            with(
                with(v(), "spec.kafka.topic", Value::Null),
                "spec.kafka.routeBy",
                json!({"topicTemplate": "events"}),
            ),
            "spec.kafka.routeBy.topicTemplate",
        ),
        (
            "invalid topic name",
            with(v(), "spec.kafka.topic", json!("orders/events")),
            "spec.kafka.topic",
        ),
        (
            "slot name with capitals",
            with(v(), "spec.replication.slotName", json!("Orders-Slot")),
            "spec.replication.slotName",
        ),
        (
            "warning lag above critical",
            with(
                v(),
                "spec.replication.lag",
                json!({"warningBytes": 10, "criticalBytes": 5}),
            ),
            "spec.replication.lag.warningBytes",
        ),
        (
            "SASL without credentials",
            with(
                v(),
                "spec.kafka.security",
                json!({"protocol": "SaslSsl", "saslMechanism": "SCRAM-SHA-512"}),
            ),
            "spec.kafka.security.credentialsSecretRef",
        ),
        (
            "producer config weakening acks",
            with(v(), "spec.kafka.producer.config", json!({"acks": "1"})),
            "spec.kafka.producer.config",
        ),
        (
            "tiny max message size",
            with(v(), "spec.kafka.producer.maxMessageBytes", json!(10)),
            "spec.kafka.producer.maxMessageBytes",
        ),
        (
            "three replicas",
            with(v(), "spec.worker.replicas", json!(3)),
            "spec.worker.replicas",
        ),
        (
            "dead letter without topic",
            with(v(), "spec.delivery.poisonPolicy", json!("DeadLetter")),
            "spec.delivery.deadLetterTopic",
        ),
        (
            "verify-full without CA",
            with(v(), "spec.database.tls", json!({"mode": "VerifyFull"})),
            "spec.database.tls.caSecretRef",
        ),
        (
            "unknown compression",
            with(v(), "spec.kafka.producer.compression", json!("brotli")),
            "spec.kafka.producer.compression",
        ),
        (
            "tracestate without traceparent",
            with(v(), "spec.outbox.columns.tracestate", json!("ts")),
            "tracestate needs traceparent",
        ),
        (
            "tracestate and traceparent from one column",
            with(
                with(v(), "spec.outbox.columns.tracestate", json!("trace")),
                "spec.outbox.columns.traceparent",
                json!("trace"),
            ),
            "tracestate and traceparent must name different columns",
        ),
        (
            "header column under a reserved name",
            with(
                v(),
                "spec.outbox.columns.headerColumns",
                json!([{"column": "tenant", "header": "ce_tenant"}]),
            ),
            "header is reserved",
        ),
        (
            "header column under a reserved name in capitals",
            with(
                v(),
                "spec.outbox.columns.headerColumns",
                json!([{"column": "ct", "header": "Content-Type"}]),
            ),
            "header is reserved",
        ),
        (
            "two header columns under one name",
            with(
                v(),
                "spec.outbox.columns.headerColumns",
                json!([{"column": "a", "header": "x"}, {"column": "b", "header": "x"}]),
            ),
            "spec.outbox.columns.headerColumns[1]: Duplicate value",
        ),
        (
            "content type that is not one",
            with(v(), "spec.kafka.cloudEvents", json!({"contentType": "json"})),
            "spec.kafka.cloudEvents.contentType",
        ),
        (
            "polling without its settings",
            with(v(), "spec.mode", json!("Polling")),
            "set spec.polling (at least orderColumn) with mode Polling",
        ),
        (
            "polling settings without polling",
            with(v(), "spec.polling", json!({"orderColumn": "seq"})),
            "leave it out with mode Replication",
        ),
        (
            "polling messages",
            with(
                with(messages(), "spec.mode", json!("Polling")),
                "spec.polling",
                json!({"orderColumn": "seq"}),
            ),
            "mode Polling reads rows of spec.outbox.table",
        ),
        (
            "polling batch too large",
            with(
                with(v(), "spec.mode", json!("Polling")),
                "spec.polling",
                json!({"orderColumn": "seq", "batchSize": 100000}),
            ),
            "spec.polling.batchSize",
        ),
        (
            "unknown mode",
            with(v(), "spec.mode", json!("Trigger")),
            "spec.mode: Unsupported value",
        ),
    ]
}

/// Every envelope option at once, as a user would write them.
fn with_envelope(obj: Value) -> Value {
    let obj = with(
        obj,
        "spec.kafka.cloudEvents",
        json!({"source": "urn:shop:orders", "contentType": "application/json; charset=utf-8"}),
    );
    with(
        obj,
        "spec.outbox.columns",
        json!({
            "timestamp": "occurred_at", "partition": "shard",
            "traceparent": "traceparent", "tracestate": "tracestate",
            "headerColumns": [{"column": "tenant", "header": "x-tenant"}, {"column": "region", "header": "x-region"}]
        }),
    )
}

#[tokio::test]
async fn invalid_resources_are_refused_naming_the_field() {
    let bed = shared().await;
    let client = bed.kube.client().await.expect("client");
    bed.kube.install_crd(&OutboxRelay::crd()).await.expect("install CRD");
    let ns = namespace(&client).await;
    let api = dynamic_api(&client, &ns);
    let cases = invalid_cases();
    assert!(cases.len() >= 8);
    let mut failures = Vec::new();
    for (i, (what, obj, expect)) in cases.into_iter().enumerate() {
        let obj = with(obj, "metadata.name", json!(format!("bad-{i}")));
        match create(&api, obj).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains(expect) => {}
            Err(e) => failures.push(format!("{what}: expected 422 mentioning {expect:?}, got {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    create(&api, with_envelope(valid("envelope")))
        .await
        .expect("every envelope option together is accepted");
    let created = create(&api, messages()).await.expect("a tableless relay is accepted");
    assert_eq!(created.data["spec"]["outbox"]["source"], json!("Messages"));
    // Switching the source, or the prefix, is an identity change.
    for patch in [
        json!({"spec": {"outbox": {"source": "Table", "table": "public.outbox"}}}),
        json!({"spec": {"outbox": {"messages": {"prefix": "other"}}}}),
    ] {
        let e = api
            .patch("messages", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect_err("identity change refused");
        assert!(
            e.to_string()
                .contains("spec.outbox.source and spec.outbox.messages.prefix are immutable"),
            "{e}"
        );
    }
    let same = json!({"spec": {"outbox": {"messages": {"prefix": "outbox", "function": "app.emit"}}}});
    api.patch("messages", &PatchParams::default(), &Patch::Merge(&same))
        .await
        .expect("the function can move");
}

/// A field a relay is created with: (path, value).
type Field = Option<(&'static str, Value)>;

/// Identity fields: (what, created with, merge patch, text of the refusal).
fn identity_changes() -> Vec<(&'static str, Field, Value, &'static str)> {
    let slot = Some(("spec.replication.slotName", json!("pinned_slot")));
    let publication = Some(("spec.replication.publicationName", json!("pinned_pub")));
    vec![
        (
            "change host",
            None,
            json!({"spec": {"database": {"host": "elsewhere"}}}),
            "spec.database (host, port, database) is immutable",
        ),
        (
            "change port",
            None,
            json!({"spec": {"database": {"port": 6543}}}),
            "spec.database (host, port, database) is immutable",
        ),
        (
            "change database",
            None,
            json!({"spec": {"database": {"database": "other"}}}),
            "spec.database (host, port, database) is immutable",
        ),
        (
            "change table",
            None,
            json!({"spec": {"outbox": {"table": "public.other"}}}),
            "spec.outbox.table is immutable",
        ),
        (
            "add slotName",
            None,
            json!({"spec": {"replication": {"slotName": "new_slot"}}}),
            "slotName is immutable",
        ),
        (
            "remove slotName",
            slot.clone(),
            json!({"spec": {"replication": {"slotName": null}}}),
            "slotName is immutable",
        ),
        (
            "change slotName",
            slot,
            json!({"spec": {"replication": {"slotName": "other_slot"}}}),
            "slotName is immutable",
        ),
        (
            "add publicationName",
            None,
            json!({"spec": {"replication": {"publicationName": "new_pub"}}}),
            "publicationName is immutable",
        ),
        (
            "remove publicationName",
            publication.clone(),
            json!({"spec": {"replication": {"publicationName": null}}}),
            "publicationName is immutable",
        ),
        (
            "change publicationName",
            publication,
            json!({"spec": {"replication": {"publicationName": "other_pub"}}}),
            "publicationName is immutable",
        ),
        (
            "switch to polling",
            None,
            json!({"spec": {"mode": "Polling", "polling": {"orderColumn": "seq"}}}),
            "spec.mode is immutable",
        ),
    ]
}

#[tokio::test]
async fn identity_cannot_change_after_creation() {
    let bed = shared().await;
    let client = bed.kube.client().await.expect("client");
    bed.kube.install_crd(&OutboxRelay::crd()).await.expect("install CRD");
    let ns = namespace(&client).await;
    let api = dynamic_api(&client, &ns);
    let mut failures = Vec::new();
    for (i, (what, created_with, patch, expect)) in identity_changes().into_iter().enumerate() {
        let name = format!("id-{i}");
        let obj = match created_with {
            Some((path, value)) => with(valid(&name), path, value),
            None => valid(&name),
        };
        create(&api, obj)
            .await
            .unwrap_or_else(|e| panic!("{what}: create: {e}"));
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) if e.to_string().contains(expect) && e.to_string().contains("create a new OutboxRelay") => {}
            Err(e) => failures.push(format!("{what}: refused, but the message lacks {expect:?}: {e}")),
        }
        // Other fields stay editable.
        let ok = json!({"spec": {"kafka": {"producer": {"lingerMs": 20}}, "drainTimeoutSeconds": 30}});
        if let Err(e) = api.patch(&name, &PatchParams::default(), &Patch::Merge(&ok)).await {
            failures.push(format!("{what}: an unrelated edit was refused: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(OutboxRelay::kind(&()), "OutboxRelay");
}

/// Every guarantee-bearing or TLS-weakening librdkafka property and every alias
/// of one is refused by the API server; every allow-listed tuning key passes.
#[tokio::test]
async fn producer_config_refuses_every_protected_key_and_alias() {
    use outbox_operator::kafka::keys;
    let bed = shared().await;
    let client = bed.kube.client().await.expect("client");
    bed.kube.install_crd(&OutboxRelay::crd()).await.expect("install CRD");
    let ns = namespace(&client).await;
    let api = dynamic_api(&client, &ns);
    let mut refused: Vec<&str> = keys::PROTECTED
        .iter()
        .flat_map(|p| std::iter::once(p.key).chain(p.aliases.iter().copied()))
        .collect();
    refused.extend(["dr_msg_cb", "dr_cb", "ssl.key.password", "some.unknown.key"]);
    for k in [
        "delivery.timeout.ms",
        "request.required.acks",
        "queue.buffering.max.ms",
        "linger.ms",
    ] {
        assert!(refused.contains(&k), "{k} is tried");
    }
    let mut failures = Vec::new();
    for (i, key) in refused.iter().enumerate() {
        let obj = with(
            valid(&format!("cfg-{i}")),
            "spec.kafka.producer.config",
            json!({ *key: "1" }),
        );
        match create(&api, obj).await {
            Ok(_) => failures.push(format!("{key}: accepted")),
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("spec.kafka.producer.config") => {}
            Err(e) => failures.push(format!("{key}: expected 422 naming the field, got {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let all: serde_json::Map<String, Value> = keys::ALLOWED.iter().map(|k| (k.to_string(), json!("1"))).collect();
    create(
        &api,
        with(valid("cfg-tuning"), "spec.kafka.producer.config", Value::Object(all)),
    )
    .await
    .expect("every allow-listed key is accepted");
}
