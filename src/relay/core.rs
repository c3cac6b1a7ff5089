//! The delivery core: every per-event decision of the relay, as one pure state machine.
//!
//! Inputs are what the replication stream and the producer report ([`Input`]:
//! Begin, Insert, Commit, Delivered, Refused, Parked, Keepalive); outputs are what
//! the session must do ([`Action`]: Produce, DeadLetter, Park, Confirm,
//! DeleteRows, Stop, ...). No I/O, no clock, no Kafka or PostgreSQL client: the
//! session (`super::session`) is thin I/O around it, and every rule below has a
//! fast deterministic unit test.
//!
//! The rules, in the order they protect the promise "no committed event is lost
//! or silently skipped":
//! 1. A position is confirmable only when every record *and park* of every
//!    transaction up to it is acknowledged ([`Checkpoints`]): a refused record is
//!    never acknowledged, so nothing after it is ever confirmed.
//! 2. Under `Stop`, a refused event stops the core: no record after it is produced,
//!    and its transaction (so everything after it) is never confirmed. A refusal the
//!    broker gives after sending can arrive after later records were acknowledged;
//!    those records are in Kafka but their positions stay unconfirmed, so the next
//!    session sends them again after the poison event (see docs/architecture.md).
//! 3. Under `DeadLetter`, a refused event is first *parked* (written whole to the
//!    park table, acknowledged by [`Input::Parked`]), then a copy goes to the
//!    dead-letter topic; for an oversized event that copy is a payload-less pointer.
//!    Both count as pending, so the position past the event is confirmed only after
//!    the park write and the dead-letter acknowledgement.
//! 4. A skip request names exactly one event (id and commit LSN): that event is
//!    parked instead of produced (or instead of stopping), whatever the policy.
//! 5. Relayed-row deletion (`deleteAfterRelay`) only ever lists events delivered
//!    whole to their own topic, and only once their transaction is confirmed.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use super::checkpoint::{Checkpoints, TxnSeq};
use super::lsn::Lsn;
use super::mapping::OutboxRecord;
use super::pgoutput::PgTimestamp;
use super::tag::{SEQ_BITS, Tag};
use crate::api::PoisonPolicy;
use crate::kafka::FailedRecord;

/// Header names the relay writes.
pub mod headers {
    pub const ID: &str = "id";
    pub const TYPE: &str = "type";
    pub const ERROR_KIND: &str = "outbox-error-kind";
    pub const ERROR_REASON: &str = "outbox-error-reason";
    pub const ORIGINAL_TOPIC: &str = "outbox-original-topic";
    /// On a dead-letter pointer: the event's whole copy is in the park table.
    pub const PARKED_IN: &str = "outbox-parked-in";
    /// Commit LSN of the event's transaction (with the id, names the event exactly).
    pub const COMMIT_LSN: &str = "outbox-commit-lsn";
}

/// Category of an oversized event (also its condition reason and metric label).
pub const MESSAGE_TOO_LARGE: &str = "MessageTooLarge";
/// Category of a dead-letter copy the broker refused.
pub const DEAD_LETTER_FAILED: &str = "DeadLetterFailed";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    #[error("replication protocol: {0}")]
    Protocol(&'static str),
}

impl CoreError {
    pub fn category(&self) -> &'static str {
        "Protocol"
    }
}

/// One event, named the way users see it in status and give it back in a skip
/// request: its id and the commit LSN of its transaction (`<id>@<lsn>`). The
/// commit LSN is known both when the row is read and when a delivery report comes
/// back (it is kept per transaction), unlike the insert's own LSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRef {
    pub event_id: String,
    pub commit_lsn: Lsn,
}

impl fmt::Display for EventRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.event_id, self.commit_lsn)
    }
}

impl std::str::FromStr for EventRef {
    type Err = String;
    /// Parses `<id>@<lsn>`; the id may itself contain `@` (the last one splits).
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, lsn) = s
            .trim()
            .rsplit_once('@')
            .ok_or_else(|| format!("{s:?} is not <event id>@<commit LSN>"))?;
        let commit_lsn = lsn
            .parse::<Lsn>()
            .map_err(|_| format!("{lsn:?} in {s:?} is not an LSN like 0/16B3748"))?;
        if id.is_empty() {
            return Err(format!("{s:?} has no event id"));
        }
        Ok(Self {
            event_id: id.to_string(),
            commit_lsn,
        })
    }
}

