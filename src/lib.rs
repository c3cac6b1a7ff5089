//! Outbox relay operator: moves transactional-outbox rows from PostgreSQL to Kafka.
//!
//! Module map (see docs/architecture.md):
//! - [`api`]: the `OutboxRelay` resource, its conditions and reasons.
//! - [`relay`]: the worker's data path (replication stream, pgoutput, records, checkpoints).
#![forbid(unsafe_code)]

pub mod api;
pub mod relay;
