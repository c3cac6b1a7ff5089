//! Step 4: make the world match: server-side apply the worker Deployment, and
//! provision the publication and slot in PostgreSQL.
//!
//! Both happen on every reconcile, suspended or not: the apply is a no-op when
//! nothing changed, and the slot must exist even while no worker runs, or events
//! written in the meantime would be lost. The two run side by side, since neither
//! depends on the other; a failure of one does not stop the other (a suspend must
//! take effect even while the database is down).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use super::status::{DatabaseObservation, Observed, Problem, WorkerObservation};
use super::validate::DatabaseTarget;
use super::{ApiFailure, Context, Error as ReconcileError, FIELD_MANAGER, api_call, build, dereference, validate};
use crate::api::OutboxRelay;
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
}

/// Runs dereference, validate, build and apply, collecting what the status needs.
pub async fn observe(relay: &OutboxRelay, ctx: &Context) -> Outcome {
    let namespace = relay.namespace().unwrap_or_default();
    let prepared = match dereference::dereference(&ctx.client, &namespace, &relay.spec).await {
        Ok(secrets) => validate::validate(relay, &secrets, &ctx.config.relay_image).map_err(ReconcileError::from),
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
            };
        }
    };

    let desired = build::deployment(&v);
    // The worker's ServiceAccount and Role come before the Deployment that uses them.
    let worker = async {
        super::worker_rbac::apply(&ctx.client, &v)
            .await
            .map_err(|(object, source)| Error::WorkerIdentity { object, source })?;
        apply_deployment(&ctx.client, &desired).await
    };
    let (applied, provisioned) = tokio::join!(worker, provision(&v.database));

    let mut error = None;
    let database = match provisioned {
        Ok(slot) => DatabaseObservation::Provisioned {
            table: v.database.table.unquoted(),
            publication: v.database.publication.clone(),
            slot_name: v.database.slot.clone(),
            slot,
        },
        Err(e) => {
            let e = ReconcileError::from(e);
            let obs = DatabaseObservation::Failed(Problem::of(&e));
            error = Some(e);
            obs
        }
    };
    let worker = match applied {
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

/// Checks the prerequisites, ensures publication and slot, and reads the slot.
pub async fn provision(target: &DatabaseTarget) -> Result<Option<SlotInfo>, Error> {
    let client = timed(
        "connecting",
        postgres::CONNECT_TIMEOUT + Duration::from_secs(2),
        "",
        async { postgres::connect(&target.connect).await },
    )
    .await?;
    timed(
        "checking the prerequisites",
        CHECK_TIMEOUT,
        "",
        postgres::check_prerequisites(&client, &target.table, &target.columns, &target.slot),
    )
    .await?;
    timed(
        "ensuring the publication",
        CHECK_TIMEOUT,
        "; a lock on the outbox table may be blocking it",
        postgres::ensure_publication(&client, &target.publication, &target.table),
    )
    .await?;
    timed(
        "creating the replication slot",
        SLOT_CREATE_TIMEOUT,
        "; PostgreSQL waits for transactions running at that moment to end: look for long-running \
         transactions in pg_stat_activity",
        postgres::ensure_slot(&client, &target.slot),
    )
    .await?;
    let slot = timed(
        "reading the slot's status",
        CHECK_TIMEOUT,
        "",
        postgres::slot_status(&client, &target.slot),
    )
    .await?;
    Ok(slot)
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
