//! End-to-end demo on a local stack: PostgreSQL, Kafka (KRaft) and a Kubernetes
//! API server start on loopback; the operator runs against that API server; an
//! `OutboxRelay` is applied; an "orders service" commits orders with their
//! outbox events (some transactions roll back); the events appear in Kafka.
//!
//! The API server has no kubelet, so this program plays that part for the one
//! pod that matters: it reads the worker Deployment the operator rendered and
//! runs its container (the same binary, same arguments, environment resolved
//! from the referenced Secret) as a local process, and reports it available.
//!
//! Run with `hack/demo` (it builds the binary and fetches the servers first).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use outbox_operator::api::OutboxRelay;
use outbox_testbed::{TestBed, free_port, http_get};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

type Error = Box<dyn std::error::Error + Send + Sync>;

const NS: &str = "shop";
const RELAY: &str = "orders";
const ORDERS: usize = 60;

fn say(msg: impl AsRef<str>) {
    println!("\n\x1b[1m▶ {}\x1b[0m", msg.as_ref());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let bin = worker_binary()?;
    say("Starting a local stack: PostgreSQL, Kafka (KRaft), kube-apiserver + etcd");
    let bed = TestBed::start().await?;
    println!("  postgres   127.0.0.1:{}", bed.pg.port());
    println!("  kafka      {}", bed.kafka.bootstrap());
    println!("  kubernetes {}", bed.kube.server_url());

    say("Creating the shop database: an orders table and a Debezium-style outbox table");
    bed.pg.create_database("shop").await?;
    let db = bed.pg.client("shop").await?;
    db.batch_execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL);
         CREATE TABLE outbox (
           id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
           aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
           payload jsonb NOT NULL, headers jsonb);",
    )
    .await?;
    bed.kafka.create_topic("outbox.event.Order", 3).await?;

    say("Installing the OutboxRelay CRD and starting the operator");
    let client = bed.kube.client().await?;
    bed.kube.install_crd(&OutboxRelay::crd()).await?;
    let op_port = free_port()?;
    let mut operator = Command::new(&bin)
        .args([
            "--log-format",
            "text",
            "operator",
            "--relay-image",
            "outbox-operator:dev",
        ])
        .args(["--listen", &format!("127.0.0.1:{op_port}"), "--requeue-seconds", "5"])
        .env("KUBECONFIG", bed.kube.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()?;

    say(format!(
        "kubectl apply: namespace {NS}, the database Secret, OutboxRelay {RELAY}"
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
                "stringData": {"username": bed.pg.user(), "password": bed.pg.password()}
            }))?,
        )
        .await?;
    let relay = json!({
        "apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay",
        "metadata": {"name": RELAY, "namespace": NS},
        "spec": {
            "database": {"host": bed.pg.host(), "port": bed.pg.port(), "database": "shop",
                         "tls": {"mode": "Disable"}, "credentialsSecretRef": {"name": "shop-db"}},
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": bed.kafka.bootstrap(),
                      "routeBy": {"column": "aggregatetype", "topicTemplate": "outbox.event.${routedByValue}"}},
            "cleanupPolicy": "Delete"
        }
    });
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), NS);
    relays
        .create(&PostParams::default(), &serde_json::from_value(relay)?)
        .await?;

    say("The operator provisions the publication and slot and renders the worker Deployment");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let deployment = wait_for(Duration::from_secs(60), "the worker Deployment", || async {
        deployments.get_opt(&format!("{RELAY}-relay")).await.ok().flatten()
    })
    .await?;
    let slot: String = db
        .query_one("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await?
        .get(0);
    println!("  slot {slot} created; Deployment {RELAY}-relay rendered");

    say("Standing in for the kubelet: running the worker pod's container as a local process");
    let (mut worker, worker_addr) = run_pod(&bin, &deployment, &secrets).await?;
    wait_for(Duration::from_secs(60), "the worker's /readyz", || async {
        http_get(&worker_addr, "/readyz").await.filter(|(c, _)| *c == 200)
    })
    .await?;
    mark_available(&deployments).await?;

    say(format!(
        "The orders service commits {ORDERS} orders; every 5th transaction rolls back"
    ));
    let mut committed = HashSet::new();
    let mut rolled_back = HashSet::new();
    let mut db = db;
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
    let bootstrap = bed.kafka.bootstrap();
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
    let out = bed
        .kube
        .kubectl()
        .args(["get", "outboxrelays", "-n", NS, "-o", "wide"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if let Err(e) = &status {
        println!("  (not Ready yet: {e})");
    }

    say("Worker metrics (excerpt)");
    if let Some((_, body)) = http_get(&worker_addr, "/metrics").await {
        for line in body.lines().filter(|l| {
            l.starts_with("outbox_relay_events_total")
                || l.starts_with("outbox_relay_confirmed_lsn")
                || l.starts_with("outbox_relay_commit_to_ack_seconds_count")
                || l.starts_with("outbox_relay_active")
        }) {
            println!("  {line}");
        }
    }

    say("kubectl delete outboxrelay orders: cleanupPolicy Delete drops the slot and publication");
    let _ = worker.kill();
    let _ = worker.wait();
    relays.delete(RELAY, &DeleteParams::default()).await?;
    wait_for(Duration::from_secs(60), "the relay to be gone", || async {
        relays.get_opt(RELAY).await.ok().and_then(|o| o.is_none().then_some(()))
    })
    .await?;
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    let pubs: i64 = db.query_one("SELECT count(*) FROM pg_publication", &[]).await?.get(0);
    println!("  slots left: {slots}, publications left: {pubs}");

    let _ = operator.kill();
    let _ = operator.wait();
    let ok = delivered == committed.len() && ghosts == 0 && slots == 0 && pubs == 0 && status.is_ok();
    say(if ok {
        "Demo finished: every committed event delivered, no rolled-back event, cleanup done"
    } else {
        "Demo finished with problems (see above)"
    });
    if ok { Ok(()) } else { Err("demo checks failed".into()) }
}

/// The `outbox-operator` binary next to this example's directory (`target/<profile>/`).
fn worker_binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or("no target directory")?;
    let bin = dir.join("outbox-operator");
    if !bin.exists() {
        return Err(format!("{} not found: build it first (hack/demo does)", bin.display()).into());
    }
    Ok(bin)
}

/// Runs the Deployment's single container locally: same args, env resolved from
/// values and Secret references, HTTP port moved to a free loopback port.
async fn run_pod(bin: &Path, d: &Deployment, secrets: &Api<Secret>) -> Result<(Child, String), Error> {
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or("deployment has no pod spec")?;
    let c = pod.containers.first().ok_or("no container")?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut args: Vec<String> = c.args.clone().unwrap_or_default();
    if let Some(i) = args.iter().position(|a| a == "--listen")
        && let Some(v) = args.get_mut(i + 1)
    {
        *v = addr.clone();
    }
    let mut env = BTreeMap::new();
    for e in c.env.clone().unwrap_or_default() {
        let value = match (e.value, e.value_from.and_then(|v| v.secret_key_ref)) {
            (Some(v), _) => v,
            (None, Some(r)) => {
                let s = secrets.get(&r.name).await?;
                let bytes = s
                    .data
                    .and_then(|d| d.get(&r.key).cloned())
                    .ok_or("secret key missing")?;
                String::from_utf8(bytes.0)?
            }
            _ => continue,
        };
        env.insert(e.name, value);
    }
    env.insert("OUTBOX_LOG_FORMAT".into(), "text".into());
    env.insert("RUST_LOG".into(), "error".into());
    println!("  {} {}", c.image.as_deref().unwrap_or("?"), args.join(" "));
    let child = Command::new(bin).args(&args).envs(&env).stdin(Stdio::null()).spawn()?;
    Ok((child, addr))
}

/// What the deployment controller would write once the pod is ready.
async fn mark_available(deployments: &Api<Deployment>) -> Result<(), Error> {
    let status = json!({"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}});
    deployments
        .patch_status(
            &format!("{RELAY}-relay"),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(())
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
