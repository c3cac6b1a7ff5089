//! One replication session: from `START_REPLICATION` until an error or shutdown.
//!
//! Every failure ends the session and the supervisor ([`super::worker`]) starts
//! a new one from the slot's confirmed position. That single recovery path
//! covers PostgreSQL restarts, lost connections and producer trouble alike, and
//! it is safe because nothing is confirmed before Kafka acknowledged it: the
//! new session re-sends only the unacknowledged tail.
//!
//! Kafka being down does *not* end a session: the producer retries forever
//! (no message timeout), reading pauses once `max_in_flight` events (or
//! `max_in_flight_bytes`) wait, the
//! confirmed position stays put (PostgreSQL keeps the WAL), and the worker
//! reports itself stalled until acknowledgements flow again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::checkpoint::{Checkpoints, TxnSeq};
use super::config::RelayConfig;
use super::lsn::Lsn;
use super::mapping::{Mapper, MappingError, OutboxRecord};
use super::pgoutput::{self, PgOutputError, PgOutputMessage, PgTimestamp, TupleData};
use super::replication::{
    ReplicationConnection, ReplicationError, ReplicationMessage, ReplicationReader, ReplicationWriter,
};
use super::state::{Phase, RelayState};
use crate::api::PoisonPolicy;
use crate::kafka::{self, BrokerHealth, DeliveryErrorKind, DeliveryReport, FailedRecord, RelayProducerContext};
use crate::metrics::{OutcomeLabels, RelayMetrics};

/// Header names the relay writes.
pub mod headers {
    pub const ID: &str = "id";
    pub const TYPE: &str = "type";
    pub const ERROR_KIND: &str = "outbox-error-kind";
    pub const ERROR_REASON: &str = "outbox-error-reason";
    pub const ORIGINAL_TOPIC: &str = "outbox-original-topic";
}

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("decoding pgoutput: {0}")]
    Decode(#[from] PgOutputError),
    #[error("outbox table mapping: {0}")]
    Mapping(MappingError),
    #[error("creating the Kafka producer: {0}")]
    Producer(KafkaError),
    #[error(
        "event {event_id} cannot be delivered ({kind}): {reason}; the relay stops here (poisonPolicy Stop) and retries, nothing after it is confirmed"
    )]
    Poison {
        event_id: String,
        kind: &'static str,
        reason: String,
    },
    #[error("Kafka delivery failed: {0}")]
    Delivery(String),
    #[error("dead-letter topic refused event {event_id}: {reason}")]
    DeadLetter { event_id: String, reason: String },
    #[error("the server ended the replication stream")]
    StreamEnded,
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

impl RelayError {
    /// Stable category for metrics, logs and conditions.
    pub fn category(&self) -> &'static str {
        match self {
            RelayError::Replication(e) => e.category(),
            RelayError::Decode(e) => e.category(),
            RelayError::Mapping(e) => e.category(),
            RelayError::Producer(_) => "KafkaConfig",
            RelayError::Poison { kind, .. } => kind,
            RelayError::Delivery(_) => "KafkaError",
            RelayError::DeadLetter { .. } => "DeadLetterFailed",
            RelayError::StreamEnded => "StreamEnded",
            RelayError::Protocol(_) => "Protocol",
        }
    }

    /// Another worker streams from the slot: wait as a hot standby.
    pub fn is_slot_in_use(&self) -> bool {
        matches!(self, RelayError::Replication(e) if e.is_slot_in_use())
    }
}

/// How a session that did not fail ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    Shutdown,
}

/// Per-transaction data kept until the transaction is confirmed.
#[derive(Debug)]
struct TxnMeta {
    commit_time: PgTimestamp,
    events: u32,
    /// Key, payload and header bytes of the transaction's records.
    bytes: u64,
    /// Event ids to delete once confirmed (only with `deleteAfterRelay`).
    ids: Vec<Bytes>,
}

/// What a record's Kafka delivery tag carries, packed into the integer librdkafka
/// hands back: `| transaction sequence, low 36 bits | record size: 27 bits | dead-letter: 1 bit |`.
/// The size lets the session bound the bytes in flight without a lookup per ack
/// (sizes clamp at 128 MiB, above the largest record allowed). The sequence is
/// completed from the open transactions by [`Checkpoints::resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    txn: TxnSeq,
    size: u64,
    dead_letter: bool,
}

const SIZE_BITS: u32 = 27;
const SIZE_MAX: u64 = (1 << SIZE_BITS) - 1;
const SEQ_BITS: u32 = 64 - SIZE_BITS - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Reading pauses at this many open transactions too, so a backlog of
/// transactions without outbox rows cannot grow the queue without bound.
const MAX_OPEN_TRANSACTIONS: usize = 100_000;

