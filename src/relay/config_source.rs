//! `spec.outbox.source`: the outbox table, or the settings of a tableless relay.

use std::time::Duration;

use super::ConfigError;
use crate::api::{OutboxRelaySpec, OutboxSource, RelayMode};
use crate::postgres::QualifiedTable;

/// The resolved settings of `source: Messages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSource {
    pub prefix: String,
    /// The SQL function applications call to emit an event.
    pub function: QualifiedTable,
}

/// The resolved settings of `mode: Polling`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollSettings {
    pub order_column: String,
    pub batch_size: usize,
    pub min_interval: Duration,
    pub max_interval: Duration,
}

/// `mode: Polling` and its settings; `None` for a replication relay. The API
/// server checks the same rules (CEL); a spec file never passed it.
pub(super) fn polling(spec: &OutboxRelaySpec) -> Result<Option<PollSettings>, ConfigError> {
    let bad = |why: &str| Err(ConfigError::InvalidSource(why.to_string()));
    match (spec.mode, &spec.polling) {
        (RelayMode::Replication, None) => Ok(None),
        (RelayMode::Replication, Some(_)) => {
            bad("polling is only read with mode Polling: remove it or set mode: Polling")
        }
        (RelayMode::Polling, None) => bad("mode Polling needs spec.polling with at least orderColumn"),
        (RelayMode::Polling, Some(p)) => {
            if spec.outbox.source != OutboxSource::Table || spec.outbox.partitions.is_some() {
                return bad(crate::api::polling::SOURCE_MESSAGE);
            }
            let min = p.min_interval_ms.clamp(1, 60_000) as u64;
            Ok(Some(PollSettings {
                order_column: p.order_column.clone(),
                batch_size: p.batch_size.clamp(1, 10_000) as usize,
                min_interval: Duration::from_millis(min),
                max_interval: Duration::from_millis((p.max_interval_ms.clamp(1, 60_000) as u64).max(min)),
            }))
        }
    }
}

/// The outbox table, or for messages the park table's base name and the message
/// settings. The API server checks the same rules (CEL); a spec file never passed it.
pub(super) fn source(
    spec: &OutboxRelaySpec,
    slot: &str,
) -> Result<(QualifiedTable, Option<MessageSource>), ConfigError> {
    let o = &spec.outbox;
    match o.source {
        OutboxSource::Table => {
            if o.messages.is_some() {
                return Err(ConfigError::InvalidSource(
                    "messages is only read with source Messages: remove it or set source: Messages".into(),
                ));
            }
            let table = QualifiedTable::parse(&o.table).map_err(|e| ConfigError::InvalidTable(e.to_string()))?;
            Ok((table, None))
        }
        OutboxSource::Messages => {
            if !o.table.is_empty() {
                return Err(ConfigError::InvalidSource(
                    "source Messages reads no table: leave spec.outbox.table out".into(),
                ));
            }
            if o.delete_after_relay {
                return Err(ConfigError::InvalidSource(
                    "deleteAfterRelay needs a table: messages leave nothing behind to delete".into(),
                ));
            }
            if o.partitions.is_some() {
                return Err(ConfigError::InvalidSource(
                    "partitions need a table: source Messages has no outbox table to partition".into(),
                ));
            }
            if let Some(r) = &spec.kafka.route_by
                && r.column != "aggregatetype"
            {
                return Err(ConfigError::InvalidSource(
                    "with source Messages, routeBy routes by the envelope's aggregateType: leave routeBy.column unset"
                        .into(),
                ));
            }
            let m = o.messages.clone().unwrap_or_default();
            let prefix_ok = (1..=64).contains(&m.prefix.len())
                && m.prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
            if !prefix_ok {
                return Err(ConfigError::InvalidSource(format!(
                    "messages.prefix {:?} must be 1 to 64 of A-Z a-z 0-9 . _ : -",
                    m.prefix
                )));
            }
            let function = QualifiedTable::parse(&m.function)
                .map_err(|e| ConfigError::InvalidSource(format!("messages.function: {e}")))?;
            let park_base = QualifiedTable {
                schema: function.schema.clone(),
                name: slot.to_string(),
            };
            Ok((
                park_base,
                Some(MessageSource {
                    prefix: m.prefix,
                    function,
                }),
            ))
        }
    }
}
