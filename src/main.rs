//! One binary, several roles: `relay` (the worker), `crd` (prints the CRD).
//! Wiring only; the logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use outbox_operator::api::OutboxRelay;
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
    /// Run the relay worker: stream the slot, publish to Kafka, confirm after acks.
    Relay(RelayArgs),
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", serde_norway::to_string(&OutboxRelay::crd())?);
            Ok(())
        }
        Command::Relay(args) => {
            telemetry::init(cli.log_format, "info");
            run_relay(args).await
        }
    }
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
    let cfg = RelayConfig::from_spec(&namespace, &name, &file.spec, &Credentials::from_env()?)?;

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
