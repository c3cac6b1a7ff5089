//! Keeps the Secrets a relay's cleanup needs until that cleanup ran.
//!
//! Deleting a namespace deletes everything in it at once; without protection the
//! credentials Secret usually goes before the relay, and the relay's cleanup (which
//! must log in to PostgreSQL to drain and drop the slot) could never finish. So the
//! operator puts its own finalizer on the database credentials and CA Secrets of
//! every relay, and takes it off when no relay in the namespace needs them any more:
//! after the last one's cleanup, or when a spec stops naming them. A Secret being
//! deleted stays readable until then.
//!
//! Best effort: a failed patch is logged and retried on the next reconcile; it
//! never fails a reconcile (a relay works without the guard, it only loses the
//! protection during namespace deletion).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use super::dereference::Dereferenced;
use super::{Context, FIELD_MANAGER, api_call};
use crate::api::OutboxRelay;

/// The operator's finalizer on Secrets that a relay's cleanup needs.
pub const FINALIZER: &str = "outbox.dev/in-use";

/// The Secrets the relay's cleanup needs: database credentials and CA.
pub fn protected(relay: &OutboxRelay) -> Vec<String> {
    let db = &relay.spec.database;
    let mut out: BTreeSet<String> = BTreeSet::new();
    out.insert(db.credentials_secret_ref.name.clone());
    if let Some(ca) = &db.tls.ca_secret_ref {
        out.insert(ca.name.clone());
    }
    out.into_iter().collect()
}

/// Secrets that `relay` no longer needs and no other relay in the namespace does:
/// the ones it protected before minus `still`.
fn releasable(ctx: &Context, relay: &OutboxRelay, candidates: BTreeSet<String>) -> BTreeSet<String> {
    let ns = relay.namespace();
    let uid = relay.uid();
    let others = ctx.relays.state();
    let needed: BTreeSet<String> = others
        .iter()
        .filter(|o| o.namespace() == ns && o.uid() != uid)
        .flat_map(|o| protected(o))
        .collect();
    candidates.into_iter().filter(|s| !needed.contains(s)).collect()
}

/// Adds the finalizer where it is missing, and removes it from Secrets the relay
/// protected before but whose name its spec no longer holds.
///
/// Adding the finalizer gives the Secret a new resourceVersion, and the workers'
/// pod template carries a hash of those versions (so a rotated password rolls
/// them). The new version replaces the one read, before anything is built from
/// it: otherwise every new relay would roll its just-started workers once.
pub async fn guard(ctx: &Context, relay: &OutboxRelay, secrets: &mut Dereferenced) {
    let ns = relay.namespace().unwrap_or_default();
    let want = protected(relay);
    for name in want.iter().filter(|n| secrets.unguarded.contains(*n)) {
        let rv = secrets.secret_versions.get(name).cloned().unwrap_or_default();
        if let Some(new) = add(ctx, &ns, name, &rv).await {
            secrets.secret_versions.insert(name.clone(), new);
        }
    }
    let before: BTreeSet<String> = relay
        .status
        .as_ref()
        .map(|s| s.protected_secrets.iter().cloned().collect())
        .unwrap_or_default();
    let dropped = before.into_iter().filter(|n| !want.contains(n)).collect();
    for name in releasable(ctx, relay, dropped) {
        remove(ctx, &ns, &name).await;
    }
}

/// After the relay's cleanup: takes the finalizer off every Secret it protected
/// that no other relay needs.
pub async fn release(ctx: &Context, relay: &OutboxRelay) {
    let ns = relay.namespace().unwrap_or_default();
    let mut all: BTreeSet<String> = protected(relay).into_iter().collect();
    if let Some(s) = &relay.status {
        all.extend(s.protected_secrets.iter().cloned());
    }
    for name in releasable(ctx, relay, all) {
        remove(ctx, &ns, &name).await;
    }
}

fn pp() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// A JSON patch guarded by the resourceVersion read, so a concurrent change of the
/// list is never overwritten (the next reconcile tries again). Returns the
/// Secret's resourceVersion after the patch, if it was applied.
async fn add(ctx: &Context, ns: &str, name: &str, resource_version: &str) -> Option<String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = match api_call(api.get_opt(name)).await {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            warn!(secret = name, error = %e, "cannot read a Secret to protect it");
            return None;
        }
    };
    let current = secret.meta().finalizers.clone();
    if current.as_ref().is_some_and(|f| f.iter().any(|f| f == FINALIZER)) {
        return secret.meta().resource_version.clone();
    }
    let rv = secret
        .meta()
        .resource_version
        .clone()
        .unwrap_or_else(|| resource_version.to_string());
    let op = match current {
        Some(_) => json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}),
        None => json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
    };
    let patch = json!([{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, op]);
    match json_patch(&api, name, patch).await {
        Ok(after) => {
            debug!(secret = name, "protected");
            after
        }
        Err(e) => {
            warn!(secret = name, error = %e, "cannot add the in-use finalizer to a Secret");
            None
        }
    }
}

async fn remove(ctx: &Context, ns: &str, name: &str) {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = match api_call(api.get_opt(name)).await {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            warn!(secret = name, error = %e, "cannot read a Secret to release it");
            return;
        }
    };
    let Some(i) = secret
        .meta()
        .finalizers
        .as_ref()
        .and_then(|f| f.iter().position(|f| f == FINALIZER))
    else {
        return;
    };
    let path = format!("/metadata/finalizers/{i}");
    let patch = json!([{"op": "test", "path": path, "value": FINALIZER}, {"op": "remove", "path": path}]);
    match json_patch(&api, name, patch).await {
        Ok(_) => debug!(secret = name, "released"),
        Err(e) => warn!(secret = name, error = %e, "cannot remove the in-use finalizer from a Secret"),
    }
}

/// Applies `patch`; returns the Secret's resourceVersion afterwards.
async fn json_patch(
    api: &Api<Secret>,
    name: &str,
    patch: serde_json::Value,
) -> Result<Option<String>, super::ApiFailure> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| super::ApiFailure::Api(kube::Error::SerdeError(e)))?;
    api_call(api.patch(name, &pp(), &Patch::<()>::Json(patch)))
        .await
        .map(|s| s.metadata.resource_version)
}
