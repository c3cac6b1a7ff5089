//! The worker's own identity: a ServiceAccount, Role and RoleBinding per relay.
//!
//! The worker writes one condition (`Delivering`) of its own resource and reads
//! the skip annotation on it (`relay::status_report`). Its Role is limited by
//! `resourceNames` to that one OutboxRelay: `get` on it and on its status, `patch`
//! on its status; plus creating Events (for the skip's Warning Event; `create`
//! cannot be limited by name). Nothing else: no Secrets, no other relays. All
//! three objects are owned by the relay and go away with it.
//!
//! The operator can grant this Role because it holds the same permissions itself
//! (RBAC refuses to let anyone grant more than they have).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{deployment_name, labels};
use super::validate::Validated;
use super::{ApiFailure, FIELD_MANAGER, api_call};

/// Name of the worker's ServiceAccount, Role and RoleBinding (the Deployment's name).
pub fn worker_identity_name(relay: &str) -> String {
    deployment_name(relay)
}

fn meta(v: &Validated) -> ObjectMeta {
    ObjectMeta {
        name: Some(worker_identity_name(&v.identity.name)),
        namespace: Some(v.identity.namespace.clone()),
        labels: Some(labels(&v.identity.name)),
        owner_references: Some(vec![v.identity.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The three objects, rendered. Pure.
pub fn render(v: &Validated) -> (ServiceAccount, Role, RoleBinding) {
    let name = worker_identity_name(&v.identity.name);
    let relay = vec![v.identity.name.clone()];
    let sa = ServiceAccount {
        metadata: meta(v),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(v),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![crate::api::GROUP.into()]),
                resources: Some(vec!["outboxrelays".into()]),
                resource_names: Some(relay.clone()),
                verbs: vec!["get".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![crate::api::GROUP.into()]),
                resources: Some(vec!["outboxrelays/status".into()]),
                resource_names: Some(relay),
                verbs: vec!["get".into(), "patch".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec!["events.k8s.io".into()]),
                resources: Some(vec!["events".into()]),
                verbs: vec!["create".into(), "patch".into()],
                ..PolicyRule::default()
            },
        ]),
    };
    let binding = RoleBinding {
        metadata: meta(v),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(v.identity.namespace.clone()),
            ..Subject::default()
        }]),
    };
    (sa, role, binding)
}

/// Applies the three objects (server-side apply, before the Deployment that uses them).
pub async fn apply(client: &Client, v: &Validated) -> Result<(), (String, ApiFailure)> {
    let (sa, role, binding) = render(v);
    let ns = &v.identity.namespace;
    ssa(
        Api::<ServiceAccount>::namespaced(client.clone(), ns),
        "v1",
        "ServiceAccount",
        &sa,
        &sa.metadata,
    )
    .await?;
    ssa(
        Api::<Role>::namespaced(client.clone(), ns),
        "rbac.authorization.k8s.io/v1",
        "Role",
        &role,
        &role.metadata,
    )
    .await?;
    ssa(
        Api::<RoleBinding>::namespaced(client.clone(), ns),
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        &binding,
        &binding.metadata,
    )
    .await
}

async fn ssa<K: Clone + DeserializeOwned + std::fmt::Debug, T: Serialize>(
    api: Api<K>,
    api_version: &str,
    kind: &str,
    obj: &T,
    meta: &ObjectMeta,
) -> Result<(), (String, ApiFailure)> {
    let name = meta.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(obj).unwrap_or_default();
    if let Some(m) = body.as_object_mut() {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind.into());
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api_call(api.patch(&name, &pp, &Patch::Apply(&body)))
        .await
        .map(|_| ())
        .map_err(|e| (format!("{kind} {name}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OutboxRelay;
    use crate::controller::dereference::Dereferenced;

    #[test]
    fn the_worker_may_touch_only_its_own_relay() {
        let r = OutboxRelay::test();
        let v = crate::controller::validate::validate(&r, &Dereferenced::test(), "img").expect("valid");
        let (sa, role, binding) = render(&v);
        let name = worker_identity_name(&v.identity.name);
        assert_eq!(sa.metadata.name.as_deref(), Some(name.as_str()));
        let rules = role.rules.expect("rules");
        for rule in &rules {
            let on_relays = rule
                .resources
                .as_ref()
                .expect("resources")
                .iter()
                .any(|r| r.starts_with("outboxrelays"));
            if on_relays {
                assert_eq!(
                    rule.resource_names.as_deref(),
                    Some(&[v.identity.name.clone()][..]),
                    "{rule:?}"
                );
                assert!(rule.verbs.iter().all(|v| v == "get" || v == "patch"), "{rule:?}");
            } else {
                assert_eq!(rule.resources.as_deref(), Some(&["events".to_string()][..]));
            }
        }
        assert!(
            rules.iter().all(|r| !r
                .resources
                .as_ref()
                .expect("resources")
                .contains(&"secrets".to_string())),
            "no Secrets"
        );
        assert_eq!(binding.role_ref.name, name);
        assert_eq!(binding.subjects.expect("subjects")[0].name, name);
        assert!(role.metadata.owner_references.is_some(), "goes away with the relay");
    }
}
