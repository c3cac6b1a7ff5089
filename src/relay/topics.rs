//! The check before sending: whether a record's topic exists and may be
//! written, from the producer's metadata, once per topic and session, so under
//! `Stop` such a refusal stops the relay before anything after the event is sent.
//! The same lookup gives the topic's partition count, which a fixed partition (the
//! partition column) is checked against.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use tracing::debug;

use super::session::Producer_;
use crate::kafka::DeliveryErrorKind;

/// How long a topic metadata lookup may take before the record is sent unchecked.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Topic checks from metadata, cached per session. Only definite answers refuse
/// (the topic does not exist, writing it is not authorized); a lookup that fails
/// or times out lets the record go, and the broker's own answer decides.
#[derive(Default)]
pub(super) struct TopicChecks {
    /// The last topic found fine and its partition count: the common case (one
    /// static topic) is a pointer compare.
    last_ok: Option<(Arc<str>, usize)>,
    /// Topics found fine, with their partition counts as read once per session
    /// (0: the lookup listed none, e.g. on a transient error).
    ok: HashMap<Arc<str>, usize>,
}

impl TopicChecks {
    pub(super) async fn check(
        &mut self,
        producer: &Arc<Producer_>,
        topic: &Arc<str>,
    ) -> Option<(&'static str, String)> {
        if self.last_ok.as_ref().is_some_and(|(t, _)| Arc::ptr_eq(t, topic)) {
            return None;
        }
        if let Some(n) = self.ok.get(topic) {
            self.last_ok = Some((topic.clone(), *n));
            return None;
        }
        let p = producer.clone();
        let name = topic.to_string();
        // librdkafka's metadata call blocks; keep it off the async threads.
        let answer = tokio::task::spawn_blocking(move || {
            p.client().fetch_metadata(Some(&name), METADATA_TIMEOUT).map(|m| {
                m.topics()
                    .first()
                    .map_or((None, 0), |t| (t.error(), t.partitions().len()))
            })
        })
        .await;
        let (refusal, partitions) = match answer {
            Ok(Ok((None, n))) => (None, n),
            Ok(Ok((Some(code), _))) => (topic_refusal(topic, RDKafkaErrorCode::from(code)), 0),
            Ok(Err(e)) => {
                debug!(%topic, error = %e, "topic metadata lookup failed; sending unchecked");
                return None;
            }
            Err(_) => return None,
        };
        if refusal.is_none() {
            if self.ok.len() >= 10_000 {
                self.ok.clear();
            }
            self.ok.insert(topic.clone(), partitions);
            self.last_ok = Some((topic.clone(), partitions));
        }
        refusal
    }

    /// The partition count of a topic [`Self::check`] found fine; `None` when the
    /// lookup gave no count.
    pub(super) fn partitions(&self, topic: &Arc<str>) -> Option<usize> {
        let n = match &self.last_ok {
            Some((t, n)) if Arc::ptr_eq(t, topic) => Some(*n),
            _ => self.ok.get(topic).copied(),
        };
        n.filter(|n| *n > 0)
    }
}

/// A metadata error that refuses the topic for good, as a category and a message.
fn topic_refusal(topic: &str, code: RDKafkaErrorCode) -> Option<(&'static str, String)> {
    use RDKafkaErrorCode as C;
    match code {
        C::UnknownTopicOrPartition | C::UnknownTopic => Some((
            DeliveryErrorKind::UnknownTopic.category(),
            format!("topic {topic} does not exist (create it, or enable automatic topic creation)"),
        )),
        C::TopicAuthorizationFailed => Some((
            DeliveryErrorKind::NotAuthorized.category(),
            format!("the relay's Kafka principal may not write topic {topic} (grant WRITE on it)"),
        )),
        C::InvalidTopic => Some((
            DeliveryErrorKind::UnknownTopic.category(),
            format!("topic name {topic} is not valid"),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_errors_that_refuse_a_topic() {
        let (kind, msg) = topic_refusal("t", RDKafkaErrorCode::UnknownTopicOrPartition).expect("refused");
        assert_eq!(kind, "UnknownTopic");
        assert!(msg.contains("does not exist"));
        assert_eq!(
            topic_refusal("t", RDKafkaErrorCode::TopicAuthorizationFailed).map(|r| r.0),
            Some("NotAuthorized")
        );
        assert_eq!(
            topic_refusal("t", RDKafkaErrorCode::LeaderNotAvailable),
            None,
            "transient: let the broker decide"
        );
    }
}
