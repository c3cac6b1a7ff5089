//! The operator's series (`outbox_operator_*`): reconciles, status writes, and per
//! relay the slot, conditions and database passes it last saw.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::ErrorLabels;

/// Per-relay series of the operator: one per `OutboxRelay`, so `namespace` and
/// `name` stay as low-cardinality as the relays themselves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    pub namespace: String,
    pub name: String,
}

/// One series per relay and `pg_replication_slots.wal_status` value: four per relay,
/// exactly one of them 1 (the kube-state-metrics shape for an enum, so alerts select
/// a status by label instead of decoding a number).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WalStatusLabels {
    pub namespace: String,
    pub name: String,
    pub wal_status: &'static str,
}

/// Every value `pg_replication_slots.wal_status` takes, from safest to lost.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusUpdateLabels {
    /// `written`, or `unchanged` when the computed status equalled the stored one.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatabasePassLabels {
    /// `confirmed` from the database's shared snapshot, or `full` (this relay's
    /// own statements).
    pub pass: &'static str,
}

/// All operator metrics (prefix `outbox_operator`); cheap to clone.
#[derive(Clone)]
pub struct OperatorMetrics {
    pub reconcile_duration_seconds: Histogram,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub status_updates: Family<StatusUpdateLabels, Counter>,
    pub database_passes: Family<DatabasePassLabels, Counter>,
    pub database_snapshots: Counter,
    pub slot_lag_bytes: Family<RelayLabels, Gauge>,
    pub slot_retained_bytes: Family<RelayLabels, Gauge>,
    pub slot_active: Family<RelayLabels, Gauge>,
    pub slot_wal_lost: Family<RelayLabels, Gauge>,
    pub slot_wal_status: Family<WalStatusLabels, Gauge>,
    pub slot_safe_wal_size_bytes: Family<RelayLabels, Gauge>,
    pub slot_lag_warning_bytes: Family<RelayLabels, Gauge>,
    pub slot_lag_critical_bytes: Family<RelayLabels, Gauge>,
    pub slot_lost: Family<RelayLabels, Gauge>,
    pub conflict: Family<RelayLabels, Gauge>,
    pub ready: Family<RelayLabels, Gauge>,
    pub partitions_attached: Family<RelayLabels, Gauge>,
    pub partitions_retiring: Family<RelayLabels, Gauge>,
    pub poll_backlog_rows: Family<RelayLabels, Gauge>,
    pub deletions_dropped_unrelayed: Counter,
    pub unrelayed_events_dropped: Counter,
    registry: Arc<Registry>,
}

/// What the operator last saw of one relay, for its gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayGauges {
    pub ready: bool,
    /// `None` when the slot could not be read this time: the slot series keep their
    /// last values rather than drop to zero, which would look like a caught-up relay.
    pub slot: Option<SlotGauges>,
    /// `SlotLost` or `DatabaseChanged`: events may be missing.
    pub slot_lost: bool,
    /// Another relay holds the slot or publication this relay names.
    pub conflict: bool,
    /// The relay's own lag thresholds (`spec.replication.lag`), exported so one alert
    /// rule compares every relay's lag with that relay's budget.
    pub lag_warning_bytes: i64,
    pub lag_critical_bytes: i64,
    /// With `spec.outbox.partitions`: (attached, detached and waiting to be dropped).
    pub partitions: Option<(i64, i64)>,
    /// `mode: Polling`: rows waiting in the table (counted up to a cap).
    pub poll_backlog_rows: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotGauges {
    pub lag_bytes: i64,
    pub retained_bytes: i64,
    pub active: bool,
    pub wal_lost: bool,
    /// `pg_replication_slots.wal_status`; `None` when the server reports none.
    pub wal_status: Option<String>,
    /// `pg_replication_slots.safe_wal_size`: WAL bytes that can still be written before
    /// the slot is in danger of losing its WAL. `None` when `max_slot_wal_keep_size`
    /// is unlimited (-1): nothing bounds the slot, so no series is exported.
    pub safe_wal_size: Option<i64>,
}

