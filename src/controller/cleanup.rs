//! Deletion: what happens to the state outside Kubernetes.
//!
//! `cleanupPolicy: Delete` drops the slot (an orphaned slot pins WAL on the primary
//! until its disk fills up) and the publication. Until both are verifiably gone the
//! finalizer stays, whatever the reason (database down, Secret deleted first): the
//! failure is retried with backoff and reported in an Event that says how to get
//! out (fix it, or switch to `Retain`). `Retain` leaves both in place.
//!
//! The worker Deployment is not deleted here: its owner reference hands it to the
//! garbage collector once the resource is gone. It is only scaled to zero first,
//! so a worker (or its hot standby) cannot take the slot back while it is dropped.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::apply::{self, timed};
use super::{
    ApiFailure, Context, Error as ReconcileError, FIELD_MANAGER, api_call, build, dereference, events, validate,
};
use crate::api::{CleanupPolicy, OutboxRelay};
use crate::postgres;

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
}

impl Error {
    pub fn category(&self) -> &'static str {
        match &self.cause {
            Cause::Dereference(e) => e.category(),
            Cause::Validate(e) => e.category(),
            Cause::ScaleDown { .. } => "DeploymentApplyFailed",
            Cause::Database(e) => e.category(),
        }
    }
}

pub async fn run(relay: &OutboxRelay, ctx: &Context) -> Result<Action, ReconcileError> {
    let namespace = relay.namespace().unwrap_or_default();
    let name = relay.name_any();
    let (slot, publication) = validate::object_names(&namespace, &name, &relay.spec);
    match relay.spec.cleanup_policy {
        CleanupPolicy::Retain => {
            events::publish(
                &ctx.recorder,
                relay,
                EventType::Normal,
                events::SLOT_RETAINED,
                "Cleanup",
                format!(
                    "cleanupPolicy is Retain: replication slot {slot:?} and publication {publication:?} stay in the \
                     database. An unread slot keeps WAL on the primary: drop it when nothing will read it again."
                ),
            )
            .await;
        }
        CleanupPolicy::Delete => {
            drop_both(relay, ctx, &namespace).await.map_err(|cause| Error {
                slot: slot.clone(),
                publication: publication.clone(),
                cause,
            })?;
            events::publish(
                &ctx.recorder,
                relay,
                EventType::Normal,
                events::SLOT_DROPPED,
                "Cleanup",
                format!("Dropped replication slot {slot:?} and publication {publication:?}."),
            )
            .await;
        }
    }
    ctx.metrics.remove_relay(&namespace, &name);
    Ok(Action::await_change())
}

async fn drop_both(relay: &OutboxRelay, ctx: &Context, namespace: &str) -> Result<(), Cause> {
    let secrets = dereference::dereference(&ctx.client, namespace, &relay.spec).await?;
    let identity = validate::identity(relay)?;
    let target = validate::database_target(&identity, &relay.spec, &secrets)?;
    scale_to_zero(ctx, namespace, &build::deployment_name(&identity.name)).await?;

    let client = timed(
        "connecting",
        postgres::CONNECT_TIMEOUT + Duration::from_secs(2),
        "",
        async { postgres::connect(&target.connect).await },
    )
    .await?;
    let slot_dropped = timed(
        "dropping the replication slot",
        DROP_TIMEOUT,
        "",
        postgres::drop_slot(&client, &target.slot),
    )
    .await?;
    let publication_dropped = timed(
        "dropping the publication",
        DROP_TIMEOUT,
        "; a lock on the outbox table may be blocking it",
        postgres::drop_publication(&client, &target.publication),
    )
    .await?;
    tracing::info!(
        slot = %target.slot,
        slot_dropped,
        publication = %target.publication,
        publication_dropped,
        "cleaned up"
    );
    Ok(())
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