/// The core's fixed settings.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub policy: PoisonPolicy,
    pub dead_letter_topic: Option<Arc<str>>,
    /// Largest record sent to the event's own topic (key, payload and headers).
    pub max_message_bytes: usize,
    /// `deleteAfterRelay`: report delivered event ids for deletion.
    pub delete_rows: bool,
    /// The one event to park instead of delivering (the skip annotation).
    pub skip: Option<EventRef>,
    /// Where parked events go, named in dead-letter pointers.
    pub park_table: Arc<str>,
}

/// An inserted outbox row, as the session hands it over.
#[derive(Debug)]
pub enum Row {
    /// Mapped and ready to send.
    Event(OutboxRecord),
    /// Mapped, but a check before sending refused it (topic missing or not
    /// authorized, from the producer's metadata).
    Refused {
        record: OutboxRecord,
        kind: &'static str,
        reason: String,
    },
    /// The mapping refused the row; `row` holds every column's text form.
    Unmapped {
        event_id: Option<String>,
        row: serde_json::Value,
        kind: &'static str,
        reason: String,
    },
}

#[derive(Debug)]
pub enum Input {
    Begin {
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    Insert(Row),
    Commit {
        end_lsn: Lsn,
    },
    /// Kafka acknowledged the record sent with this tag.
    Delivered {
        tag: usize,
    },
    /// Kafka refused the record sent with this tag for good (a poison kind).
    Refused {
        tag: usize,
        kind: &'static str,
        reason: String,
        record: FailedRecord,
    },
    /// The park write issued with this tag is durable.
    Parked {
        tag: usize,
    },
    /// Server keepalive: with nothing open, its position may be confirmed.
    Keepalive {
        wal_end: Lsn,
    },
}

/// An event written whole to the park table.
#[derive(Clone, Debug, PartialEq)]
pub struct ParkedEvent {
    pub event: EventRef,
    /// Why it did not go to its topic (a category such as `MessageTooLarge`).
    pub kind: &'static str,
    pub reason: String,
    /// Everything its Kafka record would carry (topic, key, payload, headers).
    pub record: FailedRecord,
    /// For rows the mapping refused: every column's text form.
    pub row: Option<serde_json::Value>,
    /// Parked on a skip request rather than by the dead-letter policy.
    pub skipped: bool,
}

/// Why the relay stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    pub kind: &'static str,
    pub event: EventRef,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Relayed,
    DeadLettered,
    Parked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Parked => "parked",
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send to the event's topic, with this delivery tag.
    Produce { tag: usize, record: OutboxRecord },
    /// Send this copy to the dead-letter topic.
    DeadLetter {
        tag: usize,
        topic: Arc<str>,
        record: FailedRecord,
    },
    /// Write to the park table, then feed [`Input::Parked`] with the tag.
    Park { tag: usize, event: Box<ParkedEvent> },
    /// One record or park acknowledged (for metrics).
    Acked {
        outcome: Outcome,
        commit_time: Option<PgTimestamp>,
    },
    /// A transaction with events was fully delivered (for metrics).
    Released {
        events: u32,
        bytes: u64,
        commit_time: PgTimestamp,
    },
    /// The confirmable position moved here.
    Confirm(Lsn),
    /// Delete these delivered rows (`deleteAfterRelay`).
    DeleteRows(Vec<Bytes>),
    /// The skip request was applied to this event.
    Skipped(EventRef),
    /// Halt: nothing after this event is produced or confirmed.
    Stop(Stop),
}

/// Per-transaction data kept until the transaction is confirmed.
#[derive(Debug)]
struct TxnMeta {
    commit_lsn: Lsn,
    commit_time: PgTimestamp,
    events: u32,
    /// Key, payload and header bytes of the records sent to their own topic.
    bytes: u64,
    /// Ids of events sent whole to their own topic (only with `deleteAfterRelay`).
    ids: Vec<Bytes>,
}

pub struct DeliveryCore {
    cfg: CoreConfig,
    cp: Checkpoints<TxnMeta>,
    current: Option<TxnSeq>,
    stopped: Option<Stop>,
    bytes_in_flight: u64,
    /// Refused records left pending on purpose (they block the position).
    refused_in_flight: usize,
}

impl DeliveryCore {
    pub fn new(cfg: CoreConfig, resumed_from: Lsn) -> Self {
        Self {
            cfg,
            cp: Checkpoints::new(resumed_from),
            current: None,
            stopped: None,
            bytes_in_flight: 0,
            refused_in_flight: 0,
        }
    }

