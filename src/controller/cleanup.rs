//! Deletion: what happens to the state outside Kubernetes.
//!
//! `cleanupPolicy: Delete` first **drains** ([`super::drain`]): the worker keeps
//! running until the slot's confirmed position reaches the WAL position at the
//! time of the delete, so every event written before it is in Kafka. Then the slot
//! (an orphaned slot pins WAL on the primary until its disk fills up) and the
//! publication are dropped, each only if this relay owns it
//! ([`crate::postgres::binding::release`]). A drain that cannot finish ends after
//! `spec.drainTimeoutSeconds` or at once with `outbox.dev/force-delete`, and a
//! Warning Event names the events dropped unrelayed. `Retain` leaves both in place.
//!
//! Until cleanup is done the finalizer stays, whatever the reason (database down,
//! drain in progress): the resource shows `Ready=False` with reason `Draining` or
//! the error, and an Event says how to get out.
//!
//! The worker Deployment is not deleted here: its owner reference hands it to the
//! garbage collector once the resource is gone. It is scaled to zero just before
//! the drop, so a worker (or its hot standby) cannot take the slot back.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::apply::{self, timed};
use super::{
    ApiFailure, Context, FIELD_MANAGER, api_call, build, dereference, drain, events, secrets, status, validate,
};
use crate::api::conditions::{Desired, merge, reasons, types};
use crate::api::{CleanupPolicy, DrainStatus, OutboxRelay, annotations};
use crate::postgres::binding::{self, pending};
use crate::postgres::{self, PgError, objects};
use crate::relay::lsn::Lsn;

const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the slot and publication could not be dropped (yet).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot drop replication slot {slot:?} and publication {publication:?} yet: {cause}. Deletion waits until \
     they are dropped; fix the problem, or set spec.cleanupPolicy to Retain to delete the resource and keep both"
)]
pub struct Error {
    pub slot: String,
    pub publication: String,
    pub cause: Cause,
}

#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("{0}")]
    Dereference(#[from] dereference::Error),
    #[error("{0}")]
    Validate(#[from] validate::Error),
    #[error("cannot scale the worker Deployment {name:?} to zero: {source}")]
    ScaleDown {
        name: String,
        #[source]
        source: ApiFailure,
    },
    #[error("{0}")]
    Database(#[from] apply::Error),
    #[error("cannot write the drain's status: {source}")]
    Status {
        #[source]
        source: ApiFailure,
    },
}

impl From<PgError> for Cause {
    fn from(e: PgError) -> Self {
        Cause::Database(apply::Error::Database(e))
    }
}

impl Error {
    pub fn category(&self) -> &'static str {
        match &self.cause {
            Cause::Dereference(e) => e.category(),
            Cause::Validate(e) => e.category(),
            Cause::ScaleDown { .. } => "DeploymentApplyFailed",
            Cause::Database(e) => e.category(),
            Cause::Status { .. } => "StatusWriteFailed",
        }
    }
}

/// Where a cleanup pass left the deletion.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Cleanup is complete: the finalizer may go.
    Done,
    /// Draining: look again after this long.
    Wait(Duration),
}

/// How often a drain in progress is looked at.
const DRAIN_POLL: Duration = Duration::from_secs(2);

pub async fn run(relay: &OutboxRelay, ctx: &Context) -> Result<Progress, Error> {
    let namespace = relay.namespace().unwrap_or_default();
    let name = relay.name_any();
    let (slot, publication) = validate::object_names(&namespace, &name, &relay.spec);
    if relay.spec.mode == crate::api::RelayMode::Polling {
        // Nothing outside Kubernetes to drop, and nothing to drain: a poller deletes
        // a row only after Kafka acknowledged it, so every event not yet relayed is
        // still a row in the table, whatever the policy.
        events::publish(
            &ctx.recorder,
            relay,
            EventType::Normal,
            events::ROWS_LEFT,
            "Cleanup",
            format!(
                "mode Polling: no slot or publication to drop. Rows not relayed yet stay in table {}; a new polling \
                 relay of that table sends them. The poller's unique index stays too.",
                relay.spec.outbox.table
            ),
        )
        .await;
        secrets::release(ctx, relay).await;
        ctx.metrics.remove_relay(&namespace, &name);
        return Ok(Progress::Done);
    }
    let progress = match relay.spec.cleanup_policy {
        CleanupPolicy::Retain => {
            events::publish(
                &ctx.recorder,
                relay,
                EventType::Normal,
                events::SLOT_RETAINED,
                "Cleanup",
                format!(
                    "cleanupPolicy is Retain: replication slot {slot:?} and publication {publication:?} stay in the \
                     database. An unread slot keeps WAL on the primary: drop it when nothing will read it again, or \
                     hand it to a new relay with the annotation {}=\"true\".",
                    annotations::ADOPT
                ),
            )
            .await;
            Progress::Done
        }
        CleanupPolicy::Delete => delete(relay, ctx, &namespace).await.map_err(|cause| Error {
            slot: slot.clone(),
            publication: publication.clone(),
            cause,
        })?,
    };
    if progress == Progress::Done {
        secrets::release(ctx, relay).await;
        ctx.metrics.remove_relay(&namespace, &name);
    }
    Ok(progress)
}

