//! The command line (SPEC §2): `serve`, and the commands that do not serve — `policy check`,
//! `policy test`, `policy schema` and `token mint`.

mod offline;
pub mod serve;
mod shared;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use shared::parse_ttl;

/// wsgate: a WebSocket gateway whose security is policy, not code.
#[derive(Debug, Parser)]
#[command(name = "wsgate", version, about)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<serve::ServeArgs>),
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
    Test(offline::TestArgs),
    /// Print the JSON Schema of the policy file format.
    Schema,
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

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}` is not key=value"))
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Policy(PolicyCommand::Check { dir }) => offline::policy_check(&dir),
        Command::Policy(PolicyCommand::Test(args)) => offline::policy_test(&args),
        Command::Policy(PolicyCommand::Schema) => {
            print!("{}", crate::policy::model::policy_json_schema());
            ExitCode::SUCCESS
        }
        Command::Token(TokenCommand::Mint { sub, ttl, claims }) => offline::token_mint(&sub, ttl, &claims),
    }
}
