//! Step 4: make the world match: provision the publication and slot in PostgreSQL
//! (through [`binding`], which checks ownership and identity first), then
//! server-side apply the worker Deployment.
//!
//! Both happen on every reconcile, suspended or not: the apply is a no-op when
//! nothing changed, and the slot must exist even while no worker runs, or events
//! written in the meantime would be lost. A failure of provisioning does not stop
//! the apply (a suspend must take effect even while the database is down).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use std::collections::BTreeSet;

use kube::runtime::reflector::ObjectRef;

use super::status::{DatabaseObservation, Observed, Problem, WorkerObservation};
use super::validate::Validated;
use super::{
    ApiFailure, Context, Error as ReconcileError, FIELD_MANAGER, api_call, build, conflicts, dereference, problems,
    validate,
};
use crate::api::conditions::reasons;
use crate::api::{OutboxRelay, annotations};
use crate::postgres::binding::{self, Bound, Intent, Observation, Owner, Refusal, Take};
use crate::postgres::{self, PgError, SlotInfo};

/// Budget of each provisioning statement. Creating the slot gets more: PostgreSQL
/// waits for the transactions running at that moment to finish first.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
const SLOT_CREATE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Database(#[from] PgError),

    #[error("PostgreSQL did not finish {step} within {} s{hint}", after.as_secs())]
    DatabaseTimeout {
        step: &'static str,
        after: Duration,
        hint: &'static str,
    },

    #[error(
        "cannot apply the worker Deployment {name:?}: {source}; check the operator's RBAC (deployments patch) and admission webhooks"
    )]
    Deployment {
        name: String,
        #[source]
        source: ApiFailure,
    },

    #[error(
        "cannot apply the worker's {object}: {source}; check the operator's RBAC (serviceaccounts, roles and rolebindings patch)"
    )]
    WorkerIdentity {
        object: String,
        #[source]
        source: ApiFailure,
    },
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Database(e) => e.category(),
            Error::DatabaseTimeout { .. } => "DatabaseTimeout",
            Error::Deployment { .. } => "DeploymentApplyFailed",
            Error::WorkerIdentity { .. } => "WorkerIdentityApplyFailed",
        }
    }
}

/// What one pass of the steps found, and the first error that should fail the reconcile.
pub struct Outcome {
    pub observed: Observed,
    pub error: Option<ReconcileError>,
    /// How the relay came to own its slot in this pass, for an Event.
    pub take: Option<Take>,
}

/// Runs dereference, validate, the conflict check, provisioning and the Deployment
/// apply, collecting what the status needs.
///
/// Provisioning runs before the Deployment is applied: a relay whose objects belong
/// to another relay must not get a running worker (it would stream, and confirm,
/// another relay's slot), so its Deployment is applied with zero replicas.
pub async fn observe(relay: &OutboxRelay, ctx: &Context) -> Outcome {
    let namespace = relay.namespace().unwrap_or_default();
    let prepared = match dereference::dereference(&ctx.client, &namespace, &relay.spec).await {
        Ok(mut secrets) => {
            // Before validation: guarding changes the versions the pod template hashes.
            super::secrets::guard(ctx, relay, &mut secrets).await;
            validate::validate(relay, &secrets, &ctx.config.relay_image).map_err(ReconcileError::from)
        }
        Err(e) => Err(ReconcileError::from(e)),
    };
    let v = match prepared {
        Ok(v) => v,
        Err(e) => {
            // Nothing to apply; still report the worker as it stands.
            let worker = match get_deployment(&ctx.client, &namespace, &build::deployment_name(&relay.name_any())).await
            {
                Ok(d) => worker_observation(relay, d.as_ref()),
                Err(f) => WorkerObservation::Unknown(Problem::new("KubernetesApiError", f.to_string())),
            };
            return Outcome {
                observed: Observed {
                    database: DatabaseObservation::Failed(Problem::of(&e)),
                    worker,
                },
                error: Some(e),
                take: None,
            };
        }
    };
    let others = ctx.relays.state();
    let cached = conflicts::find(relay, others.iter().map(|r| &**r));
    let (database, take, mut error) = match cached {
        Some(c) => (
            DatabaseObservation::Unbound {
                problem: problems::cache_conflict(&c),
                slot: None,
                binding: None,
            },
            None,
            None,
        ),
        None => match provision(relay, ctx, &v).await {
            Ok(Provision::Bound(b, partitions)) => (
                DatabaseObservation::Provisioned {
                    // What the condition says was found: the table, or the emit function.
                    table: match &v.database.messages {
                        None => format!("table {} exists", v.database.table.unquoted()),
                        Some(m) => format!("emit function {}() is in place", m.function.unquoted()),
                    },
                    publication: v.database.publication.clone(),
                    slot_name: v.database.slot.clone(),
                    slot: b.slot,
                    binding: b.identity,
                    partitions,
                },
                b.take,
                None,
            ),
            Ok(Provision::Polled(facts)) => (
                DatabaseObservation::Polled {
                    table: v.database.table.unquoted(),
                    order_column: relay
                        .spec
                        .polling
                        .as_ref()
                        .map(|p| p.order_column.clone())
                        .unwrap_or_default(),
                    facts,
                },
                None,
                None,
            ),
            Ok(Provision::Refused { refusal, slot }) => (
                DatabaseObservation::Unbound {
                    problem: problems::refusal(relay, &v.database, &refusal),
                    slot,
                    binding: match &refusal {
                        Refusal::Lost { recorded, .. } | Refusal::DatabaseChanged { recorded, .. } => {
                            Some(recorded.clone())
                        }
                        Refusal::Conflict { .. } => None,
                    },
                },
                None,
                None,
            ),
            Err(e) => {
                let e = ReconcileError::from(e);
                (DatabaseObservation::Failed(Problem::of(&e)), None, Some(e))
            }
        },
    };

    let stand_down =
        matches!(&database, DatabaseObservation::Unbound { problem, .. } if problem.reason == reasons::CONFLICT);
    let desired = if stand_down {
        let mut idle = v.clone();
        idle.spec.suspend = true;
        build::deployment(&idle)
    } else {
        build::deployment(&v)
    };
    // The worker's ServiceAccount and Role come before the Deployment that uses them.
    let applied = async {
        super::worker_rbac::apply(&ctx.client, &v)
            .await
            .map_err(|(object, source)| Error::WorkerIdentity { object, source })?;
        apply_deployment(&ctx.client, &desired).await
    };
    let worker = match applied.await {
        Ok(d) => worker_observation(relay, Some(&d)),
        Err(e) => {
            let e = ReconcileError::from(e);
            let obs = WorkerObservation::Unknown(Problem::of(&e));
            error.get_or_insert(e);
            obs
        }
    };
    Outcome {
        observed: Observed { database, worker },
        error,
        take,
    }
}

