//! The spec reference (`docs/spec-reference.md`), generated from the CRD's OpenAPI
//! schema, so every field, type, default and validation the API server enforces is
//! documented exactly as enforced. `outbox-operator spec-reference` prints it; a test
//! fails when the checked-in file drifts.

use std::fmt::Write as _;

use kube::CustomResourceExt;
use serde_json::Value;

use super::OutboxRelay;

/// The reference page as Markdown.
pub fn spec_reference() -> String {
    let crd = serde_json::to_value(OutboxRelay::crd()).unwrap_or_default();
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# OutboxRelay spec reference\n\n\
         <!-- Generated from the CRD schema by `cargo run -- spec-reference > docs/spec-reference.md`; \
         tests/spec_reference.rs fails when it drifts. Do not edit by hand. -->\n\n\
         `{}/{}`, kind `{}` (short name `{}`), namespaced. Every field below is checked by the \
         API server as listed under *validation*; a field without a default is optional unless \
         marked **required**.\n",
        crd["spec"]["group"].as_str().unwrap_or_default(),
        version["name"].as_str().unwrap_or_default(),
        crd["spec"]["names"]["kind"].as_str().unwrap_or_default(),
        crd["spec"]["names"]["shortNames"][0].as_str().unwrap_or_default(),
    );
    let spec = &schema["properties"]["spec"];
    let _ = writeln!(out, "## Rules across fields\n");
    for (path, node) in [("spec", spec)]
        .into_iter()
        .chain(objects(spec, "spec").iter().map(|(p, n)| (p.as_str(), *n)))
    {
        for rule in node["x-kubernetes-validations"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "- `{path}`: {} (`{}`)",
                text(&rule["message"]),
                rule["rule"].as_str().unwrap_or_default().replace('`', "'")
            );
        }
    }
    let _ = writeln!(
        out,
        "\n## Fields\n\n| field | type | default | validation | description |\n|---|---|---|---|---|"
    );
    rows(&mut out, spec, "spec");
    out
}

/// Every object node under `node` with its path, depth first.
fn objects<'a>(node: &'a Value, path: &str) -> Vec<(String, &'a Value)> {
    let mut found = Vec::new();
    for (name, child) in properties(node) {
        let p = format!("{path}.{name}");
        let child = items_or_self(child, &p);
        if child.1.get("properties").is_some() {
            found.push((child.0.clone(), child.1));
            found.extend(objects(child.1, &child.0));
        }
    }
    found
}

fn properties(node: &Value) -> Vec<(&String, &Value)> {
    node["properties"]
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default()
}

/// An array's item schema (with `[]` in the path), or the node itself.
fn items_or_self<'a>(node: &'a Value, path: &str) -> (String, &'a Value) {
    if node["type"] == "array" && node.get("items").is_some() {
        (format!("{path}[]"), &node["items"])
    } else {
        (path.to_string(), node)
    }
}

fn rows(out: &mut String, node: &Value, path: &str) {
    let required: Vec<&str> = node["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, child) in properties(node) {
        let p = format!("{path}.{name}");
        let mut checks = validation(child);
        if required.contains(&name.as_str()) {
            checks.insert(0, "**required**".to_string());
        }
        let _ = writeln!(
            out,
            "| `{p}` | {} | {} | {} | {} |",
            type_of(child),
            child.get("default").map(|d| format!("`{d}`")).unwrap_or_default(),
            checks.join("; "),
            text(&child["description"]),
        );
        let (inner_path, inner) = items_or_self(child, &p);
        if inner.get("properties").is_some() {
            rows(out, inner, &inner_path);
        }
    }
}

fn type_of(node: &Value) -> String {
    if node.get("x-kubernetes-int-or-string").is_some() {
        return "integer or string".into();
    }
    match node["type"].as_str() {
        Some("array") => format!("array of {}", type_of(&node["items"])),
        Some("object") => match node.get("additionalProperties") {
            Some(v) if v.is_object() => format!("map of {}", type_of(v)),
            _ => "object".into(),
        },
        Some(t) => node["format"]
            .as_str()
            .map(|f| format!("{t} ({f})"))
            .unwrap_or_else(|| t.to_string()),
        None if node.get("anyOf").is_some() || node.get("oneOf").is_some() => "one of several shapes".into(),
        None => "any".into(),
    }
}

fn validation(node: &Value) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(e) = node["enum"].as_array() {
        let values: Vec<String> = e
            .iter()
            .map(|x| format!("`{}`", x.as_str().unwrap_or_default()))
            .collect();
        v.push(format!("one of {}", values.join(", ")));
    }
    for (key, what) in [
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("minItems", "items ≥"),
        ("maxItems", "items ≤"),
    ] {
        if let Some(n) = node.get(key) {
            // schemars writes bounds as floats; integers read better without ".0".
            let n = match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
                _ => n.to_string(),
            };
            v.push(format!("{what} {n}"));
        }
    }
    if let Some(p) = node["pattern"].as_str() {
        v.push(format!("pattern `{}`", p.replace('|', "\\|")));
    }
    if node["nullable"] == true {
        v.push("nullable".into());
    }
    if node["x-kubernetes-validations"].is_array() {
        v.push("rules below".into());
    }
    v
}

/// A description as one table cell.
fn text(v: &Value) -> String {
    v.as_str()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_fields_with_type_default_and_validation() {
        let r = spec_reference();
        let row = |field: &str| {
            r.lines()
                .find(|l| l.starts_with(&format!("| `{field}` |")))
                .unwrap_or_else(|| panic!("no row for {field} in\n{r}"))
                .to_string()
        };
        assert!(
            row("spec.database.port").contains("`5432`"),
            "{}",
            row("spec.database.port")
        );
        assert!(row("spec.database.port").contains("≤ 65535"));
        assert!(row("spec.database.tls.mode").contains("`VerifyFull`"));
        assert!(row("spec.database.host").contains("**required**"));
        assert!(row("spec.replication.slotName").contains("pattern"));
        assert!(row("spec.database.tls.allowCleartextPassword").contains("boolean"));
        assert!(r.contains("warningBytes must be below criticalBytes"), "{r}");
    }
}
