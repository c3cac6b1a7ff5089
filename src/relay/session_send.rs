//! Sending one record: the checks before sending (topic, partition) and the
//! Kafka record with its headers, timestamp and partition.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use tracing::warn;

use super::super::core::{self, Input, Row};
use super::super::envelope::{self, Fallback};
use super::super::mapping::OutboxRecord;
use super::{RelayError, Session, headers};
use crate::kafka::DeliveryErrorKind;

impl Session<'_> {
    /// The check before sending: whether the record's topic exists and may be
    /// written, from the producer's metadata, once per topic and session; and
    /// whether the topic has the partition the record asks for (if not, the key's
    /// hash picks one: the event goes on).
    pub(super) async fn checked(&mut self, mut record: OutboxRecord) -> Row {
        if let Some((kind, reason)) = self.topics.check(&self.producer, &record.topic).await {
            return Row::Refused { record, kind, reason };
        }
        if let Err(f) = envelope::partition_for(record.partition, self.topics.partitions(&record.topic)) {
            self.fell_back(&record, &f);
            record.partition = None;
        }
        Row::Event(record)
    }

    /// Counts and logs an envelope value that was replaced or left out.
    pub(super) fn fell_back(&self, record: &OutboxRecord, f: &Fallback) {
        self.metrics.envelope_fallback(f.kind);
        warn!(event_id = %record.event_id_str(), kind = f.kind, reason = %f.reason, "envelope value not used; the event goes on");
    }

    /// Sends one record; an immediate refusal comes back as an input for the core.
    pub(super) async fn produce(&mut self, tag: usize, r: &OutboxRecord) -> Result<Option<Input>, RelayError> {
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
        let mut record = BaseRecord::with_opaque_to(&r.topic, tag).headers(h);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if let Some(p) = &r.payload {
            record = record.payload(&p[..]);
        }
        // The mapping only makes timestamps Kafka can carry; the check is for the
        // type's sake (librdkafka would read 0 as "now").
        if let Some(ms) = envelope::kafka_millis(r.timestamp) {
            record = record.timestamp(ms);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(None),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition), mut back))
                    if back.partition.is_some() =>
                {
                    // The partition count was not known before sending (the metadata
                    // lookup gave none): the same fallback as a known-bad partition.
                    let f = Fallback {
                        kind: envelope::kinds::INVALID_PARTITION,
                        reason: format!(
                            "the producer knows no partition {:?} of topic {}; the key's hash picks the partition",
                            back.partition, r.topic
                        ),
                    };
                    self.fell_back(r, &f);
                    back.partition = None;
                    record = back;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The in-flight bound sits below librdkafka's queue size, so
                    // this is rare; wait for deliveries to make room.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    let kind = DeliveryErrorKind::classify(&e);
                    if !kind.is_poison() {
                        // The producer's state is suspect: a new session starts over.
                        self.metrics.error(kind.category());
                        return Err(RelayError::Delivery(e.to_string()));
                    }
                    return Ok(Some(Input::Refused {
                        tag,
                        kind: kind.category(),
                        reason: e.to_string(),
                        record: core::failed_record(r),
                    }));
                }
            }
        }
    }
}