impl Tag {
    fn new(txn: TxnSeq, size: usize, dead_letter: bool) -> Self {
        Self {
            txn,
            size: (size as u64).min(SIZE_MAX),
            dead_letter,
        }
    }

    fn encode(self) -> usize {
        (((self.txn.as_u64() & SEQ_MASK) << (SIZE_BITS + 1)) | (self.size << 1) | u64::from(self.dead_letter)) as usize
    }

    fn decode(tag: usize) -> Self {
        let v = tag as u64;
        Self {
            txn: TxnSeq::from_u64(v >> (SIZE_BITS + 1)),
            size: (v >> 1) & SIZE_MAX,
            dead_letter: v & 1 == 1,
        }
    }
}

type Producer_ = ThreadedProducer<RelayProducerContext>;

/// Runs one session until shutdown (`Ok`) or an error.
pub async fn run(
    cfg: &RelayConfig,
    metrics: &RelayMetrics,
    state: &RelayState,
    health: &Arc<BrokerHealth>,
    deletions: Option<&mpsc::UnboundedSender<Vec<Bytes>>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SessionEnd, RelayError> {
    let conn = ReplicationConnection::connect(&cfg.replication).await?;
    let publication = super::replication::publication_names(&[cfg.publication.as_str()])?;
    // Lsn::ZERO: resume from the slot's confirmed position, wherever that is.
    let stream = conn
        .start_logical(
            &cfg.slot,
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", &publication)],
        )
        .await?;
    let (reader, writer) = stream.split();

    let (report_tx, reports) = mpsc::unbounded_channel();
    let producer: Producer_ = ThreadedProducer::from_config_and_context(
        &kafka::producer_config(&cfg.kafka),
        RelayProducerContext::new(report_tx, health.clone()),
    )
    .map_err(RelayError::Producer)?;

    metrics.sessions.inc();
    metrics.active.set(1);
    state.set_phase(Phase::Streaming);
    info!(slot = %cfg.slot, publication = %cfg.publication, "streaming from the slot");

    let mut s = Session {
        cfg,
        metrics,
        state,
        health,
        producer,
        reports,
        deletions,
        cp: Checkpoints::new(Lsn::ZERO),
        mapper: None,
        outbox_relation: None,
        outbox_columns: Vec::new(),
        current: None,
        received: Lsn::ZERO,
        sent: Lsn::ZERO,
        bytes_in_flight: 0,
        last_progress: Instant::now(),
    };
    let mut writer = writer;
    let result = match s.run(reader, &mut writer, &mut shutdown).await {
        Ok(SessionEnd::Shutdown) => s.finish(writer).await,
        Err(e) => {
            // Deliver and confirm what precedes the failure, so the next session
            // starts right at it instead of re-sending (or never getting past)
            // the events before it. Best effort: the connection may be gone.
            if !matches!(e, RelayError::Replication(_)) {
                let _ = s.drain().await;
                let _ = s.send_status(&mut writer).await;
            }
            Err(e)
        }
    };
    metrics.active.set(0);
    metrics.in_flight.set(0);
    // Records still queued belong to unconfirmed transactions that the next
    // session sends again; dropping them now only avoids needless duplicates.
    s.producer.purge(rdkafka::producer::PurgeConfig::default().queue());
    result
}

struct Session<'a> {
    cfg: &'a RelayConfig,
    metrics: &'a RelayMetrics,
    state: &'a RelayState,
    health: &'a Arc<BrokerHealth>,
    producer: Producer_,
    reports: mpsc::UnboundedReceiver<DeliveryReport>,
    deletions: Option<&'a mpsc::UnboundedSender<Vec<Bytes>>>,
    cp: Checkpoints<TxnMeta>,
    mapper: Option<Mapper>,
    outbox_relation: Option<u32>,
    outbox_columns: Vec<String>,
    current: Option<TxnSeq>,
    /// Highest WAL position seen in the stream.
    received: Lsn,
    /// Flush position last sent to the server.
    sent: Lsn,
    /// Bytes of records sent and not yet reported back; bounds librdkafka's memory.
    bytes_in_flight: u64,
    /// Last acknowledgement, or when the in-flight set last became non-empty.
    last_progress: Instant,
}

