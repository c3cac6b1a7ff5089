//! One binary, several roles: `operator` (the controller), `relay` (the worker),
//! `crd` (prints the CRD), `spec-reference` (prints docs/spec-reference.md).
//! Wiring only; the logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use outbox_operator::api::OutboxRelay;
use outbox_operator::controller;
use outbox_operator::http::Probe;
use outbox_operator::lease;
use outbox_operator::relay::config::{Credentials, RelayConfig, SpecFile};
use outbox_operator::relay::worker::{self, RelayHandle};
use outbox_operator::telemetry::{self, LogFormat};
use tokio::sync::watch;

#[derive(Parser)]
#[command(version, about = "Transactional-outbox relay operator for Kubernetes")]
struct Cli {
    /// Log format.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", value_enum, default_value = "json", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the OutboxRelay CustomResourceDefinition as YAML.
    Crd,
    /// Print the spec reference (Markdown) generated from the CRD schema.
    SpecReference,
    /// Run the relay worker: stream the slot, publish to Kafka, confirm after acks.
    Relay(RelayArgs),
    /// Run the operator: reconcile OutboxRelays into worker Deployments, publications and slots.
    Operator(OperatorArgs),
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Worker image for relays that do not set spec.worker.image.
    #[arg(long, env = "OUTBOX_RELAY_IMAGE")]
    relay_image: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "OUTBOX_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Watch only these namespaces (repeat the flag or separate with commas;
    /// default: all namespaces). Needs only Roles in them, no ClusterRole.
    #[arg(long = "namespace", env = "OUTBOX_WATCH_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Seconds between reconciles of a healthy relay (refreshes lag and conditions).
    #[arg(long, env = "OUTBOX_REQUEUE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    requeue_seconds: u64,
    /// Reconcile only while holding the Lease (for more than one replica); the
    /// others serve /healthz and /readyz and stand by.
    #[arg(long, env = "OUTBOX_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "OUTBOX_LEASE_NAME", default_value = "outbox-operator")]
    lease_name: String,
    /// Namespace of the Lease (the chart passes the pod's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's name in the Lease (the chart passes the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds of silence after which a follower takes over a leader's Lease.
    #[arg(long, env = "OUTBOX_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    lease_duration_seconds: u64,
}

#[derive(clap::Args)]
struct RelayArgs {
    /// OutboxRelay resource or bare spec (YAML or JSON).
    #[arg(long, env = "OUTBOX_RELAY_SPEC_FILE", conflicts_with = "spec_json")]
    spec: Option<PathBuf>,
    /// The spec as JSON (how the operator passes it to worker pods).
    #[arg(long, env = "OUTBOX_RELAY_SPEC")]
    spec_json: Option<String>,
    /// Resource name (default: from the file's metadata).
    #[arg(long, env = "OUTBOX_RELAY_NAME")]
    name: Option<String>,
    /// Resource namespace (default: from the file's metadata, else "default").
    #[arg(long, env = "OUTBOX_RELAY_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "OUTBOX_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", serde_norway::to_string(&OutboxRelay::crd())?);
            Ok(())
        }
        Command::SpecReference => {
            print!("{}", outbox_operator::api::reference::spec_reference());
            Ok(())
        }
        Command::Relay(args) => {
            telemetry::init(cli.log_format, "info");
            // One thread for the worker's own code: a session is one sequential
            // pipeline (read, decode, map, hand to librdkafka, take acks), and
            // librdkafka runs its own threads. On a multi-thread runtime the
            // socket's readiness is picked up by a runtime worker that then wakes
            // the session's thread: two threads woken per read, and idle workers
            // spinning for work, which costs most when the cores are shared.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run_relay(args))
        }
        Command::Operator(args) => {
            telemetry::init(cli.log_format, "info");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run_operator(args))
        }
    }
}

