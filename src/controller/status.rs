//! Step 5: the status. [`desired_status`] is a pure function of the resource, what
//! the steps observed and the time; [`write`] applies it to the status subresource
//! only when [`unchanged`] says it differs, because a no-op write still wakes every
//! watcher of the resource (GitOps tools, the operator itself).
//!
//! The operator owns the conditions `Ready`, `DatabaseReady`, `SlotHealthy` and
//! `WorkerAvailable`, plus `observedGeneration`, `destination` and `slot`. It applies
//! only those fields, so conditions of other writers survive its server-side applies.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};

use super::{ApiFailure, FIELD_MANAGER, api_call};
use crate::api::conditions::{Desired, merge, reasons, types};
use crate::api::{BindingStatus, OutboxRelay, OutboxRelayStatus};
use crate::metrics::{RelayGauges, SlotGauges};
use crate::postgres::{LagLevel, SlotInfo};

/// Condition types this operator writes.
pub const OWNED_TYPES: [&str; 4] = [
    types::READY,
    types::DATABASE_READY,
    types::SLOT_HEALTHY,
    types::WORKER_AVAILABLE,
];

/// Why something is not as wanted: a stable reason and a sentence for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// A reconcile error as a problem, with advice where the error's own text has none.
    pub fn of(e: &super::Error) -> Self {
        let reason = e.category();
        let mut message = sentence(&e.user_message());
        if let Some(advice) = advice(reason) {
            message.push(' ');
            message.push_str(advice);
        }
        Self { reason, message }
    }
}

/// What to do, for categories whose error text states only what is wrong.
fn advice(reason: &str) -> Option<&'static str> {
    Some(match reason {
        reasons::TABLE_NOT_FOUND => "Create the table or correct spec.outbox.table.",
        reasons::DATABASE_UNREACHABLE => {
            "Check spec.database.host and port and that the operator can reach the server; retrying with backoff."
        }
        reasons::AUTHENTICATION_FAILED => "Check the user name and password in spec.database.credentialsSecretRef.",
        "DatabaseNotFound" => "Create the database or correct spec.database.database.",
        "ColumnNotFound" => "Add the column or map another one in spec.outbox.columns.",
        "TlsHandshakeFailed" => "Check spec.database.tls and the server's certificate.",
        _ => return None,
    })
}

/// Ends the text with a full stop and upper-cases its first word, unless that word
/// is an identifier (`wal_level`) whose spelling matters.
fn sentence(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        return String::new();
    }
    let first_word = s.split(' ').next().unwrap_or_default();
    let mut out = String::with_capacity(s.len() + 1);
    if first_word.chars().all(|c| c.is_ascii_lowercase()) {
        let mut chars = s.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
        }
        out.push_str(chars.as_str());
    } else {
        out.push_str(s);
    }
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// What the steps found in the database.
// One value per reconcile: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum DatabaseObservation {
    /// Prerequisites hold and publication and slot exist; `slot` is what the server
    /// says about the slot (`None`: dropped between provisioning and the read).
    Provisioned {
        /// What was found besides server and role: "table X exists", or the emit function.
        table: String,
        publication: String,
        slot_name: String,
        slot: Option<SlotInfo>,
        /// The slot's identity, for `status.binding`.
        binding: BindingStatus,
        /// The partition manager's pass, with `spec.outbox.partitions`.
        partitions: Option<crate::api::partitions::PartitionsStatus>,
    },
    /// `mode: Polling`: the table is ready to poll (no slot, no publication).
    Polled {
        table: String,
        order_column: String,
        facts: crate::postgres::polling::PollFacts,
    },
    /// Reachable and checked, but the relay may not use its objects: another relay
    /// owns them (`Conflict`), or its slot was lost (`SlotLost`, `DatabaseChanged`).
    Unbound {
        problem: Problem,
        /// The slot as the server reports it, if it exists.
        slot: Option<SlotInfo>,
        /// What the relay had recorded, kept so the loss stays described.
        binding: Option<BindingStatus>,
    },
    /// A step up to and including provisioning failed.
    Failed(Problem),
}

