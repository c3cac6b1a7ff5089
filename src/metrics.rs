//! Prometheus metrics (OpenMetrics text) of the relay worker.
//!
//! Names follow `outbox_<component>_<what>_<unit>`. Labels stay low-cardinality:
//! outcomes and error categories only; never event ids, topics or LSNs. The
//! relay a series belongs to comes from the scrape target's pod labels.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `relayed` or `dead_lettered`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Stable error category (`MessageTooLarge`, `DatabaseUnreachable`, ...).
    pub kind: &'static str,
}

/// All relay metrics; cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct RelayMetrics {
    pub events: Family<OutcomeLabels, Counter>,
    pub bytes: Counter,
    pub transaction_events: Histogram,
    pub commit_to_ack_seconds: Histogram,
    pub confirmed_lsn: Gauge,
    pub errors: Family<ErrorLabels, Counter>,
    pub active: Gauge,
    pub in_flight: Gauge,
    pub last_event_timestamp_seconds: Gauge,
    pub sessions: Counter,
    registry: Arc<Registry>,
}

impl RelayMetrics {
    pub fn new() -> Self {
        let events = Family::<OutcomeLabels, Counter>::default();
        let bytes = Counter::default();
        // 1 … 32768 events per transaction.
        let transaction_events = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        // 1 ms … ~33 s.
        let commit_to_ack_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let confirmed_lsn = Gauge::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let active = Gauge::default();
        let in_flight = Gauge::default();
        let last_event_timestamp_seconds = Gauge::default();
        let sessions = Counter::default();

        let mut r = Registry::with_prefix("outbox_relay");
        r.register("events", "Outbox events delivered to Kafka", events.clone());
        r.register(
            "payload_bytes",
            "Bytes of keys, payloads and headers delivered",
            bytes.clone(),
        );
        r.register(
            "transaction_events",
            "Outbox events per committed transaction",
            transaction_events.clone(),
        );
        r.register(
            "commit_to_ack_seconds",
            "Time from the PostgreSQL commit to the Kafka acknowledgement, per event",
            commit_to_ack_seconds.clone(),
        );
        r.register(
            "confirmed_lsn",
            "Flush position last confirmed to PostgreSQL, as a number",
            confirmed_lsn.clone(),
        );
        r.register("errors", "Errors by category", errors.clone());
        r.register(
            "active",
            "1 while this worker streams from the slot, 0 as standby",
            active.clone(),
        );
        r.register(
            "in_flight_events",
            "Events sent to Kafka and not yet acknowledged",
            in_flight.clone(),
        );
        r.register(
            "last_event_timestamp_seconds",
            "Commit time of the last delivered event, Unix seconds",
            last_event_timestamp_seconds.clone(),
        );
        r.register("sessions", "Replication sessions started", sessions.clone());

        Self {
            events,
            bytes,
            transaction_events,
            commit_to_ack_seconds,
            confirmed_lsn,
            errors,
            active,
            in_flight,
            last_event_timestamp_seconds,
            sessions,
            registry: Arc::new(r),
        }
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = RelayMetrics::new();
        m.events.get_or_create(&OutcomeLabels { outcome: "relayed" }).inc_by(3);
        m.error("MessageTooLarge");
        m.commit_to_ack_seconds.observe(0.004);
        let text = m.encode();
        assert!(
            text.contains("outbox_relay_events_total{outcome=\"relayed\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_errors_total{kind=\"MessageTooLarge\"} 1"),
            "{text}"
        );
        assert!(text.contains("outbox_relay_commit_to_ack_seconds_bucket"), "{text}");
        assert!(text.contains("outbox_relay_confirmed_lsn"), "{text}");
    }
}
