//! The chart in namespaced mode (`watchNamespaces`) on the real cluster: the
//! operator runs under Roles in the listed namespace only. There it provisions a
//! relay, gives its worker an identity and moves events; the real authorizer
//! refuses it everything elsewhere (relays, Secrets, Deployments, and any
//! cluster-wide list), and a relay in another namespace is left as it was applied.
//!
//! `harness = false`: [`outbox_testbed::cluster::main`] runs these tests inside
//! the cluster's private namespaces.

mod cluster_support;
mod support;

use std::process::ExitCode;
use std::time::Duration;

use cluster_support::{Case, OPERATOR_NS, RELEASE, cluster_installed_with, create_namespace, operator_logs};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use outbox_testbed::unique_name;
use serde_json::json;

fn main() -> ExitCode {
    outbox_testbed::cluster::main(outbox_testbed::cluster_tests![
        a_namespaced_install_works_in_its_namespace_and_cannot_read_others
    ])
}

/// Whether the operator's ServiceAccount may `verb` `resource` in `ns` ("" for
/// cluster-wide), as the API server's authorizer decides it.
async fn operator_may(client: &Client, verb: &str, group: &str, resource: &str, ns: &str) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": format!("system:serviceaccount:{OPERATOR_NS}:{RELEASE}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{OPERATOR_NS}"), "system:authenticated"],
            "resourceAttributes": {"namespace": ns, "verb": verb, "group": group, "resource": resource}
        }
    }))
    .expect("review");
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    api.create(&PostParams::default(), &review)
        .await
        .expect("create SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

async fn a_namespaced_install_works_in_its_namespace_and_cannot_read_others() {
    // The listed namespace must exist before the install puts its Role there.
    let shared = outbox_testbed::cluster::shared().await;
    let admin = shared.kube.client().await.expect("kube client");
    let watched = unique_name("scoped");
    let outside = unique_name("outside");
    create_namespace(&admin, &watched).await;
    create_namespace(&admin, &outside).await;
    let list = format!("watchNamespaces={{{watched}}}");
    let cluster = cluster_installed_with(&[&list]).await;

    // The grants: the operator's rules in the listed namespace, nothing elsewhere.
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let operator_bindings: Vec<String> = bindings
        .list(&ListParams::default())
        .await
        .expect("list ClusterRoleBindings")
        .items
        .iter()
        .filter(|b| {
            b.subjects
                .iter()
                .flatten()
                .any(|s| s.name == RELEASE && s.namespace.as_deref() == Some(OPERATOR_NS))
        })
        .map(|b| b.name_any())
        .collect();
    assert!(
        operator_bindings.is_empty(),
        "the operator is bound cluster-wide: {operator_bindings:?}"
    );
    let role_bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &watched);
    role_bindings
        .get(RELEASE)
        .await
        .expect("the operator's RoleBinding in the listed namespace");
    for (verb, group, resource) in [
        ("watch", "outbox.dev", "outboxrelays"),
        ("patch", "outbox.dev", "outboxrelays/status"),
        ("get", "", "secrets"),
        ("watch", "", "secrets"),
        ("create", "apps", "deployments"),
    ] {
        assert!(
            operator_may(&admin, verb, group, resource, &watched).await,
            "the operator may not {verb} {resource} in its namespace {watched}"
        );
    }
    for ns in [outside.as_str(), "default", ""] {
        for (verb, group, resource) in [
            ("list", "outbox.dev", "outboxrelays"),
            ("get", "outbox.dev", "outboxrelays"),
            ("get", "", "secrets"),
            ("list", "", "secrets"),
            ("list", "apps", "deployments"),
            ("create", "apps", "deployments"),
        ] {
            assert!(
                !operator_may(&admin, verb, group, resource, ns).await,
                "the operator may {verb} {resource} in {:?}, outside its namespace",
                if ns.is_empty() { "the whole cluster" } else { ns }
            );
        }
    }

    // It still does its work in the listed namespace: a worker with its own
    // identity, streaming, every event delivered in order per key.
    let case = Case::in_namespace(cluster, watched.clone(), 3).await;
    case.create_relay("orders", case.spec(json!({}))).await;
    case.await_ready_pods("orders", 1).await;
    let ids = case.insert_events(5, 20, 25, 1).await;
    case.assert_delivered("orders", &ids).await;

    // A relay outside the list stays as it was applied.
    let other = Case::in_namespace(cluster, outside.clone(), 1).await;
    other.create_relay("orders", other.spec(json!({}))).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = other.relays().get("orders").await.expect("get the outside relay");
    assert!(
        r.finalizers().is_empty(),
        "the outside relay got a finalizer: {:?}",
        r.finalizers()
    );
    assert!(r.status.is_none(), "the outside relay got a status: {:?}", r.status);
    let deployments = other.deployments().list(&ListParams::default()).await.expect("list");
    assert!(deployments.items.is_empty(), "a worker was started outside the list");
    // And it never tried: no refusal in its logs (a watch outside its Roles would
    // show up as `forbidden`).
    let logs = operator_logs(cluster, 400);
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "the operator hit RBAC refusals:\n{logs}"
    );
}
