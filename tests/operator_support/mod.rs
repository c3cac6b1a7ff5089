//! Shared helpers of the operator tests: the CRD installed into the bed's real
//! kube-apiserver, a namespace, a database with an outbox table and a credentials
//! Secret per test, the controller running in-process (watching only that
//! namespace, so tests of one binary do not reconcile each other's relays), and
//! `await_*` helpers that dump what was there when they time out.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use outbox_operator::api::conditions::find;
use outbox_operator::api::{OutboxRelay, OutboxRelaySpec};
use outbox_operator::controller::{self, OperatorHandle, WatchScope};
use outbox_testbed::{Postgres, TestBed, shared, unique_name};
use serde_json::{Value, json};
use tokio::sync::watch;

pub use outbox_testbed::OUTBOX_DDL;

pub const IMAGE: &str = "example.test/outbox-operator:test";
pub const SECRET: &str = "pg-credentials";

/// How long the await helpers wait by default.
pub const WAIT: Duration = Duration::from_secs(60);

/// One test's namespace, database and running operator.
pub struct Harness {
    pub client: Client,
    pub ns: String,
    /// Database (on `pg`) holding the outbox table.
    pub db: String,
    pub pg: &'static Postgres,
    pub handle: OperatorHandle,
    /// The namespaces of [`Options::also_watch`].
    pub watched: Vec<String>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct Options {
    pub requeue: Duration,
    /// Create the outbox table in the test's database.
    pub table: bool,
    /// Create the credentials Secret.
    pub secret: bool,
    /// Watch every namespace instead of only the test's own. Only for a test binary
    /// with a single test: the operator would reconcile its neighbours' relays too.
    pub watch_all: bool,
    /// Further namespaces (name prefixes) to create, each with the credentials
    /// Secret, and to watch besides the test's own: a namespaced install with a
    /// list of namespaces. Their names are in [`Harness::watched`].
    pub also_watch: &'static [&'static str],
}

impl Default for Options {
    fn default() -> Self {
        Self {
            requeue: Duration::from_secs(2),
            table: true,
            secret: true,
            watch_all: false,
            also_watch: &[],
        }
    }
}

impl Harness {
    pub async fn start(prefix: &str) -> Harness {
        Self::start_with(prefix, Options::default()).await
    }

    pub async fn start_with(prefix: &str, opts: Options) -> Harness {
        let bed: &'static TestBed = shared().await;
        Self::start_on(&bed.pg, bed, prefix, opts).await
    }

    /// Like [`Harness::start_with`] but with the database on `pg` (a private server).
    pub async fn start_on(pg: &'static Postgres, bed: &'static TestBed, prefix: &str, opts: Options) -> Harness {
        let client = bed.kube.client().await.expect("kube client");
        bed.kube.install_crd(&OutboxRelay::crd()).await.expect("install CRD");
        let ns = unique_name(prefix);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("namespace");
        namespaces
            .create(&PostParams::default(), &obj)
            .await
            .expect("create namespace");

        let db = ns.replace('-', "_");
        pg.create_database(&db).await.expect("create database");
        if opts.table {
            let c = pg.client(&db).await.expect("connect");
            c.batch_execute(OUTBOX_DDL).await.expect("create outbox table");
        }
        let mut watched = Vec::new();
        for prefix in opts.also_watch {
            let other = unique_name(prefix);
            let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": other}})).expect("namespace");
            namespaces
                .create(&PostParams::default(), &obj)
                .await
                .expect("create namespace");
            watched.push(other);
        }
        let scope = if opts.watch_all {
            WatchScope::cluster()
        } else {
            WatchScope::namespaces(std::iter::once(ns.clone()).chain(watched.iter().cloned()))
        };
        let h = Self::spawn(client, ns, db, pg, opts.requeue, scope, watched);
        if opts.secret {
            h.create_secret(SECRET, pg.user(), pg.password()).await;
            for other in &h.watched {
                h.create_secret_in(other, SECRET, pg.user(), pg.password()).await;
            }
        }
        h
    }

