//! The command line (SPEC §2): `serve`, and the commands that do not serve — `policy check`,
//! `policy test`, `policy schema` and `token mint`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};

use crate::policy::compile::process_env;
use crate::policy::{CompileOptions, PolicyErrors, PolicySource, compile, testing, units};

/// Exit status for a command-line or configuration error (sysexits' EX_USAGE / EX_CONFIG
/// family): a refused policy, a missing key.
pub const EXIT_CONFIG: u8 = 64;

/// wsgate: a WebSocket gateway whose security is policy, not code.
#[derive(Debug, Parser)]
#[command(name = "wsgate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<crate::startup::ServeArgs>),
    /// Check or test a policy directory.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Tokens for development and tests.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `wsgate policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and compile everything; exit 1 with file:line:col errors.
    Check {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Run the policy tests in DIR/tests; prints "N passed, N failed".
    Test(TestArgs),
    /// Print the JSON Schema of the policy file format.
    Schema,
}

/// `wsgate policy test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The policy directory.
    pub dir: PathBuf,
    /// Also write the results as JUnit XML to this file.
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

/// `wsgate token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint an HS256 token with the secret in WSGATE_JWT_SECRET.
    Mint {
        /// The subject (user id).
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 15m, 1h.
        #[arg(long, default_value = "15m", value_parser = parse_ttl)]
        ttl: Duration,
        /// Extra claims, `key=value`; values that are JSON are used as JSON (roles=["a"]).
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
    },
}

pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    units::parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration (e.g. 15m, 1h)"))
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}` is not key=value"))
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => crate::startup::run(*args),
        Command::Policy(PolicyCommand::Check { dir }) => policy_check(&dir),
        Command::Policy(PolicyCommand::Test(args)) => policy_test(&args),
        Command::Policy(PolicyCommand::Schema) => {
            print!("{}", crate::policy::model::policy_json_schema());
            ExitCode::SUCCESS
        }
        Command::Token(TokenCommand::Mint { sub, ttl, claims }) => token_mint(&sub, ttl, &claims),
    }
}

pub(crate) fn options() -> CompileOptions<'static> {
    CompileOptions { generation: 1, secret_lookup: &process_env }
}

pub(crate) fn print_errors(errors: &PolicyErrors) {
    for e in &errors.0 {
        eprintln!("{e}");
    }
    eprintln!("policy refused: {} error{}", errors.0.len(), if errors.0.len() == 1 { "" } else { "s" });
}

fn policy_check(dir: &Path) -> ExitCode {
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

fn policy_test(args: &TestArgs) -> ExitCode {
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

fn token_mint(sub: &str, ttl: Duration, claims: &[(String, String)]) -> ExitCode {
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
