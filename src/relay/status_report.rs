//! The worker's own condition on its `OutboxRelay`: `Delivering`.
//!
//! Why the worker writes it rather than the operator reading the worker's state:
//! the worker is the only one that knows which event it stopped at and why, and
//! the least privilege that carries that is one condition of one resource. The
//! worker applies only the `Delivering` entry of `status.conditions` (a map list
//! keyed by type) and `status.lastSkippedEvent`, with its own field manager
//! (`outbox-relay-worker`), so it can neither touch the operator's conditions nor
//! anything else; its Role (rendered by the operator) allows `get` and status
//! `patch` on its own resource only (`resourceNames`), and creating Events. The
//! operator folds a False `Delivering` into `Ready`.
//!
//! It is the one part of the worker that talks to Kubernetes, and only when the
//! rendered Deployment asks for it (`OUTBOX_STATUS_REPORTING=true`), so the relay
//! runs without an API server in tests and outside a cluster.
//!
//! Writes are rate-limited: nothing is written when nothing changed; a change of
//! status or reason is written at once (checked every `interval`); a change of the
//! message alone (e.g. a stall's growing duration) at most every `message_interval`.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tracing::{debug, info, warn};

use super::config::SKIP_EVENT_ANNOTATION;
use super::core::EventRef;
use super::state::{Phase, RelayState};
use crate::api::OutboxRelay;
use crate::api::conditions::{self, Desired, reasons, types};

/// The worker's field manager for server-side apply.
pub const FIELD_MANAGER: &str = "outbox-relay-worker";
/// Environment variable that turns status reporting on.
pub const ENV: &str = "OUTBOX_STATUS_REPORTING";
/// Bound on every API call of the reporter.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// What the worker's condition should say now; `None` while it has nothing to
/// report (starting, or a hot standby, which must not overwrite the active
/// worker's word).
pub fn delivering(state: &RelayState) -> Option<Desired> {
    let phase = state.phase();
    match phase {
        Phase::Starting | Phase::Standby => None,
        // Streaming again after a failure, without progress yet: still failing
        // (a relay stopped at a poison event retries; it must not flap to True).
        Phase::Streaming if state.failing() => failing(state),
        Phase::Streaming => Some(match state.stalled() {
            Some(why) => Desired::new(
                types::DELIVERING,
                false,
                reasons::KAFKA_UNAVAILABLE,
                format!(
                    "Kafka does not acknowledge: {why}. Nothing is lost: the slot keeps the WAL and delivery resumes when the brokers answer; check spec.kafka.bootstrapServers and the brokers."
                ),
            ),
            None => {
                let mut message = "Streaming from the slot; events are delivered.".to_string();
                if let Some(skipped) = state.skipped() {
                    message.push_str(&format!(
                        " Event {skipped} was skipped on request and is in the park table; remove the outbox.dev/skip-event annotation."
                    ));
                }
                Desired::new(types::DELIVERING, true, reasons::RELAYING, message)
            }
        }),
        Phase::Failing => failing(state),
    }
}

fn failing(state: &RelayState) -> Option<Desired> {
    let (category, message) = state
        .last_error()
        .unwrap_or(("Failing", "the last session failed".to_string()));
    Some(Desired::new(
        types::DELIVERING,
        false,
        category,
        worker_message(category, &message),
    ))
}

/// The error's text plus what to do, for kinds whose text says only what is wrong.
fn worker_message(category: &str, message: &str) -> String {
    let advice = match category {
        "ConnectFailed" | "ConnectTimeout" | "DatabaseUnreachable" => {
            " Check that the worker can reach spec.database.host; it retries with backoff."
        }
        "AuthenticationFailed" => " Check the credentials in spec.database.credentialsSecretRef.",
        "ReplicationTimeout" => " The worker reconnected; if this repeats, check the network to PostgreSQL.",
        "KafkaError" | "KafkaConfig" => " Check spec.kafka and the brokers; the worker retries.",
        _ => "",
    };
    let mut m = message.to_string();
    if !m.ends_with('.') {
        m.push('.');
    }
    m.push_str(advice);
    m
}

