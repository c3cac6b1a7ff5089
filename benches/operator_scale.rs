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
//!   reconcile is visible;
//! - the SQL statements the operator ran per reconcile in that window (transactions
//!   in the relays' databases, `pg_stat_database`), the shared snapshots it read
//!   per database and interval, and the share of database passes a snapshot
//!   confirmed (from its `/metrics`; absent for builds that take no snapshots).
//!
//! With `OUTBOX_BENCH_BASELINE_OPERATOR=PATH` (a build of an earlier commit) it
//! runs the same scenario with that binary in the same run, on namespaces and
//! databases of its own, and prints the ratios.
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

/// Backend pids of the sessions in the run's databases: the operator's (no worker
/// runs here, and the bench's own set-up sessions have ended).
async fn operator_sessions(pg: &tokio_postgres::Client, run: &str) -> Vec<i32> {
    pg.query(
        "SELECT pid FROM pg_stat_activity WHERE datname LIKE $1 || '\\_team\\_%'",
        &[&run],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Sessions ever established to the relays' databases (PostgreSQL 14+).
async fn sessions_opened(pg: &tokio_postgres::Client, run: &str) -> i64 {
    pg.query_one(
        "SELECT coalesce(sum(sessions), 0)::int8 FROM pg_stat_database WHERE datname LIKE $1 || '\\_team\\_%'",
        &[&run],
    )
    .await
    .expect("pg_stat_database")
    .get(0)
}

/// Transactions (each of the operator's statements is one) in the relays'
/// databases, committed or not.
async fn transactions(pg: &tokio_postgres::Client, run: &str) -> i64 {
    pg.query_one(
        "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::int8 FROM pg_stat_database
         WHERE datname LIKE $1 || '\\_team\\_%'",
        &[&run],
    )
    .await
    .expect("pg_stat_database")
    .get(0)
}

/// A counter from the operator's `/metrics` (summed over its labels when `labels`
/// is empty); `None` when the build does not export it (an older baseline).
async fn counter(addr: &str, name: &str, labels: &str) -> Option<f64> {
    let (_, text) = http_get(addr, "/metrics").await?;
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let matches =
            series == format!("{name}{labels}") || (labels.is_empty() && series.starts_with(&format!("{name}{{")));
        if matches {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
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

/// What one operator binary did with the relays.
struct Figures {
    created: Duration,
    all_ready: Duration,
    cpu_to_ready: f64,
    window: f64,
    steady_cpu: f64,
    rss_kib: u64,
    peak_kib: u64,
    held_mean: f64,
    held_max: usize,
    opened: i64,
    reconciles: f64,
    /// Transactions in the relays' databases during the steady window.
    statements: i64,
    /// Shared snapshots read during the window (builds that take them).
    snapshots: Option<f64>,
    /// Database passes confirmed from a snapshot, and all database passes.
    confirmed: Option<(f64, f64)>,
}

struct Setup {
    namespaces: usize,
    per_ns: usize,
    steady: Duration,
    requeue: u64,
}

#[tokio::main]
async fn main() {
    let setup = Setup {
        namespaces: arg("--namespaces", 10) as usize,
        per_ns: arg("--per-namespace", 10) as usize,
        steady: Duration::from_secs(arg("--steady-seconds", 60)),
        requeue: arg("--requeue-seconds", 30),
    };
    let total = setup.namespaces * setup.per_ns;
    let baseline = std::env::var("OUTBOX_BENCH_BASELINE_OPERATOR").ok().map(PathBuf::from);
    let runs = 1 + usize::from(baseline.is_some());

    let components = Components::locate().expect("test bed components (hack/testbed fetch)");
    let (kube, pg) = tokio::join!(KubeApi::start(&components), Postgres::start(&components));
    let (kube, pg) = (kube.expect("kube-apiserver"), pg.expect("postgres"));
    // One slot per relay and run, more than the bed's default.
    let admin = pg.client("postgres").await.expect("connect");
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET max_replication_slots = {}",
            total * runs + 10
        ))
        .await
        .expect("raise max_replication_slots");
    drop(admin);
    pg.stop().await.expect("stop postgres");
    pg.start_again().await.expect("restart postgres");
    kube.install_crd(&OutboxRelay::crd()).await.expect("CRD");

    let current = PathBuf::from(env!("CARGO_BIN_EXE_outbox-operator"));
    let mut results = vec![("this build", scenario(&current, "a", &setup, &kube, &pg).await)];
    if let Some(base) = baseline {
        results.push(("baseline", scenario(&base, "b", &setup, &kube, &pg).await));
    }

    println!(
        "{} relays ({} namespaces x {}), {} databases on one server, requeue {} s, steady window {} s\n",
        total,
        setup.namespaces,
        setup.per_ns,
        setup.namespaces,
        setup.requeue,
        setup.steady.as_secs()
    );
    println!(
        "| operator | applied → all Ready | CPU until Ready | steady CPU | CPU per reconcile | RSS steady / peak | sessions held mean / max | sessions opened per reconcile |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, f) in &results {
        println!(
            "| {name} | {:.1} s | {:.2} s | {:.3} s/s | {:.1} ms | {:.1} / {:.1} MiB | {:.1} / {} | {:.2} ({} in {:.0} s) |",
            f.all_ready.as_secs_f64(),
            f.cpu_to_ready,
            f.steady_cpu / f.window,
            f.steady_cpu * 1000.0 / f.reconciles.max(1.0),
            f.rss_kib as f64 / 1024.0,
            f.peak_kib as f64 / 1024.0,
            f.held_mean,
            f.held_max,
            f.opened as f64 / f.reconciles.max(1.0),
            f.opened,
            f.window,
        );
        eprintln!("{name}: {total} relays created in {:.1} s", f.created.as_secs_f64());
    }
    println!(
        "\n| operator | SQL statements per reconcile | shared snapshots per database and interval | database passes confirmed from a snapshot |"
    );
    println!("|---|---:|---:|---:|");
    let intervals = |f: &Figures| f.window / setup.requeue as f64;
    for (name, f) in &results {
        println!(
            "| {name} | {:.2} ({} in {:.0} s) | {} | {} |",
            f.statements as f64 / f.reconciles.max(1.0),
            f.statements,
            f.window,
            f.snapshots.map_or("—".into(), |n| format!(
                "{:.2} ({n:.0} for {} databases)",
                n / (setup.namespaces as f64 * intervals(f)).max(1e-9),
                setup.namespaces
            )),
            f.confirmed.map_or("—".into(), |(c, all)| format!(
                "{:.0} % ({c:.0} of {all:.0})",
                100.0 * c / all.max(1.0)
            )),
        );
    }
    if let [(_, this), (_, base)] = &results[..] {
        println!(
            "\nthis build / baseline: time to all Ready {:.2}x, CPU until Ready {:.2}x, steady CPU {:.2}x, sessions opened {:.2}x, SQL statements {:.2}x",
            this.all_ready.as_secs_f64() / base.all_ready.as_secs_f64().max(1e-9),
            this.cpu_to_ready / base.cpu_to_ready.max(1e-9),
            (this.steady_cpu / this.window) / (base.steady_cpu / base.window).max(1e-9),
            this.opened as f64 / (base.opened as f64).max(1.0),
            (this.statements as f64 / this.window) / (base.statements as f64 / base.window).max(1e-9),
        );
    }
}

/// Namespaces `<run>-team-N`, databases `<run>_team_N`, the operator `binary`
/// watching them, and the figures.
async fn scenario(binary: &std::path::Path, run: &str, setup: &Setup, kube: &KubeApi, pg: &Postgres) -> Figures {
    let total = setup.namespaces * setup.per_ns;
    let requeue = setup.requeue;
    let client = kube.client().await.expect("client");
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let mut names = Vec::new();
    let mut watched = Vec::new();
    for n in 0..setup.namespaces {
        let ns = format!("{run}-team-{n}");
        watched.push(ns.clone());
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
        let db = format!("{run}_team_{n}");
        pg.create_database(&db).await.expect("database");
        let c = pg.client(&db).await.expect("connect");
        for r in 0..setup.per_ns {
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
    // Watching only this run's namespaces: the other run's relays stay untouched.
    let mut child = Command::new(binary)
        .args([
            "--log-format",
            "text",
            "operator",
            "--relay-image",
            "example.test/relay:1",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--requeue-seconds", &requeue.to_string()])
        .args(["--namespace", &watched.join(",")])
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
            let spec = spec(pg, &db, &table);
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
    let mine = |ns: &Option<String>| ns.as_deref().is_some_and(|n| watched.iter().any(|w| w == n));
    let mut available: HashSet<(String, String)> = HashSet::new();
    let limit = Duration::from_secs(300);
    let all_ready = loop {
        for d in deployments.list(&ListParams::default()).await.expect("list").items {
            if !mine(&d.metadata.namespace) {
                continue;
            }
            let key = (
                d.metadata.namespace.clone().unwrap_or_default(),
                d.metadata.name.clone().unwrap_or_default(),
            );
            if !available.contains(&key) && mark_available(&client, &key.0, &key.1).await {
                available.insert(key);
            }
        }
        let list = relays.list(&ListParams::default()).await.expect("list relays").items;
        let n = list.iter().filter(|r| mine(&r.metadata.namespace) && ready(r)).count();
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
    let opened0 = sessions_opened(&sql, run).await;
    let statements0 = transactions(&sql, run).await;
    let addr = format!("127.0.0.1:{port}");
    let snapshots0 = counter(&addr, "outbox_operator_database_snapshots_total", "").await;
    let confirmed0 = counter(&addr, "outbox_operator_database_passes_total", "{pass=\"confirmed\"}").await;
    let passes0 = counter(&addr, "outbox_operator_database_passes_total", "").await;
    let (mut samples, mut held_sum, mut held_max) = (0u64, 0usize, 0usize);
    while start.elapsed() < setup.steady {
        let pids = operator_sessions(&sql, run).await;
        held_max = held_max.max(pids.len());
        held_sum += pids.len();
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = start.elapsed().as_secs_f64();
    let opened = sessions_opened(&sql, run).await - opened0;
    let statements = transactions(&sql, run).await - statements0;
    let snapshots = counter(&addr, "outbox_operator_database_snapshots_total", "")
        .await
        .zip(snapshots0)
        .map(|(b, a)| b - a);
    let confirmed = counter(&addr, "outbox_operator_database_passes_total", "{pass=\"confirmed\"}")
        .await
        .map(|b| b - confirmed0.unwrap_or(0.0))
        .zip(
            counter(&addr, "outbox_operator_database_passes_total", "")
                .await
                .zip(passes0)
                .map(|(b, a)| b - a),
        );
    let (cpu1, rss, peak) = usage(child.id());
    let _ = child.kill();
    let _ = child.wait();

    Figures {
        created,
        all_ready,
        cpu_to_ready: cpu_at_ready,
        window,
        steady_cpu: cpu1 - cpu0,
        rss_kib: rss,
        peak_kib: peak,
        held_mean: held_sum as f64 / samples.max(1) as f64,
        held_max,
        opened,
        reconciles: total as f64 * window / requeue as f64,
        statements,
        snapshots,
        confirmed,
    }
}
