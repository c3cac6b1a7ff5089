//! `crds/outboxrelay.yaml` is what the Rust types generate. When this fails,
//! regenerate with `cargo run -- crd > crds/outboxrelay.yaml` and commit the diff.

use kube::CustomResourceExt;
use outbox_operator::api::OutboxRelay;

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/outboxrelay.yaml");
    let on_disk = std::fs::read_to_string(path).expect("crds/outboxrelay.yaml is readable");
    let generated = serde_norway::to_string(&OutboxRelay::crd()).expect("CRD serializes");
    assert!(
        on_disk == generated,
        "crds/outboxrelay.yaml drifted from the Rust types; run `cargo run -- crd > crds/outboxrelay.yaml`"
    );
}

#[test]
fn chart_carries_the_same_crd() {
    let chart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/outbox-operator/crds/outboxrelay.yaml"
    );
    let in_chart = std::fs::read_to_string(chart).expect("the chart ships the CRD");
    let generated = serde_norway::to_string(&OutboxRelay::crd()).expect("CRD serializes");
    assert!(
        in_chart == generated,
        "the chart's CRD drifted; copy crds/outboxrelay.yaml into charts/outbox-operator/crds/"
    );
}
