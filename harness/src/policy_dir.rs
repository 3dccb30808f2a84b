//! A server's private policy directory: a temporary copy of the repository's `policies/`, with
//! a scenario's overrides deep-merged into `policy.yaml` and its extra files written beside it.
//! Each server gets its own copy so scenarios running side by side never see each other's
//! policy, and `edit_policy` can rewrite one server's policy while it runs.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// The policy document that overrides are merged into.
pub const POLICY_FILE: &str = "policy.yaml";

/// Deep-merges `overrides` into `base`: mappings merge key by key, recursively; any other value
/// (scalar, list, `null`) replaces what was there.
pub fn deep_merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// One server's policy directory, removed when dropped.
#[derive(Debug)]
pub struct PolicyDir {
    /// Owns the directory's lifetime: dropping it deletes the copy.
    dir: tempfile::TempDir,
    /// `policy.yaml` as it stands now (base + every override so far), so `edit_policy` can
    /// merge further changes on top.
    effective: Value,
    /// `policy.yaml` as the repository ships it, for `edit_policy` with `replace: true`.
    base: Value,
}

impl PolicyDir {
    /// Copies `source` (everything but its `examples/` directory, which the server never reads)
    /// into a new temporary directory, merges `overrides` into its `policy.yaml` and writes
    /// `files` (relative path → content).
    pub fn create(source: &Path, overrides: Option<&Value>, files: &[(String, String)]) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("wsgate-policy-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary policy directory: {e}"))?;
        copy_tree(source, dir.path(), true).map_err(|e| format!("cannot copy {}: {e}", source.display()))?;
        let base = read_policy(&dir.path().join(POLICY_FILE))?;
        let mut this = PolicyDir { dir, effective: base.clone(), base };
        this.apply(overrides, files, false)?;
        Ok(this)
    }

    /// The directory to pass as `--policies`.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The policy document as it is now written.
    #[cfg(test)]
    pub fn effective(&self) -> &Value {
        &self.effective
    }

    /// Merges `overrides` into the current policy (or into the repository's one with `replace`),
    /// writes `files`, and rewrites `policy.yaml`. Each file is replaced atomically (written
    /// beside it, then renamed) so a watching server never reads half a file.
    pub fn apply(
        &mut self,
        overrides: Option<&Value>,
        files: &[(String, String)],
        replace: bool,
    ) -> Result<(), String> {
        for (rel, content) in files {
            let target = self.dir.path().join(checked_relative(rel)?);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            write_atomically(&target, content.as_bytes())?;
        }
        if replace {
            self.effective = self.base.clone();
        }
        if let Some(over) = overrides {
            if !over.is_object() {
                return Err("`policy` overrides must be a mapping".into());
            }
            deep_merge(&mut self.effective, over);
        }
        // JSON is YAML: writing JSON keeps the merge exact (no re-quoting questions).
        let text = serde_json::to_string_pretty(&self.effective).map_err(|e| e.to_string())? + "\n";
        write_atomically(&self.dir.path().join(POLICY_FILE), text.as_bytes())
    }
}

/// Refuses absolute paths and `..` so a scenario's `files:` stay inside the policy directory.
fn checked_relative(rel: &str) -> Result<PathBuf, String> {
    let path = Path::new(rel);
    if rel.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("file name `{rel}` must be a relative path inside the policy directory"));
    }
    Ok(path.to_path_buf())
}

fn read_policy(path: &Path) -> Result<Value, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: Value = serde_saphyr::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    if !value.is_object() {
        return Err(format!("{} is not a mapping", path.display()));
    }
    Ok(value)
}

fn write_atomically(target: &Path, content: &[u8]) -> Result<(), String> {
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A leading dot: the server ignores hidden files, so the temporary is never read as policy.
    let tmp = target.with_file_name(format!(".{name}.harness-tmp"));
    fs::write(&tmp, content).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, target).map_err(|e| format!("cannot replace {}: {e}", target.display()))
}

