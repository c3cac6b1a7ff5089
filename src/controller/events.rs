//! Kubernetes Events: one when a condition flips, one when a reconcile fails (with
//! the error's category as reason), and one when cleanup dropped or kept the slot.
//!
//! Publishing is best effort: a failed Event is logged and never fails a reconcile.
//! The recorder folds repeats of the same reason into one Event with a count, so a
//! failure retried with backoff does not flood the namespace.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::debug;

use super::Error;
use super::status::OWNED_TYPES;
use crate::api::OutboxRelay;
use crate::api::conditions::reasons;

/// Cleanup dropped the slot and publication.
pub const SLOT_DROPPED: &str = "SlotDropped";
/// Cleanup kept the slot and publication (`cleanupPolicy: Retain`).
pub const SLOT_RETAINED: &str = "SlotRetained";

/// An Event note may hold 1 kB.
const MAX_NOTE: usize = 1000;

/// A condition of the operator's that changed status (or appeared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flip {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// The operator's conditions whose status differs between `previous` and `next`.
pub fn flips(previous: &[Condition], next: &[Condition]) -> Vec<Flip> {
    next.iter()
        .filter(|c| OWNED_TYPES.contains(&c.type_.as_str()))
        .filter(|c| {
            previous
                .iter()
                .find(|p| p.type_ == c.type_)
                .is_none_or(|p| p.status != c.status)
        })
        .map(|c| Flip {
            type_: c.type_.clone(),
            status: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

pub async fn flip(recorder: &Recorder, relay: &OutboxRelay, f: &Flip) {
    // Suspension is asked for; it is not a fault.
    let type_ = if f.status || f.reason == reasons::SUSPENDED {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let status = if f.status { "True" } else { "False" };
    let note = format!("{} is {status}: {}", f.type_, f.message);
    publish(recorder, relay, type_, &f.reason, &f.type_, note).await;
}

pub async fn error(recorder: &Recorder, relay: &OutboxRelay, action: &str, e: &Error) {
    publish(
        recorder,
        relay,
        EventType::Warning,
        e.category(),
        action,
        e.user_message(),
    )
    .await;
}

pub async fn publish(
    recorder: &Recorder,
    relay: &OutboxRelay,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note, MAX_NOTE)),
        action: action.to_string(),
        secondary: None,
    };
    let reference = relay.object_ref(&());
    let publish = recorder.publish(&event, &reference);
    match tokio::time::timeout(super::API_TIMEOUT, publish).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, reason, "could not publish an Event"),
        Err(_) => debug!(reason, "publishing an Event timed out"),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn c(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{type_} {status}"),
            observed_generation: Some(1),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn only_status_changes_are_flips() {
        let prev = vec![
            c("Ready", "False", "WorkerUnavailable"),
            c("DatabaseReady", "True", "Provisioned"),
            c("Relaying", "False", "Other"),
        ];
        let next = vec![
            c("Ready", "True", "Relaying"),
            c("DatabaseReady", "True", "Provisioned"),
            c("SlotHealthy", "True", "LagWithinThresholds"),
            c("Relaying", "True", "Other"),
        ];
        let f = flips(&prev, &next);
        let names: Vec<&str> = f.iter().map(|f| f.type_.as_str()).collect();
        assert_eq!(names, ["Ready", "SlotHealthy"]);
        assert!(f[0].status);
        // A reason change alone is no flip.
        let reworded = vec![c("Ready", "False", "SecretNotFound")];
        assert!(flips(&prev[..1], &reworded).is_empty());
    }

    #[test]
    fn notes_are_cut_at_a_char_boundary() {
        let s = truncate("é".repeat(600), MAX_NOTE);
        assert!(s.len() <= MAX_NOTE && s.ends_with("..."));
        assert_eq!(truncate("short".into(), MAX_NOTE), "short");
    }
}
