//! `policies/policy.schema.json` is generated from the Rust types; these tests keep the
//! committed copy in sync and check that real policy files validate against it.

mod common;

use std::path::Path;

fn committed_schema() -> String {
    std::fs::read_to_string(common::default_policy_dir().join("policy.schema.json")).unwrap()
}

#[test]
fn the_committed_schema_matches_the_types() {
    let generated = wsgate::policy::model::policy_json_schema();
    assert!(
        committed_schema() == generated,
        "policies/policy.schema.json is stale: run `cargo run -p wsgate -- policy schema > policies/policy.schema.json`"
    );
}

fn policy_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && name == "examples" {
            for example in std::fs::read_dir(&path).unwrap().flatten() {
                if example.path().is_dir() {
                    policy_files(&example.path(), out);
                }
            }
        } else if path.is_file() && name.ends_with(".yaml") && !name.starts_with('.') {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_policy_document_validates_against_the_schema() {
    let schema: serde_json::Value = serde_json::from_str(&committed_schema()).unwrap();
    let validator =
        jsonschema::options().offline().build(&schema).expect("the generated schema is a valid JSON Schema");
    let mut files = Vec::new();
    policy_files(&common::default_policy_dir(), &mut files);
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let errors: Vec<String> =
            validator.iter_errors(&doc).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", file.display());
    }
}

#[test]
fn the_schema_rejects_a_misspelt_key() {
    let schema: serde_json::Value = serde_json::from_str(&committed_schema()).unwrap();
    let validator = jsonschema::options().offline().build(&schema).unwrap();
    let doc = serde_json::json!({"version": 1, "connections": {"max_per_usr": 1}});
    assert!(!validator.is_valid(&doc));
}