impl OperatorMetrics {
    pub fn new() -> Self {
        // 5 ms … ~82 s: a reconcile is a few API calls and SQL statements, but slot
        // creation waits for running transactions.
        let reconcile_duration_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let status_updates = Family::<StatusUpdateLabels, Counter>::default();
        let database_passes = Family::<DatabasePassLabels, Counter>::default();
        let database_snapshots = Counter::default();
        let slot_lag_bytes = Family::<RelayLabels, Gauge>::default();
        let slot_retained_bytes = Family::<RelayLabels, Gauge>::default();
        let slot_active = Family::<RelayLabels, Gauge>::default();
        let slot_wal_lost = Family::<RelayLabels, Gauge>::default();
        let slot_wal_status = Family::<WalStatusLabels, Gauge>::default();
        let slot_safe_wal_size_bytes = Family::<RelayLabels, Gauge>::default();
        let slot_lag_warning_bytes = Family::<RelayLabels, Gauge>::default();
        let slot_lag_critical_bytes = Family::<RelayLabels, Gauge>::default();
        let slot_lost = Family::<RelayLabels, Gauge>::default();
        let conflict = Family::<RelayLabels, Gauge>::default();
        let ready = Family::<RelayLabels, Gauge>::default();
        let partitions_attached = Family::<RelayLabels, Gauge>::default();
        let partitions_retiring = Family::<RelayLabels, Gauge>::default();
        let poll_backlog_rows = Family::<RelayLabels, Gauge>::default();
        let deletions_dropped_unrelayed = Counter::default();
        let unrelayed_events_dropped = Counter::default();

        let mut r = Registry::with_prefix("outbox_operator");
        r.register(
            "reconcile_duration_seconds",
            "Time one reconcile of an OutboxRelay took",
            reconcile_duration_seconds.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            reconcile_errors.clone(),
        );
        r.register(
            "status_updates",
            "Status writes, and reconciles that skipped the write because nothing changed",
            status_updates.clone(),
        );
        r.register(
            "database_passes",
            "Reconciles' database passes: confirmed from the database's shared snapshot, or full",
            database_passes.clone(),
        );
        r.register(
            "database_snapshots",
            "Shared reads of a database's replication slots and publications (one per database, role \
             and requeue interval at most)",
            database_snapshots.clone(),
        );
        r.register(
            "slot_lag_bytes",
            "WAL bytes between the server's position and the slot's confirmed position",
            slot_lag_bytes.clone(),
        );
        r.register(
            "slot_retained_bytes",
            "WAL bytes the slot keeps on the primary's disk",
            slot_retained_bytes.clone(),
        );
        r.register(
            "slot_active",
            "1 while a worker streams from the slot",
            slot_active.clone(),
        );
        r.register(
            "slot_wal_lost",
            "1 when PostgreSQL removed WAL the slot still needed (wal_status lost)",
            slot_wal_lost.clone(),
        );
        r.register(
            "slot_wal_status",
            "1 for the slot's current pg_replication_slots.wal_status (reserved, extended, unreserved, lost), \
             0 for the others",
            slot_wal_status.clone(),
        );
        r.register(
            "slot_safe_wal_size_bytes",
            "WAL bytes that can still be written before the slot risks losing its WAL \
             (pg_replication_slots.safe_wal_size; absent when max_slot_wal_keep_size is unlimited)",
            slot_safe_wal_size_bytes.clone(),
        );
        r.register(
            "slot_lag_warning_bytes",
            "The relay's spec.replication.lag.warningBytes",
            slot_lag_warning_bytes.clone(),
        );
        r.register(
            "slot_lag_critical_bytes",
            "The relay's spec.replication.lag.criticalBytes",
            slot_lag_critical_bytes.clone(),
        );
        r.register(
            "slot_lost",
            "1 while the relay's slot is lost (gone, WAL removed, publication dropped) or the server changed: \
             events may be missing and the status says from where",
            slot_lost.clone(),
        );
        r.register(
            "conflict",
            "1 while another relay holds the slot or publication this relay names",
            conflict.clone(),
        );
        r.register("ready", "1 while the relay's Ready condition is True", ready.clone());
        r.register(
            "poll_backlog_rows",
            "Polling mode: rows waiting in the outbox table to be relayed (counted up to 100001: more reads as that)",
            poll_backlog_rows.clone(),
        );
        r.register(
            "partitions_attached",
            "Partitions attached to the relay's outbox table (with spec.outbox.partitions)",
            partitions_attached.clone(),
        );
        r.register(
            "partitions_retiring",
            "Detached partitions waiting for the slot to confirm their events before they are dropped",
            partitions_retiring.clone(),
        );
        r.register(
            "deletions_dropped_unrelayed",
            "Deletions that dropped a slot before everything in it was relayed (forced or timed out)",
            deletions_dropped_unrelayed.clone(),
        );
        r.register(
            "unrelayed_events_dropped",
            "Outbox events such deletions dropped unrelayed",
            unrelayed_events_dropped.clone(),
        );

        Self {
            reconcile_duration_seconds,
            reconcile_errors,
            status_updates,
            database_passes,
            database_snapshots,
            slot_lag_bytes,
            slot_retained_bytes,
            slot_active,
            slot_wal_lost,
            slot_wal_status,
            slot_safe_wal_size_bytes,
            slot_lag_warning_bytes,
            slot_lag_critical_bytes,
            slot_lost,
            conflict,
            ready,
            partitions_attached,
            poll_backlog_rows,
            partitions_retiring,
            deletions_dropped_unrelayed,
            unrelayed_events_dropped,
            registry: Arc::new(r),
        }
    }

