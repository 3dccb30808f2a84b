//! Shared helpers for the engine's integration tests: copies of the default policy to break.

#![allow(dead_code)]

pub mod inproc;
pub mod proxy;
pub mod redis;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A secret long enough for the default policy.
pub const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

/// The repository's default policy directory.
pub fn default_policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// A temporary copy of the default policy directory (documents, schemas, tests).
pub struct PolicyCopy {
    pub dir: tempfile::TempDir,
}

impl PolicyCopy {
    pub fn new() -> PolicyCopy {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = default_policy_dir();
        for sub in ["", "schemas", "tests"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            for entry in std::fs::read_dir(src.join(sub)).unwrap().flatten() {
                if entry.path().is_file() {
                    std::fs::copy(entry.path(), dir.path().join(sub).join(entry.file_name())).unwrap();
                }
            }
        }
        PolicyCopy { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path().join(file)).unwrap()
    }

    pub fn write(&self, file: &str, text: &str) {
        std::fs::write(self.path().join(file), text).unwrap();
    }

    /// Replaces the one occurrence of `from` in `file` with `to`; returns the 1-based line
    /// where it stood.
    pub fn replace(&self, file: &str, from: &str, to: &str) -> usize {
        let text = self.read(file);
        assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once in {file}");
        let at = text.find(from).unwrap();
        let line = text[..at].lines().count() + usize::from(text[..at].ends_with('\n') || at == 0);
        self.write(file, &text.replacen(from, to, 1));
        line.max(1)
    }
}

/// Runs the real `wsgate` binary with the test secret in its environment.
pub fn wsgate(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(args).env("WSGATE_JWT_SECRET", SECRET);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd)
}

/// Runs the real `wsgate` binary with no secret in its environment.
pub fn wsgate_without_secret(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(args).env_remove("WSGATE_JWT_SECRET");
    run(cmd)
}

fn run(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("run wsgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
