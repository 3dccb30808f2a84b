//! The files operators deploy with (`deploy/`): the Prometheus alerts and the Grafana dashboard
//! parse, have the shape their tools need, and name only metrics wsgate exports.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use wsgate::metrics::NAMES;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

/// Every `wsgate_*` metric an expression names, histogram series folded to their metric.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("wsgate_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
            .unwrap_or(&name);
        found.insert(base.to_string());
    }
    found
}

fn assert_known(exprs: &[String], file: &str) {
    let mut named = BTreeSet::new();
    for e in exprs {
        let found = metrics_in(e);
        assert!(!found.is_empty(), "{file}: `{e}` names no wsgate metric");
        named.extend(found);
    }
    for name in &named {
        assert!(NAMES.contains(&name.as_str()), "{file} names {name}, which wsgate does not export");
    }
}

#[test]
fn the_alert_rules_parse_and_name_only_exported_metrics() {
    let doc: Value = serde_saphyr::from_str(&repo("deploy/prometheus/alerts.yml")).unwrap();
    let mut exprs = Vec::new();
    let mut alerts = Vec::new();
    for group in doc["groups"].as_array().expect("groups") {
        assert!(group["name"].is_string());
        for rule in group["rules"].as_array().expect("rules") {
            let alert = rule["alert"].as_str().expect("every rule is an alert");
            assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
            assert!(rule["annotations"]["summary"].is_string(), "{alert}: summary");
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
            alerts.push(alert.to_string());
        }
    }
    // The alerts the operations issue asks for.
    for required in
        ["WsgateConnectionSpike", "WsgatePolicyReloadFailed", "WsgateRedisDown", "WsgateHighMessageRejectionRatio"]
    {
        assert!(alerts.iter().any(|a| a == required), "missing alert {required}");
    }
    assert_known(&exprs, "alerts.yml");
}

#[test]
fn the_dashboard_parses_and_names_only_exported_metrics() {
    let doc: Value = serde_json::from_str(&repo("deploy/grafana/wsgate.json")).unwrap();
    let mut exprs = Vec::new();
    let mut titles = Vec::new();
    for panel in doc["panels"].as_array().expect("panels") {
        titles.push(panel["title"].as_str().expect("title").to_string());
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    let all = exprs.join("\n");
    for needed in [
        "wsgate_connections_active",
        "wsgate_messages_received_total",
        "wsgate_messages_rejected_total",
        "wsgate_connection_duration_seconds",
        "wsgate_policy_reloads_total",
    ] {
        assert!(all.contains(needed), "the dashboard shows no {needed}");
    }
    assert_known(&exprs, "wsgate.json");
}

#[test]
fn the_name_finder_finds_names() {
    let found =
        metrics_in("histogram_quantile(0.9, rate(wsgate_pipeline_duration_seconds_bucket[5m])) / wsgate_x_count");
    assert_eq!(found.into_iter().collect::<Vec<_>>(), vec!["wsgate_pipeline_duration_seconds", "wsgate_x_count"]);
}
