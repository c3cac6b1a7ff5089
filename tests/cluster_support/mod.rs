//! Shared helpers of the tests on the real single-node cluster: the operator
//! image built from the binary under test and loaded into the node, the chart
//! installed once per test binary with `helm install`, and per test a namespace,
//! a database with an outbox table, a credentials Secret and a topic. The await
//! helpers dump pods, Events and the relay's status when they time out.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use outbox_operator::api::{OutboxRelay, OutboxRelaySpec};
use outbox_testbed::cluster::{self, Cluster};
use outbox_testbed::{OUTBOX_DDL, unique_name};
use serde_json::{Value, json};

/// The image every pod runs: the binary these tests were built with.
pub const IMAGE: &str = "localhost/outbox-operator:test";
pub const OPERATOR_NS: &str = "outbox-system";
pub const RELEASE: &str = "outbox-operator";
pub const SECRET: &str = "pg-credentials";
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");
/// Upper bound for pods to be scheduled, started and pass their probes.
pub const WAIT: Duration = Duration::from_secs(90);

static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The cluster, with the image loaded and the chart installed (once per binary).
pub async fn cluster() -> &'static Cluster {
    cluster_installed_with(&[]).await
}

/// Like [`cluster`], with extra `--set` values for the install; the first call
/// in a binary decides them.
pub async fn cluster_installed_with(sets: &[&str]) -> &'static Cluster {
    let c = cluster::shared().await;
    INSTALLED
        .get_or_init(|| async {
            eprintln!("cluster: usable {:.1}s after start", c.startup.as_secs_f32());
            let t = Instant::now();
            c.load_binary_image(env!("CARGO_BIN_EXE_outbox-operator").as_ref(), IMAGE)
                .await
                .expect("build and load the operator image");
            eprintln!("cluster: image built and loaded in {:.1}s", t.elapsed().as_secs_f32());
            let t = Instant::now();
            helm_install(c, sets);
            let client = c.kube.client().await.expect("client");
            await_deployment_available(&client, OPERATOR_NS, RELEASE, 2).await;
            eprintln!(
                "cluster: chart installed, operator pods ready in {:.1}s",
                t.elapsed().as_secs_f32()
            );
        })
        .await;
    c
}

/// Creates namespace `name`.
pub async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    namespaces
        .create(&PostParams::default(), &obj)
        .await
        .expect("create namespace");
}

/// `helm install` (or upgrade) of the chart with the test image.
pub fn helm_install(c: &Cluster, extra: &[&str]) {
    let (repo, tag) = IMAGE.split_once(':').expect("image has a tag");
    let mut cmd = c.kube.helm();
    cmd.args([
        "upgrade",
        "--install",
        RELEASE,
        CHART,
        "--namespace",
        OPERATOR_NS,
        "--create-namespace",
    ])
    .args(["--set", &format!("image.repository={repo}")])
    .args(["--set", &format!("image.tag={tag}")])
    .args(["--set", "image.pullPolicy=Never"])
    // A comma separates --set assignments; escaped, it stays in the value.
    .args(["--set", "logLevel=info\\,outbox_operator=debug"]);
    for s in extra {
        cmd.args(["--set", s]);
    }
    run("helm install", cmd);
}

