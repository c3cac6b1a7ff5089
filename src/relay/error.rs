//! The session's error: one variant per kind of failure, each with a stable
//! CamelCase category (condition reason, metric label, log field).

use std::time::Duration;

use rdkafka::error::KafkaError;
use thiserror::Error;

use super::core::{CoreError, EventRef};
use super::mapping::MappingError;
use super::pgoutput::PgOutputError;
use super::replication::ReplicationError;
use crate::postgres::PgError;

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("decoding pgoutput: {0}")]
    Decode(#[from] PgOutputError),
    #[error("{0}")]
    Core(#[from] CoreError),
    #[error(
        "outbox table mapping: {0}; the relay cannot read any event until the spec's columns match the table (fix spec.outbox.columns or the table)"
    )]
    Mapping(MappingError),
    #[error("creating the Kafka producer: {0}")]
    Producer(KafkaError),
    #[error(
        "event {event} cannot be delivered ({kind}): {reason}. The relay stopped at it: nothing after it is sent or confirmed, and it retries. Fix the cause and it resumes on its own, or annotate the OutboxRelay with outbox.dev/skip-event={event} to park this one event in the park table and go on"
    )]
    Poison {
        event: EventRef,
        kind: &'static str,
        reason: String,
    },
    #[error("Kafka delivery failed: {0}")]
    Delivery(String),
    #[error(
        "cannot park event {event} in {table}: {source}. Nothing after it is confirmed; create the table (see docs) or grant the relay's role CREATE and INSERT on the schema"
    )]
    Park {
        event: EventRef,
        table: String,
        #[source]
        source: PgError,
    },
    #[error(
        "the replication connection went silent: no message from the server for {after:?} after asking for a reply; reconnecting"
    )]
    ReplicationTimeout {
        after: Duration,
        /// The server process of the silent connection: it may still hold the
        /// slot until its `wal_sender_timeout`, and the next session ends it.
        backend_pid: Option<i32>,
    },
    #[error("the server ended the replication stream")]
    StreamEnded,
    #[error("polling {table}: {source}")]
    Poll {
        table: String,
        #[source]
        source: PgError,
    },
    #[error(
        "polling {table}: {detail}. The relay stopped before this row: nothing at or after it is sent or deleted; fix the row (or the column) and it resumes on its own"
    )]
    PollOrder { table: String, detail: String },
    #[error(
        "polling {table}: PostgreSQL did not finish {step} within {after:?}; the batch is rolled back (its rows stay in the table) and polling starts over"
    )]
    PollTimeout {
        table: String,
        step: &'static str,
        after: Duration,
        /// The server process of the silent connection: it still holds the
        /// poller's advisory lock (and the batch's row locks), and the next
        /// session ends it.
        backend_pid: Option<i32>,
    },
    #[error("another worker polls {table} (it holds the poller's advisory lock); waiting as a hot standby")]
    PollerActive { table: String },
}

impl RelayError {
    /// Stable category for metrics, logs and conditions.
    pub fn category(&self) -> &'static str {
        match self {
            RelayError::Replication(e) => e.category(),
            RelayError::Decode(e) => e.category(),
            RelayError::Core(e) => e.category(),
            RelayError::Mapping(e) => e.category(),
            RelayError::Producer(_) => "KafkaConfig",
            RelayError::Poison { kind, .. } => kind,
            RelayError::Delivery(_) => "KafkaError",
            RelayError::Park { .. } => "ParkFailed",
            RelayError::ReplicationTimeout { .. } => "ReplicationTimeout",
            RelayError::StreamEnded => "StreamEnded",
            RelayError::Poll { source, .. } => match source {
                PgError::Query { .. } | PgError::ConnectionLost { .. } => "PollFailed",
                other => other.category(),
            },
            RelayError::PollOrder { .. } => "InvalidOrderColumn",
            RelayError::PollTimeout { .. } => "PollTimeout",
            RelayError::PollerActive { .. } => "PollerActive",
        }
    }

    /// Another worker streams from the slot: wait as a hot standby.
    /// In polling mode: another worker holds the table's advisory lock.
    pub fn is_slot_in_use(&self) -> bool {
        matches!(self, RelayError::Replication(e) if e.is_slot_in_use())
            || matches!(self, RelayError::PollerActive { .. })
    }

    /// The server process of our own connection that went silent, when the
    /// session ended because of it: it may still hold the slot or the poller's
    /// lock, and only this worker may end it.
    pub fn stale_backend(&self) -> Option<i32> {
        match self {
            RelayError::ReplicationTimeout { backend_pid, .. } | RelayError::PollTimeout { backend_pid, .. } => {
                *backend_pid
            }
            _ => None,
        }
    }

    /// The event the error is about, when there is one.
    pub fn event(&self) -> Option<&EventRef> {
        match self {
            RelayError::Poison { event, .. } | RelayError::Park { event, .. } => Some(event),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::lsn::Lsn;

    #[test]
    fn stop_messages_name_the_event_and_the_way_out() {
        let e = RelayError::Poison {
            event: EventRef {
                event_id: "e-1".into(),
                commit_lsn: Lsn::new(0x16B3748),
            },
            kind: "MessageTooLarge",
            reason: "the record is 9000 bytes, more than maxMessageBytes 2048".into(),
        };
        let text = e.to_string();
        assert!(text.contains("e-1@0/16B3748"), "{text}");
        assert!(text.contains("outbox.dev/skip-event=e-1@0/16B3748"), "{text}");
        assert_eq!(e.category(), "MessageTooLarge");
    }
}
