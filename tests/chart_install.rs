//! The Helm chart lints, renders, carries the checked-in CRD, and everything it
//! renders is accepted by a real kube-apiserver (server-side dry run, so the
//! Deployment, RBAC and Service are validated against the real schemas). The
//! optional PrometheusRule only alerts on metrics the operator really exports.

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use outbox_operator::metrics::{OperatorMetrics, RelayGauges, SlotGauges};
use outbox_testbed::{shared, unique_name};
use serde::Deserialize;
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");
const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/outboxrelay.yaml");

/// Runs the command and returns its stdout; fails the test with its output otherwise.
fn run(what: &str, mut cmd: Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `helm template` of the chart into `ns`, with extra `--set` values.
fn render(helm: Command, ns: &str, sets: &[&str]) -> String {
    let mut cmd = helm;
    cmd.args([
        "template",
        "outbox-operator",
        CHART,
        "--namespace",
        ns,
        "--include-crds",
    ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    run("helm template", cmd)
}

/// The non-empty documents of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn chart_renders_and_the_api_server_accepts_it() {
    let bed = shared().await;
    let kube = &bed.kube;

    let mut lint = kube.helm();
    lint.args(["lint", "--strict", CHART]);
    run("helm lint", lint);

    let ns = unique_name("chart");
    let rendered = render(kube.helm(), &ns, &["prometheusRule.enabled=false"]);
    let docs = documents(&rendered);
    assert!(
        !docs.iter().any(|d| d["kind"] == "PrometheusRule"),
        "PrometheusRule rendered although disabled"
    );

    // The CRD the chart installs is the checked-in one (tests/crd_drift.rs ties that
    // to the Rust types).
    let crd_docs: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crd_docs.len(), 1, "expected exactly one CRD in the rendered chart");
    let checked_in: Value =
        serde_norway::from_str(&std::fs::read_to_string(CRD).expect("crds/outboxrelay.yaml is readable"))
            .expect("crds/outboxrelay.yaml parses");
    assert_eq!(
        crd_docs[0], &checked_in,
        "the rendered CRD differs from crds/outboxrelay.yaml"
    );

    // The operator's Deployment runs the operator and tells it the worker image.
    let deployment = find(&docs, "Deployment", "outbox-operator");
    assert_eq!(deployment["metadata"]["namespace"], ns.as_str());
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert!(
        strings(&container["args"]).contains(&"operator"),
        "container args lack `operator`: {}",
        container["args"]
    );
    let env = container["env"].as_array().expect("container env");
    assert!(
        env.iter()
            .any(|e| e["name"] == "OUTBOX_RELAY_IMAGE" && e["value"].as_str().is_some_and(|v| !v.is_empty())),
        "container env lacks OUTBOX_RELAY_IMAGE: {}",
        container["env"]
    );

    // The ClusterRole lets the operator write status and watch Secrets.
    let role = find(&docs, "ClusterRole", "outbox-operator");
    let rules = role["rules"].as_array().expect("ClusterRole rules");
    let grants = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            strings(&r["apiGroups"]).contains(&group)
                && strings(&r["resources"]).contains(&resource)
                && strings(&r["verbs"]).contains(&verb)
        })
    };
    assert!(
        grants("outbox.dev", "outboxrelays/status", "patch"),
        "no patch on outboxrelays/status"
    );
    assert!(grants("", "secrets", "watch"), "no watch on secrets");
    let binding = find(&docs, "ClusterRoleBinding", "outbox-operator");
    assert_eq!(binding["subjects"][0]["namespace"], ns.as_str());

    // Install the CRD first (a helm install does the same with crds/), then let the
    // API server validate every rendered object without persisting it.
    let crd: CustomResourceDefinition = serde_json::from_value(crd_docs[0].clone()).expect("CRD decodes");
    kube.install_crd(&crd).await.expect("install the chart's CRD");
    let mut create_ns = kube.kubectl();
    create_ns.args(["create", "namespace", &ns]);
    run("kubectl create namespace", create_ns);

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    let mut apply = kube.kubectl();
    apply.args(["apply", "--dry-run=server", "-f"]).arg(&file);
    let applied = run("kubectl apply --dry-run=server", apply);
    for (kind, name) in [
        (
            "customresourcedefinition.apiextensions.k8s.io",
            "outboxrelays.outbox.dev",
        ),
        ("serviceaccount", "outbox-operator"),
        ("clusterrole.rbac.authorization.k8s.io", "outbox-operator"),
        ("clusterrole.rbac.authorization.k8s.io", "outbox-operator-edit"),
        ("clusterrole.rbac.authorization.k8s.io", "outbox-operator-view"),
        ("clusterrolebinding.rbac.authorization.k8s.io", "outbox-operator"),
        ("service", "outbox-operator-metrics"),
        ("deployment.apps", "outbox-operator"),
    ] {
        let line = format!("{kind}/{name} ");
        assert!(
            applied
                .lines()
                .any(|l| l.starts_with(&line) && l.ends_with("(server dry run)")),
            "no server dry run of {kind}/{name} in:\n{applied}"
        );
    }
    assert_eq!(
        applied.lines().count(),
        docs.len(),
        "kubectl applied a different number of objects than were rendered:\n{applied}"
    );
}