/// What the steps found about the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerObservation {
    /// `spec.suspend` is true: the worker is scaled to zero on purpose.
    Suspended,
    /// No Deployment (yet).
    Missing,
    /// The Deployment could not be applied or read.
    Unknown(Problem),
    Deployment {
        /// Desired pods.
        replicas: i32,
        available: i32,
        /// The Deployment controller has seen the latest spec.
        rolled_out: bool,
    },
}

/// Everything [`desired_status`] needs besides the resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub database: DatabaseObservation,
    pub worker: WorkerObservation,
}

/// The current time, to the second (the precision the API stores).
pub fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// The status the operator wants, holding only the fields it owns. Conditions keep
/// their `lastTransitionTime` unless their status flips (see [`merge`]).
pub fn desired_status(relay: &OutboxRelay, observed: &Observed, now: &Time) -> OutboxRelayStatus {
    let current = relay.status.as_ref();
    let generation = relay.metadata.generation;
    let database = database_condition(&observed.database);
    let slot = slot_condition(relay, &observed.database);
    let worker = worker_condition(relay, &observed.worker);
    let ready = fold_delivering(relay, ready_condition(relay, observed, &database, &slot, &worker));

    let current_conditions = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conditions = merge(current_conditions, &[ready, database, slot.0, worker], generation, now)
        .into_iter()
        .filter(|c| OWNED_TYPES.contains(&c.type_.as_str()))
        .collect();

    let (slot_status, binding) = match &observed.database {
        DatabaseObservation::Provisioned { slot, binding, .. } => {
            (slot.as_ref().map(SlotInfo::to_status), Some(binding.clone()))
        }
        // A lost slot keeps its last seen facts (the confirmed position says where
        // events may be missing); a conflicting relay shows nothing of the other's.
        DatabaseObservation::Unbound { slot, binding, problem } => {
            let facts = match (slot, problem.reason) {
                (_, reasons::CONFLICT) => None,
                (Some(s), _) => Some(s.to_status()),
                (None, _) => current.and_then(|s| s.slot.clone()),
            };
            (
                facts,
                binding.clone().or_else(|| current.and_then(|s| s.binding.clone())),
            )
        }
        DatabaseObservation::Polled { .. } => (None, None),
        // Unreadable now: keep what was last seen (its name at least is still right)
        // rather than blank the printer columns while the database is away.
        DatabaseObservation::Failed(_) => (
            current.and_then(|s| s.slot.clone()),
            current.and_then(|s| s.binding.clone()),
        ),
    };
    OutboxRelayStatus {
        observed_generation: generation,
        conditions,
        destination: Some(relay.destination()).filter(|d| !d.is_empty()),
        slot: slot_status,
        last_event_time: None,
        binding,
        drain: None,
        protected_secrets: super::secrets::protected(relay),
        last_skipped_event: None,
        partitions: match &observed.database {
            DatabaseObservation::Provisioned { partitions, .. } => partitions.clone(),
            // Not reached this pass: what was last seen still holds.
            _ if relay.spec.outbox.partitions.is_some() => current.and_then(|s| s.partitions.clone()),
            _ => None,
        },
    }
}

fn database_condition(db: &DatabaseObservation) -> Desired {
    match db {
        DatabaseObservation::Provisioned {
            table,
            publication,
            slot_name,
            ..
        } => Desired::new(
            types::DATABASE_READY,
            true,
            reasons::PROVISIONED,
            format!(
                "Connected; wal_level is logical, {table}, publication {publication:?} and \
                 replication slot {slot_name:?} are in place."
            ),
        ),
        DatabaseObservation::Polled {
            table, order_column, ..
        } => Desired::new(
            types::DATABASE_READY,
            true,
            reasons::PROVISIONED,
            format!(
                "Connected; polling mode: table {table} exists, has a unique index on {order_column:?}, and the role \
                 may read, lock and delete its rows."
            ),
        ),
        DatabaseObservation::Unbound { problem: p, .. } | DatabaseObservation::Failed(p) => {
            Desired::new(types::DATABASE_READY, false, p.reason, p.message.clone())
        }
    }
}

