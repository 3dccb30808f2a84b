//! The commands that do not serve: `policy check`, `policy test` and `token mint`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;

use super::shared::{EXIT_CONFIG, options, print_errors};
use crate::policy::compile::driver::process_env;
use crate::policy::{PolicyErrors, PolicySource, compile, testing};

/// `wsgate policy test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The policy directory.
    pub dir: PathBuf,
    /// Also write the results as JUnit XML to this file.
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

pub(crate) fn policy_check(dir: &Path) -> ExitCode {
    match PolicySource::read_dir(dir).and_then(|source| compile(&source, &options())) {
        Ok(policy) => {
            println!(
                "policy ok: {} files, {} message types, {} connect rules, sha256 {}",
                policy.sources.len(),
                policy.messages.types.len(),
                policy.auth.rules.len(),
                policy.content_hash
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(&errors);
            ExitCode::from(1)
        }
    }
}

pub(crate) fn policy_test(args: &TestArgs) -> ExitCode {
    let source = match PolicySource::read_dir(&args.dir) {
        Ok(s) => s,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::from(1);
        }
    };
    let policy = match compile(&source, &options()) {
        Ok(p) => Arc::new(p),
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::from(1);
        }
    };
    let report = match testing::run(&policy, &source.tests) {
        Ok(r) => r,
        Err(errors) => {
            print_errors(&PolicyErrors(errors));
            return ExitCode::from(1);
        }
    };
    for case in &report.cases {
        if let Some(f) = &case.failure {
            println!("FAIL {}: {}\n     {f}", case.file, case.name);
        }
    }
    if let Some(path) = &args.junit
        && let Err(e) = std::fs::write(path, report.junit())
    {
        eprintln!("cannot write {}: {e}", path.display());
        return ExitCode::from(1);
    }
    if report.cases.is_empty() {
        println!("no test cases in {}", args.dir.join("tests").display());
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    if report.failed() == 0 && !report.cases.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

pub(crate) fn token_mint(sub: &str, ttl: Duration, claims: &[(String, String)]) -> ExitCode {
    let Some(secret) = process_env("WSGATE_JWT_SECRET").filter(|s| !s.is_empty()) else {
        eprintln!("WSGATE_JWT_SECRET is not set");
        return ExitCode::from(EXIT_CONFIG);
    };
    match crate::token::mint(secret.as_bytes(), sub, ttl, claims, SystemTime::now()) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