fn copy_tree(from: &Path, to: &Path, top: bool) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if top && name == "examples" {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name), false)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mappings_merge_recursively() {
        let mut base = json!({"connections": {"max_per_ip": 100, "heartbeat": {"interval": "30s", "timeout": "10s"}}});
        deep_merge(&mut base, &json!({"connections": {"heartbeat": {"timeout": "1s"}}}));
        assert_eq!(
            base,
            json!({"connections": {"max_per_ip": 100, "heartbeat": {"interval": "30s", "timeout": "1s"}}})
        );
    }

    #[test]
    fn scalars_lists_and_null_replace() {
        let mut base = json!({"origins": {"allowed": ["*", "x"]}, "auth": {"jwt": {"issuer": "a", "leeway": "5s"}}});
        deep_merge(
            &mut base,
            &json!({"origins": {"allowed": ["https://app.example.com"]}, "auth": {"jwt": {"issuer": null}}}),
        );
        assert_eq!(base["origins"]["allowed"], json!(["https://app.example.com"]));
        assert_eq!(base["auth"]["jwt"], json!({"issuer": null, "leeway": "5s"}));
    }

    #[test]
    fn a_mapping_replaces_a_scalar_and_new_keys_are_added() {
        let mut base = json!({"a": 1});
        deep_merge(&mut base, &json!({"a": {"b": 2}, "c": [1]}));
        assert_eq!(base, json!({"a": {"b": 2}, "c": [1]}));
    }

    fn fixture() -> tempfile::TempDir {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("policy.yaml"), "version: 1\nconnections:\n  max_per_ip: 100\n").unwrap();
        fs::create_dir_all(src.path().join("schemas")).unwrap();
        fs::write(src.path().join("schemas/ping.json"), "{}").unwrap();
        fs::create_dir_all(src.path().join("examples/x")).unwrap();
        fs::write(src.path().join("examples/x/policy.yaml"), "version: 1\n").unwrap();
        src
    }

    #[test]
    fn creates_a_merged_copy_without_examples() {
        let src = fixture();
        let files = vec![("schemas/boom.json".to_string(), "{\"type\":\"object\"}".to_string())];
        let dir = PolicyDir::create(src.path(), Some(&json!({"connections": {"max_per_ip": 1}})), &files).unwrap();
        assert!(dir.path().join("schemas/ping.json").is_file());
        assert!(!dir.path().join("examples").exists());
        assert_eq!(fs::read_to_string(dir.path().join("schemas/boom.json")).unwrap(), "{\"type\":\"object\"}");
        let written: Value = serde_json::from_str(&fs::read_to_string(dir.path().join(POLICY_FILE)).unwrap()).unwrap();
        assert_eq!(written, json!({"version": 1, "connections": {"max_per_ip": 1}}));
        assert_eq!(fs::read_to_string(src.path().join("policy.yaml")).unwrap().lines().count(), 3, "source untouched");
    }

    #[test]
    fn edits_accumulate_unless_replaced() {
        let src = fixture();
        let mut dir = PolicyDir::create(src.path(), Some(&json!({"origins": {"allowed": ["*"]}})), &[]).unwrap();
        dir.apply(Some(&json!({"connections": {"max_per_ip": 7}})), &[], false).unwrap();
        assert_eq!(dir.effective()["origins"]["allowed"], json!(["*"]));
        assert_eq!(dir.effective()["connections"]["max_per_ip"], json!(7));
        dir.apply(None, &[], true).unwrap();
        assert_eq!(dir.effective(), &json!({"version": 1, "connections": {"max_per_ip": 100}}));
    }

    #[test]
    fn files_must_stay_inside() {
        let src = fixture();
        for bad in ["/etc/passwd", "../x.json", "schemas/../../x", ""] {
            let files = vec![(bad.to_string(), String::new())];
            assert!(PolicyDir::create(src.path(), None, &files).is_err(), "{bad}");
        }
    }
}