    fn spawn(
        client: Client,
        ns: String,
        db: String,
        pg: &'static Postgres,
        requeue: Duration,
        scope: WatchScope,
        watched: Vec<String>,
    ) -> Harness {
        let handle = OperatorHandle::new();
        let config = controller::Config {
            relay_image: IMAGE.into(),
            scope,
            requeue_interval: requeue,
        };
        let (stop, mut rx) = watch::channel(false);
        let signalled = tokio::spawn(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        let task = tokio::spawn(controller::run(client.clone(), config, handle.clone(), async move {
            let _ = signalled.await;
        }));
        Harness {
            client,
            ns,
            db,
            pg,
            handle,
            watched,
            stop,
            task: Some(task),
        }
    }

    /// Stops the controller and waits for running reconciles to finish.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }

    pub fn relays(&self) -> Api<OutboxRelay> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Another namespace with the credentials Secret, for relays that share this
    /// test's database from elsewhere.
    pub async fn extra_namespace(&self, prefix: &str) -> String {
        let ns = unique_name(prefix);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("namespace");
        namespaces
            .create(&PostParams::default(), &obj)
            .await
            .expect("create namespace");
        self.create_secret_in(&ns, SECRET, self.pg.user(), self.pg.password())
            .await;
        ns
    }

    /// The relays of namespace `ns`.
    pub fn relays_in(&self, ns: &str) -> Api<OutboxRelay> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Sets an annotation on the relay `name`.
    pub async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.relays()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("annotate relay");
    }

