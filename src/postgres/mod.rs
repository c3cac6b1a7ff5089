//! PostgreSQL side of a relay, over ordinary SQL connections: connecting (with
//! libpq's `sslmode` meaning), checking prerequisites, provisioning the publication
//! and logical replication slot, and reading the slot's health.
//!
//! Used by the operator's reconciler (provision, observe, clean up) and by the
//! worker (which streams over its own replication connection, see `relay`).

pub mod connect;
pub mod error;
pub mod ident;
pub mod provision;
pub mod slot;

pub use connect::{CONNECT_TIMEOUT, PgConnectConfig, connect, tls_client_config};
pub use error::PgError;
pub use ident::{QualifiedTable, quote_ident, quote_literal};
pub use provision::{
    OUTPUT_PLUGIN, Prerequisites, Provisioned, check_prerequisites, drop_publication, drop_slot, ensure_publication,
    ensure_slot,
};
pub use slot::{LagLevel, SlotInfo, classify_lag, slot_status};
