//! `spec.mode: Polling`: the relay for databases where logical replication
//! cannot be enabled (no `wal_level = logical`, no REPLICATION role, a managed
//! service that forbids slots). The worker reads the outbox table in batches,
//! in the order of an increasing column, and deletes each row only after Kafka
//! acknowledged it.
//!
//! Kept apart from `mod.rs` so the mode reads as one piece: the enum, the
//! settings with their defaults, and the CEL rules that tie them to the rest of
//! the spec.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the relay learns about new events.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RelayMode {
    /// A logical replication slot (pgoutput): committed inserts stream in commit
    /// order, nothing is written back to the table. Needs `wal_level = logical`.
    #[default]
    Replication,
    /// Batches read from the table in `spec.polling.orderColumn` order and deleted
    /// once Kafka acknowledged them. No slot and no publication; needs SELECT and
    /// DELETE on the table.
    Polling,
}

/// Settings of `mode: Polling`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollingSpec {
    /// An integer column with positive values that grow with insertion order and
    /// are unique (a `bigserial` or identity column): rows are relayed in its order,
    /// so it is what keeps each key's events in order. The operator creates a unique
    /// index on it when there is none.
    #[schemars(length(min = 1, max = 63))]
    pub order_column: String,
    /// Rows read, sent and deleted per batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,
    /// Wait after a batch that was not full. A full batch is followed by the next
    /// one at once.
    #[serde(default = "default_min_interval")]
    #[schemars(range(min = 1, max = 60000))]
    pub min_interval_ms: i32,
    /// Longest wait between polls of an empty table: each empty poll doubles the
    /// wait from `minIntervalMs` up to this.
    #[serde(default = "default_max_interval")]
    #[schemars(range(min = 1, max = 60000))]
    pub max_interval_ms: i32,
}

fn default_batch_size() -> i32 {
    500
}
fn default_min_interval() -> i32 {
    10
}
fn default_max_interval() -> i32 {
    500
}

impl PollingSpec {
    /// The settings with their defaults, for a given order column.
    pub fn with_order_column(column: &str) -> Self {
        Self {
            order_column: column.into(),
            batch_size: default_batch_size(),
            min_interval_ms: default_min_interval(),
            max_interval_ms: default_max_interval(),
        }
    }
}

// CEL on the spec. `mode` has a default, so the API server fills it in before
// these run; `has()` keeps them safe on objects stored before the field existed.

/// `spec.polling` exactly when the mode is Polling.
pub const SETTINGS_RULE: &str = "(has(self.mode) && self.mode == 'Polling') == has(self.polling)";
pub const SETTINGS_MESSAGE: &str =
    "set spec.polling (at least orderColumn) with mode Polling, and leave it out with mode Replication";

/// Polling reads rows: a table source, and no partition retention (it drops
/// partitions by the slot's confirmed position, which a poller does not have).
pub const SOURCE_RULE: &str = "!(has(self.mode) && self.mode == 'Polling') || ((!has(self.outbox.source) || self.outbox.source == 'Table') && !has(self.outbox.partitions))";
pub const SOURCE_MESSAGE: &str = "mode Polling reads rows of spec.outbox.table: use source Table, and leave \
     spec.outbox.partitions out (partition retention follows a replication slot)";

/// The mode is part of the relay's identity: from Polling to Replication, a new
/// slot would start at the current WAL position and the rows not yet polled would
/// never be relayed; from Replication to Polling, every row the slot already
/// relayed (and that is still in the table) would be sent again and the slot left
/// behind.
pub const IDENTITY_RULE: &str =
    "(has(self.mode) ? self.mode : 'Replication') == (has(oldSelf.mode) ? oldSelf.mode : 'Replication')";
pub const IDENTITY_MESSAGE: &str = "spec.mode is immutable: switching would skip rows not yet polled, or send \
     relayed rows again; create a new OutboxRelay (and delete this one) instead";