    /// The comment on a publication (the operator's ownership record).
    pub async fn publication_comment(&self, publication: &str) -> Option<String> {
        self.sql()
            .await
            .query_opt(
                "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .expect("query publication")
            .and_then(|r| r.get(0))
    }

    /// `(schema.table)` of every table in a publication.
    pub async fn publication_tables(&self, publication: &str) -> Vec<String> {
        self.sql()
            .await
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await
            .expect("query publication tables")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn drop_slot_behind_the_operators_back(&self, slot: &str) {
        let c = self.pg.client("postgres").await.expect("connect");
        c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .expect("drop slot");
    }

    pub async fn create_secret(&self, name: &str, user: &str, password: &str) {
        self.create_secret_in(&self.ns, name, user, password).await;
    }

    pub async fn create_secret_in(&self, ns: &str, name: &str, user: &str, password: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let s: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"username": user, "password": password}
        }))
        .expect("secret");
        api.create(&PostParams::default(), &s).await.expect("create secret");
    }

    /// A relay spec for the test's database, with `patch` merged over it.
    pub fn spec(&self, patch: Value) -> Value {
        let mut spec = json!({
            "database": {
                "host": self.pg.host(), "port": self.pg.port(), "database": self.db,
                "tls": {"mode": "Disable"},
                "credentialsSecretRef": {"name": SECRET}
            },
            "outbox": {"table": "public.outbox"},
            "kafka": {"bootstrapServers": "127.0.0.1:9", "topic": "orders.events"}
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
        self.pg.client(&self.db).await.expect("connect")
    }

    pub async fn slot_exists(&self, slot: &str) -> bool {
        let c = self.pg.client("postgres").await.expect("connect");
        c.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("query slots")
            .is_some()
    }

    pub async fn publication_exists(&self, publication: &str) -> bool {
        self.sql()
            .await
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
            .await
            .expect("query publications")
            .is_some()
    }

    /// The slot and publication names the operator derives for `name` in this namespace.
    pub fn default_names(&self, name: &str) -> (String, String) {
        (
            outbox_operator::api::names::default_slot_name(&self.ns, name),
            outbox_operator::api::names::default_publication_name(&self.ns, name),
        )
    }

    /// Waits until `ok` holds for the relay; on timeout, panics with the relay's
    /// status, its Deployment and its Events.
    pub async fn await_relay(&self, name: &str, what: &str, ok: impl Fn(&OutboxRelay) -> bool) -> OutboxRelay {
        self.await_relay_in(&self.ns, name, what, ok).await
    }

    /// [`Self::await_relay`] for a relay in namespace `ns`.
    pub async fn await_relay_in(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        ok: impl Fn(&OutboxRelay) -> bool,
    ) -> OutboxRelay {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = self.relays_in(ns).get_opt(name).await.expect("get relay")
                && ok(&r)
            {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}\n{}",
                    self.dump_in(ns, name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for the condition `type_` to have `status` and (if given) `reason`.
    pub async fn await_condition(&self, name: &str, type_: &str, status: &str, reason: Option<&str>) -> OutboxRelay {
        self.await_condition_in(&self.ns, name, type_, status, reason).await
    }

    /// [`Self::await_condition`] for a relay in namespace `ns`.
    pub async fn await_condition_in(
        &self,
        ns: &str,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) -> OutboxRelay {
        let what = format!("{type_}={status} (reason {})", reason.unwrap_or("any"));
        self.await_relay_in(ns, name, &what, |r| {
            r.status
                .as_ref()
                .and_then(|s| find(&s.conditions, type_))
                .is_some_and(|c| c.status == status && reason.is_none_or(|want| c.reason == want))
        })
        .await
    }

    pub fn deployments_in(&self, ns: &str) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), ns)
    }

    pub async fn await_relay_gone_in(&self, ns: &str, name: &str) {
        let deadline = Instant::now() + WAIT;
        while self.relays_in(ns).get_opt(name).await.expect("get relay").is_some() {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {ns}/{name} to go\n{}",
                    self.dump_in(ns, name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn await_gone(&self, name: &str) {
        let deadline = Instant::now() + WAIT;
        while self.relays().get_opt(name).await.expect("get relay").is_some() {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {name} to go\n{}",
                    self.dump(name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn await_deployment(&self, name: &str) -> Deployment {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(d) = self.deployments().get_opt(name).await.expect("get deployment") {
                return d;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for Deployment {name}\n{}", self.dump(name).await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Plays the Deployment controller and kubelet, which the bed does not run:
    /// reports `available` pods.
    pub async fn set_available(&self, deployment: &str, available: i32) {
        let d = self.deployments().get(deployment).await.expect("get deployment");
        let status = json!({"status": {
            "observedGeneration": d.metadata.generation,
            "replicas": available,
            "updatedReplicas": available,
            "readyReplicas": available,
            "availableReplicas": available,
        }});
        self.deployments()
            .patch_status(deployment, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch deployment status");
    }

    /// Events about the relay `name`, as (reason, note).
    pub async fn events(&self, name: &str) -> Vec<(String, String)> {
        self.events_in(&self.ns, name).await
    }

    /// [`Self::events`] for a relay in namespace `ns`.
    pub async fn events_in(&self, ns: &str, name: &str) -> Vec<(String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        api.list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    pub async fn await_event(&self, name: &str, reason: &str) -> String {
        self.await_event_with(name, reason, |_| true).await
    }

    /// Waits for an Event with `reason` whose note satisfies `ok`; returns the note.
    pub async fn await_event_with(&self, name: &str, reason: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((_, note)) = self.events(name).await.into_iter().find(|(r, n)| r == reason && ok(n)) {
                return note;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for an Event {reason}\n{}", self.dump(name).await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Status, Deployment and Events of a relay, for failure messages.
    pub async fn dump(&self, name: &str) -> String {
        self.dump_in(&self.ns, name).await
    }

    /// [`Self::dump`] for a relay in namespace `ns`.
    pub async fn dump_in(&self, ns: &str, name: &str) -> String {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let relay = match self.relays_in(ns).get_opt(name).await {
            Ok(Some(r)) => serde_json::to_string_pretty(&json!({
                "metadata": {"finalizers": r.metadata.finalizers, "generation": r.metadata.generation,
                             "deletionTimestamp": r.metadata.deletion_timestamp},
                "status": r.status,
            }))
            .unwrap_or_default(),
            Ok(None) => "relay: gone".into(),
            Err(e) => format!("relay: {e}"),
        };
        let deployment = match deployments.get_opt(&format!("{name}-relay")).await {
            Ok(Some(d)) => format!(
                "deployment: replicas {:?}, status {}",
                d.spec.and_then(|s| s.replicas),
                serde_json::to_string(&d.status).unwrap_or_default()
            ),
            Ok(None) => "deployment: none".into(),
            Err(e) => format!("deployment: {e}"),
        };
        let events: Vec<String> = self
            .events_in(ns, name)
            .await
            .into_iter()
            .map(|(r, n)| format!("  {r}: {n}"))
            .collect();
        format!(
            "--- {ns}/{name}\n{relay}\n{deployment}\nevents:\n{}\nmetrics:\n{}",
            events.join("\n"),
            self.handle.metrics.encode()
        )
    }

    /// A metric sample from the operator's exposition, by exact series text.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = self.handle.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// JSON merge of `patch` into `base` (objects merge, everything else replaces).
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

pub fn condition(r: &OutboxRelay, type_: &str) -> (String, String, String) {
    let c = r
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", r.status));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

pub fn env_of(d: &Deployment) -> BTreeMap<String, Value> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| &p.containers[0])
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name.clone(), serde_json::to_value(&e).unwrap_or_default()))
        .collect()
}

/// A loopback port nothing listens on.
pub fn closed_port() -> u16 {
    outbox_testbed::free_port().expect("free port")
}
