//! Finds the checking tools `hack/tools` builds (promtool, luahealth) and helm from
//! the test bed's components, failing loudly with the command that provides them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/outbox-operator");

/// `$OUTBOX_TOOLS_CACHE/bin/NAME`, else `.cache/tools/bin/NAME` in the repository.
pub fn tool(name: &str) -> PathBuf {
    let cache = std::env::var_os("OUTBOX_TOOLS_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(REPO).join(".cache").join("tools"));
    let path = cache.join("bin").join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: run `hack/tools` to build it (OUTBOX_TOOLS_CACHE selects another cache)",
        path.display()
    );
    path
}

/// The test bed's helm, without starting any server.
pub fn helm() -> Command {
    let c = outbox_testbed::Components::locate().unwrap_or_else(|e| panic!("{e}"));
    Command::new(c.helm)
}

/// Runs the command; returns (success, stdout, stderr).
pub fn output(what: &str, cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the command and returns its stdout; fails the test with its output otherwise.
pub fn run(what: &str, cmd: &mut Command) -> String {
    let (ok, stdout, stderr) = output(what, cmd);
    assert!(ok, "{what} failed:\n{stdout}\n{stderr}");
    stdout
}

/// The chart's rule groups as a plain Prometheus rules file. Descriptions without a
/// template are dropped: they are prose, and repeating them in every case would test
/// nothing but copying; summaries (templated) stay and are compared.
pub fn chart_rules() -> String {
    let yaml = run(
        "helm template",
        helm().args([
            "template",
            "outbox-operator",
            CHART,
            "--set",
            "prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ]),
    );
    let rule: Value = serde_norway::from_str(&yaml).expect("the PrometheusRule parses");
    let mut groups = rule["spec"]["groups"].clone();
    for group in groups.as_array_mut().expect("groups") {
        for r in group["rules"].as_array_mut().expect("rules") {
            if let Some(a) = r["annotations"].as_object_mut()
                && a.get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.contains("{{"))
            {
                a.remove("description");
            }
        }
    }
    serde_norway::to_string(&serde_json::json!({ "groups": groups })).expect("rules serialize")
}
