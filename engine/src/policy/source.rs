//! Reading a policy directory from disk: which files are part of a policy and which are not.
//!
//! A policy directory holds policy documents (`*.yaml` at its top), JSON Schemas
//! (`schemas/*.json`) and policy tests (`tests/*.yaml`). Dot-files and editor leftovers
//! (`*~`, `#*#`, `*.swp`, `*.tmp`, vim's `4913`) are ignored, so a half-saved file never becomes
//! part of a policy. Reading is separate from compiling so that tests can compile a policy
//! held in memory.
//!
//! Every file read must resolve inside the directory: a symbolic link that leads out of it is
//! refused unread (its contents would otherwise be parsed, and quoted in errors, with the
//! server's rights). Links that stay inside are followed, as a Kubernetes ConfigMap volume
//! needs (`policy.yaml -> ..data/policy.yaml`, `..data -> ..2026_12_04…`). Key files named by
//! the policy (`public_key_file`, `jwks_file`) are not part of the scan and may live anywhere.

use std::path::{Path, PathBuf};

use super::error::{PolicyError, PolicyErrors};

/// Largest policy, schema or test file read (a policy is configuration, not data).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most files of one kind read from a policy directory.
pub const MAX_FILES: usize = 256;

/// One file of a policy directory, read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Path relative to the policy directory, with `/` separators (`schemas/publish.json`).
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// The files of a policy directory, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    /// The directory, for resolving key files named by the policy.
    pub dir: PathBuf,
    /// `*.yaml` policy documents at the top, sorted by name.
    pub documents: Vec<SourceFile>,
    /// `schemas/*.json`, sorted by name.
    pub schemas: Vec<SourceFile>,
    /// `tests/*.yaml`, sorted by name.
    pub tests: Vec<SourceFile>,
}

impl PolicySource {
    /// Reads a policy directory. Fails when the directory cannot be read, a file is too large
    /// or not UTF-8, or a `.yml` file stands where only `.yaml` is read.
    pub fn read_dir(dir: &Path) -> Result<PolicySource, PolicyErrors> {
        let mut errors = Vec::new();
        // Resolved once: every file must resolve under it. When the directory cannot be
        // resolved, reading it fails below with the reason.
        let root = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let documents = read_files(&root, dir, "", "yaml", &mut errors);
        let schemas = read_files(&root, &dir.join("schemas"), "schemas/", "json", &mut errors);
        let tests = read_files(&root, &dir.join("tests"), "tests/", "yaml", &mut errors);
        if documents.is_empty() && errors.is_empty() {
            errors.push(dir_error(dir, "no policy documents (*.yaml) in this directory"));
        }
        if errors.is_empty() {
            Ok(PolicySource { dir: dir.to_path_buf(), documents, schemas, tests })
        } else {
            Err(PolicyErrors(errors))
        }
    }
}

fn dir_error(dir: &Path, message: impl Into<String>) -> PolicyError {
    PolicyError { file: dir.display().to_string(), line: 0, col: 0, path: String::new(), message: message.into() }
}

/// Whether a file name is an editor's temporary or backup file, or hidden.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with('#')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || name == "4913"
}

fn read_files(root: &Path, dir: &Path, prefix: &str, ext: &str, errors: &mut Vec<PolicyError>) -> Vec<SourceFile> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Optional subdirectories (schemas/, tests/) may be absent.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !prefix.is_empty() => return Vec::new(),
        Err(e) => {
            errors.push(dir_error(dir, format!("cannot read directory: {e}")));
            return Vec::new();
        }
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_ignored_name(&name) {
            continue;
        }
        let path = entry.path();
        let is_file = entry.file_type().map(|t| t.is_file() || t.is_symlink()).unwrap_or(false) && path.is_file();
        if !is_file {
            continue;
        }
        let rel = format!("{prefix}{name}");
        if ext == "yaml" && name.ends_with(".yml") {
            errors.push(file_error(
                &rel,
                "policy files must end in .yaml; rename this file so it is not silently ignored",
            ));
            continue;
        }
        if !name.ends_with(&format!(".{ext}")) {
            continue;
        }
        // The file read is the resolved one, so what was checked is what is read.
        let resolved = match std::fs::canonicalize(&path) {
            Ok(resolved) if resolved.starts_with(root) => resolved,
            Ok(_) => {
                errors.push(file_error(&rel, OUTSIDE));
                continue;
            }
            Err(e) => {
                errors.push(file_error(&rel, format!("cannot read: {e}")));
                continue;
            }
        };
        match read_bounded(&resolved) {
            Ok(text) => files.push(SourceFile { name: rel, text }),
            Err(message) => errors.push(file_error(&rel, message)),
        }
    }
    if files.len() > MAX_FILES {
        errors.push(dir_error(dir, format!("{} files; at most {MAX_FILES} are read", files.len())));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

/// Why a file that links out of the policy directory is not read. The target is not named: the
/// link and its place in the directory are what the operator acts on.
const OUTSIDE: &str = "resolves outside the policy directory (a symbolic link out of it): policy documents, \
                       schemas and tests must live inside the directory; only key files may live elsewhere";

fn file_error(file: &str, message: impl Into<String>) -> PolicyError {
    PolicyError { file: file.to_string(), line: 0, col: 0, path: String::new(), message: message.into() }
}

/// Reads a file of at most [`MAX_FILE_BYTES`] as UTF-8. The bound holds while reading, not
/// only by the size the file system reports: `/dev/zero` says 0 and never ends.
pub fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    // Only regular files: opening a FIFO blocks forever, and a device never ends.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("file is larger than {MAX_FILE_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| "file is not UTF-8".to_string())
}