/// What the status needs to know about the worker.
pub fn worker_observation(relay: &OutboxRelay, deployment: Option<&Deployment>) -> WorkerObservation {
    if relay.spec.suspend {
        return WorkerObservation::Suspended;
    }
    let Some(d) = deployment else {
        return WorkerObservation::Missing;
    };
    let status = d.status.clone().unwrap_or_default();
    let rolled_out = match (d.metadata.generation, status.observed_generation) {
        (Some(g), Some(o)) => o >= g,
        _ => false,
    };
    WorkerObservation::Deployment {
        replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        available: status.available_replicas.unwrap_or(0),
        rolled_out,
    }
}

/// Server-side apply with force: the operator owns every field it renders, and
/// fields it stops rendering are removed from the object.
pub async fn apply_deployment(client: &Client, desired: &Deployment) -> Result<Deployment, Error> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    let ns = desired.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    // `Deployment` has no apiVersion/kind fields; server-side apply needs them.
    let body = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": desired.metadata,
        "spec": desired.spec,
    });
    api_call(api.patch(&name, &pp, &Patch::Apply(&body)))
        .await
        .map_err(|source| Error::Deployment { name, source })
}

pub async fn get_deployment(client: &Client, namespace: &str, name: &str) -> Result<Option<Deployment>, ApiFailure> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    api_call(api.get_opt(name)).await
}

/// What provisioning decided.
// Made once per reconcile and taken apart right away: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Provision {
    /// Bound, with the partition manager's pass when `spec.outbox.partitions` is set.
    Bound(Bound, Option<crate::api::partitions::PartitionsStatus>),
    /// `mode: Polling`: the table, its order column's index and the role's rights
    /// are in place; no slot or publication exists for this relay.
    Polled(postgres::polling::PollFacts),
    /// The relay may not use its objects (conflict or loss); `slot` is what the
    /// server says about the slot, if it exists.
    Refused { refusal: Refusal, slot: Option<SlotInfo> },
}

