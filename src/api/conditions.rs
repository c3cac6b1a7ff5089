//! Condition types, reasons and the merge rule for status conditions.
//!
//! `lastTransitionTime` moves only when a condition's status flips; a changed
//! reason or message alone keeps the time. That keeps status writes idempotent,
//! so a steady relay produces no status churn (and no GitOps diff noise).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub mod types {
    /// Everything below is fine and events flow.
    pub const READY: &str = "Ready";
    /// Connected; `wal_level` logical; table, publication and slot exist.
    pub const DATABASE_READY: &str = "DatabaseReady";
    /// Slot lag below thresholds and its WAL still retained.
    pub const SLOT_HEALTHY: &str = "SlotHealthy";
    /// The worker Deployment has an available pod.
    pub const WORKER_AVAILABLE: &str = "WorkerAvailable";
    /// Written by the worker itself (field manager `outbox-relay-worker`): events
    /// are delivered, or why not (the event and what to do). Folded into `Ready`.
    pub const DELIVERING: &str = "Delivering";
}

/// Condition reasons (CamelCase, stable: also used as Event reasons and metric labels).
pub mod reasons {
    pub const RELAYING: &str = "Relaying";
    pub const SUSPENDED: &str = "Suspended";
    pub const PROVISIONED: &str = "Provisioned";
    /// SlotHealthy in `mode: Polling`: there is no slot; the message gives the backlog.
    pub const POLLING: &str = "Polling";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DATABASE_UNREACHABLE: &str = "DatabaseUnreachable";
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    pub const WAL_LEVEL_NOT_LOGICAL: &str = "WalLevelNotLogical";
    pub const TABLE_NOT_FOUND: &str = "TableNotFound";
    pub const INSUFFICIENT_PRIVILEGE: &str = "InsufficientPrivilege";
    pub const PROVISIONING_FAILED: &str = "ProvisioningFailed";
    pub const LAG_OK: &str = "LagWithinThresholds";
    pub const LAG_WARNING: &str = "LagWarning";
    pub const LAG_CRITICAL: &str = "LagCritical";
    pub const WAL_LOST: &str = "WalLost";
    pub const SLOT_MISSING: &str = "SlotMissing";
    pub const WORKER_AVAILABLE: &str = "WorkerAvailable";
    pub const WORKER_PROGRESSING: &str = "WorkerProgressing";
    pub const WORKER_UNAVAILABLE: &str = "WorkerUnavailable";
    pub const NOT_READY: &str = "NotReady";
    /// Another relay owns (or holds first) the slot or publication this relay names.
    pub const CONFLICT: &str = "Conflict";
    /// The relay's slot is gone, lost its WAL, or lost its publication.
    pub const SLOT_LOST: &str = "SlotLost";
    /// The database server is not the one the slot was made on.
    pub const DATABASE_CHANGED: &str = "DatabaseChanged";
    /// Deletion waits for the worker to relay what was written before it.
    pub const DRAINING: &str = "Draining";
    /// Worker: events wait for Kafka's acknowledgement for too long.
    pub const KAFKA_UNAVAILABLE: &str = "KafkaUnavailable";
    /// Worker: an event was skipped (parked) on request; Event reason.
    pub const EVENT_SKIPPED: &str = "EventSkipped";
    // Further `Delivering` reasons are the worker's stable error categories:
    // MessageTooLarge, UnknownTopic, NotAuthorized, InvalidRecord, InvalidHeaders,
    // InvalidTopic, InvalidPayload, ColumnMissing, ParkFailed, DeadLetterFailed,
    // ReplicationTimeout, KafkaError, ConnectFailed, AuthenticationFailed, ...
}

/// A condition as a reconciler wants it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Desired {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Merges `desired` into `current`: conditions of other types (owned by another writer)
/// are kept as they are; `lastTransitionTime` is carried over unless the status flipped.
pub fn merge(current: &[Condition], desired: &[Desired], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    let mut out: Vec<Condition> = current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let status = status_str(d.status);
        let last_transition_time = current
            .iter()
            .find(|c| c.type_ == d.type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        out.push(Condition {
            type_: d.type_.to_string(),
            status: status.to_string(),
            reason: d.reason.to_string(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default())
    }

    #[test]
    fn new_condition_gets_now() {
        let out = merge(
            &[],
            &[Desired::new(types::READY, true, reasons::RELAYING, "ok")],
            Some(3),
            &t(100),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].status, "True");
        assert_eq!(out[0].observed_generation, Some(3));
        assert_eq!(out[0].last_transition_time, t(100));
    }

    #[test]
    fn time_moves_only_on_flip() {
        let first = merge(
            &[],
            &[Desired::new(types::READY, false, reasons::NOT_READY, "a")],
            Some(1),
            &t(100),
        );
        let same = merge(
            &first,
            &[Desired::new(types::READY, false, reasons::TABLE_NOT_FOUND, "b")],
            Some(2),
            &t(200),
        );
        assert_eq!(
            same[0].last_transition_time,
            t(100),
            "reason change alone keeps the time"
        );
        assert_eq!(same[0].reason, reasons::TABLE_NOT_FOUND);
        let flipped = merge(
            &same,
            &[Desired::new(types::READY, true, reasons::RELAYING, "c")],
            Some(2),
            &t(300),
        );
        assert_eq!(flipped[0].last_transition_time, t(300));
    }

    #[test]
    fn other_writers_conditions_are_kept() {
        let first = merge(
            &[],
            &[Desired::new("Relaying", true, reasons::RELAYING, "worker")],
            Some(1),
            &t(1),
        );
        let out = merge(
            &first,
            &[Desired::new(types::READY, true, reasons::RELAYING, "op")],
            Some(1),
            &t(2),
        );
        assert_eq!(out.len(), 2);
        assert!(find(&out, "Relaying").is_some());
        assert!(find(&out, types::READY).is_some());
    }
}