/// The SlotHealthy condition and the lag level behind it (`None`: unknown).
fn slot_condition(relay: &OutboxRelay, db: &DatabaseObservation) -> (Desired, Option<LagLevel>) {
    let th = &relay.spec.replication.lag;
    let (slot_name, slot) = match db {
        DatabaseObservation::Provisioned { slot_name, slot, .. } => (slot_name, slot),
        // No slot to be healthy or not: the backlog is the table itself, and it
        // pins no WAL. The condition says what waits, so `kubectl describe` still
        // answers "is it keeping up?".
        DatabaseObservation::Polled { table, facts, .. } => {
            return (
                Desired::new(
                    types::SLOT_HEALTHY,
                    true,
                    reasons::POLLING,
                    format!(
                        "Polling mode keeps no replication slot and pins no WAL; in table {table}, {} to be relayed.",
                        crate::postgres::polling::backlog_words(facts.pending_rows)
                    ),
                ),
                Some(LagLevel::Ok),
            );
        }
        DatabaseObservation::Unbound { problem: p, .. } => {
            return (
                Desired::new(types::SLOT_HEALTHY, false, p.reason, p.message.clone()),
                None,
            );
        }
        DatabaseObservation::Failed(p) => {
            return (
                Desired::new(
                    types::SLOT_HEALTHY,
                    false,
                    p.reason,
                    "The slot's health is unknown until the database problem is fixed (see DatabaseReady).",
                ),
                None,
            );
        }
    };
    let Some(info) = slot else {
        return (
            Desired::new(
                types::SLOT_HEALTHY,
                false,
                reasons::SLOT_MISSING,
                format!(
                    "Replication slot {slot_name:?} was not found right after provisioning; the next reconcile checks \
                     whether it was lost."
                ),
            ),
            None,
        );
    };
    let lag = info.lag_bytes.unwrap_or(0);
    let level = info.lag_level(th);
    let (status, message) = match level {
        LagLevel::Ok => (
            true,
            format!(
                "Lag is {lag} bytes, below the warning threshold of {} bytes.",
                th.warning_bytes
            ),
        ),
        LagLevel::Warning => (
            false,
            format!(
                "Lag is {lag} bytes, above the warning threshold of {} bytes; check that the worker runs and that \
                 Kafka accepts its writes.",
                th.warning_bytes
            ),
        ),
        LagLevel::Critical => (
            false,
            format!(
                "Lag is {lag} bytes (critical threshold {} bytes, wal_status {}); the slot keeps this WAL on the \
                 primary's disk: get the worker streaming again before the disk fills up.",
                th.critical_bytes,
                info.wal_status.as_deref().unwrap_or("unknown")
            ),
        ),
        LagLevel::Lost => (
            false,
            "PostgreSQL removed WAL the slot still needed (wal_status lost), so events are missing and the slot \
             cannot stream any more; recreate the relay (or drop the slot) and reconcile the outbox table by hand."
                .to_string(),
        ),
    };
    (
        Desired::new(types::SLOT_HEALTHY, status, level.reason(), message),
        Some(level),
    )
}

fn worker_condition(relay: &OutboxRelay, w: &WorkerObservation) -> Desired {
    let deployment = super::build::deployment_name(&relay.name_any());
    match w {
        WorkerObservation::Suspended => Desired::new(
            types::WORKER_AVAILABLE,
            false,
            reasons::SUSPENDED,
            "spec.suspend is true, so the worker is scaled to zero; the slot keeps every new event until it is \
             set back to false.",
        ),
        WorkerObservation::Missing => Desired::new(
            types::WORKER_AVAILABLE,
            false,
            reasons::WORKER_UNAVAILABLE,
            format!("The worker Deployment {deployment:?} does not exist yet."),
        ),
        WorkerObservation::Unknown(p) => Desired::new(types::WORKER_AVAILABLE, false, p.reason, p.message.clone()),
        WorkerObservation::Deployment {
            replicas, available, ..
        } if *available >= 1 => Desired::new(
            types::WORKER_AVAILABLE,
            true,
            reasons::WORKER_AVAILABLE,
            format!("{available} of {replicas} worker pods of Deployment {deployment:?} are available."),
        ),
        WorkerObservation::Deployment { rolled_out: false, .. } => Desired::new(
            types::WORKER_AVAILABLE,
            false,
            reasons::WORKER_PROGRESSING,
            format!("The worker Deployment {deployment:?} is rolling out; no pod is available yet."),
        ),
        WorkerObservation::Deployment { .. } => Desired::new(
            types::WORKER_AVAILABLE,
            false,
            reasons::WORKER_UNAVAILABLE,
            format!(
                "No worker pod of Deployment {deployment:?} is available; see kubectl describe deployment {deployment} \
                 and the logs of its pods."
            ),
        ),
    }
}

