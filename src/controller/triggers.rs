//! Which changes of a relay start a reconcile.
//!
//! Every status write is a change of the object, and without a filter the watch
//! hands the operator's own writes straight back to it: each reconcile that wrote
//! the status was followed at once by a second one that found nothing to do (one
//! more round of Secret reads, SQL and API calls per change). The filter passes a
//! change only when something a reconcile reads from the user or the worker moved:
//! the spec (`generation`), annotations (skip, recreate, adopt, force-delete),
//! labels, finalizers, the deletion timestamp, and the worker's own part of the
//! status (`Delivering`, `lastSkippedEvent`), which `Ready` folds in. The
//! operator's own status fields are left out, and the periodic requeue still
//! looks at every relay.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use crate::api::OutboxRelay;
use crate::api::conditions::types;

/// The hash of what may call for a reconcile (see the module docs).
pub fn relevant(relay: &OutboxRelay) -> Option<u64> {
    let mut h = DefaultHasher::new();
    let m = &relay.metadata;
    m.uid.hash(&mut h);
    m.generation.hash(&mut h);
    m.annotations.hash(&mut h);
    m.labels.hash(&mut h);
    m.finalizers.hash(&mut h);
    m.deletion_timestamp.as_ref().map(|t| t.0.as_second()).hash(&mut h);
    if let Some(status) = &relay.status {
        for c in status.conditions.iter().filter(|c| c.type_ == types::DELIVERING) {
            (&c.status, &c.reason, &c.message, c.observed_generation).hash(&mut h);
        }
        status.last_skipped_event.hash(&mut h);
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;
    use crate::api::OutboxRelayStatus;

    fn condition(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn relay() -> OutboxRelay {
        let mut r = OutboxRelay::test();
        r.metadata.generation = Some(1);
        r.status = Some(OutboxRelayStatus {
            conditions: vec![condition(types::READY, "True", "Relaying")],
            ..OutboxRelayStatus::default()
        });
        r
    }

    #[test]
    fn the_operators_own_status_writes_do_not_trigger() {
        let before = relay();
        let mut after = before.clone();
        let status = after.status.as_mut().unwrap();
        status.conditions = vec![condition(types::READY, "False", "LagWarning")];
        status.observed_generation = Some(1);
        status.destination = Some("orders".into());
        assert_eq!(relevant(&before), relevant(&after));
    }

    #[test]
    fn user_and_worker_changes_trigger() {
        let base = relay();
        let h = relevant(&base);
        let mut spec = base.clone();
        spec.metadata.generation = Some(2);
        let mut annotated = base.clone();
        annotated
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("outbox.dev/skip-event".into(), "id@0/1".into());
        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let mut finalized = base.clone();
        finalized.metadata.finalizers = Some(vec!["outbox.dev/cleanup".into()]);
        let mut worker = base.clone();
        worker
            .status
            .as_mut()
            .unwrap()
            .conditions
            .push(condition(types::DELIVERING, "False", "MessageTooLarge"));
        let mut skipped = base.clone();
        skipped.status.as_mut().unwrap().last_skipped_event = Some("id@0/1".into());
        let mut recreated = base.clone();
        recreated.metadata.uid = Some("another".into());
        for (what, changed) in [
            ("spec", spec),
            ("annotation", annotated),
            ("deletion", deleting),
            ("finalizers", finalized),
            ("Delivering", worker),
            ("lastSkippedEvent", skipped),
            ("uid", recreated),
        ] {
            assert_ne!(relevant(&changed), h, "a change of {what} must trigger");
        }
    }
}
