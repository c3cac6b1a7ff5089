//! The operator at scale: many relays in many namespaces against one PostgreSQL
//! server.
//!
//! Starts a private kube-apiserver and PostgreSQL, makes `--namespaces N` (default
//! 10) namespaces with `--per-namespace M` (default 10) relays each, one database
//! per namespace and one outbox table per relay, then runs the operator binary and
//! applies them all at once. There is no kubelet here, so the bench plays the
//! Deployment controller: it marks each worker Deployment available as soon as it
//! appears. It prints
//! - the time from applying the relays until every one is `Ready=True`;
//! - the operator's CPU (user + system) and RSS over a steady window afterwards;
//! - the PostgreSQL connections the operator holds (sampled) and the sessions it
//!   opened during that window (`pg_stat_database.sessions` of the relays'
//!   databases), against the number of relays and requeues, so the cost per
//!   reconcile is visible.
//!
//!   cargo bench --profile dev --bench operator_scale [-- --namespaces N --per-namespace M --steady-seconds S --requeue-seconds R]

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use outbox_operator::api::{OutboxRelay, OutboxRelaySpec};
use outbox_testbed::{Components, KubeApi, OUTBOX_DDL, Postgres, free_port, http_get};
use serde_json::json;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (user + system CPU seconds, current RSS KiB, peak RSS KiB) of a process.
fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let hz = 100.0;
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, field("VmRSS:"), field("VmHWM:"))
}

