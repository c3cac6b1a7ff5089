//! End-to-end demo on a real single-node Kubernetes cluster: the test bed starts
//! etcd, kube-apiserver, the controller-manager, the scheduler, containerd, the
//! kubelet and kube-proxy in private namespaces, with PostgreSQL and Kafka beside
//! them. The operator image is built from the Dockerfile around the binary (podman,
//! no registry) and loaded into the node;
//! the chart is installed with Helm (two operator replicas, one Lease); an
//! `OutboxRelay` is applied and the kubelet runs its worker pods; an "orders
//! service" commits orders with their outbox events (some transactions roll back);
//! the events appear in Kafka; deleting the relay garbage-collects its pods.
//!
//! Run with `hack/demo` (it builds the binary and fetches the components first).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use outbox_operator::api::OutboxRelay;
use outbox_testbed::cluster::Cluster;
use outbox_testbed::http_get;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

const NS: &str = "shop";
const RELAY: &str = "orders";
const ORDERS: usize = 60;
const IMAGE: &str = "localhost/outbox-operator:demo";
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");

fn say(msg: impl AsRef<str>) {
    println!("\n\x1b[1m▶ {}\x1b[0m", msg.as_ref());
}

fn main() -> ExitCode {
    outbox_testbed::cluster::run_isolated(demo)
}

