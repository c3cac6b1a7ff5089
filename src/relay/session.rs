//! One replication session: from `START_REPLICATION` until an error or shutdown.
//!
//! Thin I/O around the delivery core ([`super::core`]): it reads the stream,
//! maps rows, feeds the core, and carries out what the core decides (produce,
//! dead-letter, park, delete rows, stop). Every per-event decision is the core's.
//!
//! Every failure ends the session and the supervisor ([`super::worker`]) starts
//! a new one from the slot's confirmed position. That single recovery path
//! covers PostgreSQL restarts, lost connections and producer trouble alike, and
//! it is safe because nothing is confirmed before Kafka acknowledged it: the
//! new session re-sends only the unacknowledged tail.
//!
//! Kafka being down does *not* end a session: the producer retries forever
//! (no message timeout), reading pauses once `max_in_flight` events (or
//! `max_in_flight_bytes`) wait, the confirmed position stays put (PostgreSQL
//! keeps the WAL), and the worker reports itself stalled until acknowledgements
//! flow again.
//!
//! A connection that goes silent without closing is found by the status updates:
//! every `status_interval` one asks the server for a reply, and no message from
//! the server within `reply_timeout` after that ends the session
//! ([`RelayError::ReplicationTimeout`]). TCP keepalive and a user timeout on the
//! socket (`super::replication`) catch a dead peer host underneath.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::config::RelayConfig;
use super::core::{self, Action, CoreConfig, CoreError, DeliveryCore, Input, Row};
use super::lsn::Lsn;
use super::mapping::Mapper;
use super::message::{self, Disposition, MessageMapper};
use super::park::Parker;
use super::pgoutput::{self, LogicalMessage, PgOutputMessage, PgTimestamp, TupleData};
use super::replication::{ReplicationConnection, ReplicationMessage, ReplicationReader, ReplicationWriter};
use super::state::{Phase, RelayState};
use crate::kafka::{self, BrokerHealth, DeliveryErrorKind, DeliveryReport, RelayProducerContext};
use crate::metrics::{OutcomeLabels, RelayMetrics};

pub use super::core::headers;
pub use super::error::RelayError;

// The sending half (checks before sending, building the Kafka record) lives in a
// file of its own; it is still this session's code.
#[path = "session_send.rs"]
mod send;
// The poller (`mode: Polling`) shares the delivery half; it is still this module's code.
#[path = "session_poll.rs"]
mod poll;
pub use poll::{end_stale_poller, run as run_polling};

/// How a session that did not fail ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    Shutdown,
}

