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
//! needs (`policy.yaml -> ..data/policy.yaml`, `..data -> ..2026_12_04…`); there every name that
//! leads through `..data` is read from the one version `..data` named when the read began
//! ([`Generation`]). Key files named by
//! the policy (`public_key_file`, `jwks_file`) are not part of the scan and may live anywhere.

use std::path::{Path, PathBuf};

use super::error::{PolicyError, PolicyErrors};

/// Largest policy, schema or test file read (a policy is configuration, not data).
pub(crate) const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most files of one kind read from a policy directory.
pub(crate) const MAX_FILES: usize = 256;

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
        let generation = Generation::resolve(dir, &root);
        let documents = read_files(&root, &generation, dir, "", "yaml", &mut errors);
        let schemas = read_files(&root, &generation, &dir.join("schemas"), "schemas/", "json", &mut errors);
        let tests = read_files(&root, &generation, &dir.join("tests"), "tests/", "yaml", &mut errors);
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

/// In a Kubernetes ConfigMap volume, the version directory `..data` linked to when a read
/// began. The kubelet writes each new version of the ConfigMap into a new timestamped directory
/// and swaps `..data` to it with one rename; the names an operator sees
/// (`policy.yaml -> ..data/policy.yaml`, `schemas -> ..data/schemas`) are links through it.
/// Each such name resolved on its own could mix the old `policy.yaml` with the new schemas when
/// a swap lands between two files, so a name whose link leads through `..data` is read from this
/// one version instead. Names that are files of their own are read as they are. A swap that
/// removes the version while it is being read fails this read, and its events bring the next.
struct Generation {
    /// `<dir>/..data`, lexically normalised, as links name it.
    link: PathBuf,
    /// The version directory it named, when it is one inside the policy directory.
    target: Option<PathBuf>,
}

impl Generation {
    fn resolve(dir: &Path, root: &Path) -> Generation {
        let link = normalise(&dir.join("..data"));
        let is_link = std::fs::symlink_metadata(&link).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        let target = is_link
            .then(|| std::fs::canonicalize(&link).ok())
            .flatten()
            .filter(|target| target.starts_with(root) && target != root && target.is_dir());
        Generation { link, target }
    }

    /// Where `path` is read from: inside the version when `path` is a link that leads through
    /// `..data`, else `path` itself.
    fn locate(&self, path: &Path) -> PathBuf {
        let Some(target) = &self.target else { return path.to_path_buf() };
        let Ok(to) = std::fs::read_link(path) else { return path.to_path_buf() };
        let through = normalise(&path.parent().unwrap_or(Path::new("")).join(to));
        match through.strip_prefix(&self.link) {
            Ok(rest) => target.join(rest),
            Err(_) => path.to_path_buf(),
        }
    }
}

/// `path` with `.` and `name/..` removed without touching the file system, as a link's text is
/// read relative to the directory holding it.
fn normalise(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn dir_error(dir: &Path, message: impl Into<String>) -> PolicyError {
    PolicyError { file: dir.display().to_string(), line: 0, col: 0, path: String::new(), message: message.into() }
}

/// Whether a file name is an editor's temporary or backup file, or hidden.
pub(crate) fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with('#')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || name == "4913"
}

fn read_files(
    root: &Path,
    generation: &Generation,
    dir: &Path,
    prefix: &str,
    ext: &str,
    errors: &mut Vec<PolicyError>,
) -> Vec<SourceFile> {
    // A subdirectory that is itself a link through `..data` is listed inside the version.
    let listed = if prefix.is_empty() { dir.to_path_buf() } else { generation.locate(dir) };
    let entries = match std::fs::read_dir(&listed) {
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
        let path = generation.locate(&entry.path());
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
pub(crate) fn read_bounded(path: &Path) -> Result<String, String> {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Version `name` of a ConfigMap volume in `dir`, holding `policy.yaml` and `schemas/a.json`.
    fn version(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join(name).join("schemas")).unwrap();
        std::fs::write(dir.join(name).join("policy.yaml"), text).unwrap();
        std::fs::write(dir.join(name).join("schemas/a.json"), format!("{{\"title\": \"{name}\"}}")).unwrap();
    }

    #[test]
    fn names_through_the_data_link_are_read_from_the_version_it_names() {
        let dir = tempfile::tempdir().unwrap();
        version(dir.path(), "..2026_12_05_01.1", "old: 1\n");
        version(dir.path(), "..2026_12_05_02.2", "new: 2\n");
        symlink("..2026_12_05_02.2", dir.path().join("..data")).unwrap();
        symlink("./..data/policy.yaml", dir.path().join("policy.yaml")).unwrap();
        symlink("..data/schemas", dir.path().join("schemas")).unwrap();
        let source = PolicySource::read_dir(dir.path()).unwrap();
        assert_eq!(source.documents, vec![SourceFile { name: "policy.yaml".into(), text: "new: 2\n".into() }]);
        assert_eq!(source.schemas.len(), 1);
        assert!(source.schemas[0].text.contains("..2026_12_05_02.2"), "{:?}", source.schemas);
        assert_eq!(source.dir, dir.path(), "key files still resolve against the directory itself");
    }

    #[test]
    fn files_of_their_own_beside_a_data_link_are_read_too() {
        let dir = tempfile::tempdir().unwrap();
        version(dir.path(), "..2026_12_05_01.1", "linked: 1\n");
        symlink("..2026_12_05_01.1", dir.path().join("..data")).unwrap();
        symlink("..data/policy.yaml", dir.path().join("policy.yaml")).unwrap();
        std::fs::write(dir.path().join("own.yaml"), "own: 1\n").unwrap();
        std::fs::create_dir(dir.path().join("schemas")).unwrap();
        std::fs::write(dir.path().join("schemas/b.json"), "{}").unwrap();
        symlink("../..data/schemas/a.json", dir.path().join("schemas/a.json")).unwrap();
        let source = PolicySource::read_dir(dir.path()).unwrap();
        let names = |files: &[SourceFile]| files.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&source.documents), ["own.yaml", "policy.yaml"]);
        assert_eq!(names(&source.schemas), ["schemas/a.json", "schemas/b.json"]);
    }

    #[test]
    fn lexical_normalising_drops_dots_and_the_names_they_undo() {
        assert_eq!(normalise(Path::new("/p/schemas/../..data/x")), Path::new("/p/..data/x"));
        assert_eq!(normalise(Path::new("/p/./..data")), Path::new("/p/..data"));
        assert_eq!(normalise(Path::new("../a")), Path::new("../a"));
    }

    #[test]
    fn a_data_link_out_of_the_directory_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("policy.yaml"), "leak: 1\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "own: 1\n").unwrap();
        symlink(outside.path(), dir.path().join("..data")).unwrap();
        let source = PolicySource::read_dir(dir.path()).unwrap();
        assert_eq!(source.documents[0].text, "own: 1\n");
    }
}
