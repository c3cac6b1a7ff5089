//! One binary, several roles: `operator`, `relay`, `crd`.
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use outbox_operator::api::OutboxRelay;

#[derive(Parser)]
#[command(version, about = "Transactional-outbox relay operator for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the OutboxRelay CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", serde_norway::to_string(&OutboxRelay::crd())?);
        }
    }
    Ok(())
}
