//! `mode: Polling`, the I/O half: one poll session, from taking the table's
//! advisory lock until an error or shutdown. The statements, the wait and the row
//! conversion are pure (`super::super::polling`); every per-event decision is the
//! delivery core's, exactly as for a replication session (see that module for the
//! batch protocol and why it loses nothing).

use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::producer::Producer;
use tokio::sync::watch;
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::{info, warn};

use super::super::core::{DeliveryCore, Input};
use super::super::lsn::Lsn;
use super::super::mapping::Mapper;
use super::super::pgoutput::PgTimestamp;
use super::super::polling::{self, LOCK_CLASS, PollSql};
use super::{Phase, RelayConfig, RelayError, Session, SessionEnd, core_config};
use crate::kafka::BrokerHealth;
use crate::metrics::RelayMetrics;
use crate::postgres::{self, PgError};

/// Runs one poll session until shutdown (`Ok`) or an error.
pub async fn run(
    cfg: &RelayConfig,
    metrics: &RelayMetrics,
    state: &super::RelayState,
    health: &std::sync::Arc<BrokerHealth>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SessionEnd, RelayError> {
    let Some(settings) = cfg.poll.as_ref() else {
        return Err(RelayError::Core(super::CoreError::Protocol(
            "polling without polling settings",
        )));
    };
    let table = cfg.table.unquoted();
    let poll_err = |source: PgError| RelayError::Poll {
        table: table.clone(),
        source,
    };
    let bound = cfg.tuning.poll_statement_timeout;
    let mut client = timed(&table, bound, "connecting", postgres::connect(&cfg.sql))
        .await?
        .map_err(poll_err)?;
    // Text values as pgoutput sends them (timestamps in ISO form, UTC).
    let setup = client.batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'");
    timed(&table, bound, "setting up the session", setup)
        .await?
        .map_err(|e| poll_err(postgres::error::query_error("set up the poll session", e)))?;
    let pid = client.query_one("SELECT pg_backend_pid()", &[]);
    let pid: i32 = timed(&table, bound, "reading the backend's pid", pid)
        .await?
        .and_then(|r| r.try_get(0))
        .map_err(|e| poll_err(postgres::error::query_error("read the poll session's backend pid", e)))?;
    let quoted = cfg.table.to_string();
    let got: bool = timed(
        &table,
        bound,
        "taking the advisory lock",
        client.query_one(PollSql::LOCK, &[&quoted, &LOCK_CLASS]),
    )
    .await?
    .and_then(|r| r.try_get(0))
    .map_err(|e| poll_err(postgres::error::query_error("take the poller's advisory lock", e)))?;
    if !got {
        return Err(RelayError::PollerActive { table });
    }
    let cols: Vec<(String, u32)> = timed(
        &table,
        bound,
        "reading the table's columns",
        client.query(PollSql::COLUMNS, &[&quoted]),
    )
    .await?
    .map_err(|e| poll_err(postgres::error::query_error("read the outbox table's columns", e)))?
    .iter()
    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32))
    .collect();
    if cols.is_empty() {
        return Err(poll_err(PgError::TableNotFound { table: quoted }));
    }
    let names: Vec<String> = cols.iter().map(|c| c.0.clone()).collect();
    let Some(order) = names.iter().position(|n| *n == settings.order_column) else {
        return Err(poll_err(PgError::ColumnNotFound {
            table: table.clone(),
            column: settings.order_column.clone(),
            field: "polling.orderColumn",
        }));
    };
    let sql = PollSql::new(&cfg.table, &names, &settings.order_column, settings.batch_size);

    let mut s = Session::new(cfg, metrics, state, health, None)?;
    let relation = polling::relation(&cfg.table, cols);
    s.mapper = Some(
        Mapper::new(&relation, &cfg.columns, &cfg.destination, cfg.cloud_events.as_ref())
            .map_err(RelayError::Mapping)?,
    );
    s.outbox_columns = names;
    metrics.sessions.inc();
    metrics.active.set(1);
    state.set_phase(Phase::Streaming);
    info!(%table, order_column = %settings.order_column, batch = settings.batch_size, "polling the outbox table");

    let mut wait = Duration::ZERO;
    let result: Result<SessionEnd, RelayError> = loop {
        state.heard(Instant::now());
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Ok(SessionEnd::Shutdown),
            _ = tokio::time::sleep(wait) => {}
        }
        if *shutdown.borrow() {
            break Ok(SessionEnd::Shutdown);
        }
        match s.poll_batch(&mut client, &sql, order).await {
            Ok(rows) => {
                wait = polling::next_wait(
                    rows,
                    settings.batch_size,
                    wait,
                    settings.min_interval,
                    settings.max_interval,
                )
            }
            Err(e) => break Err(e),
        }
    };
    metrics.active.set(0);
    metrics.in_flight.set(0);
    // Records still queued belong to rows not deleted: the next poll sends them
    // again, so dropping them now only avoids needless duplicates.
    s.producer.purge(rdkafka::producer::PurgeConfig::default().queue());
    if result.is_ok() {
        info!(%table, "stopped polling");
    }
    // A silent connection's backend keeps the lock: name it for the next session.
    result.map_err(|e| match e {
        RelayError::PollTimeout { table, step, after, .. } => RelayError::PollTimeout {
            table,
            step,
            after,
            backend_pid: Some(pid),
        },
        other => other,
    })
}

