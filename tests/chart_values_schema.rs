//! The chart's `values.schema.json` types and bounds every value: `helm lint --strict`
//! and `helm template` accept the defaults and refuse bad values with a message that
//! names the value.

mod tools;

use serde_json::Value;
use tools::{CHART, helm, output};

fn schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{CHART}/values.schema.json")).expect("read the schema"))
        .expect("the schema is JSON")
}

fn values() -> Value {
    serde_norway::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).expect("read values.yaml"))
        .expect("values.yaml parses")
}

/// (lint ok, template ok, both outputs) with `--set` values.
fn check(sets: &[&str]) -> (bool, bool, String) {
    let mut lint = helm();
    lint.args(["lint", "--strict", CHART]);
    let mut template = helm();
    template.args(["template", "outbox-operator", CHART]);
    for s in sets {
        lint.args(["--set", s]);
        template.args(["--set", s]);
    }
    let (lint_ok, lo, le) = output("helm lint", &mut lint);
    let (template_ok, to, te) = output("helm template", &mut template);
    (
        lint_ok,
        template_ok,
        format!("{lo}{le}{te}{}", if template_ok { "" } else { &to }),
    )
}

#[test]
fn every_value_in_values_yaml_has_a_type_in_the_schema() {
    fn walk(values: &Value, schema: &Value, path: &str, count: &mut usize) {
        let Some(map) = values.as_object() else { return };
        for (key, v) in map {
            let p = format!("{path}.{key}");
            let s = &schema["properties"][key];
            assert!(s.is_object(), "{p} has no schema");
            let typed = s.get("type").is_some() || s.get("$ref").is_some() || s.get("oneOf").is_some();
            assert!(typed, "{p} has no type in the schema: {s}");
            *count += 1;
            if s.get("properties").is_some() {
                assert_eq!(s["additionalProperties"], false, "{p}: unknown keys must be refused");
                walk(v, s, &p, count);
            }
        }
    }
    let schema = schema();
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown top-level values must be refused"
    );
    let mut count = 0;
    walk(&values(), &schema, "", &mut count);
    assert!(count >= 20, "only {count} values checked");
}

#[test]
fn defaults_and_good_values_pass() {
    let (lint, template, out) = check(&[]);
    assert!(lint && template, "defaults refused:\n{out}");
    let (lint, template, out) = check(&[
        "prometheusRule.enabled=true",
        "prometheusRule.for=1h30m",
        "prometheusRule.safeWalSizeBytes=536870912",
        "metrics.serviceMonitor.interval=15s",
        "resources.requests.cpu=0.5",
        "resources.limits.memory=512Mi",
        "image.tag=1.2.3",
        "logFormat=text",
        "logLevel=outbox_operator=debug\\,info",
        "watchNamespaces={team-a,team-b}",
    ]);
    assert!(lint && template, "good values refused:\n{out}");
}

#[test]
fn bad_values_are_refused_naming_the_value() {
    for (set, named) in [
        ("replicaCount=9", "/replicaCount"),
        ("leaderElection.enabled=false", "/leaderElection/enabled"),
        (
            "leaderElection.leaseDurationSeconds=1",
            "/leaderElection/leaseDurationSeconds",
        ),
        ("requeueSeconds=0", "/requeueSeconds"),
        ("metrics.port=70000", "/metrics/port"),
        ("metrics.port=http", "/metrics/port"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("logFormat=xml", "/logFormat"),
        ("prometheusRule.for=ten minutes", "/prometheusRule/for"),
        ("prometheusRule.safeWalSizeBytes=-1", "/prometheusRule/safeWalSizeBytes"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("serviceAccount.create=maybe", "/serviceAccount/create"),
        ("serviceAccount.name=Not_A_Name", "/serviceAccount/name"),
        ("metrics.serviceMonitr.enabled=true", "serviceMonitr"),
        ("replicas=2", "replicas"),
        ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
        ("watchNamespaces={a,a}", "/watchNamespaces"),
        ("watchNamespaces=team-a", "/watchNamespaces"),
    ] {
        let (lint, template, out) = check(&[set]);
        assert!(!lint, "helm lint --strict accepted {set}:\n{out}");
        assert!(!template, "helm template accepted {set}:\n{out}");
        assert!(
            out.contains(named),
            "the refusal of {set} does not name {named}:\n{out}"
        );
        assert!(
            out.contains("schema"),
            "the refusal of {set} does not point at the schema:\n{out}"
        );
    }
}