impl Session<'_> {
    async fn run(
        &mut self,
        mut reader: ReplicationReader,
        writer: &mut ReplicationWriter,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, RelayError> {
        let t = &self.cfg.tuning;
        let mut confirm_tick = tokio::time::interval(t.confirm_interval);
        confirm_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick = tokio::time::interval(t.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_in_flight = t.max_in_flight;
        let max_bytes = t.max_in_flight_bytes as u64;

        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                Some(report) = self.reports.recv() => {
                    self.on_report(report)?;
                    // Acks come in bursts; take all that are there in one go.
                    while let Ok(report) = self.reports.try_recv() {
                        self.on_report(report)?;
                    }
                }
                msg = reader.next(), if self.cp.in_flight() < max_in_flight
                    && self.bytes_in_flight < max_bytes
                    && self.cp.open_transactions() < MAX_OPEN_TRANSACTIONS => {
                    match msg? {
                        Some(ReplicationMessage::XLogData { wal_end, data, .. }) => {
                            self.received = self.received.max(wal_end);
                            self.on_wal(data).await?;
                        }
                        Some(ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. }) => {
                            self.received = self.received.max(wal_end);
                            self.cp.idle_advance(wal_end);
                            if reply_requested {
                                self.send_status(writer).await?;
                            }
                        }
                        None => return Err(RelayError::StreamEnded),
                    }
                }
                _ = confirm_tick.tick() => {
                    if self.cp.confirmed() > self.sent {
                        self.send_status(writer).await?;
                    }
                    self.check_stall();
                }
                _ = status_tick.tick() => {
                    self.send_status(writer).await?;
                }
            }
        }
    }

    fn check_stall(&mut self) {
        let in_flight = self.cp.in_flight();
        self.metrics.in_flight.set(in_flight as i64);
        let silent = self.last_progress.elapsed();
        if in_flight > 0 && silent > self.cfg.tuning.stall_after {
            let detail = self.health.last_error().unwrap_or_else(|| "no acknowledgement".into());
            self.state.set_stalled(Some(format!(
                "{in_flight} events wait for Kafka for {}s ({detail})",
                silent.as_secs()
            )));
        } else {
            self.state.set_stalled(None);
        }
    }

    async fn send_status(&mut self, writer: &mut ReplicationWriter) -> Result<(), RelayError> {
        let flush = self.cp.confirmed();
        writer
            .send_status(self.received.max(flush), flush, flush, false)
            .await?;
        if flush > self.sent {
            debug!(%flush, "confirmed");
            self.sent = flush;
            self.metrics.confirmed_lsn.set(flush.as_u64() as i64);
        }
        Ok(())
    }

    async fn on_wal(&mut self, data: Bytes) -> Result<(), RelayError> {
        match pgoutput::decode(&data)? {
            PgOutputMessage::Begin(b) => {
                self.current = Some(self.cp.begin(TxnMeta {
                    commit_time: b.commit_time,
                    events: 0,
                    bytes: 0,
                    ids: Vec::new(),
                }));
            }
            PgOutputMessage::Relation(r) if r.namespace == self.cfg.table.schema && r.name == self.cfg.table.name => {
                self.mapper =
                    Some(Mapper::new(&r, &self.cfg.columns, &self.cfg.destination).map_err(RelayError::Mapping)?);
                self.outbox_relation = Some(r.id);
                self.outbox_columns = r.columns.iter().map(|c| c.name.clone()).collect();
            }
            PgOutputMessage::Insert(i) if Some(i.relation_id) == self.outbox_relation => {
                let txn = self
                    .current
                    .ok_or(RelayError::Protocol("insert outside a transaction"))?;
                let mapper = self
                    .mapper
                    .as_mut()
                    .ok_or(RelayError::Protocol("insert before the table's relation message"))?;
                match mapper.map(&i.new) {
                    Ok(record) => {
                        let id = record.event_id.clone();
                        let size = self.produce(txn, &record).await?;
                        if let Some(meta) = self.cp.meta_mut(txn) {
                            meta.events += 1;
                            meta.bytes += size as u64;
                            if self.deletions.is_some()
                                && let Some(id) = id
                            {
                                meta.ids.push(id);
                            }
                        }
                    }
                    Err(e) => {
                        let failed = self.raw_row(&i.new);
                        let id = failed.1;
                        self.refuse(txn, failed.0, id, e.category(), e.to_string(), false)?;
                    }
                }
            }
            PgOutputMessage::Commit(c) => {
                let txn = self
                    .current
                    .take()
                    .ok_or(RelayError::Protocol("commit without begin"))?;
                let done = self.cp.commit(txn, c.end_lsn);
                self.on_confirmed(done);
            }
            // Updates, deletes and truncates are never events (the publication
            // does not even send them); other messages carry nothing we need.
            _ => {}
        }
        Ok(())
    }

    /// A row that could not be mapped, as a JSON object of its text columns, for the dead-letter topic.
    fn raw_row(&self, row: &TupleData) -> (FailedRecord, String) {
        let mut obj = serde_json::Map::new();
        for (name, v) in self.outbox_columns.iter().zip(&row.columns) {
            obj.insert(
                name.clone(),
                v.as_str()
                    .map_or(serde_json::Value::Null, |s| serde_json::Value::String(s.into())),
            );
        }
        let id = obj
            .get(&self.cfg.columns.id)
            .and_then(|v| v.as_str())
            .unwrap_or("<unknown id>")
            .to_string();
        let record = FailedRecord {
            topic: String::new(),
            key: None,
            payload: Some(serde_json::Value::Object(obj).to_string().into_bytes()),
            headers: vec![(headers::ID.into(), id.clone().into_bytes())],
        };
        (record, id)
    }

    /// Sends one record (or hands it to the poison policy); returns its size.
    async fn produce(&mut self, txn: TxnSeq, r: &OutboxRecord) -> Result<usize, RelayError> {
        let size = r.size();
        if size > self.cfg.max_message_bytes {
            let reason = format!(
                "record is {size} bytes, more than maxMessageBytes {}",
                self.cfg.max_message_bytes
            );
            self.refuse(
                txn,
                failed_record(r),
                r.event_id_str(),
                "MessageTooLarge",
                reason,
                false,
            )?;
            return Ok(size);
        }
        let mut h = OwnedHeaders::new_with_capacity(2 + r.extra_headers.len());
        if let Some(id) = &r.event_id {
            h = h.insert(Header {
                key: headers::ID,
                value: Some(&id[..]),
            });
        }
        if let Some(t) = &r.event_type {
            h = h.insert(Header {
                key: headers::TYPE,
                value: Some(&t[..]),
            });
        }
        for (k, v) in &r.extra_headers {
            h = h.insert(Header {
                key: k,
                value: Some(&v[..]),
            });
        }
        let mut record = BaseRecord::with_opaque_to(&r.topic, Tag::new(txn, size, false).encode()).headers(h);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if let Some(p) = &r.payload {
            record = record.payload(&p[..]);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    if self.cp.in_flight() == 0 {
                        self.last_progress = Instant::now();
                    }
                    self.cp.add_record(txn);
                    self.bytes_in_flight += size as u64;
                    return Ok(size);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The in-flight bound sits below librdkafka's queue size, so
                    // this is rare; wait for deliveries to make room.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    let kind = DeliveryErrorKind::classify(&e);
                    if kind.is_poison() {
                        self.refuse(
                            txn,
                            failed_record(r),
                            r.event_id_str(),
                            kind.category(),
                            e.to_string(),
                            false,
                        )?;
                        return Ok(size);
                    }
                    return Err(RelayError::Delivery(e.to_string()));
                }
            }
        }
    }

    /// An event Kafka (or the mapping) refuses for good: stop, or dead-letter it.
    /// `counted` says whether the event already holds an in-flight slot.
    fn refuse(
        &mut self,
        txn: TxnSeq,
        mut record: FailedRecord,
        event_id: String,
        kind: &'static str,
        reason: String,
        counted: bool,
    ) -> Result<(), RelayError> {
        self.metrics.error(kind);
        let (PoisonPolicy::DeadLetter, Some(dlq)) = (self.cfg.poison, &self.cfg.dead_letter_topic) else {
            return Err(RelayError::Poison { event_id, kind, reason });
        };
        warn!(%event_id, kind, %reason, topic = %dlq, "sending event to the dead-letter topic");
        if kind == "MessageTooLarge" {
            // The payload is what made it too large; headers keep the id so the
            // row can be found in the table (or the WAL) again.
            record.payload = None;
        }
        record
            .headers
            .push((headers::ERROR_KIND.into(), kind.as_bytes().to_vec()));
        record.headers.push((headers::ERROR_REASON.into(), reason.into_bytes()));
        record
            .headers
            .push((headers::ORIGINAL_TOPIC.into(), record.topic.clone().into_bytes()));
        let size = record.key.as_ref().map_or(0, Vec::len)
            + record.payload.as_ref().map_or(0, Vec::len)
            + record.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let h = kafka::owned_headers(&record.headers);
        let mut base = BaseRecord::with_opaque_to(dlq, Tag::new(txn, size, true).encode()).headers(h);
        if let Some(k) = &record.key {
            base = base.key(&k[..]);
        }
        if let Some(p) = &record.payload {
            base = base.payload(&p[..]);
        }
        self.producer.send(base).map_err(|(e, _)| RelayError::DeadLetter {
            event_id,
            reason: e.to_string(),
        })?;
        self.bytes_in_flight += size as u64;
        if !counted {
            self.cp.add_record(txn);
        }
        Ok(())
    }

    fn on_report(&mut self, report: DeliveryReport) -> Result<(), RelayError> {
        let Tag {
            txn,
            size,
            dead_letter: dead_lettered,
        } = Tag::decode(report.tag);
        let txn = self.cp.resolve(txn.as_u64(), SEQ_BITS);
        // Every send adds its size and every report, success or not, takes it back.
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(size);
        match report.result {
            Ok(()) => {
                self.last_progress = Instant::now();
                self.health.mark_up();
                let outcome = if dead_lettered { "dead_lettered" } else { "relayed" };
                self.metrics.events.get_or_create(&OutcomeLabels { outcome }).inc();
                if let Some(meta) = self.cp.meta_mut(txn)
                    && let Some(committed) = meta.commit_time.to_system_time()
                    && let Ok(age) = SystemTime::now().duration_since(committed)
                {
                    self.metrics.commit_to_ack_seconds.observe(age.as_secs_f64());
                }
                let done = self.cp.ack(txn);
                self.on_confirmed(done);
                Ok(())
            }
            Err(f) if dead_lettered => Err(RelayError::DeadLetter {
                event_id: event_id_of(&f.record),
                reason: f.error,
            }),
            Err(f) if f.kind.is_poison() => {
                let id = event_id_of(&f.record);
                self.refuse(txn, f.record, id, f.kind.category(), f.error, true)
            }
            Err(f) => {
                self.metrics.error(f.kind.category());
                Err(RelayError::Delivery(f.error))
            }
        }
    }

    fn on_confirmed(&mut self, done: Vec<TxnMeta>) {
        let mut ids = Vec::new();
        for meta in done {
            if meta.events == 0 {
                continue;
            }
            self.metrics.transaction_events.observe(f64::from(meta.events));
            self.metrics.bytes.inc_by(meta.bytes);
            if let Some(t) = meta.commit_time.to_system_time()
                && let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH)
            {
                self.metrics.last_event_timestamp_seconds.set(since.as_secs() as i64);
            }
            ids.extend(meta.ids);
        }
        if let Some(tx) = self.deletions
            && !ids.is_empty()
        {
            // Best effort: the rows are delivered; deleting them is housekeeping.
            let _ = tx.send(ids);
        }
    }

    /// Waits (bounded) for in-flight acknowledgements, confirming what they complete.
    async fn drain(&mut self) -> Result<(), RelayError> {
        let deadline = Instant::now() + self.cfg.tuning.drain_timeout;
        while self.cp.in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.reports.recv()).await {
                Ok(Some(report)) => self.on_report(report)?,
                Ok(None) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Graceful stop: drain so the next worker re-sends as little as possible,
    /// confirm, and end the stream.
    async fn finish(&mut self, mut writer: ReplicationWriter) -> Result<SessionEnd, RelayError> {
        self.drain().await?;
        self.send_status(&mut writer).await?;
        writer.finish().await?;
        info!(confirmed = %self.cp.confirmed(), left_in_flight = self.cp.in_flight(), "stopped");
        Ok(SessionEnd::Shutdown)
    }
}

fn failed_record(r: &OutboxRecord) -> FailedRecord {
    let mut hs = Vec::new();
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

fn event_id_of(r: &FailedRecord) -> String {
    r.headers
        .iter()
        .find(|(k, _)| k == headers::ID)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| "<null id>".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for (seq, size, dlq) in [
            (0, 0, false),
            (12345, 1024, true),
            ((1 << 36) - 1, SIZE_MAX as usize, true),
        ] {
            let t = Tag::new(TxnSeq::from_u64(seq), size, dlq);
            assert_eq!(Tag::decode(t.encode()), t);
        }
        let big = Tag::new(TxnSeq::from_u64(7), usize::MAX, false);
        assert_eq!(
            Tag::decode(big.encode()).size,
            SIZE_MAX,
            "sizes clamp instead of spilling into the sequence"
        );
        assert_eq!(Tag::decode(big.encode()).txn, TxnSeq::from_u64(7));
        let wrapped = Tag::new(TxnSeq::from_u64(SEQ_MASK + 5), 1, false);
        assert_eq!(
            Tag::decode(wrapped.encode()).txn,
            TxnSeq::from_u64(4),
            "only the low bits travel"
        );
    }
}