/// Reading pauses at this many open transactions too, so a backlog of
/// transactions without outbox rows cannot grow the queue without bound.
const MAX_OPEN_TRANSACTIONS: usize = 100_000;
/// Bound on one park write (connect, create the table, insert).
const PARK_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) type Producer_ = ThreadedProducer<RelayProducerContext>;

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
    let backend_pid = conn.backend_pid();
    let publication = super::replication::publication_names(&[cfg.publication.as_str()])?;
    // Lsn::ZERO: resume from the slot's confirmed position, wherever that is.
    let mut options = vec![("proto_version", "1"), ("publication_names", publication.as_str())];
    if cfg.messages.is_some() {
        // Logical decoding messages are sent only on request (PostgreSQL 14+);
        // transactional ones arrive inside their transaction, like rows.
        options.push(("messages", "true"));
    }
    let stream = conn.start_logical(&cfg.slot, Lsn::ZERO, &options).await?;
    let (reader, writer) = stream.split();

    let mut s = Session::new(cfg, metrics, state, health, deletions)?;
    metrics.sessions.inc();
    metrics.active.set(1);
    state.set_phase(Phase::Streaming);
    info!(slot = %cfg.slot, publication = %cfg.publication, "streaming from the slot");

    let mut writer = writer;
    let result = match s.run(reader, &mut writer, &mut shutdown).await {
        Err(RelayError::ReplicationTimeout { after, .. }) => Err(RelayError::ReplicationTimeout { after, backend_pid }),
        Ok(SessionEnd::Shutdown) => s.finish(writer).await,
        Err(e) => {
            // Deliver and confirm what precedes the failure, so the next session
            // starts right at it instead of re-sending (or never getting past)
            // the events before it. Best effort: the connection may be gone.
            if !matches!(e, RelayError::Replication(_) | RelayError::ReplicationTimeout { .. }) {
                if matches!(e, RelayError::Poison { .. }) && s.broker_refusal {
                    // The broker refused a record already sent: records queued
                    // behind it have not reached the broker yet, so drop them
                    // now rather than let them follow the poison event during the
                    // drain (what is in flight already may still land; see the docs).
                    s.producer.purge(rdkafka::producer::PurgeConfig::default().queue());
                }
                let _ = s.drain().await;
                let _ = s.send_status(&mut writer, false).await;
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
    /// Actions being carried out while `actions` collects what they feed back.
    spare: Vec<Action>,
    cfg: &'a RelayConfig,
    metrics: &'a RelayMetrics,
    state: &'a RelayState,
    health: &'a Arc<BrokerHealth>,
    producer: Arc<Producer_>,
    reports: mpsc::UnboundedReceiver<DeliveryReport>,
    deletions: Option<&'a mpsc::UnboundedSender<Vec<Bytes>>>,
    core: DeliveryCore,
    /// The core's output buffer, reused across inputs.
    actions: Vec<Action>,
    parker: Parker,
    mapper: Option<Mapper>,
    /// `source: Messages`: maps messages with the relay's prefix.
    messages: Option<MessageMapper>,
    /// Commit time of the transaction being read (from its Begin).
    commit_time: PgTimestamp,
    outbox_relation: Option<u32>,
    outbox_columns: Vec<String>,
    topics: super::topics::TopicChecks,
    /// Highest WAL position seen in the stream.
    received: Lsn,
    /// Flush position last sent to the server.
    sent: Lsn,
    /// Last acknowledgement, or when the in-flight set last became non-empty.
    last_progress: Instant,
    /// Last message from the server (data or keepalive).
    last_heard: Instant,
    /// When a status update asking for a reply went out with none heard since.
    reply_asked: Option<Instant>,
    /// A delivery report refused a record (as opposed to a check before sending).
    broker_refusal: bool,
}

impl<'a> Session<'a> {
    /// A session's delivery half: the producer, the core and the park table,
    /// shared by the replication stream and the poller.
    // Once per session: the error's size costs nothing worth boxing it for.
    #[allow(clippy::result_large_err)]
    fn new(
        cfg: &'a RelayConfig,
        metrics: &'a RelayMetrics,
        state: &'a RelayState,
        health: &'a Arc<BrokerHealth>,
        deletions: Option<&'a mpsc::UnboundedSender<Vec<Bytes>>>,
    ) -> Result<Self, RelayError> {
        let (report_tx, reports) = mpsc::unbounded_channel();
        let producer: Producer_ = ThreadedProducer::from_config_and_context(
            &kafka::producer_config(&cfg.kafka),
            RelayProducerContext::new(report_tx, health.clone()),
        )
        .map_err(RelayError::Producer)?;
        let parker = Parker::new(cfg.sql.clone(), &cfg.table, format!("{}/{}", cfg.namespace, cfg.name));
        let core = DeliveryCore::new(core_config(cfg, &parker, deletions.is_some()), Lsn::ZERO);
        Ok(Session {
            cfg,
            metrics,
            state,
            health,
            producer: Arc::new(producer),
            reports,
            deletions,
            core,
            actions: Vec::new(),
            spare: Vec::new(),
            parker,
            mapper: None,
            messages: cfg
                .messages
                .as_ref()
                .map(|_| MessageMapper::new(&cfg.destination, cfg.cloud_events.as_ref())),
            commit_time: PgTimestamp(0),
            outbox_relation: None,
            outbox_columns: Vec::new(),
            topics: super::topics::TopicChecks::default(),
            received: Lsn::ZERO,
            sent: Lsn::ZERO,
            last_progress: Instant::now(),
            last_heard: Instant::now(),
            reply_asked: None,
            broker_refusal: false,
        })
    }
}

fn core_config(cfg: &RelayConfig, parker: &Parker, delete_rows: bool) -> CoreConfig {
    CoreConfig {
        policy: cfg.poison,
        dead_letter_topic: cfg.dead_letter_topic.as_deref().map(Arc::from),
        max_message_bytes: cfg.max_message_bytes,
        delete_rows,
        skip: cfg.skip.clone(),
        park_table: Arc::from(parker.table().to_string()),
    }
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
        let reply_timeout = t.reply_timeout;

        loop {
            let reading = self.core.in_flight() < max_in_flight
                && self.core.bytes_in_flight() < max_bytes
                && self.core.open_transactions() < MAX_OPEN_TRANSACTIONS;
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                Some(report) = self.reports.recv() => {
                    self.on_report(report).await?;
                    // Acks come in bursts; take all that are there in one go.
                    while let Ok(report) = self.reports.try_recv() {
                        self.on_report(report).await?;
                    }
                }
                msg = reader.next(), if reading => {
                    self.last_heard = Instant::now();
                    self.reply_asked = None;
                    match msg? {
                        Some(ReplicationMessage::XLogData { wal_end, data, .. }) => {
                            self.received = self.received.max(wal_end);
                            self.on_wal(data).await?;
                        }
                        Some(ReplicationMessage::PrimaryKeepalive { wal_end, reply_requested, .. }) => {
                            self.received = self.received.max(wal_end);
                            self.feed(Input::Keepalive { wal_end }).await?;
                            if reply_requested {
                                self.send_status(writer, false).await?;
                            }
                        }
                        None => return Err(RelayError::StreamEnded),
                    }
                }
                _ = confirm_tick.tick() => {
                    if self.core.confirmed() > self.sent {
                        self.send_status(writer, false).await?;
                    }
                    self.check_stall();
                    if !reading {
                        // Not reading (waiting for Kafka): a reply could not be seen.
                        self.reply_asked = None;
                    } else if let Some(asked) = self.reply_asked
                        && asked.elapsed() > reply_timeout
                    {
                        return Err(RelayError::ReplicationTimeout {
                            after: asked.elapsed(),
                            backend_pid: None,
                        });
                    }
                    self.state.heard(if reading { self.last_heard } else { Instant::now() });
                }
                _ = status_tick.tick() => {
                    // Ask for a reply: a server that answers proves the connection
                    // is alive both ways, one that does not is replaced.
                    self.send_status(writer, reading).await?;
                    if reading && self.reply_asked.is_none() {
                        self.reply_asked = Some(Instant::now());
                    }
                }
            }
        }
    }

    fn check_stall(&mut self) {
        let in_flight = self.core.in_flight();
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

    async fn send_status(&mut self, writer: &mut ReplicationWriter, reply: bool) -> Result<(), RelayError> {
        let flush = self.core.confirmed();
        writer
            .send_status(self.received.max(flush), flush, flush, reply)
            .await?;
        if flush > self.sent {
            debug!(%flush, "confirmed");
            if self.sent.is_zero() {
                // First position this session confirmed: it got past whatever
                // ended the last one.
                self.state.progressed();
            }
            self.sent = flush;
            self.metrics.confirmed_lsn.set(flush.as_u64() as i64);
        }
        Ok(())
    }

    async fn on_wal(&mut self, data: Bytes) -> Result<(), RelayError> {
        match pgoutput::decode(&data)? {
            PgOutputMessage::Begin(b) => {
                self.commit_time = b.commit_time;
                self.feed(Input::Begin {
                    commit_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                })
                .await?;
            }
            PgOutputMessage::Relation(r)
                if self.messages.is_none() && r.namespace == self.cfg.table.schema && r.name == self.cfg.table.name =>
            {
                self.mapper = Some(
                    Mapper::new(
                        &r,
                        &self.cfg.columns,
                        &self.cfg.destination,
                        self.cfg.cloud_events.as_ref(),
                    )
                    .map_err(RelayError::Mapping)?,
                );
                self.outbox_relation = Some(r.id);
                self.outbox_columns = r.columns.iter().map(|c| c.name.clone()).collect();
            }
            PgOutputMessage::Insert(i) if Some(i.relation_id) == self.outbox_relation => {
                let row = self.map_row(&i.new).await?;
                self.feed_event(row).await?;
            }
            PgOutputMessage::Commit(c) => {
                self.feed(Input::Commit { end_lsn: c.end_lsn }).await?;
            }
            PgOutputMessage::Message(m) if self.messages.is_some() => self.on_message(m).await?,
            // Updates, deletes and truncates are never events (the publication
            // does not even send them); other messages carry nothing we need.
            _ => {}
        }
        Ok(())
    }

    /// An outbox row, mapped and checked, or refused by the mapping.
    async fn map_row(&mut self, tuple: &TupleData) -> Result<Row, RelayError> {
        let mapper = self
            .mapper
            .as_mut()
            .ok_or(CoreError::Protocol("insert before the table's relation message"))?;
        Ok(match mapper.map(tuple, self.commit_time) {
            Ok(mapped) => {
                for f in &mapped.fallbacks {
                    self.fell_back(&mapped.record, f);
                }
                self.checked(mapped.record).await
            }
            Err(e) => {
                let (event_id, row) = self.raw_row(tuple);
                Row::Unmapped {
                    event_id,
                    row,
                    kind: e.category(),
                    reason: e.to_string(),
                }
            }
        })
    }

    /// A logical decoding message (`source: Messages`): an event of its transaction
    /// when it is transactional and has our prefix, through the same core as rows.
    async fn on_message(&mut self, m: LogicalMessage) -> Result<(), RelayError> {
        let prefix = self.cfg.messages.as_ref().map_or("", |s| s.prefix.as_str());
        match message::disposition(&m, prefix) {
            Disposition::NotOurs => return Ok(()),
            Disposition::Refused => {
                // Written outside any transaction's fate: relaying it could publish an
                // event whose business change rolled back. Never silently, though.
                self.metrics.refused_messages.inc();
                warn!(lsn = %m.lsn, prefix = %m.prefix, bytes = m.content.len(),
                    "refused a non-transactional message with the relay's prefix: only pg_logical_emit_message(true, ...) is relayed");
                return Ok(());
            }
            Disposition::Relay => {}
        }
        let mapped = match self.messages.as_mut() {
            Some(mapper) => mapper.map(&m.content, self.commit_time),
            None => return Ok(()),
        };
        let row = match mapped {
            Ok(mapped) => self.checked(mapped.record).await,
            Err(e) => {
                let (event_id, row) = message::raw_row(&m);
                Row::Unmapped {
                    event_id,
                    row,
                    kind: e.category(),
                    reason: e.to_string(),
                }
            }
        };
        self.feed_event(row).await
    }

    /// One event (a row or a message) into the core; a first event after idling
    /// starts the progress clock the reply deadline measures.
    async fn feed_event(&mut self, row: Row) -> Result<(), RelayError> {
        let was_idle = self.core.in_flight() == 0;
        self.feed(Input::Insert(row)).await?;
        if was_idle && self.core.in_flight() > 0 {
            self.last_progress = Instant::now();
        }
        Ok(())
    }

    /// A row that could not be mapped: its event id and every column's text form.
    fn raw_row(&self, row: &TupleData) -> (Option<String>, serde_json::Value) {
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
            .map(str::to_string);
        (id, serde_json::Value::Object(obj))
    }

    /// Feeds the core and carries out what it decides, including what those
    /// actions feed back (an immediate send refusal, a finished park). Two
    /// buffers swap roles, so the per-event path allocates nothing here.
    async fn feed(&mut self, input: Input) -> Result<(), RelayError> {
        let mut buf = std::mem::take(&mut self.actions);
        let mut work = std::mem::take(&mut self.spare);
        let mut stop = None;
        let mut result = self.core.step(input, &mut buf).map_err(RelayError::from);
        while result.is_ok() && !buf.is_empty() {
            std::mem::swap(&mut buf, &mut work);
            for action in work.drain(..) {
                match self.carry_out(action, &mut stop).await {
                    Ok(None) => {}
                    Ok(Some(next)) => {
                        if let Err(e) = self.core.step(next, &mut buf) {
                            result = Err(e.into());
                            break;
                        }
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        buf.clear();
        work.clear();
        self.actions = buf;
        self.spare = work;
        result?;
        match stop {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Does one action; returns what to feed back to the core, if anything.
    async fn carry_out(&mut self, action: Action, stop: &mut Option<RelayError>) -> Result<Option<Input>, RelayError> {
        match action {
            Action::Produce { tag, record } => self.produce(tag, &record).await,
            Action::DeadLetter { tag, topic, record } => {
                warn!(event_id = %core::event_id_of(&record), topic = %topic, "sending event to the dead-letter topic");
                let h = kafka::owned_headers(&record.headers);
                let mut base = BaseRecord::with_opaque_to(&topic, tag).headers(h);
                if let Some(k) = &record.key {
                    base = base.key(&k[..]);
                }
                if let Some(p) = &record.payload {
                    base = base.payload(&p[..]);
                }
                match self.producer.send(base) {
                    Ok(()) => Ok(None),
                    Err((e, _)) => Ok(Some(Input::Refused {
                        tag,
                        kind: DeliveryErrorKind::classify(&e).category(),
                        reason: e.to_string(),
                        record,
                    })),
                }
            }
            Action::Park { tag, event } => {
                self.metrics.error(event.kind);
                warn!(event = %event.event, kind = event.kind, reason = %event.reason, table = %self.parker.table(), "parking event");
                // Bounded: a hung SQL connection must not hang the session.
                let parked = tokio::time::timeout(PARK_TIMEOUT, self.parker.park(&event))
                    .await
                    .unwrap_or_else(|_| {
                        Err(crate::postgres::PgError::ConnectionLost {
                            action: "park an event",
                            detail: format!("no answer within {PARK_TIMEOUT:?}"),
                        })
                    });
                if parked.is_err() {
                    self.parker.reset();
                }
                parked.map_err(|source| RelayError::Park {
                    event: event.event.clone(),
                    table: self.parker.table().to_string(),
                    source,
                })?;
                Ok(Some(Input::Parked { tag }))
            }
            Action::Acked { outcome, commit_time } => {
                if outcome != core::Outcome::Parked {
                    self.last_progress = Instant::now();
                    self.health.mark_up();
                }
                self.metrics
                    .events
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.as_str(),
                    })
                    .inc();
                if let Some(committed) = commit_time.and_then(|t| t.to_system_time())
                    && let Ok(age) = SystemTime::now().duration_since(committed)
                {
                    self.metrics.commit_to_ack_seconds.observe(age.as_secs_f64());
                }
                Ok(None)
            }
            Action::Released {
                events,
                bytes,
                commit_time,
            } => {
                self.metrics.transaction_events.observe(f64::from(events));
                self.metrics.bytes.inc_by(bytes);
                if let Some(t) = commit_time.to_system_time()
                    && let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH)
                {
                    self.metrics.last_event_timestamp_seconds.set(since.as_secs() as i64);
                }
                Ok(None)
            }
            // The status ticks send the position; nothing to do per step.
            Action::Confirm(_) => Ok(None),
            Action::DeleteRows(ids) => {
                if let Some(tx) = self.deletions {
                    // Best effort: the rows are delivered; deleting them is housekeeping.
                    let _ = tx.send(ids);
                }
                Ok(None)
            }
            Action::Skipped(event) => {
                warn!(%event, "skipped on request: the event is parked, the relay goes on");
                self.state.set_skipped(event);
                Ok(None)
            }
            Action::Stop(s) => {
                self.metrics.error(s.kind);
                *stop = Some(RelayError::Poison {
                    event: s.event,
                    kind: s.kind,
                    reason: s.reason,
                });
                Ok(None)
            }
        }
    }

    async fn on_report(&mut self, report: DeliveryReport) -> Result<(), RelayError> {
        match report.result {
            Ok(()) => self.feed(Input::Delivered { tag: report.tag }).await,
            Err(f) if f.kind.is_poison() => {
                self.broker_refusal = true;
                self.feed(Input::Refused {
                    tag: report.tag,
                    kind: f.kind.category(),
                    reason: f.error,
                    record: f.record,
                })
                .await
            }
            Err(f) => {
                self.metrics.error(f.kind.category());
                Err(RelayError::Delivery(f.error))
            }
        }
    }

    /// Waits (bounded) for in-flight acknowledgements, confirming what they complete.
    async fn drain(&mut self) -> Result<(), RelayError> {
        let deadline = Instant::now() + self.cfg.tuning.drain_timeout;
        // Refused records never come back: wait only for the others.
        while self.core.in_flight() > self.core.refused_in_flight() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.reports.recv()).await {
                Ok(Some(report)) => {
                    // After a stop, failed reports (purged records among them) only
                    // mark their records refused, so the drain need not wait for them.
                    let report = match report.result {
                        Err(f) if self.core.stopped().is_some() => {
                            let input = Input::Refused {
                                tag: report.tag,
                                kind: f.kind.category(),
                                reason: f.error,
                                record: f.record,
                            };
                            let _ = self.feed(input).await;
                            continue;
                        }
                        result => DeliveryReport {
                            tag: report.tag,
                            result,
                        },
                    };
                    // A second poison event while draining changes nothing.
                    match self.on_report(report).await {
                        Ok(()) | Err(RelayError::Poison { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Graceful stop: drain so the next worker re-sends as little as possible,
    /// confirm, and end the stream.
    async fn finish(&mut self, mut writer: ReplicationWriter) -> Result<SessionEnd, RelayError> {
        self.drain().await?;
        self.send_status(&mut writer, false).await?;
        writer.finish().await?;
        info!(confirmed = %self.core.confirmed(), left_in_flight = self.core.in_flight(), "stopped");
        Ok(SessionEnd::Shutdown)
    }
}
