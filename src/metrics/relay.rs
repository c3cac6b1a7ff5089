//! The relay worker's series (`outbox_relay_*`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::ErrorLabels;

/// Upper bounds (seconds) of the commit→ack histogram's buckets. Dense between
/// 1 ms and 100 ms, where delivery SLOs and alerts usually sit (a doubling
/// series jumps from 16 to 32 ms, so a 20 ms objective could not be read off
/// it), then coarse up to a minute for a stalled broker.
pub const COMMIT_TO_ACK_BUCKETS: [f64; 24] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `relayed`, `dead_lettered` (the copy on the dead-letter topic) or `parked` (in the park table).
    pub outcome: &'static str,
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
    /// Envelope values replaced or left out while the event went on (by kind).
    pub envelope_fallbacks: Family<ErrorLabels, Counter>,
    pub active: Gauge,
    pub in_flight: Gauge,
    pub last_event_timestamp_seconds: Gauge,
    pub sessions: Counter,
    /// Messages with the relay's prefix that were not transactional, so not
    /// relayed (`source: Messages`).
    pub refused_messages: Counter,
    /// `mode: Polling`: outbox rows deleted after Kafka acknowledged (or the park
    /// table took) them.
    pub polled_rows_deleted: Counter,
    registry: Arc<Registry>,
}

impl RelayMetrics {
    pub fn new() -> Self {
        let events = Family::<OutcomeLabels, Counter>::default();
        let bytes = Counter::default();
        // 1 … 32768 events per transaction.
        let transaction_events = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        let commit_to_ack_seconds = Histogram::new(COMMIT_TO_ACK_BUCKETS.iter().copied());
        let confirmed_lsn = Gauge::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let envelope_fallbacks = Family::<ErrorLabels, Counter>::default();
        let active = Gauge::default();
        let in_flight = Gauge::default();
        let last_event_timestamp_seconds = Gauge::default();
        let sessions = Counter::default();
        let refused_messages = Counter::default();
        let polled_rows_deleted = Counter::default();

        let mut r = Registry::with_prefix("outbox_relay");
        r.register(
            "nontransactional_messages",
            "Messages with the relay's prefix written non-transactionally, refused (not relayed): only transactional messages are committed-only",
            refused_messages.clone(),
        );
        r.register(
            "polled_rows_deleted",
            "Polling mode: outbox rows deleted once Kafka acknowledged them (or the park table took them)",
            polled_rows_deleted.clone(),
        );
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
            "envelope_fallbacks",
            "Envelope values (timestamp, partition, traceparent, tracestate) replaced or left out; the event was sent",
            envelope_fallbacks.clone(),
        );
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
            envelope_fallbacks,
            active,
            in_flight,
            last_event_timestamp_seconds,
            sessions,
            refused_messages,
            polled_rows_deleted,
            registry: Arc::new(r),
        }
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    pub fn envelope_fallback(&self, kind: &'static str) {
        self.envelope_fallbacks.get_or_create(&ErrorLabels { kind }).inc();
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
        // 4 ms lands in the 5 ms bucket and in every one above it, not below.
        assert!(
            text.contains("outbox_relay_commit_to_ack_seconds_bucket{le=\"0.003\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_commit_to_ack_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_commit_to_ack_seconds_bucket{le=\"0.02\"} 1"),
            "{text}"
        );
        assert!(text.contains("outbox_relay_confirmed_lsn"), "{text}");
    }
}
