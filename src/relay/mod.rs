//! The relay worker: logical replication stream → outbox events → Kafka records.
//!
//! Nothing in here knows about Kubernetes; the operator renders the worker's
//! configuration and the worker only sees PostgreSQL and Kafka.

pub mod checkpoint;
pub mod config;
pub mod core;
pub mod envelope;
pub mod error;
pub mod lsn;
pub mod mapping;
pub mod message;
pub mod park;
pub mod pgoutput;
pub mod polling;
pub mod replication;
pub mod retention;
pub mod session;
pub mod state;
pub mod status_report;
pub mod tag;
mod topics;
pub mod worker;
