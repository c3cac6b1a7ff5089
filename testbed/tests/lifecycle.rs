//! The fault-test helpers work: private servers survive stop / kill / start again
//! with their data, and a dropped server is stopped and its files removed.

use std::time::{Duration, Instant};

use outbox_testbed::{Components, Kafka, Postgres, unique_name};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

fn components() -> Components {
    match Components::locate() {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn postgres_keeps_data_across_stop_and_crash() {
    let c = components();
    let started = Instant::now();
    let pg = Postgres::start(&c).await.expect("start postgres");
    eprintln!("postgres started in {:?}", started.elapsed());
    let db = unique_name("life");
    pg.create_database(&db).await.expect("create database");
    let client = pg.client(&db).await.expect("connect");
    client
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .await
        .expect("setup");
    drop(client);

    pg.stop().await.expect("stop");
    assert!(pg.client(&db).await.is_err(), "still answering after stop");
    pg.start_again().await.expect("start again");
    let client = pg.client(&db).await.expect("reconnect");
    client
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("insert after restart");
    drop(client);

    pg.kill().await.expect("kill");
    pg.start_again().await.expect("start after crash");
    let client = pg.client(&db).await.expect("reconnect after crash");
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn dropped_postgres_is_stopped_and_removed() {
    let c = components();
    let pg = Postgres::start(&c).await.expect("start postgres");
    let dir = pg.data_dir().parent().expect("temp dir").to_path_buf();
    let port = pg.port();
    drop(pg);
    assert!(
        !dir.exists() || std::env::var_os("OUTBOX_TESTBED_KEEP").is_some(),
        "{dir:?} left"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still open"
    );
}

#[tokio::test]
async fn kafka_keeps_records_across_restart() {
    let c = components();
    let started = Instant::now();
    let kafka = Kafka::start(&c).await.expect("start kafka");
    eprintln!("kafka started in {:?}", started.elapsed());
    let topic = unique_name("life");
    kafka.create_topic(&topic, 2).await.expect("create topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .expect("producer");
    let delivery = producer
        .send(
            FutureRecord::to(&topic).key("k").payload("before"),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .expect("produce");
    drop(producer);

    let started = Instant::now();
    kafka.stop().await.expect("stop");
    kafka.start_again().await.expect("start again");
    eprintln!("kafka restarted in {:?}", started.elapsed());
    kafka.kill().await.expect("kill");
    kafka.start_again().await.expect("start after crash");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", unique_name("life"))
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, delivery.partition, Offset::Offset(delivery.offset))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    let msg = loop {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => break m.detach(),
            Some(Err(e)) => panic!("consume: {e}"),
            None if Instant::now() < deadline => continue,
            None => panic!("no record within 30s"),
        }
    };
    assert_eq!(msg.payload(), Some(&b"before"[..]));
}