/// Ends the poll session `pid` if it still holds this relay's advisory lock.
/// Only ever called with the backend of our own previous connection, which went
/// silent: a live poller (another worker) is never ended. A role may end its own
/// backends without extra privileges.
pub async fn end_stale_poller(cfg: &RelayConfig, pid: i32) -> Result<bool, PgError> {
    let client = postgres::connect(&cfg.sql).await?;
    let quoted = cfg.table.to_string();
    let row = client
        .query_opt(
            "SELECT pg_terminate_backend(l.pid) FROM pg_catalog.pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $1 AND l.objsubid = 1 \
               AND l.classid::int8 = $2 AND l.objid::int8 = $3::text::regclass::oid::int8",
            &[&pid, &LOCK_CLASS, &quoted],
        )
        .await
        .map_err(|e| postgres::error::query_error("end a stale poll session", e))?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

impl Session<'_> {
    /// One batch: read and lock, feed the core row by row, wait for Kafka, delete
    /// what the core confirmed, commit. Returns how many rows were read.
    async fn poll_batch(&mut self, client: &mut Client, sql: &PollSql, order: usize) -> Result<usize, RelayError> {
        let table = self.cfg.table.unquoted();
        let bound = self.cfg.tuning.poll_statement_timeout;
        let poll_err = |action: &'static str, e: tokio_postgres::Error| RelayError::Poll {
            table: table.clone(),
            source: postgres::error::query_error(action, e),
        };
        let tx = timed(&table, bound, "starting a batch", client.transaction())
            .await?
            .map_err(|e| poll_err("start a batch", e))?;
        let read = timed(&table, bound, "reading a batch", tx.simple_query(&sql.select))
            .await?
            .map_err(|e| poll_err("read a batch of outbox rows", e))?;
        let rows: Vec<_> = read
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .collect();
        if rows.is_empty() {
            timed(&table, bound, "ending an empty poll", tx.commit())
                .await?
                .map_err(|e| poll_err("end an empty poll", e))?;
            return Ok(0);
        }

        // A core per batch: positions are the rows' order values, which start over
        // (lower) when a later-committed row with a smaller value shows up.
        self.core = DeliveryCore::new(core_config(self.cfg, &self.parker, false), Lsn::ZERO);
        self.broker_refusal = false;
        self.commit_time = PgTimestamp::now();
        let width = self.outbox_columns.len();
        let mut placed: Vec<(Lsn, String, String)> = Vec::with_capacity(rows.len());
        let mut fed: Result<(), RelayError> = Ok(());
        for row in &rows {
            let values = (0..width).map(|i| row.get(i));
            let tuple = polling::tuple(values);
            let at = match polling::position(row.get(order), placed.last().map(|p| p.0), &self.outbox_columns[order]) {
                Ok(at) => at,
                Err(detail) => {
                    fed = Err(RelayError::PollOrder {
                        table: table.clone(),
                        detail,
                    });
                    break;
                }
            };
            let whereabouts = (
                row.get(width).unwrap_or_default().to_string(),
                row.get(width + 1).unwrap_or_default().to_string(),
            );
            placed.push((at, whereabouts.0, whereabouts.1));
            fed = self.feed_row(at, &tuple).await;
            if fed.is_err() {
                break;
            }
        }
        if fed.is_ok() {
            fed = self.await_batch().await;
        }
        match &fed {
            Ok(()) => {}
            Err(RelayError::Poison { .. }) | Err(RelayError::PollOrder { .. }) => {
                if self.broker_refusal {
                    // As in a replication session: records queued behind a refused
                    // one must not follow it out.
                    self.producer.purge(rdkafka::producer::PurgeConfig::default().queue());
                }
                // Deliver what precedes the stop, so those rows can be deleted now.
                self.drain().await?;
            }
            // Anything else: roll back (dropping the transaction does), every row stays.
            Err(_) => return fed.map(|_| 0),
        }
        let confirmed = self.core.confirmed();
        let (oids, ctids): (Vec<&str>, Vec<&str>) = placed
            .iter()
            .filter(|(at, ..)| *at <= confirmed)
            .map(|(_, o, c)| (o.as_str(), c.as_str()))
            .unzip();
        if !oids.is_empty() {
            let deleted = timed(
                &table,
                bound,
                "deleting relayed rows",
                tx.execute(&sql.delete, &[&oids, &ctids]),
            )
            .await?
            .map_err(|e| poll_err("delete relayed outbox rows", e))?;
            if deleted != oids.len() as u64 {
                // The rows are locked by this transaction, so nobody else can have
                // removed them: a mismatch means the delete did not name what was read.
                warn!(%table, expected = oids.len(), deleted, "deleted a different number of rows than were relayed");
            }
            self.metrics.polled_rows_deleted.inc_by(deleted);
        }
        timed(&table, bound, "committing a batch", tx.commit())
            .await?
            .map_err(|e| poll_err("commit a batch", e))?;
        if !oids.is_empty() {
            self.state.progressed();
        }
        fed.map(|_| rows.len())
    }

    /// One row as a transaction of its own at position `at`.
    async fn feed_row(&mut self, at: Lsn, tuple: &super::TupleData) -> Result<(), RelayError> {
        self.feed(Input::Begin {
            commit_lsn: at,
            commit_time: self.commit_time,
        })
        .await?;
        let row = self.map_row(tuple).await?;
        self.feed_event(row).await?;
        self.feed(Input::Commit { end_lsn: at }).await
    }

    /// Waits for Kafka to answer for every record of the batch (bounded).
    async fn await_batch(&mut self) -> Result<(), RelayError> {
        let started = Instant::now();
        while self.core.in_flight() > self.core.refused_in_flight() {
            match tokio::time::timeout(Duration::from_secs(1), self.reports.recv()).await {
                Ok(Some(report)) => {
                    self.on_report(report).await?;
                    while let Ok(report) = self.reports.try_recv() {
                        self.on_report(report).await?;
                    }
                }
                Ok(None) => return Err(RelayError::Delivery("the producer's delivery reports ended".into())),
                Err(_) => {
                    self.check_stall();
                    self.state.heard(Instant::now());
                    let bound = self.cfg.tuning.poll_ack_timeout;
                    if started.elapsed() > bound {
                        let waiting = self.core.in_flight();
                        let detail = self.health.last_error().unwrap_or_else(|| "no acknowledgement".into());
                        return Err(RelayError::Delivery(format!(
                            "Kafka did not acknowledge {waiting} records of a batch within {bound:?} ({detail}); the batch is rolled back and its rows are polled again"
                        )));
                    }
                }
            }
        }
        self.check_stall();
        Ok(())
    }
}

/// A statement with a bound (`tuning.poll_statement_timeout`): a hung connection
/// ends the session (and rolls the batch back: its rows stay) instead of hanging
/// the relay.
async fn timed<T>(
    table: &str,
    bound: Duration,
    step: &'static str,
    fut: impl Future<Output = T>,
) -> Result<T, RelayError> {
    tokio::time::timeout(bound, fut)
        .await
        .map_err(|_| RelayError::PollTimeout {
            table: table.to_string(),
            step,
            after: bound,
            backend_pid: None,
        })
}
