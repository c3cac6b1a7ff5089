//! Where a relay's events come from: an outbox table, or logical decoding
//! messages written with `pg_logical_emit_message` (a "tableless" outbox).
//!
//! Kept apart from `mod.rs` so the source choice reads as one piece: the enum,
//! the message settings and their defaults.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the events are read from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OutboxSource {
    /// Rows inserted into `spec.outbox.table`.
    #[default]
    Table,
    /// Transactional logical decoding messages with the relay's prefix
    /// (`pg_logical_emit_message(true, prefix, content)`), PostgreSQL 14 or later.
    /// No table: nothing to clean up and less WAL per event than an insert.
    Messages,
}

/// Settings of `source: Messages`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagesSpec {
    /// Prefix of the messages this relay relays; messages with another prefix are
    /// not this relay's and are passed over. Cannot change after creation: messages
    /// written with the old prefix and not yet relayed would be passed over.
    #[serde(default = "default_prefix")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._:-]{1,64}$"))]
    pub prefix: String,
    /// Schema-qualified name of the SQL function the operator creates (and keeps up
    /// to date) for applications to call inside their transactions:
    /// `SELECT public.outbox_emit(aggregate_type, aggregate_id, event_type, payload jsonb [, headers jsonb])`
    /// returns the message's LSN. Give relays with different prefixes in one database
    /// different functions. The park table for undeliverable events lives in the
    /// same schema, named `<slot name>_parked`.
    #[serde(default = "default_function")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$"))]
    pub function: String,
}

/// Default message prefix.
pub const DEFAULT_PREFIX: &str = "outbox";
/// Default emit function.
pub const DEFAULT_FUNCTION: &str = "public.outbox_emit";

fn default_prefix() -> String {
    DEFAULT_PREFIX.into()
}
fn default_function() -> String {
    DEFAULT_FUNCTION.into()
}

impl Default for MessagesSpec {
    fn default() -> Self {
        Self {
            prefix: default_prefix(),
            function: default_function(),
        }
    }
}

// CEL on `spec.outbox`: a table exactly when the source is `Table`, message
// settings only with `Messages`, and no row deletion without rows. `source` has a
// default, so the API server fills it in before these run; `has()` keeps them
// safe on objects stored before the field existed.
pub const TABLE_RULE: &str = "(has(self.source) && self.source == 'Messages') != has(self.table)";
pub const TABLE_MESSAGE: &str =
    "set spec.outbox.table for source Table, and leave it out for source Messages (messages need no table)";
pub const MESSAGES_RULE: &str = "!has(self.messages) || (has(self.source) && self.source == 'Messages')";
pub const MESSAGES_MESSAGE: &str =
    "spec.outbox.messages is only read with source Messages: remove it or set source: Messages";
pub const DELETE_RULE: &str =
    "!(has(self.source) && self.source == 'Messages') || !has(self.deleteAfterRelay) || !self.deleteAfterRelay";
pub const DELETE_MESSAGE: &str = "deleteAfterRelay needs a table: messages leave nothing behind to delete";
/// Partitions belong to a table; a tableless relay has none to manage.
pub const PARTITIONS_RULE: &str = "!(has(self.source) && self.source == 'Messages') || !has(self.partitions)";
pub const PARTITIONS_MESSAGE: &str = "partitions need a table: source Messages has no outbox table to partition";

/// CEL on the spec: the source and the prefix are part of the relay's identity
/// (the slot's unread events were written for them). Absent fields compare as
/// their defaults, so adding `source: Table` to an old object is no change.
pub const IDENTITY_RULE: &str = "(has(self.outbox.source) ? self.outbox.source : 'Table') == (has(oldSelf.outbox.source) ? oldSelf.outbox.source : 'Table') && (has(self.outbox.messages) ? self.outbox.messages.prefix : 'outbox') == (has(oldSelf.outbox.messages) ? oldSelf.outbox.messages.prefix : 'outbox')";
pub const IDENTITY_MESSAGE: &str = "spec.outbox.source and spec.outbox.messages.prefix are immutable: the slot's unread events were written for them; create a new OutboxRelay instead";

/// CEL on the spec: with messages the route comes from the envelope's
/// `aggregateType`, so a route column other than the default would be ignored.
pub const ROUTE_RULE: &str = "!(has(self.outbox.source) && self.outbox.source == 'Messages') || !has(self.kafka.routeBy) || self.kafka.routeBy.column == 'aggregatetype'";
pub const ROUTE_MESSAGE: &str =
    "with source Messages, routeBy routes by the envelope's aggregateType: leave routeBy.column unset";
