//! The chart's alerting rules, evaluated by Prometheus's own rule engine
//! (`promtool test rules`) against series shaped like the operator's metrics: lag
//! alerts use each relay's own thresholds, and a slot turning `unreserved` or running
//! low on `safe_wal_size` alerts before PostgreSQL removes its WAL.

mod tools;

use std::collections::{BTreeMap, BTreeSet};

use outbox_operator::metrics::{OperatorMetrics, RelayGauges, SlotGauges};
use serde_json::Value;
use tools::{chart_rules, output, run, tool};

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/alerts/operator-rules.test.yaml");

/// Metric name → label names, from the operator's own exposition with one relay set.
fn operator_series() -> BTreeMap<String, BTreeSet<String>> {
    let m = OperatorMetrics::new();
    m.set_relay(
        "ns",
        "relay",
        &RelayGauges {
            slot: Some(SlotGauges {
                wal_status: Some("reserved".into()),
                safe_wal_size: Some(1),
                ..SlotGauges::default()
            }),
            poll_backlog_rows: Some(1),
            ..RelayGauges::default()
        },
    );
    m.encode()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_series)
        .collect()
}

/// `name{a="x",b="y"} value` (or a test's `name{a="x"}`) → (name, {a, b}).
fn parse_series(line: &str) -> Option<(String, BTreeSet<String>)> {
    let line = line.trim();
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line.split_whitespace().next()?, ""),
    };
    let labels = rest
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, _)| k.trim().to_string())
        .collect();
    Some((name.to_string(), labels))
}

#[test]
fn test_series_have_the_operators_names_and_labels() {
    let exported = operator_series();
    let cases: Value = serde_norway::from_str(&std::fs::read_to_string(CASES).expect("cases")).expect("cases parse");
    let mut seen = 0;
    for t in cases["tests"].as_array().expect("tests") {
        for s in t["input_series"].as_array().expect("input_series") {
            let series = s["series"].as_str().expect("series");
            let (name, labels) = parse_series(series).expect("a series");
            let want = exported
                .get(&name)
                .unwrap_or_else(|| panic!("{series}: the operator exports no {name}: {exported:?}"));
            assert_eq!(&labels, want, "{series}: labels differ from the operator's");
            seen += 1;
        }
    }
    assert!(seen > 10, "only {seen} series in {CASES}");
    for name in [
        "outbox_operator_slot_wal_status",
        "outbox_operator_slot_safe_wal_size_bytes",
        "outbox_operator_slot_lag_warning_bytes",
        "outbox_operator_slot_lag_critical_bytes",
    ] {
        assert!(exported.contains_key(name), "the operator does not export {name}");
    }
}

#[test]
fn promtool_passes_the_rule_tests() {
    let promtool = tool("promtool");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.yaml"), chart_rules()).expect("write rules");
    let cases = dir.path().join("operator-rules.test.yaml");
    std::fs::copy(CASES, &cases).expect("copy cases");

    run(
        "promtool check rules",
        std::process::Command::new(&promtool)
            .args(["check", "rules"])
            .arg(dir.path().join("rules.yaml")),
    );
    let out = run(
        "promtool test rules",
        std::process::Command::new(&promtool)
            .args(["test", "rules"])
            .arg(&cases),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The cases can fail: with a fixed 1 GiB lag threshold (the rule before relays'
/// own thresholds) promtool reports the big-budget relay's alert.
#[test]
fn promtool_fails_a_rule_with_a_fixed_threshold() {
    let promtool = tool("promtool");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = chart_rules().replace(
        "outbox_operator_slot_lag_bytes >= outbox_operator_slot_lag_warning_bytes",
        "outbox_operator_slot_lag_bytes > 1073741824",
    );
    assert!(
        rules.contains("> 1073741824"),
        "the lag rule's expression changed: {rules}"
    );
    std::fs::write(dir.path().join("rules.yaml"), rules).expect("write rules");
    let cases = dir.path().join("operator-rules.test.yaml");
    std::fs::copy(CASES, &cases).expect("copy cases");
    let (ok, stdout, stderr) = output(
        "promtool test rules",
        std::process::Command::new(&promtool)
            .args(["test", "rules"])
            .arg(&cases),
    );
    assert!(!ok, "promtool accepted a fixed threshold:\n{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("billing"),
        "the failure should name the big-budget relay:\n{stdout}\n{stderr}"
    );
}
