//! Proves the test bed runs real servers: logical decoding in PostgreSQL, a Kafka
//! round trip, and a kube-apiserver reachable both from kube-rs and from kubectl.
//! If these fail, every other integration test would fail for the same reason.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use outbox_testbed::{shared, unique_name};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

#[tokio::test]
async fn postgres_has_logical_decoding_with_pgoutput() {
    let bed = shared().await;
    let db = unique_name("smoke");
    bed.pg.create_database(&db).await.expect("create database");
    let client = bed.pg.client(&db).await.expect("connect");

    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("SHOW wal_level")
        .get(0);
    assert_eq!(wal_level, "logical");

    client
        .batch_execute(
            "CREATE TABLE outbox (id bigserial PRIMARY KEY, payload text NOT NULL);
             CREATE PUBLICATION pub FOR TABLE outbox;",
        )
        .await
        .expect("create table and publication");
    // The slot must exist before the insert for the insert to be decoded.
    client
        .execute(
            "SELECT pg_create_logical_replication_slot('smoke_slot', 'pgoutput')",
            &[],
        )
        .await
        .expect("create logical slot");
    client
        .execute("INSERT INTO outbox (payload) VALUES ('hello')", &[])
        .await
        .expect("insert");

    let rows = client
        .query(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_binary_changes(
                 'smoke_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'pub')",
            &[],
        )
        .await
        .expect("peek changes");
    // BEGIN, RELATION, INSERT, COMMIT: the first byte of each pgoutput message is its tag.
    let tags: Vec<u8> = rows.iter().map(|r| r.get::<_, Vec<u8>>(2)[0]).collect();
    assert!(
        tags.contains(&b'I'),
        "no INSERT message among {:?}",
        tags_as_chars(&tags)
    );
    let insert = rows
        .iter()
        .map(|r| r.get::<_, Vec<u8>>(2))
        .find(|d| d[0] == b'I')
        .expect("insert message");
    assert!(
        insert.windows(5).any(|w| w == b"hello"),
        "the inserted value is not in the decoded INSERT"
    );

    client
        .execute("SELECT pg_drop_replication_slot('smoke_slot')", &[])
        .await
        .expect("drop slot");
}

fn tags_as_chars(tags: &[u8]) -> Vec<char> {
    tags.iter().map(|&t| char::from(t)).collect()
}

#[tokio::test]
async fn kafka_record_round_trips() {
    let bed = shared().await;
    let topic = unique_name("smoke");
    bed.kafka.create_topic(&topic, 1).await.expect("create topic");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bed.kafka.bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let delivery = producer
        .send(
            FutureRecord::to(&topic).key("k1").payload("v1"),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .expect("produce");
    assert_eq!(delivery.partition, 0);
    let offset = delivery.offset;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bed.kafka.bootstrap())
        .set("group.id", unique_name("smoke-group"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(offset))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a record within 30s")
        .expect("consume");
    assert_eq!(msg.key(), Some(&b"k1"[..]));
    assert_eq!(msg.payload(), Some(&b"v1"[..]));
    assert_eq!(msg.offset(), offset);
}

#[tokio::test]
async fn kube_apiserver_answers_kube_rs_and_kubectl() {
    let bed = shared().await;
    let client = bed.kube.client().await.expect("kube client");
    let namespaces: Api<Namespace> = Api::all(client);

    let listed = namespaces.list(&ListParams::default()).await.expect("list namespaces");
    let names: Vec<_> = listed.items.iter().filter_map(|n| n.metadata.name.clone()).collect();
    assert!(names.iter().any(|n| n == "kube-system"), "namespaces: {names:?}");

    let name = unique_name("smoke");
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");

    // kubectl through the written kubeconfig sees the same namespace.
    let mut kubectl = bed.kube.kubectl();
    kubectl.args(["get", "ns", &name, "-o", "name"]);
    let out = tokio::task::spawn_blocking(move || kubectl.output())
        .await
        .expect("join")
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("namespace/{name}"));
}