/// The rules of a rendered Role or ClusterRole, comparable across the two.
fn rules_of(role: &Value) -> Vec<Value> {
    role["rules"].as_array().expect("rules").clone()
}

#[tokio::test]
async fn namespaced_mode_grants_the_same_rules_in_each_listed_namespace_only() {
    let bed = shared().await;
    let kube = &bed.kube;
    let ns = unique_name("chart-ns");
    let (a, b) = (unique_name("team-a"), unique_name("team-b"));
    let cluster_docs = documents(&render(kube.helm(), &ns, &[]));
    let cluster_rules = rules_of(find(&cluster_docs, "ClusterRole", "outbox-operator"));

    let list = format!("watchNamespaces={{{a},{b}}}");
    let rendered = render(kube.helm(), &ns, &[&list]);
    let docs = documents(&rendered);
    // No cluster-wide grant to the operator; the aggregated edit/view roles are for
    // users and grant the operator nothing.
    assert!(
        !docs.iter().any(|d| d["kind"] == "ClusterRoleBinding"),
        "namespaced mode rendered a ClusterRoleBinding"
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "outbox-operator"),
        "namespaced mode rendered the operator's ClusterRole"
    );
    for watched in [&a, &b] {
        let role = docs
            .iter()
            .find(|d| {
                d["kind"] == "Role"
                    && d["metadata"]["name"] == "outbox-operator"
                    && d["metadata"]["namespace"] == watched.as_str()
            })
            .unwrap_or_else(|| panic!("no Role in {watched}"));
        assert_eq!(
            rules_of(role),
            cluster_rules,
            "the Role in {watched} differs from the cluster mode's rules"
        );
        let binding = docs
            .iter()
            .find(|d| {
                d["kind"] == "RoleBinding"
                    && d["metadata"]["name"] == "outbox-operator"
                    && d["metadata"]["namespace"] == watched.as_str()
            })
            .unwrap_or_else(|| panic!("no RoleBinding in {watched}"));
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(
            binding["subjects"][0]["namespace"],
            ns.as_str(),
            "bound to the release's ServiceAccount"
        );
    }
    let container = &find(&docs, "Deployment", "outbox-operator")["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_array().expect("container env");
    let watch = env
        .iter()
        .find(|e| e["name"] == "OUTBOX_WATCH_NAMESPACE")
        .unwrap_or_else(|| panic!("no OUTBOX_WATCH_NAMESPACE in {}", container["env"]));
    assert_eq!(watch["value"], format!("{a},{b}").as_str());
    // Cluster mode tells the operator no namespace.
    let cluster_env =
        &find(&cluster_docs, "Deployment", "outbox-operator")["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        !cluster_env.to_string().contains("OUTBOX_WATCH_NAMESPACE"),
        "cluster mode sets a watch namespace: {cluster_env}"
    );

    // The API server accepts the namespaced objects too.
    let crd_docs: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    let crd: CustomResourceDefinition = serde_json::from_value(crd_docs[0].clone()).expect("CRD decodes");
    kube.install_crd(&crd).await.expect("install the chart's CRD");
    for n in [&ns, &a, &b] {
        let mut create_ns = kube.kubectl();
        create_ns.args(["create", "namespace", n]);
        run("kubectl create namespace", create_ns);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write rendered manifests");
    let mut apply = kube.kubectl();
    apply.args(["apply", "--dry-run=server", "-f"]).arg(&file);
    let applied = run("kubectl apply --dry-run=server", apply);
    assert_eq!(
        applied
            .lines()
            .filter(|l| l.starts_with("role.rbac.authorization.k8s.io/outbox-operator "))
            .count(),
        2,
        "expected the operator's Role in both listed namespaces:\n{applied}"
    );
}

/// The metric names the operator exposes, read from its own exposition.
fn operator_metric_names() -> BTreeSet<String> {
    let m = OperatorMetrics::new();
    let slot = SlotGauges {
        lag_bytes: 1,
        retained_bytes: 1,
        active: true,
        wal_lost: false,
        wal_status: Some("reserved".into()),
        safe_wal_size: Some(1),
    };
    m.set_relay(
        "ns",
        "relay",
        &RelayGauges {
            ready: true,
            slot: Some(slot),
            poll_backlog_rows: Some(1),
            ..RelayGauges::default()
        },
    );
    m.encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn metric_names_in(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("outbox_"))
        .collect()
}

#[tokio::test]
async fn prometheus_rule_alerts_on_exported_metrics() {
    let bed = shared().await;
    let rendered = render(bed.kube.helm(), &unique_name("rules"), &["prometheusRule.enabled=true"]);
    let docs = documents(&rendered);
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule is rendered when enabled");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");

    let exported = operator_metric_names();
    for name in [
        "outbox_operator_ready",
        "outbox_operator_slot_lag_bytes",
        "outbox_operator_slot_active",
        "outbox_operator_slot_wal_lost",
    ] {
        assert!(
            exported.contains(name),
            "the operator does not export {name}: {exported:?}"
        );
    }

    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let alert = r["alert"].as_str().expect("alert name");
            let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{alert} has no expr"));
            let metrics = metric_names_in(expr);
            assert!(
                !metrics.is_empty(),
                "{alert}: expr `{expr}` references no outbox metric"
            );
            for m in metrics {
                // OpenMetrics names a counter's family without the `_total` its samples carry.
                let family = m.strip_suffix("_total").unwrap_or(m);
                assert!(
                    exported.contains(m) || exported.contains(family),
                    "{alert}: expr `{expr}` uses {m}, which the operator does not export ({exported:?})"
                );
            }
            alerts.insert(alert.to_string());
        }
    }
    for want in [
        "OutboxRelayNotReady",
        "OutboxRelaySlotLagHigh",
        "OutboxRelayWalLost",
        "OutboxRelaySlotLost",
        "OutboxRelayConflict",
        "OutboxRelayDeletionDroppedEvents",
    ] {
        assert!(alerts.contains(want), "alert {want} missing; rendered: {alerts:?}");
    }
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names_in("outbox_operator_slot_lag_bytes > 1073741824"),
        ["outbox_operator_slot_lag_bytes"]
    );
    assert_eq!(
        metric_names_in("max by (namespace) (outbox_operator_ready{name=\"x\"}) == 0"),
        ["outbox_operator_ready"]
    );
}