    /// Starts timing a reconcile; the duration is recorded when the timer is dropped,
    /// so every return path (errors and panics included) is measured.
    pub fn reconcile_timer(&self) -> ReconcileTimer {
        ReconcileTimer {
            start: std::time::Instant::now(),
            histogram: self.reconcile_duration_seconds.clone(),
        }
    }

    pub fn reconcile_error(&self, kind: &'static str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    pub fn database_pass(&self, pass: &'static str) {
        self.database_passes.get_or_create(&DatabasePassLabels { pass }).inc();
    }

    pub fn database_snapshot(&self) {
        self.database_snapshots.inc();
    }

    pub fn status_update(&self, written: bool) {
        let outcome = if written { "written" } else { "unchanged" };
        self.status_updates.get_or_create(&StatusUpdateLabels { outcome }).inc();
    }

    /// Sets one relay's gauges.
    pub fn set_relay(&self, namespace: &str, name: &str, g: &RelayGauges) {
        let l = RelayLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.ready.get_or_create(&l).set(i64::from(g.ready));
        self.slot_lost.get_or_create(&l).set(i64::from(g.slot_lost));
        self.conflict.get_or_create(&l).set(i64::from(g.conflict));
        self.slot_lag_warning_bytes.get_or_create(&l).set(g.lag_warning_bytes);
        self.slot_lag_critical_bytes.get_or_create(&l).set(g.lag_critical_bytes);
        if let Some(rows) = g.poll_backlog_rows {
            self.poll_backlog_rows.get_or_create(&l).set(rows);
        }
        if let Some((attached, retiring)) = g.partitions {
            self.partitions_attached.get_or_create(&l).set(attached);
            self.partitions_retiring.get_or_create(&l).set(retiring);
        }
        if let Some(s) = &g.slot {
            self.slot_lag_bytes.get_or_create(&l).set(s.lag_bytes);
            self.slot_retained_bytes.get_or_create(&l).set(s.retained_bytes);
            self.slot_active.get_or_create(&l).set(i64::from(s.active));
            self.slot_wal_lost.get_or_create(&l).set(i64::from(s.wal_lost));
            for status in WAL_STATUSES {
                let current = s.wal_status.as_deref() == Some(status);
                self.slot_wal_status
                    .get_or_create(&wal_status_labels(&l, status))
                    .set(i64::from(current));
            }
            match s.safe_wal_size {
                Some(bytes) => {
                    self.slot_safe_wal_size_bytes.get_or_create(&l).set(bytes);
                }
                None => {
                    self.slot_safe_wal_size_bytes.remove(&l);
                }
            }
        }
    }

    /// Drops a deleted relay's series, so they do not linger with their last values.
    pub fn remove_relay(&self, namespace: &str, name: &str) {
        let l = RelayLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.ready.remove(&l);
        self.slot_lag_bytes.remove(&l);
        self.slot_retained_bytes.remove(&l);
        self.slot_active.remove(&l);
        self.slot_wal_lost.remove(&l);
        for status in WAL_STATUSES {
            self.slot_wal_status.remove(&wal_status_labels(&l, status));
        }
        self.slot_safe_wal_size_bytes.remove(&l);
        self.slot_lag_warning_bytes.remove(&l);
        self.slot_lag_critical_bytes.remove(&l);
        self.slot_lost.remove(&l);
        self.conflict.remove(&l);
        self.partitions_attached.remove(&l);
        self.partitions_retiring.remove(&l);
        self.poll_backlog_rows.remove(&l);
    }

