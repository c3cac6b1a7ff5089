//! The relay worker: logical replication stream → outbox events → Kafka records.
//!
//! Nothing in here knows about Kubernetes; the operator renders the worker's
//! configuration and the worker only sees PostgreSQL and Kafka.

pub mod lsn;
pub mod pgoutput;
pub mod replication;