/// Checks the prerequisites, then lets the binding decide and carry out what the
/// relay may do with its publication and slot.
pub async fn provision(relay: &OutboxRelay, ctx: &Context, v: &Validated) -> Result<Provision, Error> {
    let target = &v.database;
    let uid = relay.uid().unwrap_or_default();
    // A healthy relay is confirmed from its database's shared snapshot when it
    // can be; the full pass below is the only one that acts.
    if let Some(bound) = super::steady::confirm(relay, ctx, v).await {
        ctx.metrics.database_pass("confirmed");
        return Ok(Provision::Bound(bound, None));
    }
    ctx.metrics.database_pass("full");
    // Until this pass binds, the next one is a full pass too.
    ctx.full_passes.forget(&uid);
    // A connection kept from an earlier reconcile when there is one (see
    // `postgres::pool`). Every early return below drops it, which closes it: only a
    // pass that finished all its statements hands it back.
    let client = timed(
        "connecting",
        postgres::CONNECT_TIMEOUT + Duration::from_secs(4),
        "",
        ctx.pg_pool.get(&target.connect),
    )
    .await?;
    if let Some(p) = &relay.spec.polling {
        let facts = timed(
            "checking the table for polling",
            CHECK_TIMEOUT,
            "; creating the order column's index waits for writers of the table",
            postgres::polling::provision(&client, &target.table, &target.columns, &p.order_column),
        )
        .await?;
        if let Some(index) = &facts.index_created {
            tracing::info!(%index, table = %target.table.unquoted(), "created the poller's unique index on the order column");
        }
        client.release();
        return Ok(Provision::Polled(facts));
    }
    match &target.messages {
        None => {
            timed(
                "checking the prerequisites",
                CHECK_TIMEOUT,
                "",
                postgres::check_prerequisites(&client, &target.table, &target.columns, &target.slot),
            )
            .await?;
        }
        // No table to check; the emit function is the applications' way in, and
        // CREATE OR REPLACE on every pass keeps it matching the prefix.
        Some(m) => {
            timed(
                "checking the prerequisites",
                CHECK_TIMEOUT,
                "",
                postgres::check_message_prerequisites(&client, &target.slot),
            )
            .await?;
            timed(
                "creating the emit function",
                CHECK_TIMEOUT,
                "",
                postgres::messages::ensure_emit_function(&client, &m.function, &m.prefix),
            )
            .await?;
        }
    }
    let owner = owner_of(relay);
    let t = target.binding(&owner);
    let obs = timed(
        "reading the slot and publication",
        CHECK_TIMEOUT,
        "",
        binding::inspect(&client, &t),
    )
    .await?;
    let intent = intent(relay, ctx, &target.slot, &obs).await;
    let provision = match binding::decide(&owner, &target.slot, &target.publication, &obs, &intent) {
        Err(refusal) => Provision::Refused {
            refusal,
            slot: obs.slot.clone(),
        },
        Ok(steps) => {
            let bound = timed(
                "ensuring the publication and the replication slot",
                SLOT_CREATE_TIMEOUT,
                "; creating a slot waits for transactions running at that moment to end: look for \
                 long-running transactions in pg_stat_activity, or a lock on the outbox table",
                binding::bind(&client, &t, &obs, steps, &super::status::now()),
            )
            .await?;
            ctx.full_passes.bound(&uid);
            if bound.changed {
                ctx.pg_snapshots.invalidate(&target.connect);
            }
            let (partitions, clean) = manage_partitions(relay, ctx, &client, v, &bound).await;
            if !clean {
                // A failed or abandoned pass may have left a statement running or a
                // transaction open on this connection: close it, never reuse it.
                return Ok(Provision::Bound(bound, partitions));
            }
            Provision::Bound(bound, partitions)
        }
    };
    client.release();
    Ok(provision)
}

/// With `spec.outbox.partitions`, one pass of the partition manager, once the slot
/// is in place (its confirmed position decides what may be dropped). A failure is
/// reported in `status.partitions.error`, an Event-worthy warning and a metric, not
/// as a provisioning failure: the relay itself still works. The flag says whether
/// the connection finished cleanly and may be reused.
async fn manage_partitions(
    relay: &OutboxRelay,
    ctx: &Context,
    client: &tokio_postgres::Client,
    v: &Validated,
    bound: &Bound,
) -> (Option<crate::api::partitions::PartitionsStatus>, bool) {
    let Some(spec) = relay.spec.outbox.partitions.as_ref() else {
        return (None, true);
    };
    let slot = postgres::partitions::SlotFacts {
        confirmed: bound
            .slot
            .as_ref()
            .and_then(|s| s.confirmed_flush_lsn.as_deref())
            .and_then(|l| l.parse().ok()),
        created_at: bound.identity.slot_created_at.as_ref().map(|t| t.0.as_second()),
    };
    let now = super::status::now().0.as_second();
    let pass = tokio::time::timeout(
        CHECK_TIMEOUT,
        postgres::partitions::manage(client, &v.database.table, spec, slot, now),
    )
    .await;
    let failure = match pass {
        Ok(Ok(report)) => {
            if !(report.created.is_empty() && report.detached.is_empty() && report.dropped.is_empty()) {
                tracing::info!(created = ?report.created, detached = ?report.detached, dropped = ?report.dropped, "maintained the outbox table's partitions");
            }
            return (Some(report.to_status()), true);
        }
        Ok(Err(e)) => (e.category(), e.to_string()),
        Err(_) => (
            "PartitionMaintenanceTimeout",
            format!(
                "partition maintenance did not finish within {} s; a detach waits for a lock on the outbox table",
                CHECK_TIMEOUT.as_secs()
            ),
        ),
    };
    let (category, message) = failure;
    ctx.metrics.reconcile_error(category);
    tracing::warn!(error = %message, category, "partition maintenance failed");
    let mut last = relay
        .status
        .as_ref()
        .and_then(|s| s.partitions.clone())
        .unwrap_or_default();
    last.error = Some(format!("{category}: {message}"));
    (Some(last), false)
}