/// Runs kubectl against the cluster and prints its output, indented.
fn kubectl(c: &Cluster, args: &[&str]) -> Result<(), Error> {
    let out = c.kube.kubectl().args(args).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    if !out.status.success() {
        return Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

async fn demo() -> Result<(), Error> {
    let bin = operator_binary()?;
    say("Starting a single-node cluster (kubelet, containerd, kube-proxy, controllers) with PostgreSQL and Kafka");
    let cluster = Cluster::start().await?;
    let c = &cluster;
    println!("  cluster usable after {:.1}s", c.startup.as_secs_f32());
    println!("  kubernetes {}", c.kube.server_url());
    println!("  postgres   {}:{}", c.pg.host(), c.pg.port());
    println!("  kafka      {}", c.kafka.bootstrap());
    kubectl(c, &["get", "nodes", "-o", "wide"])?;

    say(format!(
        "Building image {IMAGE} from {} and loading it into the node",
        bin.display()
    ));
    let t = Instant::now();
    c.load_binary_image(&bin, IMAGE).await?;
    println!("  done in {:.1}s", t.elapsed().as_secs_f32());

    say("helm install outbox-operator: two replicas, leader election on a Lease");
    let (repo, tag) = IMAGE.split_once(':').ok_or("image without tag")?;
    let out = c
        .kube
        .helm()
        .args([
            "install",
            "outbox-operator",
            CHART,
            "-n",
            "outbox-system",
            "--create-namespace",
        ])
        .args([
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
        ])
        .args(["--set", "image.pullPolicy=Never", "--set", "requeueSeconds=5", "--wait"])
        .output()?;
    if !out.status.success() {
        return Err(format!("helm install: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let client = c.kube.client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "outbox-system");
    let leader = wait_for(Duration::from_secs(60), "a leader", || async {
        leases
            .get_opt("outbox-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    })
    .await?;
    kubectl(c, &["get", "pods", "-n", "outbox-system", "-o", "wide"])?;
    println!("  Lease outbox-operator held by {leader}");

    say("Creating the shop database: an orders table and a Debezium-style outbox table");
    c.pg.create_database("shop").await?;
    let mut db = c.pg.client("shop").await?;
    db.batch_execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL);
         CREATE TABLE outbox (
           id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
           aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
           payload jsonb NOT NULL, headers jsonb);",
    )
    .await?;
    c.kafka.create_topic("outbox.event.Order", 3).await?;

    say(format!(
        "kubectl apply: namespace {NS}, the database Secret, OutboxRelay {RELAY} (2 workers: active + standby)"
    ));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "shop-db"},
                "stringData": {"username": c.pg.user(), "password": c.pg.password()}
            }))?,
        )
        .await?;
    let relay = json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": RELAY, "namespace": NS},
        "spec": {
            "database": {"host": c.pg.host(), "port": c.pg.port(), "database": "shop",
                         "tls": {"mode": "Disable"}, "credentialsSecretRef": {"name": "shop-db"}},
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": c.kafka.bootstrap(),
                      "routeBy": {"column": "aggregatetype", "topicTemplate": "outbox.event.${routedByValue}"}},
            "cleanupPolicy": "Delete",
            "worker": {"replicas": 2}
        }
    });
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), NS);
    relays
        .create(&PostParams::default(), &serde_json::from_value(relay)?)
        .await?;

    say("The operator provisions publication and slot; the kubelet runs the worker pods");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    let workers = wait_for(Duration::from_secs(90), "two Ready worker pods", || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        let ready: Vec<Pod> = list.items.into_iter().filter(pod_ready).collect();
        (ready.len() == 2).then_some(ready)
    })
    .await?;
    println!("  Ready after {:.1}s", t.elapsed().as_secs_f32());
    kubectl(c, &["get", "pods", "-n", NS, "-o", "wide"])?;
    for p in &workers {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        let phase = http_get(&format!("{ip}:8080"), "/readyz").await.map(|(_, b)| b);
        println!(
            "  {} /readyz: {}",
            p.metadata.name.as_deref().unwrap_or("?"),
            phase.unwrap_or_default()
        );
    }

    say(format!(
        "The orders service commits {ORDERS} orders; every 5th transaction rolls back"
    ));
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    for i in 1..=ORDERS {
        let tx = db.transaction().await?;
        let order: i64 = tx
            .query_one(
                "INSERT INTO orders (customer, total) VALUES ($1, $2::float8::numeric) RETURNING id",
                &[&format!("customer-{}", i % 7), &(i as f64 * 9.5)],
            )
            .await?
            .get(0);
        let id: String = tx
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
                 VALUES ('Order', $1, 'OrderPlaced', jsonb_build_object('order', $2::int8, 'placedAt', clock_timestamp()))
                 RETURNING id::text",
                &[&format!("order-{order}"), &order],
            )
            .await?
            .get(0);
        if i % 5 == 0 {
            tx.rollback().await?;
            rolled_back.insert(id);
        } else {
            tx.commit().await?;
            committed.insert(id);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    println!("  {} committed, {} rolled back", committed.len(), rolled_back.len());

    say("Reading topic outbox.event.Order");
    let bootstrap = c.kafka.bootstrap();
    let expect = committed.clone();
    let records = tokio::task::spawn_blocking(move || read_topic(&bootstrap, "outbox.event.Order", &expect)).await??;
    for r in records.iter().take(8) {
        println!("  {r}");
    }
    if records.len() > 8 {
        println!("  … {} more", records.len() - 8);
    }
    let seen: HashSet<&String> = records.iter().map(|r| &r.id).collect();
    let delivered = committed.iter().filter(|id| seen.contains(id)).count();
    let ghosts = rolled_back.iter().filter(|id| seen.contains(id)).count();
    println!(
        "  delivered {delivered}/{} committed events; rolled-back events seen: {ghosts}",
        committed.len()
    );

    say("kubectl get outboxrelays -n shop");
    let status = wait_for(Duration::from_secs(60), "Ready=True", || async {
        let r = relays.get(RELAY).await.ok()?;
        let ready = r
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(r)
    })
    .await;
    kubectl(c, &["get", "outboxrelays", "-n", NS, "-o", "wide"])?;
    if let Err(e) = &status {
        println!("  (not Ready yet: {e})");
    }

    say("kubectl delete outboxrelay orders: pods garbage-collected, slot and publication dropped");
    relays.delete(RELAY, &DeleteParams::default()).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    wait_for(
        Duration::from_secs(60),
        "the relay, its Deployment and pods to be gone",
        || async {
            let relay_gone = relays.get_opt(RELAY).await.ok()?.is_none();
            let pods_gone = pods.list(&ListParams::default()).await.ok()?.items.is_empty();
            let deployments_gone = deployments.list(&ListParams::default()).await.ok()?.items.is_empty();
            (relay_gone && pods_gone && deployments_gone).then_some(())
        },
    )
    .await?;
    kubectl(c, &["get", "deployments,replicasets,pods", "-n", NS])?;
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    let pubs: i64 = db.query_one("SELECT count(*) FROM pg_publication", &[]).await?.get(0);
    println!("  slots left: {slots}, publications left: {pubs}");

    let ok = delivered == committed.len() && ghosts == 0 && slots == 0 && pubs == 0 && status.is_ok();
    say(if ok {
        "Demo finished: every committed event delivered, no rolled-back event, cleanup done"
    } else {
        "Demo finished with problems (see above)"
    });
    if ok { Ok(()) } else { Err("demo checks failed".into()) }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `outbox-operator` binary next to this example's directory (`target/<profile>/`).
fn operator_binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or("no target directory")?;
    let bin = dir.join("outbox-operator");
    if !bin.exists() {
        return Err(format!("{} not found: build it first (hack/demo does)", bin.display()).into());
    }
    Ok(bin)
}

struct Record {
    partition: i32,
    offset: i64,
    key: String,
    id: String,
    event_type: String,
    payload: String,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p{}@{:<3} key={:<10} type={} id={} payload={}",
            self.partition, self.offset, self.key, self.event_type, self.id, self.payload
        )
    }
}

fn read_topic(bootstrap: &str, topic: &str, expect: &HashSet<String>) -> Result<Vec<Record>, Error> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "demo-reader")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md.topics().first().map(|t| t.partitions()).unwrap_or_default() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = HashSet::new();
    while Instant::now() < deadline && !expect.iter().all(|id| seen.contains(id)) {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            let id = header("id");
            seen.insert(id.clone());
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                event_type: header("type"),
                id,
                payload: m
                    .payload()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