/// Ready = DatabaseReady and SlotHealthy (a lag warning is tolerated, critical lag
/// or lost WAL are not) and WorkerAvailable, where a suspended relay counts as
/// available: suspending is a wish, not a fault, and the slot is still safe.
fn ready_condition(
    relay: &OutboxRelay,
    observed: &Observed,
    database: &Desired,
    slot: &(Desired, Option<LagLevel>),
    worker: &Desired,
) -> Desired {
    let not_ready = |d: &Desired| Desired::new(types::READY, false, d.reason, d.message.clone());
    if !database.status {
        return not_ready(database);
    }
    let (slot_cond, level) = slot;
    if matches!(level, None | Some(LagLevel::Critical | LagLevel::Lost)) {
        return not_ready(slot_cond);
    }
    if observed.worker == WorkerObservation::Suspended {
        return Desired::new(
            types::READY,
            true,
            reasons::SUSPENDED,
            "Suspended: publication and slot are in place and keep new events until spec.suspend is set to false.",
        );
    }
    if !worker.status {
        return not_ready(worker);
    }
    let source = match &relay.spec.outbox.messages {
        _ if relay.spec.outbox.source == crate::api::OutboxSource::Messages => format!(
            "messages with prefix {:?}",
            relay.spec.outbox.messages.clone().unwrap_or_default().prefix
        ),
        _ => relay.spec.outbox.table.clone(),
    };
    let mut message = format!("Events flow from {source} to {}.", relay.destination());
    if *level == Some(LagLevel::Warning) {
        message.push(' ');
        message.push_str(&slot_cond.message);
    }
    Desired::new(types::READY, true, reasons::RELAYING, message)
}

/// The worker's own `Delivering` condition (it owns it; see
/// `relay::status_report`) folded into `Ready`: a relay whose worker is up but
/// stopped at a poison event, or looping on an error, is not Ready, and says why
/// in the worker's words (reason per stop kind, event and what to do). Only a
/// Ready that would otherwise be True is overridden, so a suspended relay or a
/// missing worker keeps its own, more basic reason.
fn fold_delivering(relay: &OutboxRelay, ready: Desired) -> Desired {
    if !ready.status || ready.reason == reasons::SUSPENDED {
        return ready;
    }
    let worker = relay
        .status
        .as_ref()
        .and_then(|s| crate::api::conditions::find(&s.conditions, types::DELIVERING));
    match worker {
        Some(c) if c.status == "False" => {
            // Reasons are the worker's stable categories; unknown ones keep a generic name.
            let reason = worker_reason(&c.reason);
            Desired::new(types::READY, false, reason, c.message.clone())
        }
        _ => ready,
    }
}

/// The worker's reason as a `&'static str` (conditions hold static reasons).
fn worker_reason(reason: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "MessageTooLarge",
        "UnknownTopic",
        "NotAuthorized",
        "InvalidRecord",
        "InvalidHeaders",
        "InvalidTopic",
        "InvalidPayload",
        "ColumnMissing",
        "ParkFailed",
        "DeadLetterFailed",
        "ReplicationTimeout",
        "KafkaUnavailable",
        "KafkaError",
        "KafkaConfig",
        "ConnectFailed",
        "ConnectTimeout",
        "AuthenticationFailed",
        "SlotMissing",
        "StreamEnded",
        "Protocol",
    ];
    KNOWN
        .iter()
        .find(|k| **k == reason)
        .copied()
        .unwrap_or("DeliveryFailing")
}