    /// Highest LSN that may be sent as the flush position.
    pub fn confirmed(&self) -> Lsn {
        self.cp.confirmed()
    }
    /// Records and parks awaiting acknowledgement.
    pub fn in_flight(&self) -> usize {
        self.cp.in_flight()
    }
    /// Bytes of records sent and not yet reported back (bounds librdkafka's memory).
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }
    pub fn open_transactions(&self) -> usize {
        self.cp.open_transactions()
    }
    /// Records that were refused and stay pending, so they block the position;
    /// their reports never come (a drain waits only for the others).
    pub fn refused_in_flight(&self) -> usize {
        self.refused_in_flight
    }
    /// Why the core stopped, if it did.
    pub fn stopped(&self) -> Option<&Stop> {
        self.stopped.as_ref()
    }

    /// Feeds one input; appends what to do to `out` (a buffer the caller reuses,
    /// so the per-event path allocates nothing here).
    pub fn step(&mut self, input: Input, out: &mut Vec<Action>) -> Result<(), CoreError> {
        match input {
            Input::Begin {
                commit_lsn,
                commit_time,
            } => {
                self.current = Some(self.cp.begin(TxnMeta {
                    commit_lsn,
                    commit_time,
                    events: 0,
                    bytes: 0,
                    ids: Vec::new(),
                }));
            }
            Input::Insert(row) => {
                let txn = self
                    .current
                    .ok_or(CoreError::Protocol("insert outside a transaction"))?;
                if self.stopped.is_none() {
                    self.insert(txn, row, out);
                }
            }
            Input::Commit { end_lsn } => {
                let txn = self.current.take().ok_or(CoreError::Protocol("commit without begin"))?;
                let done = self.cp.commit(txn, end_lsn);
                self.released(done, out);
            }
            Input::Delivered { tag } => {
                let tag = Tag::decode(tag);
                let txn = self.cp.resolve(tag.txn.as_u64(), SEQ_BITS);
                self.bytes_in_flight = self.bytes_in_flight.saturating_sub(tag.size);
                let outcome = if tag.dead_letter {
                    Outcome::DeadLettered
                } else {
                    Outcome::Relayed
                };
                self.acked(txn, outcome, out);
            }
            Input::Parked { tag } => {
                let txn = self.cp.resolve(Tag::decode(tag).txn.as_u64(), SEQ_BITS);
                self.acked(txn, Outcome::Parked, out);
            }
            Input::Refused {
                tag,
                kind,
                reason,
                record,
            } => {
                let tag = Tag::decode(tag);
                let txn = self.cp.resolve(tag.txn.as_u64(), SEQ_BITS);
                self.bytes_in_flight = self.bytes_in_flight.saturating_sub(tag.size);
                if tag.dead_letter {
                    // The event is parked already; its dead-letter copy not being
                    // taken still must not let the position pass it unannounced.
                    self.refused_in_flight += 1;
                    let event = self.event_ref(txn, &record);
                    self.stop(
                        DEAD_LETTER_FAILED,
                        event,
                        format!("the dead-letter topic refused it: {reason}"),
                        out,
                    );
                } else if self.stopped.is_none() {
                    // The record still holds its in-flight slot: it is replaced by
                    // the park and dead-letter copy, or it blocks the position forever.
                    self.refuse(txn, record, None, kind, reason, true, out);
                } else {
                    self.refused_in_flight += 1;
                }
            }
            Input::Keepalive { wal_end } => {
                if self.cp.idle_advance(wal_end) {
                    out.push(Action::Confirm(self.cp.confirmed()));
                }
            }
        }
        Ok(())
    }

    fn insert(&mut self, txn: TxnSeq, row: Row, out: &mut Vec<Action>) {
        if let Some(meta) = self.cp.meta_mut(txn) {
            meta.events += 1;
        }
        match row {
            Row::Event(record) => {
                let size = record.size();
                let too_large = size > self.cfg.max_message_bytes;
                if self.skip_matches(txn, record.event_id.as_deref()) {
                    let (kind, reason) = if too_large {
                        (MESSAGE_TOO_LARGE, self.too_large(size))
                    } else {
                        ("", String::new())
                    };
                    self.park_skipped(txn, failed_record(&record), None, kind, reason, out);
                } else if too_large {
                    let reason = self.too_large(size);
                    self.refuse(txn, failed_record(&record), None, MESSAGE_TOO_LARGE, reason, false, out);
                } else {
                    self.cp.add_record(txn);
                    self.bytes_in_flight += Tag::new(txn, size, false).size;
                    if let Some(meta) = self.cp.meta_mut(txn) {
                        meta.bytes += size as u64;
                        if self.cfg.delete_rows
                            && let Some(id) = &record.event_id
                        {
                            meta.ids.push(id.clone());
                        }
                    }
                    out.push(Action::Produce {
                        tag: Tag::new(txn, size, false).encode(),
                        record,
                    });
                }
            }
            Row::Refused { record, kind, reason } => {
                if self.skip_matches(txn, record.event_id.as_deref()) {
                    self.park_skipped(txn, failed_record(&record), None, kind, reason, out);
                } else {
                    self.refuse(txn, failed_record(&record), None, kind, reason, false, out);
                }
            }
            Row::Unmapped {
                event_id,
                row,
                kind,
                reason,
            } => {
                let copy = FailedRecord {
                    topic: String::new(),
                    key: None,
                    payload: Some(row.to_string().into_bytes()),
                    headers: event_id
                        .iter()
                        .map(|id| (headers::ID.to_string(), id.clone().into_bytes()))
                        .collect(),
                };
                if self.skip_matches(txn, event_id.as_deref().map(str::as_bytes)) {
                    self.park_skipped(txn, copy, Some(row), kind, reason, out);
                } else {
                    self.refuse(txn, copy, Some(row), kind, reason, false, out);
                }
            }
        }
    }

    fn too_large(&self, size: usize) -> String {
        format!(
            "the record is {size} bytes, more than maxMessageBytes {}",
            self.cfg.max_message_bytes
        )
    }

    fn skip_matches(&self, txn: TxnSeq, event_id: Option<&[u8]>) -> bool {
        let (Some(skip), Some(id)) = (&self.cfg.skip, event_id) else {
            return false;
        };
        id == skip.event_id.as_bytes() && self.commit_lsn(txn) == Some(skip.commit_lsn)
    }

    fn commit_lsn(&self, txn: TxnSeq) -> Option<Lsn> {
        self.cp.meta(txn).map(|m| m.commit_lsn)
    }

    fn event_ref(&self, txn: TxnSeq, record: &FailedRecord) -> EventRef {
        EventRef {
            event_id: event_id_of(record),
            commit_lsn: self.commit_lsn(txn).unwrap_or(Lsn::ZERO),
        }
    }

    /// The skip request names this event: park it instead of delivering it, and
    /// forget the request (it names exactly one event).
    fn park_skipped(
        &mut self,
        txn: TxnSeq,
        record: FailedRecord,
        row: Option<serde_json::Value>,
        kind: &'static str,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        let event = self.event_ref(txn, &record);
        self.cfg.skip = None;
        let reason = if kind.is_empty() {
            "skipped on request (outbox.dev/skip-event)".to_string()
        } else {
            format!("skipped on request (outbox.dev/skip-event); it was refused: {reason}")
        };
        self.cp.add_record(txn);
        out.push(Action::Park {
            tag: Tag::new(txn, 0, false).encode(),
            event: Box::new(ParkedEvent {
                event: event.clone(),
                kind: if kind.is_empty() { "Skipped" } else { kind },
                reason,
                record,
                row,
                skipped: true,
            }),
        });
        out.push(Action::Skipped(event));
    }

    /// An event that cannot go to its topic: stop, or park it and dead-letter a copy.
    /// `counted`: the event's record was produced and still holds an in-flight slot.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &mut self,
        txn: TxnSeq,
        record: FailedRecord,
        row: Option<serde_json::Value>,
        kind: &'static str,
        reason: String,
        counted: bool,
        out: &mut Vec<Action>,
    ) {
        let event = self.event_ref(txn, &record);
        if counted {
            // Not delivered whole to its topic: never list its row for deletion.
            if let Some(meta) = self.cp.meta_mut(txn)
                && let Some(pos) = meta.ids.iter().position(|id| id.as_ref() == event.event_id.as_bytes())
            {
                meta.ids.swap_remove(pos);
            }
        }
        let (PoisonPolicy::DeadLetter, Some(dlq)) = (self.cfg.policy, self.cfg.dead_letter_topic.clone()) else {
            // The poison event holds an in-flight slot for good: its
            // transaction, and so every position after it, is never confirmed
            // (even when its commit arrives or later records are acknowledged).
            if !counted {
                self.cp.add_record(txn);
            }
            self.refused_in_flight += 1;
            self.stop(kind, event, reason, out);
            return;
        };
        // Park first: the only whole copy must be durable before anything lets the
        // position pass the event (both the park and the copy count as pending).
        self.cp.add_record(txn);
        out.push(Action::Park {
            tag: Tag::new(txn, 0, false).encode(),
            event: Box::new(ParkedEvent {
                event: event.clone(),
                kind,
                reason: reason.clone(),
                record: record.clone(),
                row,
                skipped: false,
            }),
        });
        let copy = dead_letter_copy(record, kind, &reason, &event, &self.cfg.park_table);
        let size = copy.key.as_ref().map_or(0, Vec::len)
            + copy.payload.as_ref().map_or(0, Vec::len)
            + copy.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let tag = Tag::new(txn, size, true);
        if !counted {
            self.cp.add_record(txn);
        }
        self.bytes_in_flight += tag.size;
        out.push(Action::DeadLetter {
            tag: tag.encode(),
            topic: dlq,
            record: copy,
        });
    }

    fn stop(&mut self, kind: &'static str, event: EventRef, reason: String, out: &mut Vec<Action>) {
        if self.stopped.is_some() {
            return;
        }
        let stop = Stop { kind, event, reason };
        self.stopped = Some(stop.clone());
        out.push(Action::Stop(stop));
    }

    fn acked(&mut self, txn: TxnSeq, outcome: Outcome, out: &mut Vec<Action>) {
        let commit_time = self.cp.meta(txn).map(|m| m.commit_time);
        out.push(Action::Acked { outcome, commit_time });
        let done = self.cp.ack(txn);
        self.released(done, out);
    }

    fn released(&mut self, done: Vec<TxnMeta>, out: &mut Vec<Action>) {
        if done.is_empty() {
            return;
        }
        let mut ids = Vec::new();
        for meta in done {
            if meta.events > 0 {
                out.push(Action::Released {
                    events: meta.events,
                    bytes: meta.bytes,
                    commit_time: meta.commit_time,
                });
            }
            ids.extend(meta.ids);
        }
        out.push(Action::Confirm(self.cp.confirmed()));
        if !ids.is_empty() {
            out.push(Action::DeleteRows(ids));
        }
    }
}