/// Reads the skip request on the resource (`outbox.dev/skip-event`).
#[derive(Clone)]
pub struct SkipSource {
    api: Api<OutboxRelay>,
    name: String,
}

impl SkipSource {
    /// Read before each session, so a user's annotation takes effect at the next
    /// retry of a stopped relay (at most `max_backoff` later), without a restart.
    pub async fn skip_request(&self) -> Option<String> {
        let relay = tokio::time::timeout(API_TIMEOUT, self.api.get(&self.name))
            .await
            .ok()?
            .ok()?;
        relay.metadata.annotations?.get(SKIP_EVENT_ANNOTATION).cloned()
    }
}

/// Applies the worker's condition to its resource.
pub struct StatusReporter {
    api: Api<OutboxRelay>,
    name: String,
    recorder: Recorder,
    written: Option<(Desired, Instant)>,
    skipped_reported: Option<EventRef>,
    message_interval: Duration,
}

impl StatusReporter {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            name: name.to_string(),
            recorder: Recorder::new(client, Reporter::from(FIELD_MANAGER)),
            written: None,
            skipped_reported: None,
            message_interval: Duration::from_secs(30),
        }
    }

    /// Where the skip request is read from (shared with the supervisor).
    pub fn skip_source(&self) -> SkipSource {
        SkipSource {
            api: self.api.clone(),
            name: self.name.clone(),
        }
    }

    /// Writes the condition when it changed enough (see the module docs), and a
    /// newly skipped event, with a Warning Event.
    pub async fn report(&mut self, state: &RelayState) {
        let skipped = state.skipped();
        let new_skip = skipped.is_some() && skipped != self.skipped_reported;
        let Some(want) = delivering(state) else { return };
        let due = new_skip
            || match &self.written {
                None => true,
                Some((had, at)) => {
                    had.status != want.status
                        || had.reason != want.reason
                        || (had.message != want.message && at.elapsed() >= self.message_interval)
                }
            };
        if !due || !self.apply(&want, skipped.as_ref()).await {
            return;
        }
        if self
            .written
            .as_ref()
            .is_none_or(|(had, _)| had.status != want.status || had.reason != want.reason)
        {
            info!(status = want.status, reason = want.reason, "reported Delivering");
        }
        self.written = Some((want, Instant::now()));
        if new_skip && let Some(event) = &skipped {
            self.skip_event(event).await;
            self.skipped_reported = skipped;
        }
    }

    /// One apply holds every field the worker owns: with server-side apply, a
    /// field the manager owned and leaves out of its next apply is removed.
    async fn apply(&self, want: &Desired, skipped: Option<&EventRef>) -> bool {
        // Read the current conditions so lastTransitionTime moves only on a flip.
        let current = match tokio::time::timeout(API_TIMEOUT, self.api.get_status(&self.name)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the OutboxRelay status");
                return false;
            }
            Err(_) => return false,
        };
        let generation = current.metadata.generation;
        let (existing, last_skipped): (Vec<Condition>, Option<String>) = current
            .status
            .map(|s| (s.conditions, s.last_skipped_event))
            .unwrap_or_default();
        let merged = conditions::merge(&existing, std::slice::from_ref(want), generation, &now());
        let Some(cond) = merged.into_iter().find(|c| c.type_ == types::DELIVERING) else {
            return false;
        };
        let mut status = serde_json::json!({"conditions": [cond]});
        // A restarted worker keeps reporting the skip an earlier one recorded.
        if let Some(skip) = skipped.map(ToString::to_string).or(last_skipped) {
            status["lastSkippedEvent"] = skip.into();
        }
        let body = serde_json::json!({
            "apiVersion": OutboxRelay::api_version(&()),
            "kind": OutboxRelay::kind(&()),
            "status": status,
        });
        self.patch(&body).await
    }

    async fn skip_event(&self, event: &EventRef) {
        warn!(%event, "reporting the skipped event");
        let Ok(Ok(relay)) = tokio::time::timeout(API_TIMEOUT, self.api.get(&self.name)).await else {
            return;
        };
        let e = Event {
            type_: EventType::Warning,
            reason: reasons::EVENT_SKIPPED.to_string(),
            note: Some(format!(
                "Event {event} was skipped on request (outbox.dev/skip-event): it is parked in the park table, not delivered to its topic."
            )),
            action: "Skip".to_string(),
            secondary: None,
        };
        match tokio::time::timeout(API_TIMEOUT, self.recorder.publish(&e, &relay.object_ref(&()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "could not publish the skip Event"),
            Err(_) => debug!("publishing the skip Event timed out"),
        }
    }

    async fn patch(&self, body: &serde_json::Value) -> bool {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match tokio::time::timeout(API_TIMEOUT, self.api.patch_status(&self.name, &pp, &Patch::Apply(body))).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot write the OutboxRelay status");
                false
            }
            Err(_) => {
                warn!("writing the OutboxRelay status timed out");
                false
            }
        }
    }
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::lsn::Lsn;

    #[test]
    fn standby_and_starting_workers_report_nothing() {
        let s = RelayState::default();
        assert_eq!(delivering(&s), None);
        s.set_phase(Phase::Standby);
        assert_eq!(delivering(&s), None);
    }

    #[test]
    fn streaming_is_true_and_a_stall_is_kafka_unavailable() {
        let s = RelayState::default();
        s.set_phase(Phase::Streaming);
        let d = delivering(&s).expect("condition");
        assert!(d.status);
        assert_eq!(d.reason, reasons::RELAYING);
        s.set_stalled(Some("12 events wait for Kafka for 20s (all brokers down)".into()));
        let d = delivering(&s).expect("condition");
        assert!(!d.status);
        assert_eq!(d.reason, "KafkaUnavailable");
        assert!(d.message.contains("Nothing is lost"), "{}", d.message);
    }

    #[test]
    fn a_stop_names_the_event_and_the_way_out() {
        let s = RelayState::default();
        let err = crate::relay::session::RelayError::Poison {
            event: EventRef {
                event_id: "e-9".into(),
                commit_lsn: Lsn::new(0x16B3748),
            },
            kind: "MessageTooLarge",
            reason: "the record is 9000 bytes, more than maxMessageBytes 2048".into(),
        };
        s.set_error(err.category(), err.to_string());
        let d = delivering(&s).expect("condition");
        assert!(!d.status);
        assert_eq!(d.reason, "MessageTooLarge");
        s.set_phase(Phase::Streaming);
        assert_eq!(
            delivering(&s),
            Some(d.clone()),
            "the retry streaming again does not flap to True"
        );
        s.progressed();
        assert!(delivering(&s).expect("condition").status);
        assert!(d.message.contains("e-9@0/16B3748"), "{}", d.message);
        assert!(d.message.contains("outbox.dev/skip-event"), "{}", d.message);
    }

    #[test]
    fn a_skipped_event_stays_visible_while_streaming() {
        let s = RelayState::default();
        s.set_phase(Phase::Streaming);
        s.set_skipped(EventRef {
            event_id: "e-9".into(),
            commit_lsn: Lsn::new(0x100),
        });
        let d = delivering(&s).expect("condition");
        assert!(d.status && d.message.contains("e-9@0/100"), "{}", d.message);
    }

    #[test]
    fn connection_errors_get_advice() {
        assert!(worker_message("ConnectFailed", "cannot connect to db:5432").contains("retries with backoff"));
        assert_eq!(
            worker_message("UnknownTopic", "topic t does not exist"),
            "topic t does not exist."
        );
    }
}
