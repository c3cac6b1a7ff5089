//! What a slot still holds: the outbox events committed after its confirmed
//! position, read with `pg_logical_slot_peek_binary_changes` (which moves nothing).
//!
//! The deletion drain uses it twice: to see that nothing is left when no worker
//! streams (an idle relay's confirmed position may trail the WAL without any event
//! in between), and to name what a forced or timed-out deletion drops unrelayed.

use bytes::Bytes;
use futures::{TryStreamExt, pin_mut};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::postgres::error::query_error;
use crate::postgres::{PgError, QualifiedTable};
use crate::relay::pgoutput::{self, PgOutputMessage};

/// How many event ids a report names; the count covers all of them.
pub const MAX_NAMED: usize = 20;
/// Upper bound of decoded changes per peek, so a huge backlog cannot hold the
/// operator (or the server) for long; a report past it says "at least".
pub const MAX_CHANGES: i32 = 2_000_000;

/// Outbox events a slot holds up to a position.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub events: u64,
    /// The first [`MAX_NAMED`] event ids, in commit order.
    pub first_ids: Vec<String>,
    /// The peek stopped at [`MAX_CHANGES`]: there may be more.
    pub truncated: bool,
}

impl Pending {
    /// "3 events (ids a, b, c)", for messages.
    pub fn describe(&self) -> String {
        let at_least = if self.truncated { "at least " } else { "" };
        let plural = if self.events == 1 { "" } else { "s" };
        if self.first_ids.is_empty() {
            return format!("{at_least}{} event{plural}", self.events);
        }
        let more = if (self.events as usize) > self.first_ids.len() {
            ", ..."
        } else {
            ""
        };
        format!(
            "{at_least}{} event{plural} (ids {}{more})",
            self.events,
            self.first_ids.join(", ")
        )
    }
}

/// Counts the inserts into `table` that the slot would still send, up to commits
/// before `upto_lsn` (`None`: everything). Fails with `SlotInUse` while a worker
/// streams from the slot: a slot has one reader at a time.
pub async fn pending_events(
    client: &Client,
    slot: &str,
    publication: &str,
    table: &QualifiedTable,
    id_column: &str,
    message_prefix: Option<&str>,
    upto_lsn: Option<&str>,
) -> Result<Pending, PgError> {
    let action = "peek at the replication slot's pending changes";
    // With a message prefix (`source: Messages`) the events are messages, which
    // pgoutput sends only when asked (an option servers before 14 do not know).
    let sql = if message_prefix.is_some() {
        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
         'proto_version', '1', 'publication_names', $4, 'messages', 'true')"
    } else {
        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
         'proto_version', '1', 'publication_names', $4)"
    };
    let rows = client
        .query_raw(
            sql,
            [
                &slot as &(dyn tokio_postgres::types::ToSql + Sync),
                &upto_lsn,
                &MAX_CHANGES,
                &publication,
            ],
        )
        .await
        .map_err(|e| peek_error(slot, e))?;
    pin_mut!(rows);
    let mut out = Pending::default();
    let mut changes: i64 = 0;
    // (relation id, index of the id column) of the outbox table, once seen.
    let mut outbox: Option<(u32, Option<usize>)> = None;
    while let Some(row) = rows.try_next().await.map_err(|e| peek_error(slot, e))? {
        changes += 1;
        let data: Vec<u8> = row.try_get(0).map_err(|e| query_error(action, e))?;
        let data = Bytes::from(data);
        let Ok(msg) = pgoutput::decode(&data) else {
            continue;
        };
        match msg {
            // Transactional only: the relay refuses the others, so they are not pending.
            PgOutputMessage::Message(m) if message_prefix == Some(m.prefix.as_str()) && m.transactional() => {
                out.events += 1;
                if out.first_ids.len() < MAX_NAMED {
                    let (id, _) = crate::relay::message::raw_row(&m);
                    out.first_ids.push(id.unwrap_or_else(|| "<no id>".into()));
                }
            }
            PgOutputMessage::Relation(r)
                if message_prefix.is_none() && r.namespace == table.schema && r.name == table.name =>
            {
                outbox = Some((r.id, r.columns.iter().position(|c| c.name == id_column)));
            }
            PgOutputMessage::Insert(i) if outbox.is_some_and(|(id, _)| id == i.relation_id) => {
                out.events += 1;
                if out.first_ids.len() < MAX_NAMED {
                    let id = outbox
                        .and_then(|(_, col)| col)
                        .and_then(|c| i.new.get(c))
                        .and_then(|v| v.as_str())
                        .unwrap_or("<no id>");
                    out.first_ids.push(id.to_string());
                }
            }
            _ => {}
        }
    }
    out.truncated = changes >= i64::from(MAX_CHANGES);
    Ok(out)
}

fn peek_error(slot: &str, e: tokio_postgres::Error) -> PgError {
    if e.code() == Some(&SqlState::OBJECT_IN_USE) {
        return PgError::SlotInUse {
            slot: slot.to_string(),
            pid: None,
        };
    }
    query_error("peek at the replication slot's pending changes", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_name_ids_and_say_when_cut() {
        let p = Pending {
            events: 1,
            first_ids: vec!["a".into()],
            truncated: false,
        };
        assert_eq!(p.describe(), "1 event (ids a)");
        let p = Pending {
            events: 30,
            first_ids: vec!["a".into(), "b".into()],
            truncated: true,
        };
        assert_eq!(p.describe(), "at least 30 events (ids a, b, ...)");
        assert_eq!(Pending::default().describe(), "0 events");
    }
}