/// Backend pids of the operator's sessions (they carry `outbox-relay/<ns>/<name>`).
async fn operator_sessions(pg: &tokio_postgres::Client) -> Vec<i32> {
    pg.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay/%'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Sessions ever established to the relays' databases (PostgreSQL 14+).
async fn sessions_opened(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(
        "SELECT coalesce(sum(sessions), 0)::int8 FROM pg_stat_database WHERE datname LIKE 'team\\_%'",
        &[],
    )
    .await
    .expect("pg_stat_database")
    .get(0)
}

fn spec(pg: &Postgres, db: &str, table: &str) -> OutboxRelaySpec {
    serde_json::from_value(json!({
        "database": {
            "host": pg.host(), "port": pg.port(), "database": db,
            "tls": {"mode": "Disable"},
            "credentialsSecretRef": {"name": "pg-credentials"}
        },
        "outbox": {"table": table},
        // Never dialled by the operator; the workers do not run here.
        "kafka": {"bootstrapServers": "127.0.0.1:9", "topic": "orders.events"}
    }))
    .expect("spec")
}

async fn mark_available(client: &Client, ns: &str, name: &str) -> bool {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Ok(d) = api.get(name).await else { return false };
    let status = json!({"status": {
        "observedGeneration": d.metadata.generation,
        "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .is_ok()
}

fn ready(r: &OutboxRelay) -> bool {
    r.status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::main]
async fn main() {
    let namespaces = arg("--namespaces", 10) as usize;
    let per_ns = arg("--per-namespace", 10) as usize;
    let steady = Duration::from_secs(arg("--steady-seconds", 60));
    let requeue = arg("--requeue-seconds", 30);
    let total = namespaces * per_ns;

    let components = Components::locate().expect("test bed components (hack/testbed fetch)");
    let (kube, pg) = tokio::join!(KubeApi::start(&components), Postgres::start(&components));
    let (kube, pg) = (kube.expect("kube-apiserver"), pg.expect("postgres"));
    // One slot per relay, more than the bed's default.
    let admin = pg.client("postgres").await.expect("connect");
    admin
        .batch_execute(&format!("ALTER SYSTEM SET max_replication_slots = {}", total + 10))
        .await
        .expect("raise max_replication_slots");
    drop(admin);
    pg.stop().await.expect("stop postgres");
    pg.start_again().await.expect("restart postgres");

    let client = kube.client().await.expect("client");
    kube.install_crd(&OutboxRelay::crd()).await.expect("CRD");
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let mut names = Vec::new();
    for n in 0..namespaces {
        let ns = format!("team-{n}");
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        ns_api.create(&PostParams::default(), &obj).await.expect("namespace");
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "pg-credentials"},
            "stringData": {"username": pg.user(), "password": pg.password()}
        }))
        .expect("secret");
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .expect("secret");
        let db = format!("team_{n}");
        pg.create_database(&db).await.expect("database");
        let c = pg.client(&db).await.expect("connect");
        for r in 0..per_ns {
            c.batch_execute(&OUTBOX_DDL.replace("public.outbox", &format!("public.outbox_{r}")))
                .await
                .expect("outbox table");
            names.push((
                ns.clone(),
                db.clone(),
                format!("relay-{r}"),
                format!("public.outbox_{r}"),
            ));
        }
    }

    let port = free_port().expect("port");
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_outbox-operator"));
    let mut child = Command::new(&binary)
        .args([
            "--log-format",
            "text",
            "operator",
            "--relay-image",
            "example.test/relay:1",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--requeue-seconds", &requeue.to_string()])
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the operator");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(http_get(&format!("127.0.0.1:{port}"), "/readyz").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "the operator never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let applied = Instant::now();
    let mut creates = futures::stream::iter(names.iter().cloned())
        .map(|(ns, db, name, table)| {
            let client = client.clone();
            let spec = spec(&pg, &db, &table);
            async move {
                Api::<OutboxRelay>::namespaced(client, &ns)
                    .create(&PostParams::default(), &OutboxRelay::new(&name, spec))
                    .await
                    .expect("create relay");
            }
        })
        .buffer_unordered(16);
    while creates.next().await.is_some() {}
    let created = applied.elapsed();

    // Play the Deployment controller until every relay is Ready.
    let relays: Api<OutboxRelay> = Api::all(client.clone());
    let deployments: Api<Deployment> = Api::all(client.clone());
    let mut available: HashSet<(String, String)> = HashSet::new();
    let limit = Duration::from_secs(300);
    let all_ready = loop {
        for d in deployments.list(&ListParams::default()).await.expect("list").items {
            let key = (
                d.metadata.namespace.clone().unwrap_or_default(),
                d.metadata.name.clone().unwrap_or_default(),
            );
            if !available.contains(&key) && mark_available(&client, &key.0, &key.1).await {
                available.insert(key);
            }
        }
        let list = relays.list(&ListParams::default()).await.expect("list relays").items;
        let n = list.iter().filter(|r| ready(r)).count();
        if n == total {
            break applied.elapsed();
        }
        assert!(applied.elapsed() < limit, "{n} of {total} relays Ready after {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (cpu_at_ready, _, _) = usage(child.id());

    // Steady state: the requeues refresh lag and conditions.
    let sql = pg.client("postgres").await.expect("connect");
    let (cpu0, _, _) = usage(child.id());
    let start = Instant::now();
    let opened0 = sessions_opened(&sql).await;
    let (mut samples, mut held_sum, mut held_max) = (0u64, 0usize, 0usize);
    while start.elapsed() < steady {
        let pids = operator_sessions(&sql).await;
        held_max = held_max.max(pids.len());
        held_sum += pids.len();
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = start.elapsed().as_secs_f64();
    let opened = sessions_opened(&sql).await - opened0;
    let (cpu1, rss, peak) = usage(child.id());
    let _ = child.kill();
    let _ = child.wait();

    let reconciles = total as f64 * window / requeue as f64;
    println!("| operator at scale | value |");
    println!("|---|---:|");
    println!("| relays (namespaces × per namespace) | {total} ({namespaces} × {per_ns}) |");
    println!("| databases on the one server | {namespaces} |");
    println!("| created in | {:.1} s |", created.as_secs_f64());
    println!("| applied → all Ready | {:.1} s |", all_ready.as_secs_f64());
    println!("| operator CPU until all Ready | {cpu_at_ready:.2} s |");
    println!("| requeue interval | {requeue} s |");
    println!("| steady window | {window:.0} s |");
    println!(
        "| steady CPU | {:.3} s per s ({:.1} ms per expected reconcile) |",
        (cpu1 - cpu0) / window,
        (cpu1 - cpu0) * 1000.0 / reconciles.max(1.0)
    );
    println!(
        "| RSS steady / peak | {:.1} / {:.1} MiB |",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "| PostgreSQL sessions held (mean / max of {samples} samples) | {:.1} / {held_max} |",
        held_sum as f64 / samples.max(1) as f64
    );
    println!(
        "| sessions opened in the window | {opened} ({:.2} per expected reconcile) |",
        opened as f64 / reconciles.max(1.0)
    );
}