/// How long the deletion has been going on: since the drain started, else since
/// the deletion timestamp.
fn elapsed(relay: &OutboxRelay, now: &Time) -> Duration {
    let since = relay
        .status
        .as_ref()
        .and_then(|s| s.drain.as_ref())
        .map(|d| d.started_at.0)
        .or_else(|| relay.metadata.deletion_timestamp.as_ref().map(|t| t.0));
    since
        .map(|t| Duration::from_secs(now.0.as_second().saturating_sub(t.as_second()).max(0) as u64))
        .unwrap_or_default()
}

fn timeout(relay: &OutboxRelay) -> Duration {
    Duration::from_secs(relay.spec.drain_timeout_seconds.max(0) as u64)
}

async fn delete(relay: &OutboxRelay, ctx: &Context, namespace: &str) -> Result<Progress, Cause> {
    let now = status::now();
    let secrets = match dereference::dereference(&ctx.client, namespace, &relay.spec).await {
        Ok(s) => s,
        // Without credentials nothing can reach the slot. The operator protects the
        // Secret with a finalizer, so this is a Secret that predates that (or whose
        // finalizer was removed by hand): wait for it within the drain timeout, then
        // let the resource go and say what was left behind.
        Err(e @ dereference::Error::SecretNotFound { .. }) if elapsed(relay, &now) >= timeout(relay) => {
            let (slot, publication) = validate::object_names(namespace, &relay.name_any(), &relay.spec);
            events::publish(
                &ctx.recorder,
                relay,
                EventType::Warning,
                events::SLOT_LEFT_BEHIND,
                "Cleanup",
                format!(
                    "{e}. Gave up after spec.drainTimeoutSeconds: replication slot {slot:?} and publication \
                     {publication:?} were NOT dropped and keep WAL on the primary; events the slot held were not \
                     relayed. Drop them by hand (pg_drop_replication_slot) once nothing needs them."
                ),
            )
            .await;
            tracing::error!(%slot, %publication, "deletion gave up: credentials Secret missing, slot left behind");
            return Ok(Progress::Done);
        }
        Err(e) => return Err(e.into()),
    };
    let identity = validate::identity(relay)?;
    let target = validate::database_target(&identity, &relay.spec, &secrets)?;
    let client = timed(
        "connecting",
        postgres::CONNECT_TIMEOUT + Duration::from_secs(2),
        "",
        async { postgres::connect(&target.connect).await },
    )
    .await?;
    let owner = apply::owner_of(relay);
    let t = target.binding(&owner);

    // Only the relay's own slot is drained; one that belongs to another relay (a
    // conflicting relay being deleted) is not even looked into.
    let obs = timed(
        "reading the slot and publication",
        DROP_TIMEOUT,
        "",
        binding::inspect(&client, &t),
    )
    .await?;
    let intent = apply::intent(relay, ctx, &target.slot, &obs).await;
    let ours = matches!(binding::owned(&t, &obs, &intent).slot, Some(Ok(())));

    // The drain's target: the WAL position when the deletion was first seen.
    let recorded_drain = relay.status.as_ref().and_then(|s| s.drain.clone());
    let drain = match (ours, recorded_drain) {
        (true, d) => d,
        // Nothing of ours to wait for.
        (false, _) => Some(DrainStatus {
            target_lsn: obs.current_lsn.clone(),
            started_at: now.clone(),
        }),
    };
    let Some(drain) = drain else {
        let lsn = timed(
            "reading the WAL position",
            DROP_TIMEOUT,
            "",
            binding::current_lsn(&client),
        )
        .await?;
        let drain = DrainStatus {
            target_lsn: lsn.clone(),
            started_at: now.clone(),
        };
        write_drain_status(ctx, relay, &target.slot, drain, None).await?;
        events::publish(
            &ctx.recorder,
            relay,
            EventType::Normal,
            reasons::DRAINING,
            "Cleanup",
            format!(
                "Draining replication slot {:?} up to LSN {lsn} (the WAL position at deletion) before dropping it.",
                target.slot
            ),
        )
        .await;
        return Ok(Progress::Wait(Duration::from_millis(500)));
    };
    let target_lsn: Lsn = drain.target_lsn.parse().unwrap_or(Lsn::ZERO);
    let forced = annotations::is_true(&relay.metadata, annotations::FORCE_DELETE);
    let mut facts = drain::Facts {
        slot: obs.slot.as_ref().filter(|_| ours).map(|s| drain::SlotFacts {
            active: s.active,
            confirmed: s.confirmed_flush_lsn.as_deref().and_then(|l| l.parse().ok()),
        }),
        target: target_lsn,
        pending: None,
        forced,
        elapsed: elapsed(relay, &now),
        timeout: timeout(relay),
    };
    let mut held = None;
    loop {
        match drain::step(&facts) {
            drain::Step::Wait => {
                keep_worker_running(ctx, relay, namespace).await;
                write_drain_status(ctx, relay, &target.slot, drain.clone(), facts.pending).await?;
                return Ok(Progress::Wait(DRAIN_POLL));
            }
            drain::Step::Peek => match timed(
                "peeking at the slot's pending events",
                DROP_TIMEOUT,
                "",
                pending::pending_events(
                    &client,
                    &target.slot,
                    &target.publication,
                    &target.table,
                    &target.columns.id,
                    target.messages.as_ref().map(|m| m.prefix.as_str()),
                    Some(&drain.target_lsn),
                ),
            )
            .await
            {
                Ok(p) => {
                    facts.pending = Some(p.events);
                    held = Some(p);
                }
                // A worker took the slot between the read and the peek: it drains.
                Err(apply::Error::Database(PgError::SlotInUse { .. })) => {
                    facts.slot = facts.slot.map(|s| drain::SlotFacts { active: true, ..s });
                    if !facts.forced && facts.elapsed < facts.timeout {
                        return Ok(Progress::Wait(DRAIN_POLL));
                    }
                }
                Err(e) => return Err(e.into()),
            },
            drain::Step::StopAndPeek => {
                scale_to_zero(ctx, namespace, &build::deployment_name(&identity.name)).await?;
                timed(
                    "freeing the slot",
                    DROP_TIMEOUT,
                    "",
                    objects::free_slot(&client, &target.slot),
                )
                .await?;
                facts.slot = facts.slot.map(|s| drain::SlotFacts { active: false, ..s });
            }
            drain::Step::Drop(finish) => {
                scale_to_zero(ctx, namespace, &build::deployment_name(&identity.name)).await?;
                let released = timed(
                    "dropping the replication slot and the publication",
                    DROP_TIMEOUT,
                    "; a lock on the outbox table may be blocking it",
                    binding::release(&client, &t, &intent),
                )
                .await?;
                // The other relays of this database should see the objects gone now.
                ctx.pg_snapshots.invalidate(&target.connect);
                report(ctx, relay, &target, &drain, finish, held.as_ref(), &released).await;
                return Ok(Progress::Done);
            }
        }
    }
}

