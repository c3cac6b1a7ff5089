//! The Kafka side of the relay: producer settings, delivery reports, error kinds.
//!
//! The producer is librdkafka's, bundled and built with the crate (no drift with
//! whatever library the host has). Its settings are fixed where the delivery
//! guarantee depends on them: idempotence on (so retries neither duplicate nor
//! reorder within a partition), `acks=all`, and no delivery timeout, because the
//! relay would rather stall and keep the WAL than give up on a record while Kafka
//! is away. Users tune batching and compression only.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{Compression, KafkaProtocol, SaslMechanism};

pub mod keys;

/// Everything the producer needs, resolved (secrets read, files mounted).
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub compression: Compression,
    pub linger_ms: i32,
    pub max_message_bytes: i32,
    pub extra: Vec<(String, String)>,
    pub protocol: KafkaProtocol,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    pub ca_location: Option<PathBuf>,
}

/// Records the relay keeps in flight at most; also sizes librdkafka's queue so
/// that `QueueFull` never happens before the relay's own back-pressure does.
pub const MAX_IN_FLIGHT: usize = 50_000;

/// Builds the librdkafka configuration. Pure. Only allow-listed extras are taken
/// ([`keys`]; the spec is checked before, this is the second line): no alias of a
/// guarantee-bearing key can reach the map, so the order of `set` calls cannot
/// decide which value wins.
pub fn producer_config(s: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &s.extra {
        if keys::refusal(k).is_none() {
            c.set(k, v);
        }
    }
    c.set("bootstrap.servers", &s.bootstrap_servers)
        .set("compression.codec", s.compression.as_str())
        .set("linger.ms", s.linger_ms.to_string())
        // Room for key and headers on top of the largest payload we accept.
        .set(
            "message.max.bytes",
            (s.max_message_bytes.saturating_add(64 * 1024)).to_string(),
        )
        .set("queue.buffering.max.messages", (MAX_IN_FLIGHT * 2).to_string())
        .set("queue.buffering.max.kbytes", (1024 * 1024).to_string())
        // Same key → same partition as the Java client, so consumers and other
        // producers (e.g. Debezium) agree on where an aggregate's events live.
        .set("partitioner", "murmur2_random")
        .set("topic.metadata.propagation.max.ms", "10000")
        .set("security.protocol", s.protocol.as_str())
        // Guarantees: not user-tunable (the CRD refuses these keys too).
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("message.send.max.retries", i32::MAX.to_string())
        .set("message.timeout.ms", "0");
    if let Some(m) = s.sasl_mechanism {
        c.set("sasl.mechanism", m.as_str());
    }
    if let Some(u) = &s.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &s.sasl_password {
        c.set("sasl.password", p);
    }
    if let Some(ca) = &s.ca_location {
        c.set("ssl.ca.location", ca.to_string_lossy());
    }
    c
}

/// Why Kafka refused a record. Permanent kinds are "poison": retrying the same
/// record cannot succeed until someone changes the topic or the ACLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryErrorKind {
    MessageTooLarge,
    UnknownTopic,
    NotAuthorized,
    InvalidRecord,
    /// Anything else: the producer's state is suspect, so the session restarts.
    Other,
}

impl DeliveryErrorKind {
    pub fn classify(e: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => Self::MessageTooLarge,
            Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition | C::InvalidTopic) => {
                Self::UnknownTopic
            }
            Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => Self::NotAuthorized,
            // A record timestamp outside the broker's window
            // (`log.message.timestamp.{before,after}.max.ms`): permanent for this record
            // until the topic's settings change, so the poison policy takes it.
            Some(C::InvalidRecord | C::InvalidTimestamp) => Self::InvalidRecord,
            _ => Self::Other,
        }
    }

    /// Whether a dead-letter policy may take the record.
    pub fn is_poison(self) -> bool {
        !matches!(self, Self::Other)
    }

    /// Stable CamelCase label for metrics, logs and conditions.
    pub fn category(self) -> &'static str {
        match self {
            Self::MessageTooLarge => "MessageTooLarge",
            Self::UnknownTopic => "UnknownTopic",
            Self::NotAuthorized => "NotAuthorized",
            Self::InvalidRecord => "InvalidRecord",
            Self::Other => "KafkaError",
        }
    }
}

/// A copy of a refused record, kept only on failure (for the dead-letter topic).
#[derive(Clone, Debug, PartialEq)]
pub struct FailedRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Outcome of one record, reported by librdkafka's delivery callback.
#[derive(Debug)]
pub struct DeliveryReport {
    /// The opaque tag the record was sent with (the relay's transaction sequence).
    pub tag: usize,
    pub result: Result<(), DeliveryFailure>,
}

