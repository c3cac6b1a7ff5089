//! The docs a platform team reads stay true: `docs/spec-reference.md` is what the CRD
//! schema generates (when that fails, regenerate with
//! `cargo run -- spec-reference > docs/spec-reference.md`), and the operations guide
//! explains every condition reason.

use outbox_operator::api::reference::spec_reference;

#[test]
fn checked_in_spec_reference_matches_the_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/spec-reference.md");
    let on_disk = std::fs::read_to_string(path).expect("docs/spec-reference.md is readable");
    assert!(
        on_disk == spec_reference(),
        "docs/spec-reference.md drifted from the CRD schema; run `cargo run -- spec-reference > docs/spec-reference.md`"
    );
}

#[test]
fn every_spec_field_of_the_crd_has_a_row() {
    let crd = serde_json::to_value(<outbox_operator::api::OutboxRelay as kube::CustomResourceExt>::crd()).expect("crd");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let reference = spec_reference();
    let mut count = 0;
    let mut stack = vec![("spec".to_string(), spec)];
    while let Some((path, node)) = stack.pop() {
        let node = if node["type"] == "array" { &node["items"] } else { node };
        for (name, child) in node["properties"].as_object().into_iter().flatten() {
            let p = format!("{path}.{name}");
            assert!(reference.contains(&format!("| `{p}` |")), "no row for {p}");
            count += 1;
            let next = if child["type"] == "array" { format!("{p}[]") } else { p };
            stack.push((next, child));
        }
    }
    assert!(count > 40, "only {count} fields");
}

#[test]
fn operations_guide_explains_every_condition_reason() {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/conditions.rs")).expect("conditions.rs");
    let module = src.split("pub mod reasons {").nth(1).expect("a reasons module");
    let module = module.split("\n}").next().expect("its end");
    let reasons: Vec<&str> = module
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert!(reasons.len() > 20, "{reasons:?}");
    let guide =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).expect("operations.md");
    for r in reasons {
        assert!(
            guide.lines().any(|l| l.starts_with(&format!("| `{r}`"))),
            "docs/operations.md has no troubleshooting row for {r}"
        );
    }
}