/// A copy of a mapped record, for parking and dead-lettering (refusal path only).
pub fn failed_record(r: &OutboxRecord) -> FailedRecord {
    let mut hs = Vec::with_capacity(2 + r.extra_headers.len());
    if let Some(id) = &r.event_id {
        hs.push((headers::ID.to_string(), id.to_vec()));
    }
    if let Some(t) = &r.event_type {
        hs.push((headers::TYPE.to_string(), t.to_vec()));
    }
    hs.extend(r.extra_headers.iter().map(|(k, v)| (k.clone(), v.to_vec())));
    FailedRecord {
        topic: r.topic.to_string(),
        key: r.key.as_ref().map(|k| k.to_vec()),
        payload: r.payload.as_ref().map(|p| p.to_vec()),
        headers: hs,
    }
}

pub fn event_id_of(r: &FailedRecord) -> String {
    r.headers
        .iter()
        .find(|(k, _)| k == headers::ID)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| "<null id>".into())
}

/// The dead-letter copy: the record with the reason in headers. For an oversized
/// event it is a pointer (key, id, type and the reason; no payload and no extra
/// headers, so it always fits), the whole event being in the park table.
fn dead_letter_copy(
    mut record: FailedRecord,
    kind: &'static str,
    reason: &str,
    event: &EventRef,
    park_table: &str,
) -> FailedRecord {
    if kind == MESSAGE_TOO_LARGE {
        record.payload = None;
        record.headers.retain(|(k, _)| k == headers::ID || k == headers::TYPE);
    }
    let original = std::mem::take(&mut record.topic);
    record.headers.extend([
        (headers::ERROR_KIND.to_string(), kind.as_bytes().to_vec()),
        (headers::ERROR_REASON.to_string(), reason.as_bytes().to_vec()),
        (headers::ORIGINAL_TOPIC.to_string(), original.clone().into_bytes()),
        (
            headers::COMMIT_LSN.to_string(),
            event.commit_lsn.to_string().into_bytes(),
        ),
        (headers::PARKED_IN.to_string(), park_table.as_bytes().to_vec()),
    ]);
    record.topic = original;
    record
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
