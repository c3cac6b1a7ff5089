//! Outbox relay operator: moves transactional-outbox rows from PostgreSQL to Kafka.
//!
//! Module map (see docs/architecture.md):
//! - [`api`]: the `OutboxRelay` resource, its conditions and reasons.
//! - [`controller`]: the operator's reconciler (Deployment, publication, slot, status).
//! - [`postgres`]: SQL side: connecting, prerequisites, publication and slot, lag.
//! - [`relay`]: the worker's data path (replication stream, pgoutput, records, checkpoints).
//! - [`kafka`]: producer settings, delivery reports and error kinds.
//! - [`metrics`], [`http`]: Prometheus metrics and the health/metrics endpoints.
//! - [`lease`]: leader election among operator replicas.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod http;
pub mod kafka;
pub mod lease;
pub mod metrics;
pub mod postgres;
pub mod relay;
pub mod telemetry;