/// Events for the end of a Delete cleanup.
async fn report(
    ctx: &Context,
    relay: &OutboxRelay,
    target: &validate::DatabaseTarget,
    drain: &DrainStatus,
    finish: drain::Finish,
    held: Option<&pending::Pending>,
    released: &binding::Released,
) {
    let (slot, publication) = (&target.slot, &target.publication);
    if let drain::Finish::GiveUp { forced } = finish {
        let why = if forced {
            format!("{}=true", annotations::FORCE_DELETE)
        } else {
            format!(
                "the drain timeout of {} s (spec.drainTimeoutSeconds)",
                relay.spec.drain_timeout_seconds
            )
        };
        let what = held
            .map(pending::Pending::describe)
            .unwrap_or_else(|| "some events".into());
        ctx.metrics.dropped_unrelayed(held.map_or(0, |p| p.events));
        events::publish(
            &ctx.recorder,
            relay,
            EventType::Warning,
            events::DROPPED_UNRELAYED,
            "Cleanup",
            match &target.messages {
                None => format!(
                    "Deletion ended the drain because of {why}: {what} committed to {} before LSN {} had not reached \
                     Kafka and were dropped with replication slot {slot:?}. They are still in the outbox table unless \
                     they were deleted there.",
                    target.table.unquoted(),
                    drain.target_lsn
                ),
                // A message lives only in the WAL the slot held: nothing keeps a copy.
                Some(m) => format!(
                    "Deletion ended the drain because of {why}: {what} emitted with prefix {:?} before LSN {} had not \
                     reached Kafka and were dropped with replication slot {slot:?}. Messages have no other copy: \
                     re-emit them from the application if they matter.",
                    m.prefix, drain.target_lsn
                ),
            },
        )
        .await;
    }
    let drained = match finish {
        drain::Finish::Drained => format!(
            "Drained: every event written before the deletion (up to LSN {}) reached Kafka. ",
            drain.target_lsn
        ),
        drain::Finish::NothingPending => "Nothing left to relay in the slot. ".to_string(),
        // The fate of each object below says the rest (gone, or someone else's).
        drain::Finish::NoSlot => String::new(),
        drain::Finish::GiveUp { .. } => String::new(),
    };
    let fate = |what: &str, name: &str, f: &binding::Fate| match f {
        binding::Fate::Dropped => format!("Dropped {what} {name:?}."),
        binding::Fate::Absent => format!("{what} {name:?} was already gone."),
        binding::Fate::NotOurs(h) => format!(
            "Left {what} {name:?} in place: it belongs to {}.",
            match h {
                binding::Holder::Relay { namespace, name, .. } => format!("OutboxRelay {namespace}/{name}"),
                binding::Holder::Unknown => "no OutboxRelay (no ownership record)".into(),
            }
        ),
    };
    events::publish(
        &ctx.recorder,
        relay,
        EventType::Normal,
        events::SLOT_DROPPED,
        "Cleanup",
        format!(
            "{drained}{} {}",
            fate("replication slot", slot, &released.slot),
            fate("publication", publication, &released.publication)
        ),
    )
    .await;
    tracing::info!(%slot, %publication, ?finish, ?released, "cleaned up");
}

