//! `vsql-vault`: checks vsql_vault evidence with no database, using the same core crate as the
//! extension, so the verdict an auditor gets here is the database's own logic.
//!
//! Exit status: 0 when the evidence verifies (or for `--help` / `--version`), 1 when it does not
//! (the first bad row and the reason are printed), 2 on a usage or input error.

mod apply;
mod decrypt;
mod digest;
mod input;
mod sign_directive;
mod sign_evidence;
mod verify;
mod verify_purge;
mod verify_report;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "vsql-vault", version, propagate_version = true, about = "Checks vsql_vault evidence offline, with public keys only (and signs key directives)", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verifies exported hash-chained rows against signed checkpoints (docs/audit-format.md).
    Verify(verify::Args),
    /// Verifies exported purge proofs: each statement's Merkle inclusion and its signed root.
    VerifyPurge(verify_purge::Args),
    /// Verifies the signature of a signed JSON report (the replication scope report).
    VerifyReport(verify_report::Args),
    /// Makes a key directive document signed by a governance authority (vault_apply_directive).
    SignDirective(sign_directive::Args),
    /// Decrypts a vsql_vault replication stream, checking every signature, tag and link.
    Decrypt(decrypt::Args),
    /// Applies a replication stream to a target PostgreSQL, exactly once (its position is kept there).
    Apply(apply::Args),
    /// Signs evidence for a server whose vsql_vault.signing_command calls it (on another host).
    SignEvidence(sign_evidence::Args),
    /// Computes a table's digest (vault_table_digest) from its export, with no database.
    Digest(digest::Args),
}

fn main() -> ExitCode {
    // clap prints help and version with status 0, usage errors with status 2.
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Verify(a) => verify::run(&a),
        Command::VerifyPurge(a) => verify_purge::run(&a),
        Command::VerifyReport(a) => verify_report::run(&a),
        Command::Decrypt(a) => decrypt::run(&a),
        Command::Apply(a) => apply::run(&a),
        Command::SignEvidence(a) => sign_evidence::run(&a),
        Command::SignDirective(a) => sign_directive::run(&a),
        Command::Digest(a) => digest::run(&a),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vsql-vault: {e}");
            ExitCode::from(2)
        }
    }
}