async fn run_operator(args: OperatorArgs) -> Result<(), Box<dyn std::error::Error>> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client configuration (in-cluster or kubeconfig): {e}"))?;
    let config = controller::Config {
        relay_image: args.relay_image,
        scope: controller::WatchScope::namespaces(args.namespaces),
        requeue_interval: std::time::Duration::from_secs(args.requeue_seconds),
    };
    let handle = controller::OperatorHandle::new();
    let mut elector = args.leader_elect.then(|| {
        // The pod name plus a per-process suffix: a container restarted in the same
        // pod must not mistake its crashed predecessor's Lease for its own.
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(std::process::id());
        let identity = format!("{}_{started:08x}", args.identity.clone().unwrap_or_else(hostname));
        let d = std::time::Duration::from_secs(args.lease_duration_seconds);
        // client-go's proportions: renew deadline 2/3 and retry 2/15 of the duration.
        let timings = lease::Timings {
            lease_duration: d,
            renew_deadline: d * 2 / 3,
            retry: d * 2 / 15,
        };
        lease::Elector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            timings,
        )
    });
    let probe = OperatorProbe {
        handle: handle.clone(),
        role: elector.as_ref().map(lease::Elector::role),
    };
    let (tx, rx) = watch::channel(false);
    let listener = outbox_operator::http::bind(args.listen)
        .await
        .map_err(|e| format!("binding {}: {e}", args.listen))?;
    let http = tokio::spawn(outbox_operator::http::serve(listener, probe, rx.clone()));
    tokio::spawn(worker::shutdown_on_signal(tx.clone()));
    let mut stop = rx.clone();
    if let Some(elector) = elector.as_mut() {
        tracing::info!(identity = elector.identity(), lease = %args.lease_name, "waiting to lead");
        tokio::select! {
            () = elector.acquire() => {}
            _ = stop.wait_for(|s| *s) => {
                let _ = http.await;
                return Ok(());
            }
        }
    }
    // The controller wants a Sync future: a task handle is one, a future waiting on a
    // watch receiver is not.
    let signalled = tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let run = controller::run(client, config, handle, async move {
        let _ = signalled.await;
    });
    match elector.as_mut() {
        None => run.await,
        Some(elector) => {
            tokio::select! {
                () = run => elector.release().await,
                lost = elector.keep_leading() => {
                    // Another replica may lead by now: stop at once (dropping the
                    // controller) and let the kubelet restart this one as a follower.
                    tracing::error!(error = %lost, category = lost.category(), "stopping: no longer the leader");
                    return Err(lost.into());
                }
            }
        }
    }
    // Also stops the HTTP server when the controller ended on its own.
    let _ = tx.send(true);
    http.await??;
    Ok(())
}

/// The operator's probes: the leader reports the controller's readiness; a standby
/// replica is healthy and ready to take over, so it reports ready too (else a
/// two-replica Deployment would never be fully available).
#[derive(Clone)]
struct OperatorProbe {
    handle: controller::OperatorHandle,
    role: Option<watch::Receiver<lease::Role>>,
}

impl Probe for OperatorProbe {
    fn metrics(&self) -> String {
        self.handle.metrics()
    }

    fn readiness(&self) -> Result<String, String> {
        let role = self.role.as_ref().map(|r| r.borrow().clone());
        match role {
            None | Some(lease::Role::Leader) => self.handle.readiness(),
            Some(lease::Role::Follower { leader }) => Ok(format!("standby: {leader} leads")),
            Some(lease::Role::Candidate) => Ok("standby: electing a leader".into()),
        }
    }
}

/// The kernel's host name (a pod's name in Kubernetes), without a libc call.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "outbox-operator".into())
}

async fn run_relay(args: RelayArgs) -> Result<(), Box<dyn std::error::Error>> {
    let text = match (&args.spec, &args.spec_json) {
        (Some(path), _) => std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?,
        (None, Some(json)) => json.clone(),
        (None, None) => return Err("give --spec FILE or OUTBOX_RELAY_SPEC".into()),
    };
    let file = SpecFile::parse(&text)?;
    let name = args
        .name
        .or(file.name)
        .ok_or("no relay name: set --name or metadata.name")?;
    let namespace = args.namespace.or(file.namespace).unwrap_or_else(|| "default".into());
    let skip = std::env::var(outbox_operator::relay::config::env::SKIP_EVENT)
        .ok()
        .or(file.skip_event);
    let cfg =
        RelayConfig::from_spec(&namespace, &name, &file.spec, &Credentials::from_env()?)?.with_skip(skip.as_deref())?;

    let handle = RelayHandle::new();
    let (tx, rx) = watch::channel(false);
    let listener = outbox_operator::http::bind(args.listen)
        .await
        .map_err(|e| format!("binding {}: {e}", args.listen))?;
    let http = tokio::spawn(outbox_operator::http::serve(listener, handle.clone(), rx.clone()));
    tokio::spawn(worker::shutdown_on_signal(tx));
    worker::run(cfg, handle, rx).await;
    http.await??;
    Ok(())
}