#[derive(Debug)]
pub struct DeliveryFailure {
    pub kind: DeliveryErrorKind,
    pub error: String,
    pub record: FailedRecord,
}

/// Shared view of broker reachability, fed by librdkafka's error callback.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    all_down: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
    errors: AtomicU64,
}

impl BrokerHealth {
    pub fn all_brokers_down(&self) -> bool {
        self.all_down.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    /// A delivered record proves the brokers are back.
    pub fn mark_up(&self) {
        self.all_down.store(false, Ordering::Relaxed);
    }
}

/// Producer context: forwards each delivery to the relay as `(tag, result)`.
///
/// An integer tag instead of a boxed future per record keeps the per-event path
/// free of allocations on success.
pub struct RelayProducerContext {
    reports: UnboundedSender<DeliveryReport>,
    pub health: Arc<BrokerHealth>,
}

impl RelayProducerContext {
    pub fn new(reports: UnboundedSender<DeliveryReport>, health: Arc<BrokerHealth>) -> Self {
        Self { reports, health }
    }
}

impl ClientContext for RelayProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.health.errors.fetch_add(1, Ordering::Relaxed);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.all_down.store(true, Ordering::Relaxed);
        }
        if let Ok(mut g) = self.health.last_error.lock() {
            *g = Some(format!("{error}: {reason}"));
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for RelayProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, msg)) => Err(DeliveryFailure {
                kind: DeliveryErrorKind::classify(e),
                error: e.to_string(),
                record: FailedRecord {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    headers: msg
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|Header { key, value }| {
                                    (key.to_string(), value.map(<[u8]>::to_vec).unwrap_or_default())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                },
            }),
        };
        // The receiver is gone only when the session ended; its records will be
        // re-read from the slot, so a lost report loses nothing.
        let _ = self.reports.send(DeliveryReport { tag, result });
    }
}

/// Rebuilds librdkafka headers from owned pairs (dead-letter records).
pub fn owned_headers(pairs: &[(String, Vec<u8>)]) -> OwnedHeaders {
    pairs
        .iter()
        .fold(OwnedHeaders::new_with_capacity(pairs.len() + 3), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KafkaSettings {
        KafkaSettings {
            bootstrap_servers: "k:9092".into(),
            compression: Compression::Zstd,
            linger_ms: 7,
            max_message_bytes: 2048,
            extra: vec![
                ("acks".into(), "0".into()),
                ("delivery.timeout.ms".into(), "1000".into()),
                ("linger.ms".into(), "999".into()),
                ("retries".into(), "0".into()),
                ("enable.ssl.certificate.verification".into(), "false".into()),
                ("batch.size".into(), "1000".into()),
            ],
            protocol: KafkaProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("u".into()),
            sasl_password: Some("p".into()),
            ca_location: Some(PathBuf::from("/etc/kafka/ca.pem")),
        }
    }

    #[test]
    fn guarantees_win_over_extras() {
        let c = producer_config(&settings());
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
        assert_eq!(c.get("batch.size"), Some("1000"), "harmless extras pass through");
        for alias in ["delivery.timeout.ms", "retries", "enable.ssl.certificate.verification"] {
            assert_eq!(c.get(alias), None, "{alias} never reaches the map");
        }
        assert_eq!(c.get("linger.ms"), Some("7"), "the spec's value, not the extra's");
        assert_eq!(c.get("message.send.max.retries"), Some(i32::MAX.to_string().as_str()));
    }

    #[test]
    fn user_settings_are_mapped() {
        let c = producer_config(&settings());
        assert_eq!(c.get("bootstrap.servers"), Some("k:9092"));
        assert_eq!(c.get("compression.codec"), Some("zstd"));
        assert_eq!(c.get("linger.ms"), Some("7"));
        assert_eq!(c.get("message.max.bytes"), Some((2048 + 65536).to_string().as_str()));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/kafka/ca.pem"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
    }

    #[test]
    fn classification() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(
            DeliveryErrorKind::classify(&too_large),
            DeliveryErrorKind::MessageTooLarge
        );
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert_eq!(DeliveryErrorKind::classify(&unknown), DeliveryErrorKind::UnknownTopic);
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(DeliveryErrorKind::classify(&down), DeliveryErrorKind::Other);
        let stale = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidTimestamp);
        assert_eq!(DeliveryErrorKind::classify(&stale), DeliveryErrorKind::InvalidRecord);
        assert!(!DeliveryErrorKind::Other.is_poison());
        assert!(DeliveryErrorKind::NotAuthorized.is_poison());
    }
}