pub fn run(what: &str, mut cmd: Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One test's namespace, database (with the outbox table), Secret and topic.
pub struct Case {
    pub client: Client,
    pub cluster: &'static Cluster,
    pub ns: String,
    pub db: String,
    pub topic: String,
}

impl Case {
    pub async fn new(prefix: &str, partitions: i32) -> Case {
        let cluster = cluster().await;
        let client = cluster.kube.client().await.expect("kube client");
        let ns = unique_name(prefix);
        create_namespace(&client, &ns).await;
        Self::in_namespace(cluster, ns, partitions).await
    }

    /// A case in the existing namespace `ns` of `cluster` (installed already).
    pub async fn in_namespace(cluster: &'static Cluster, ns: String, partitions: i32) -> Case {
        let client = cluster.kube.client().await.expect("kube client");
        let db = ns.replace('-', "_");
        cluster.pg.create_database(&db).await.expect("create database");
        let c = cluster.pg.client(&db).await.expect("connect");
        c.batch_execute(OUTBOX_DDL).await.expect("create outbox table");
        let topic = format!("{ns}.events");
        cluster
            .kafka
            .create_topic(&topic, partitions)
            .await
            .expect("create topic");
        let case = Case {
            client,
            cluster,
            ns,
            db,
            topic,
        };
        case.put_secret(cluster.pg.user(), cluster.pg.password()).await;
        case
    }

    pub fn relays(&self) -> Api<OutboxRelay> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates or replaces the credentials Secret.
    pub async fn put_secret(&self, user: &str, password: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SECRET},
            "stringData": {"username": user, "password": password}
        }))
        .expect("secret");
        api.patch(
            SECRET,
            &kube::api::PatchParams::apply("cluster-tests").force(),
            &kube::api::Patch::Apply(&s),
        )
        .await
        .expect("apply secret");
    }

    /// The relay spec for this case: PostgreSQL and Kafka at the addresses pods
    /// see, `patch` merged over it.
    pub fn spec(&self, patch: Value) -> Value {
        let pg = &self.cluster.pg;
        let mut spec = json!({
            "database": {
                "host": pg.host(), "port": pg.port(), "database": self.db,
                "tls": {"mode": "Disable"},
                "credentialsSecretRef": {"name": SECRET}
            },
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": self.cluster.kafka.bootstrap(), "topic": self.topic,
                      "producer": {"lingerMs": 2}},
            "worker": {"logLevel": "info,outbox_operator=debug"}
        });
        merge(&mut spec, patch);
        spec
    }

    pub async fn create_relay(&self, name: &str, spec: Value) -> OutboxRelay {
        let spec: OutboxRelaySpec = serde_json::from_value(spec).expect("spec");
        self.relays()
            .create(&PostParams::default(), &OutboxRelay::new(name, spec))
            .await
            .expect("create relay")
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        self.cluster.pg.client(&self.db).await.expect("sql connect")
    }

    /// Inserts `aggregates * per_aggregate` events in transactions of `per_txn`,
    /// payload `{"seq": n}` numbered per aggregate from `first_seq` in commit order.
    pub async fn insert_events(
        &self,
        aggregates: usize,
        per_aggregate: usize,
        per_txn: usize,
        first_seq: usize,
    ) -> Vec<String> {
        let client = self.sql().await;
        let total = aggregates * per_aggregate;
        let mut ids = Vec::with_capacity(total);
        let mut n = 0;
        while n < total {
            let rows = per_txn.min(total - n);
            let sql = format!(
                "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                 SELECT 'Order', 'agg-' || (i % {aggregates}), 'OrderCreated',
                        jsonb_build_object('seq', i / {aggregates} + {first_seq})
                 FROM generate_series({n}, {}) AS i ORDER BY i RETURNING id::text",
                n + rows - 1
            );
            let out = client.query(sql.as_str(), &[]).await.expect("insert events");
            ids.extend(out.iter().map(|r| r.get::<_, String>(0)));
            n += rows;
        }
        ids
    }

    /// The relay's pods that are Running with every container ready.
    pub async fn ready_pods(&self, relay: &str) -> Vec<Pod> {
        let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={relay}"));
        let pods = self.pods().list(&lp).await.expect("list pods");
        pods.items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .collect()
    }

    /// Waits until `n` pods of the relay are Running and Ready.
    pub async fn await_ready_pods(&self, relay: &str, n: usize) -> Vec<Pod> {
        let deadline = Instant::now() + WAIT;
        loop {
            let pods = self.ready_pods(relay).await;
            if pods.len() == n {
                return pods;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} ready pods of relay {relay} after {WAIT:?}, wanted {n}\n{}",
                    pods.len(),
                    self.dump(relay).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Pods, their phases and container states, Events and the relay's status.
    pub async fn dump(&self, relay: &str) -> String {
        let mut out = String::new();
        if let Ok(pods) = self.pods().list(&ListParams::default()).await {
            for p in pods.items {
                out.push_str(&format!(
                    "pod {}: {}\n",
                    p.name_any(),
                    serde_json::to_string(&p.status).unwrap_or_default()
                ));
            }
        }
        if let Ok(r) = self.relays().get(relay).await {
            out.push_str(&format!(
                "relay status: {}\n",
                serde_json::to_string(&r.status).unwrap_or_default()
            ));
        }
        let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        if let Ok(evs) = events.list(&ListParams::default()).await {
            for e in evs.items {
                out.push_str(&format!(
                    "event {} {}: {}\n",
                    e.reason.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.message.unwrap_or_default()
                ));
            }
        }
        out.push_str(&operator_logs(self.cluster, 30));
        out.push_str(&self.cluster.log_tails(10));
        out
    }
}

pub fn pod_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The last lines of the operator pods' logs (`kubectl logs`).
pub fn operator_logs(c: &Cluster, lines: usize) -> String {
    let mut cmd = c.kube.kubectl();
    cmd.args([
        "logs",
        "-n",
        OPERATOR_NS,
        "-l",
        "app.kubernetes.io/name=outbox-operator",
    ])
    .args(["--tail", &lines.to_string(), "--prefix", "--all-containers"]);
    match cmd.output() {
        Ok(o) => format!(
            "--- operator logs ---\n{}{}\n",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("(kubectl logs: {e})\n"),
    }
}

pub async fn await_deployment_available(client: &Client, ns: &str, name: &str, replicas: i32) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + WAIT;
    loop {
        let d = api.get_opt(name).await.expect("get deployment");
        let available = d
            .as_ref()
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        if available >= replicas {
            return;
        }
        if Instant::now() > deadline {
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let list = pods
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let states: Vec<String> = list
                .iter()
                .map(|p| {
                    format!(
                        "{}: {}",
                        p.name_any(),
                        serde_json::to_string(&p.status).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "deployment {ns}/{name}: {available} of {replicas} available after {WAIT:?}\n{}",
                states.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// Inserts one transaction of one event per aggregate every 20 ms (at most 3000
/// transactions) until stopped; event `seq` n of every aggregate is in round n.
pub struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Writer {
    /// Stops writing; the ids of every committed event.
    pub async fn stop(self) -> Vec<String> {
        let _ = self.stop.send(true);
        self.task.await.expect("writer task")
    }
}

impl Case {
    pub fn start_writer(&self, aggregates: usize) -> Writer {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let (cluster, db) = (self.cluster, self.db.clone());
        let task = tokio::spawn(async move {
            let client = cluster.pg.client(&db).await.expect("writer connects");
            let mut ids = Vec::new();
            for seq in 1..=3000 {
                if *rx.borrow() {
                    break;
                }
                let sql = format!(
                    "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload)
                     SELECT 'Order', 'agg-' || i, 'OrderCreated', jsonb_build_object('seq', {seq})
                     FROM generate_series(0, {}) AS i ORDER BY i RETURNING id::text",
                    aggregates - 1
                );
                let rows = client.query(sql.as_str(), &[]).await.expect("writer inserts");
                ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        });
        Writer { stop, task }
    }

    /// Every id arrives on the topic, in order per key; dumps the relay otherwise.
    pub async fn assert_delivered(&self, relay: &str, ids: &[String]) {
        let expect = id_set(ids);
        let records = crate::support::consume_async(
            &self.cluster.kafka.bootstrap(),
            &self.topic,
            &expect,
            Duration::from_secs(90),
            Duration::from_millis(500),
        )
        .await;
        let seen: HashSet<&str> = records.iter().filter_map(|r| r.id.as_deref()).collect();
        let missing = expect.iter().filter(|id| !seen.contains(id.as_str())).count();
        if missing > 0 {
            panic!(
                "{missing} of {} events never arrived ({} records read)\n{}",
                expect.len(),
                records.len(),
                self.dump(relay).await
            );
        }
        if let Err(e) = crate::support::check_per_key_order(&records) {
            panic!("{e}\n{}", self.dump(relay).await);
        }
    }

    /// Merges `patch` into the relay's spec.
    pub async fn patch_spec(&self, relay: &str, patch: Value) {
        self.relays()
            .patch(
                relay,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "spec": patch })),
            )
            .await
            .expect("patch relay spec");
    }

    /// Waits until `n` pods are Ready and none of them is in `old`.
    pub async fn await_replaced(&self, relay: &str, old: &[String], n: usize) -> Vec<Pod> {
        let deadline = Instant::now() + WAIT;
        loop {
            let pods = self.ready_pods(relay).await;
            let all = self
                .pods()
                .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={relay}")))
                .await
                .expect("list pods");
            let olds_left = all.items.iter().any(|p| old.contains(&p.name_any()));
            if pods.len() == n && !olds_left {
                return pods;
            }
            if Instant::now() > deadline {
                panic!(
                    "pods of {relay} not replaced after {WAIT:?}\n{}",
                    self.dump(relay).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn slot_exists(&self, slot: &str) -> bool {
        let c = self.sql().await;
        c.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("query slots")
            .is_some()
    }

    pub async fn publication_exists(&self, publication: &str) -> bool {
        let c = self.sql().await;
        c.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
            .await
            .expect("query publications")
            .is_some()
    }
}

/// `GET path` on the pod's port 8080 (the tests run inside the cluster's network).
pub async fn pod_get(pod: &Pod, path: &str) -> Option<(u16, String)> {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone())?;
    outbox_testbed::http_get(&format!("{ip}:8080"), path).await
}

pub fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(ResourceExt::name_any).collect()
}

/// The ids in `ids` as a set, for the consumer.
pub fn id_set(ids: &[String]) -> HashSet<String> {
    ids.iter().cloned().collect()
}