/// Whether `current` already holds `desired` in every field the operator owns.
pub fn unchanged(current: Option<&OutboxRelayStatus>, desired: &OutboxRelayStatus) -> bool {
    let Some(current) = current else { return false };
    let owned = |cs: &[Condition]| {
        let mut v: Vec<Condition> = cs
            .iter()
            .filter(|c| OWNED_TYPES.contains(&c.type_.as_str()))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.type_.cmp(&b.type_));
        v
    };
    current.observed_generation == desired.observed_generation
        && current.destination == desired.destination
        && current.slot == desired.slot
        && current.binding == desired.binding
        && current.drain == desired.drain
        && current.protected_secrets == desired.protected_secrets
        && owned(&current.conditions) == owned(&desired.conditions)
}

/// Server-side applies `status` (the operator's fields only) to the status subresource.
pub async fn write(client: &Client, relay: &OutboxRelay, status: &OutboxRelayStatus) -> Result<(), ApiFailure> {
    let api: Api<OutboxRelay> = Api::namespaced(client.clone(), &relay.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": OutboxRelay::api_version(&()),
        "kind": OutboxRelay::kind(&()),
        "status": status,
    });
    api_call(api.patch_status(
        &relay.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    ))
    .await
    .map(|_| ())
}

/// The relay's gauges from the status just computed, with its own lag thresholds.
pub fn gauges(relay: &OutboxRelay, status: &OutboxRelayStatus, observed: &Observed) -> RelayGauges {
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == types::READY && c.status == "True");
    let slot = match &observed.database {
        DatabaseObservation::Provisioned { slot: Some(s), .. } => Some(SlotGauges {
            lag_bytes: s.lag_bytes.unwrap_or(0),
            retained_bytes: s.retained_bytes.unwrap_or(0),
            active: s.active,
            wal_lost: s.wal_status.as_deref() == Some("lost"),
            wal_status: s.wal_status.clone(),
            safe_wal_size: s.safe_wal_size,
        }),
        _ => None,
    };
    let (slot_lost, conflict) = match &observed.database {
        DatabaseObservation::Unbound { problem, .. } => (
            matches!(problem.reason, reasons::SLOT_LOST | reasons::DATABASE_CHANGED),
            problem.reason == reasons::CONFLICT,
        ),
        _ => (false, false),
    };
    let lag = &relay.spec.replication.lag;
    RelayGauges {
        ready,
        slot,
        slot_lost,
        conflict,
        lag_warning_bytes: lag.warning_bytes,
        lag_critical_bytes: lag.critical_bytes,
        partitions: status
            .partitions
            .as_ref()
            .map(|p| (i64::from(p.attached), p.retiring.len() as i64)),
        poll_backlog_rows: match &observed.database {
            DatabaseObservation::Polled { facts, .. } => Some(facts.pending_rows),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::find;
    use crate::controller::{Error, dereference, validate};
    use crate::postgres::PgError;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default())
    }

    fn slot(lag: i64, wal_status: &str) -> SlotInfo {
        SlotInfo {
            name: "outbox_shop_orders".into(),
            plugin: Some("pgoutput".into()),
            database: Some("orders".into()),
            active: true,
            active_pid: Some(7),
            restart_lsn: Some("0/100".into()),
            confirmed_flush_lsn: Some("0/200".into()),
            wal_status: Some(wal_status.into()),
            safe_wal_size: None,
            lag_bytes: Some(lag),
            retained_bytes: Some(lag * 2),
        }
    }

    fn provisioned(s: Option<SlotInfo>) -> DatabaseObservation {
        DatabaseObservation::Provisioned {
            table: "table public.outbox exists".into(),
            publication: "outbox_shop_orders".into(),
            slot_name: "outbox_shop_orders".into(),
            slot: s,
            binding: BindingStatus::default(),
            partitions: None,
        }
    }

    fn available(n: i32) -> WorkerObservation {
        WorkerObservation::Deployment {
            replicas: 1,
            available: n,
            rolled_out: true,
        }
    }

    fn observed(database: DatabaseObservation, worker: WorkerObservation) -> Observed {
        Observed { database, worker }
    }

    fn healthy() -> Observed {
        observed(provisioned(Some(slot(10, "reserved"))), available(1))
    }

    fn cond<'a>(s: &'a OutboxRelayStatus, type_: &str) -> (&'a str, &'a str, &'a str) {
        let c = find(&s.conditions, type_).unwrap_or_else(|| panic!("no {type_} in {s:?}"));
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    fn failed(e: Error) -> DatabaseObservation {
        DatabaseObservation::Failed(Problem::of(&e))
    }

    #[test]
    fn all_good_is_ready_and_relaying() {
        let s = desired_status(&OutboxRelay::test(), &healthy(), &t(100));
        assert_eq!(cond(&s, "Ready").0, "True");
        assert_eq!(cond(&s, "Ready").1, "Relaying");
        assert!(cond(&s, "Ready").2.contains("public.outbox to orders.events"));
        assert_eq!(cond(&s, "DatabaseReady").1, "Provisioned");
        assert_eq!(
            cond(&s, "SlotHealthy"),
            ("True", "LagWithinThresholds", cond(&s, "SlotHealthy").2)
        );
        assert_eq!(cond(&s, "WorkerAvailable").1, "WorkerAvailable");
        assert_eq!(s.observed_generation, Some(3));
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3)));
        assert_eq!(s.destination.as_deref(), Some("orders.events"));
        assert_eq!(s.slot.as_ref().unwrap().lag_bytes, Some(10));
        assert_eq!(s.conditions.len(), 4);
    }

    #[test]
    fn worker_not_available_until_a_pod_is() {
        let r = OutboxRelay::test();
        let s = desired_status(
            &r,
            &observed(provisioned(Some(slot(0, "reserved"))), WorkerObservation::Missing),
            &t(1),
        );
        assert_eq!(cond(&s, "WorkerAvailable").0, "False");
        assert_eq!(
            cond(&s, "Ready"),
            ("False", "WorkerUnavailable", cond(&s, "WorkerAvailable").2)
        );
        let progressing = WorkerObservation::Deployment {
            replicas: 1,
            available: 0,
            rolled_out: false,
        };
        let s = desired_status(
            &r,
            &observed(provisioned(Some(slot(0, "reserved"))), progressing),
            &t(1),
        );
        assert_eq!(cond(&s, "WorkerAvailable").1, "WorkerProgressing");
        let s = desired_status(
            &r,
            &observed(provisioned(Some(slot(0, "reserved"))), available(0)),
            &t(1),
        );
        assert!(
            cond(&s, "WorkerAvailable")
                .2
                .contains("kubectl describe deployment orders-relay")
        );
    }

    #[test]
    fn wal_level_not_logical_says_what_to_do() {
        let e = Error::Apply(super::super::apply::Error::Database(PgError::WalLevelNotLogical {
            actual: "replica".into(),
        }));
        let s = desired_status(&OutboxRelay::test(), &observed(failed(e), available(1)), &t(1));
        let (status, reason, message) = cond(&s, "Ready");
        assert_eq!((status, reason), ("False", "WalLevelNotLogical"));
        assert!(
            message.contains("wal_level = logical") && message.contains("restart"),
            "{message}"
        );
        assert!(message.starts_with("wal_level is \"replica\""), "{message}");
        assert_eq!(cond(&s, "DatabaseReady").1, "WalLevelNotLogical");
        assert_eq!(cond(&s, "SlotHealthy").0, "False");
        // The worker is fine; only the database is not.
        assert_eq!(cond(&s, "WorkerAvailable").0, "True");
    }

    #[test]
    fn secret_not_found_names_the_secret() {
        let e = Error::Dereference(dereference::Error::SecretNotFound {
            namespace: "shop".into(),
            name: "orders-db".into(),
            field: "database.credentialsSecretRef",
            keys: "\"username\", \"password\"".into(),
        });
        let s = desired_status(
            &OutboxRelay::test(),
            &observed(failed(e), WorkerObservation::Missing),
            &t(1),
        );
        let (status, reason, message) = cond(&s, "Ready");
        assert_eq!((status, reason), ("False", "SecretNotFound"));
        assert!(message.contains("\"orders-db\""), "{message}");
        assert!(s.slot.is_none());
    }

    #[test]
    fn table_not_found_and_unreachable_get_advice() {
        let e = Error::Apply(super::super::apply::Error::Database(PgError::TableNotFound {
            table: "public.outbox".into(),
        }));
        let s = desired_status(&OutboxRelay::test(), &observed(failed(e), available(1)), &t(1));
        assert!(
            cond(&s, "Ready").2.contains("correct spec.outbox.table"),
            "{:?}",
            cond(&s, "Ready")
        );
        let e = Error::Apply(super::super::apply::Error::Database(PgError::DatabaseUnreachable {
            host: "db".into(),
            port: 5432,
            detail: "connection refused".into(),
        }));
        let s = desired_status(&OutboxRelay::test(), &observed(failed(e), available(1)), &t(1));
        assert_eq!(cond(&s, "Ready").1, "DatabaseUnreachable");
        assert!(cond(&s, "Ready").2.contains("retrying"), "{:?}", cond(&s, "Ready"));
    }

    #[test]
    fn unreadable_database_keeps_last_slot_status() {
        let mut r = OutboxRelay::test();
        r.status = Some(desired_status(&r, &healthy(), &t(1)));
        let e = Error::Validate(validate::Error::InvalidSpec("x".into()));
        let s = desired_status(&r, &observed(failed(e), available(1)), &t(2));
        assert_eq!(s.slot, r.status.as_ref().unwrap().slot);
    }

    #[test]
    fn lag_levels() {
        let r = OutboxRelay::test().with_lag(100, 1000);
        let at = |lag, ws: &str| desired_status(&r, &observed(provisioned(Some(slot(lag, ws))), available(1)), &t(1));

        let s = at(500, "reserved");
        assert_eq!(cond(&s, "SlotHealthy").0, "False");
        assert_eq!(cond(&s, "SlotHealthy").1, "LagWarning");
        // A warning does not make the relay unready.
        assert_eq!(cond(&s, "Ready").0, "True");
        assert!(cond(&s, "Ready").2.contains("warning threshold"));

        let s = at(5000, "extended");
        assert_eq!(cond(&s, "SlotHealthy").1, "LagCritical");
        assert_eq!(cond(&s, "Ready"), ("False", "LagCritical", cond(&s, "SlotHealthy").2));

        let s = at(0, "lost");
        assert_eq!(cond(&s, "Ready").1, "WalLost");
        assert!(
            gauges(&r, &s, &observed(provisioned(Some(slot(0, "lost"))), available(1)))
                .slot
                .unwrap()
                .wal_lost
        );

        let s = desired_status(&r, &observed(provisioned(None), available(1)), &t(1));
        assert_eq!(cond(&s, "SlotHealthy").1, "SlotMissing");
        assert_eq!(cond(&s, "Ready").0, "False");
    }

    #[test]
    fn gauges_carry_wal_status_safe_size_and_the_relays_own_thresholds() {
        let r = OutboxRelay::test().with_lag(100, 1000);
        let mut info = slot(50, "unreserved");
        info.safe_wal_size = Some(-4096);
        let o = observed(provisioned(Some(info)), available(1));
        let g = gauges(&r, &desired_status(&r, &o, &t(1)), &o);
        assert_eq!((g.lag_warning_bytes, g.lag_critical_bytes), (100, 1000));
        let s = g.slot.expect("slot gauges");
        assert_eq!(s.wal_status.as_deref(), Some("unreserved"));
        assert_eq!(s.safe_wal_size, Some(-4096));
        assert!(!s.wal_lost);
    }

    #[test]
    fn suspended_is_ready_with_reason_suspended() {
        let r = OutboxRelay::test().with_suspend(true);
        let s = desired_status(
            &r,
            &observed(provisioned(Some(slot(0, "reserved"))), WorkerObservation::Suspended),
            &t(1),
        );
        assert_eq!(cond(&s, "WorkerAvailable").0, "False");
        assert_eq!(cond(&s, "WorkerAvailable").1, "Suspended");
        assert_eq!(cond(&s, "Ready").0, "True");
        assert_eq!(cond(&s, "Ready").1, "Suspended");
        // A database problem still wins over the suspension.
        let e = Error::Validate(validate::Error::InvalidSpec("x".into()));
        let s = desired_status(&r, &observed(failed(e), WorkerObservation::Suspended), &t(1));
        assert_eq!(cond(&s, "Ready"), ("False", "InvalidSpec", "X."));
    }

    #[test]
    fn steady_state_is_unchanged_and_times_stay() {
        let mut r = OutboxRelay::test();
        let first = desired_status(&r, &healthy(), &t(100));
        assert!(!unchanged(None, &first));
        r.status = Some(first.clone());
        let again = desired_status(&r, &healthy(), &t(200));
        assert!(unchanged(r.status.as_ref(), &again), "a second pass must not write");
        assert!(again.conditions.iter().all(|c| c.last_transition_time == t(100)));

        // New lag: a write, but no transition.
        let moved = desired_status(
            &r,
            &observed(provisioned(Some(slot(11, "reserved"))), available(1)),
            &t(300),
        );
        assert!(!unchanged(r.status.as_ref(), &moved));
        assert!(moved.conditions.iter().all(|c| c.last_transition_time == t(100)));

        // A flip moves only the flipped conditions' time.
        let down = desired_status(
            &r,
            &observed(provisioned(Some(slot(10, "reserved"))), available(0)),
            &t(400),
        );
        let time = |s: &OutboxRelayStatus, ty: &str| find(&s.conditions, ty).unwrap().last_transition_time.clone();
        assert_eq!(time(&down, "WorkerAvailable"), t(400));
        assert_eq!(time(&down, "Ready"), t(400));
        assert_eq!(time(&down, "DatabaseReady"), t(100));

        // A new generation is a change even when nothing else is.
        let mut newer = r.clone();
        newer.metadata.generation = Some(4);
        assert!(!unchanged(
            r.status.as_ref(),
            &desired_status(&newer, &healthy(), &t(500))
        ));
    }

    #[test]
    fn other_writers_conditions_are_neither_applied_nor_compared() {
        let mut r = OutboxRelay::test();
        let mut current = desired_status(&r, &healthy(), &t(100));
        current.conditions.push(Condition {
            type_: "Relaying".into(),
            status: "True".into(),
            reason: "Streaming".into(),
            message: "worker".into(),
            observed_generation: Some(3),
            last_transition_time: t(50),
        });
        current.last_event_time = Some(t(99));
        r.status = Some(current);
        let next = desired_status(&r, &healthy(), &t(200));
        assert!(next.conditions.iter().all(|c| c.type_ != "Relaying"));
        assert!(next.last_event_time.is_none());
        assert!(unchanged(r.status.as_ref(), &next));
    }

    #[test]
    fn a_stopped_worker_makes_ready_false_with_its_reason() {
        let mut r = OutboxRelay::test();
        let healthy_status = desired_status(&r, &healthy(), &t(100));
        let (status, reason, _) = cond(&healthy_status, types::READY);
        assert_eq!((status, reason), ("True", reasons::RELAYING));
        let mut st = healthy_status.clone();
        st.conditions.push(Condition {
            type_: types::DELIVERING.into(),
            status: "False".into(),
            reason: "MessageTooLarge".into(),
            message:
                "event e-1@0/16B3748 cannot be delivered (MessageTooLarge): ... outbox.dev/skip-event=e-1@0/16B3748 ..."
                    .into(),
            observed_generation: Some(1),
            last_transition_time: t(100),
        });
        r.status = Some(st);
        let s = desired_status(&r, &healthy(), &t(200));
        let (status, reason, message) = cond(&s, types::READY);
        assert_eq!((status, reason), ("False", "MessageTooLarge"));
        assert!(message.contains("e-1@0/16B3748"), "{message}");
        assert!(
            s.conditions.iter().all(|c| c.type_ != types::DELIVERING),
            "the worker's condition is never applied by the operator"
        );
        r.spec.suspend = true;
        let s = desired_status(
            &r,
            &observed(provisioned(Some(slot(0, "reserved"))), WorkerObservation::Suspended),
            &t(300),
        );
        assert_eq!(
            cond(&s, types::READY).1,
            reasons::SUSPENDED,
            "suspended wins over a stale worker word"
        );
        assert_eq!(worker_reason("SomethingNew"), "DeliveryFailing");
    }

    #[test]
    fn sentences() {
        assert_eq!(sentence("table x does not exist"), "Table x does not exist.");
        assert_eq!(sentence("Done."), "Done.");
        assert_eq!(sentence("wal_level is replica"), "wal_level is replica.");
        assert_eq!(sentence(""), "");
    }
}