/// The relay as ownership records name it.
pub fn owner_of(relay: &OutboxRelay) -> Owner {
    Owner {
        uid: relay.uid().unwrap_or_default(),
        namespace: relay.namespace().unwrap_or_default(),
        name: relay.name_any(),
    }
}

/// What the relay remembers (status) and asks for (annotations), and which owners
/// named in records no longer exist.
pub async fn intent(relay: &OutboxRelay, ctx: &Context, slot: &str, obs: &Observation) -> Intent {
    let mut intent = remembered(relay, slot);
    let my_uid = relay.uid().unwrap_or_default();
    let named = obs
        .publication
        .iter()
        .filter_map(|o| o.marker())
        .chain(obs.slot_claims.iter());
    for m in named.filter(|m| m.uid != my_uid) {
        if !owner_exists(ctx, &m.namespace, &m.name, &m.uid).await {
            intent.gone_owners.insert(m.uid.clone());
        }
    }
    intent
}

/// What the relay remembers and asks for, without asking the API server about
/// anyone: no owner counts as gone.
pub fn remembered(relay: &OutboxRelay, slot: &str) -> Intent {
    let status = relay.status.as_ref();
    let recorded = status.and_then(|s| s.binding.clone());
    // An operator version without ownership records left only `status.slot`.
    let legacy = recorded.is_none() && status.and_then(|s| s.slot.as_ref()).is_some_and(|s| s.name == slot);
    let recreate = annotations::get(&relay.metadata, annotations::RECREATE_SLOT)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .filter(|v| recorded.as_ref().and_then(|r| r.recreated_for.as_deref()) != Some(*v))
        .map(String::from);
    let adopt = annotations::is_true(&relay.metadata, annotations::ADOPT);
    Intent {
        recorded,
        legacy,
        recreate,
        adopt,
        gone_owners: BTreeSet::new(),
    }
}

/// Whether the relay `namespace/name` with `uid` still exists: the cache first, then
/// the API server (the cache of a namespaced operator does not see every namespace).
/// When in doubt (no answer, no permission) it counts as existing: an object is never
/// taken from an owner that might still be there.
async fn owner_exists(ctx: &Context, namespace: &str, name: &str, uid: &str) -> bool {
    let key = ObjectRef::<OutboxRelay>::new(name).within(namespace);
    if let Some(r) = ctx.relays.get(&key) {
        return r.uid().as_deref() == Some(uid);
    }
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), namespace);
    match api_call(api.get_opt(name)).await {
        Ok(Some(r)) => r.uid().as_deref() == Some(uid),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Runs a PostgreSQL step with a deadline. Dropping the future on timeout drops
/// its connection, which ends the server-side statement too.
pub(crate) async fn timed<T>(
    step: &'static str,
    after: Duration,
    hint: &'static str,
    fut: impl Future<Output = Result<T, PgError>>,
) -> Result<T, Error> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::DatabaseTimeout { step, after, hint }),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    use super::*;

    fn deployment(generation: i64, observed: Option<i64>, replicas: i32, available: Option<i32>) -> Deployment {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: observed,
                available_replicas: available,
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        d.metadata.generation = Some(generation);
        d
    }

    #[test]
    fn worker_observation_reads_availability() {
        let r = OutboxRelay::test();
        assert_eq!(worker_observation(&r, None), WorkerObservation::Missing);
        assert_eq!(
            worker_observation(&r, Some(&deployment(2, Some(2), 2, Some(1)))),
            WorkerObservation::Deployment {
                replicas: 2,
                available: 1,
                rolled_out: true
            }
        );
        assert_eq!(
            worker_observation(&r, Some(&deployment(3, Some(2), 1, None))),
            WorkerObservation::Deployment {
                replicas: 1,
                available: 0,
                rolled_out: false
            }
        );
        let suspended = OutboxRelay::test().with_suspend(true);
        assert_eq!(
            worker_observation(&suspended, Some(&deployment(1, Some(1), 0, None))),
            WorkerObservation::Suspended
        );
    }

    #[test]
    fn timeouts_say_what_to_look_for() {
        let e = Error::DatabaseTimeout {
            step: "creating the replication slot",
            after: Duration::from_secs(60),
            hint: "; look for long-running transactions",
        };
        assert_eq!(e.category(), "DatabaseTimeout");
        assert!(e.to_string().contains("within 60 s; look for long-running"), "{e}");
    }
}