/// A suspended relay has no worker to drain it: run one for the drain.
async fn keep_worker_running(ctx: &Context, relay: &OutboxRelay, namespace: &str) {
    if !relay.spec.suspend {
        return;
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({"spec": {"replicas": relay.spec.worker.replicas}});
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let name = build::deployment_name(&relay.name_any());
    if let Err(e) = api_call(api.patch(&name, &pp, &Patch::Merge(&patch))).await
        && e.code() != Some(404)
    {
        tracing::warn!(deployment = %name, error = %e, "cannot start the worker for the drain");
    }
}

/// The status during a drain: `Ready=False`, reason `Draining`, and `status.drain`.
async fn write_drain_status(
    ctx: &Context,
    relay: &OutboxRelay,
    slot: &str,
    drain: DrainStatus,
    pending: Option<u64>,
) -> Result<(), Cause> {
    let current = relay.status.clone().unwrap_or_default();
    let held = match pending {
        Some(n) => format!(" {n} events wait in the slot and no worker streams from it."),
        None => String::new(),
    };
    let message = format!(
        "Deleting: draining replication slot {slot:?} up to LSN {} (the WAL position at deletion) before dropping it.{held} \
         The slot and publication are dropped once every event written before the delete is in Kafka, or after \
         spec.drainTimeoutSeconds ({} s), or at once with the annotation {}=true (events not relayed by then are \
         dropped and named in a Warning Event).",
        drain.target_lsn,
        relay.spec.drain_timeout_seconds,
        annotations::FORCE_DELETE
    );
    let mut desired = current.clone();
    desired.conditions = merge(
        &current.conditions,
        &[Desired::new(types::READY, false, reasons::DRAINING, message)],
        relay.metadata.generation,
        &status::now(),
    );
    desired
        .conditions
        .retain(|c| status::OWNED_TYPES.contains(&c.type_.as_str()));
    desired.drain = Some(drain);
    // Fields the worker owns (its condition was filtered out above) stay the worker's.
    desired.last_skipped_event = None;
    desired.last_event_time = None;
    if relay.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    status::write(&ctx.client, relay, &desired)
        .await
        .map_err(|source| Cause::Status { source })
}

async fn scale_to_zero(ctx: &Context, namespace: &str, deployment: &str) -> Result<(), Cause> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({"spec": {"replicas": 0}});
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match api_call(api.patch(deployment, &pp, &Patch::Merge(&patch))).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(404) => Ok(()),
        Err(source) => Err(Cause::ScaleDown {
            name: deployment.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::PgError;

    #[test]
    fn blocked_cleanup_says_how_to_get_out() {
        let e = Error {
            slot: "outbox_shop_orders".into(),
            publication: "outbox_shop_orders".into(),
            cause: Cause::Database(apply::Error::Database(PgError::DatabaseUnreachable {
                host: "db".into(),
                port: 5432,
                detail: "connection refused".into(),
            })),
        };
        assert_eq!(e.category(), "DatabaseUnreachable");
        let msg = e.to_string();
        assert!(msg.contains("\"outbox_shop_orders\""), "{msg}");
        assert!(msg.contains("cleanupPolicy to Retain"), "{msg}");
        assert!(msg.contains("connection refused"), "{msg}");
    }
}