    /// A deletion that dropped `events` outbox events unrelayed.
    pub fn dropped_unrelayed(&self, events: u64) {
        self.deletions_dropped_unrelayed.inc();
        self.unrelayed_events_dropped.inc_by(events);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn wal_status_labels(l: &RelayLabels, wal_status: &'static str) -> WalStatusLabels {
    WalStatusLabels {
        namespace: l.namespace.clone(),
        name: l.name.clone(),
        wal_status,
    }
}

/// Records the time since its creation into the reconcile histogram when dropped.
pub struct ReconcileTimer {
    start: std::time::Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_exposition_has_the_documented_names() {
        let m = OperatorMetrics::new();
        drop(m.reconcile_timer());
        m.reconcile_error("DatabaseUnreachable");
        m.status_update(true);
        m.set_relay(
            "shop",
            "orders",
            &RelayGauges {
                ready: true,
                slot: Some(SlotGauges {
                    lag_bytes: 42,
                    retained_bytes: 84,
                    active: true,
                    wal_lost: false,
                    wal_status: Some("unreserved".into()),
                    safe_wal_size: Some(4096),
                }),
                slot_lost: true,
                conflict: false,
                lag_warning_bytes: 100,
                lag_critical_bytes: 200,
                partitions: Some((4, 1)),
                poll_backlog_rows: Some(7),
            },
        );
        let text = m.encode();
        for want in [
            "outbox_operator_reconcile_duration_seconds_count 1",
            "outbox_operator_reconcile_errors_total{kind=\"DatabaseUnreachable\"} 1",
            "outbox_operator_status_updates_total{outcome=\"written\"} 1",
            "outbox_operator_slot_lag_bytes{namespace=\"shop\",name=\"orders\"} 42",
            "outbox_operator_slot_retained_bytes{namespace=\"shop\",name=\"orders\"} 84",
            "outbox_operator_slot_active{namespace=\"shop\",name=\"orders\"} 1",
            "outbox_operator_slot_wal_lost{namespace=\"shop\",name=\"orders\"} 0",
            "outbox_operator_ready{namespace=\"shop\",name=\"orders\"} 1",
            "outbox_operator_slot_lost{namespace=\"shop\",name=\"orders\"} 1",
            "outbox_operator_conflict{namespace=\"shop\",name=\"orders\"} 0",
            "outbox_operator_slot_wal_status{namespace=\"shop\",name=\"orders\",wal_status=\"unreserved\"} 1",
            "outbox_operator_slot_wal_status{namespace=\"shop\",name=\"orders\",wal_status=\"reserved\"} 0",
            "outbox_operator_slot_wal_status{namespace=\"shop\",name=\"orders\",wal_status=\"extended\"} 0",
            "outbox_operator_slot_wal_status{namespace=\"shop\",name=\"orders\",wal_status=\"lost\"} 0",
            "outbox_operator_slot_safe_wal_size_bytes{namespace=\"shop\",name=\"orders\"} 4096",
            "outbox_operator_slot_lag_warning_bytes{namespace=\"shop\",name=\"orders\"} 100",
            "outbox_operator_slot_lag_critical_bytes{namespace=\"shop\",name=\"orders\"} 200",
            "outbox_operator_partitions_attached{namespace=\"shop\",name=\"orders\"} 4",
            "outbox_operator_partitions_retiring{namespace=\"shop\",name=\"orders\"} 1",
            "outbox_operator_poll_backlog_rows{namespace=\"shop\",name=\"orders\"} 7",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        m.remove_relay("shop", "orders");
        let text = m.encode();
        assert!(!text.contains("name=\"orders\""), "{text}");
    }

    #[test]
    fn unlimited_safe_wal_size_drops_the_series() {
        let m = OperatorMetrics::new();
        let mut g = RelayGauges {
            slot: Some(SlotGauges {
                wal_status: Some("reserved".into()),
                safe_wal_size: Some(1),
                ..SlotGauges::default()
            }),
            ..RelayGauges::default()
        };
        m.set_relay("shop", "orders", &g);
        assert!(m.encode().contains("outbox_operator_slot_safe_wal_size_bytes{"));
        // max_slot_wal_keep_size set back to unlimited: a stale small value would alert.
        if let Some(s) = g.slot.as_mut() {
            s.safe_wal_size = None;
        }
        m.set_relay("shop", "orders", &g);
        let text = m.encode();
        assert!(!text.contains("outbox_operator_slot_safe_wal_size_bytes{"), "{text}");
        assert!(
            text.contains(
                "outbox_operator_slot_wal_status{namespace=\"shop\",name=\"orders\",wal_status=\"reserved\"} 1"
            ),
            "{text}"
        );
    }
}
