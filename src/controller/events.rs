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
use crate::postgres::binding::Take;

/// Cleanup dropped the slot and publication.
pub const SLOT_DROPPED: &str = "SlotDropped";
/// Cleanup kept the slot and publication (`cleanupPolicy: Retain`).
pub const SLOT_RETAINED: &str = "SlotRetained";
/// A polling relay was deleted: its unrelayed events stay as rows in the table.
pub const ROWS_LEFT: &str = "RowsLeftInTable";
/// A deletion dropped the slot before every event in it was relayed.
pub const DROPPED_UNRELAYED: &str = "DroppedUnrelayed";
/// A deletion could not reach the slot and let the resource go without dropping it.
pub const SLOT_LEFT_BEHIND: &str = "SlotLeftBehind";
/// The operator created the relay's slot.
pub const SLOT_CREATED: &str = "SlotCreated";
/// A new slot after a loss, on request.
pub const SLOT_RECREATED: &str = "SlotRecreated";
/// The relay took over objects nobody (existing) owned, on request.
pub const ADOPTED: &str = "Adopted";
/// Ownership of objects made by an earlier operator version is now recorded.
pub const OWNERSHIP_RECORDED: &str = "OwnershipRecorded";

/// Ready reasons that always get an Event when they appear, even when `Ready` was
/// already False for another reason: each means events are at stake.
pub const ALARMS: [&str; 3] = [reasons::CONFLICT, reasons::SLOT_LOST, reasons::DATABASE_CHANGED];

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

/// The operator's conditions whose status differs between `previous` and `next`,
/// and those whose reason turned into one of the [`ALARMS`].
pub fn flips(previous: &[Condition], next: &[Condition]) -> Vec<Flip> {
    next.iter()
        .filter(|c| OWNED_TYPES.contains(&c.type_.as_str()))
        .filter(|c| {
            previous.iter().find(|p| p.type_ == c.type_).is_none_or(|p| {
                p.status != c.status
                    || (p.reason != c.reason && c.type_ == "Ready" && ALARMS.contains(&c.reason.as_str()))
            })
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

/// How the relay came to own its slot: creation, recreation after a loss,
/// adoption, or records written for an earlier version's objects.
pub async fn take(recorder: &Recorder, relay: &OutboxRelay, take: &Take) {
    let slot = relay
        .status
        .as_ref()
        .and_then(|s| s.binding.as_ref())
        .map(|b| b.slot.clone());
    let (type_, reason, note) = match take {
        Take::Created => (
            EventType::Normal,
            SLOT_CREATED,
            "Created the publication and the replication slot and recorded this relay as their owner.".to_string(),
        ),
        Take::Recreated { token, lost } => (
            EventType::Warning,
            SLOT_RECREATED,
            format!(
                "Created a new replication slot {:?} on request ({}={token}). It starts at the current WAL \
                 position: events committed after the lost slot's last confirmed position{} and before now were \
                 not relayed by this relay.",
                lost.slot,
                crate::api::annotations::RECREATE_SLOT,
                relay
                    .status
                    .as_ref()
                    .and_then(|s| s.slot.as_ref())
                    .and_then(|s| s.confirmed_flush_lsn.as_deref())
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default()
            ),
        ),
        Take::Adopted { from } => (
            EventType::Warning,
            ADOPTED,
            format!(
                "Took over the existing publication and replication slot{} (owner before: {from}) on request \
                 ({}=true); this relay streams from the slot's confirmed position on.",
                slot.map(|s| format!(" {s:?}")).unwrap_or_default(),
                crate::api::annotations::ADOPT
            ),
        ),
        Take::Recorded => (
            EventType::Normal,
            OWNERSHIP_RECORDED,
            "Recorded this relay as the owner of the publication and replication slot an earlier operator version \
             created."
                .to_string(),
        ),
    };
    publish(recorder, relay, type_, reason, "Provision", note).await;
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
