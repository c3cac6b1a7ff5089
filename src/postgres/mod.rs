//! PostgreSQL side of a relay, over ordinary SQL connections: connecting (with
//! libpq's `sslmode` meaning), checking prerequisites, provisioning the publication
//! and logical replication slot, and reading the slot's health.
//!
//! Used by the operator's reconciler (provision, observe, clean up) and by the
//! worker (which streams over its own replication connection, see `relay`, with
//! the same TLS policy from [`tls`] and the same quoting from [`ident`]).

pub mod auth;
pub mod binding;
pub mod connect;
pub mod error;
pub mod ident;
pub mod messages;
pub mod objects;
pub mod partitions;
pub mod polling;
pub mod pool;
pub mod provision;
pub mod slot;
pub mod snapshot;
pub mod tls;

pub use connect::{CONNECT_TIMEOUT, PgConnectConfig, connect};
pub use error::PgError;
pub use ident::{QualifiedTable, quote_ident, quote_literal, quote_replication_literal};
pub use objects::{OUTPUT_PLUGIN, Provisioned, drop_publication, drop_slot, ensure_publication, ensure_slot};
pub use provision::{Prerequisites, check_message_prerequisites, check_prerequisites};
pub use slot::{LagLevel, SlotInfo, classify_lag, slot_status};
pub use tls::tls_client_config;
