//! The check before sending: whether a record's topic exists and may be
//! written, from the producer's metadata, once per topic and session, so under
//! `Stop` such a refusal stops the relay before anything after the event is sent.

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
    /// The last topic found fine: the common case (one static topic) is a pointer compare.
    last_ok: Option<Arc<str>>,
    ok: HashMap<Arc<str>, ()>,
}

impl TopicChecks {
    pub(super) async fn check(
        &mut self,
        producer: &Arc<Producer_>,
        topic: &Arc<str>,
    ) -> Option<(&'static str, String)> {
        if self.last_ok.as_ref().is_some_and(|t| Arc::ptr_eq(t, topic)) || self.ok.contains_key(topic) {
            self.last_ok = Some(topic.clone());
            return None;
        }
        let p = producer.clone();
        let name = topic.to_string();
        // librdkafka's metadata call blocks; keep it off the async threads.
        let answer = tokio::task::spawn_blocking(move || {
            p.client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                .map(|m| m.topics().first().and_then(|t| t.error()))
        })
        .await;
        let refusal = match answer {
            Ok(Ok(None)) => None,
            Ok(Ok(Some(code))) => topic_refusal(topic, RDKafkaErrorCode::from(code)),
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
            self.ok.insert(topic.clone(), ());
            self.last_ok = Some(topic.clone());
        }
        refusal
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
