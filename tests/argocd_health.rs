//! The chart's Argo CD health script (`charts/outbox-operator/files/health.lua`),
//! run by gopher-lua, the interpreter Argo CD embeds, against an OutboxRelay in every
//! state its Ready condition can report: every reason in `src/api/conditions.rs`,
//! no status yet, and a generation the operator has not reconciled.

mod tools;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tools::{REPO, tool};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator/files/health.lua");

/// The health Argo CD would show: (status, message).
fn health(obj: &Value) -> (String, String) {
    let mut child = Command::new(tool("luahealth"))
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start luahealth");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(obj.to_string().as_bytes())
        .expect("write the resource");
    let out = child.wait_with_output().expect("luahealth");
    assert!(
        out.status.success(),
        "the health script failed on {obj}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("luahealth prints JSON");
    (
        v["status"].as_str().unwrap_or_default().to_string(),
        v["message"].as_str().unwrap_or_default().to_string(),
    )
}

fn relay(generation: i64, ready: Option<(&str, &str, i64)>) -> Value {
    let mut conditions = vec![json!({
        "type": "DatabaseReady", "status": "True", "reason": "Provisioned",
        "message": "ok", "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })];
    if let Some((status, reason, observed)) = ready {
        conditions.push(json!({
            "type": "Ready", "status": status, "reason": reason,
            "message": format!("The operator's sentence for {reason}."),
            "observedGeneration": observed,
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }));
    }
    json!({
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxRelay",
        "metadata": {"name": "orders", "namespace": "shop", "generation": generation},
        "spec": {},
        "status": {"observedGeneration": generation, "conditions": conditions},
    })
}

/// The reason constants declared in `src/api/conditions.rs`, read from the source so
/// that a new reason without an expected health fails this test.
fn declared_reasons() -> BTreeSet<String> {
    let src = std::fs::read_to_string(format!("{REPO}/src/api/conditions.rs")).expect("conditions.rs");
    let module = src.split("pub mod reasons {").nth(1).expect("a reasons module");
    let module = module.split("\n}").next().expect("its end");
    module
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_string)
        .collect()
}

/// Every reason: the Ready status it comes with, and the health Argo CD shows.
/// Reasons of the other conditions only (`Provisioned`, `LagWithinThresholds`,
/// `LagWarning`, `Polling`, `WorkerAvailable`) appear here with Ready True: the relay
/// moves events.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("Relaying", "True", "Healthy"),
    ("Provisioned", "True", "Healthy"),
    ("LagWithinThresholds", "True", "Healthy"),
    ("LagWarning", "True", "Healthy"),
    ("Polling", "True", "Healthy"),
    ("WorkerAvailable", "True", "Healthy"),
    ("Suspended", "True", "Suspended"),
    ("WorkerProgressing", "False", "Progressing"),
    ("Draining", "False", "Progressing"),
    ("NotReady", "False", "Progressing"),
    ("SecretNotFound", "False", "Degraded"),
    ("SecretKeyMissing", "False", "Degraded"),
    ("InvalidSpec", "False", "Degraded"),
    ("DatabaseUnreachable", "False", "Degraded"),
    ("AuthenticationFailed", "False", "Degraded"),
    ("WalLevelNotLogical", "False", "Degraded"),
    ("TableNotFound", "False", "Degraded"),
    ("InsufficientPrivilege", "False", "Degraded"),
    ("ProvisioningFailed", "False", "Degraded"),
    ("LagCritical", "False", "Degraded"),
    ("WalLost", "False", "Degraded"),
    ("SlotMissing", "False", "Degraded"),
    ("WorkerUnavailable", "False", "Degraded"),
    // The worker's own stops (Delivering folded into Ready).
    ("KafkaUnavailable", "False", "Degraded"),
    // An Event reason; as a Ready reason it would be a stop like any other.
    ("EventSkipped", "False", "Degraded"),
    ("Conflict", "False", "Degraded"),
    ("SlotLost", "False", "Degraded"),
    ("DatabaseChanged", "False", "Degraded"),
];

#[test]
fn every_reason_has_a_health() {
    let declared = declared_reasons();
    assert!(declared.contains("Draining") && declared.len() > 20, "{declared:?}");
    let listed: BTreeSet<String> = EXPECTED.iter().map(|(r, ..)| r.to_string()).collect();
    assert_eq!(
        declared, listed,
        "reasons in conditions.rs and in this test's table differ"
    );

    let mut table = String::new();
    for (reason, ready, want) in EXPECTED {
        let (status, message) = health(&relay(3, Some((ready, reason, 3))));
        assert_eq!(&status, want, "Ready={ready} reason {reason}: {message}");
        assert!(
            message.contains(&format!("The operator's sentence for {reason}.")),
            "{reason}: the operator's message is shown: {message:?}"
        );
        if status == "Degraded" {
            assert!(message.starts_with(&format!("{reason}: ")), "{reason}: {message:?}");
        }
        table.push_str(&format!("{reason:<22} Ready={ready:<5} {status}\n"));
    }
    println!("{table}");
}

#[test]
fn unreconciled_generation_and_missing_status_are_progressing() {
    // The spec changed (generation 4) and Ready still describes generation 3: even a
    // healthy-looking Ready is not trusted yet.
    let (status, message) = health(&relay(4, Some(("True", "Relaying", 3))));
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.contains("generation 4"), "{message}");

    let (status, _) = health(&relay(4, Some(("False", "SlotLost", 3))));
    assert_eq!(status, "Progressing");

    // Just created: no Ready condition, or no status at all.
    let (status, _) = health(&relay(1, None));
    assert_eq!(status, "Progressing");
    let mut bare = relay(1, None);
    bare.as_object_mut().expect("object").remove("status");
    let (status, message) = health(&bare);
    assert_eq!(status, "Progressing");
    assert!(message.contains("Waiting for the operator"), "{message}");

    // Ready Unknown (the API's third value) is not a failure yet.
    let (status, _) = health(&relay(2, Some(("Unknown", "NotReady", 2))));
    assert_eq!(status, "Progressing");
}

#[test]
fn an_unknown_reason_on_false_is_degraded() {
    // A reason added to the operator later still shows as a failure, not as healthy.
    let (status, message) = health(&relay(2, Some(("False", "SomethingNew", 2))));
    assert_eq!(status, "Degraded", "{message}");
}
