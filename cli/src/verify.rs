//! `vsql-vault verify`: exported hash-chained rows against signed checkpoints, every rule of
//! docs/audit-format.md section 6.

use crate::input::{public_keys, read_lines};
use std::collections::BTreeSet;
use vsql_vault_core::chain::Checkpoint;
use vsql_vault_core::export;

#[derive(clap::Args)]
pub struct Args {
    /// Rows exported by `vault_export_audit()`, one JSON object per line; repeatable.
    #[arg(long = "export", value_name = "FILE", required = true)]
    exports: Vec<String>,
    /// Checkpoints (`vault_export_checkpoints()` or the checkpoint export file); repeatable.
    #[arg(long = "checkpoints", value_name = "FILE")]
    checkpoints: Vec<String>,
    /// A trusted Ed25519 public key, 64 hex characters; repeatable.
    #[arg(long = "public-key", value_name = "HEX", required = true)]
    public_keys: Vec<String>,
    /// The exports start after seq 1 (`vault_export_audit(tbl, from_seq)`).
    #[arg(long)]
    partial: bool,
    /// Verify only this table (its identity, or its schema.table part); repeatable. The others
    /// in the evidence are named as skipped.
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
}

/// Whether `table` (an identity, `schema.table/N`) is the one `wanted` names.
fn names(wanted: &str, table: &str) -> bool {
    // The identity's number follows its last '/': a table's own name may hold one.
    table == wanted || table.rsplit_once('/').map(|(name, _)| name) == Some(wanted)
}

pub fn run(args: &Args) -> Result<bool, String> {
    let keys = public_keys(&args.public_keys)?;
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for path in &args.checkpoints {
        checkpoints.extend(read_lines::<Checkpoint>(path)?);
    }
    // Every signed checkpoint is accounted for: its table's rows must be in the exports (a chain
    // with a checkpoint and no rows fails), unless the table is left out by name with --table,
    // which the output then says. An export emptied before it was taken does not verify.
    let selected =
        |table: &str| args.tables.is_empty() || args.tables.iter().any(|t| names(t, table));
    let checkpoint_tables: BTreeSet<String> = checkpoints.iter().map(|c| c.table.clone()).collect();
    checkpoints.retain(|c| selected(&c.table));
    // Read, parsed and hashed while verifying (in chain order; sorted first when the rows are
    // not): see vsql_vault_core::export.
    let verdict = export::verify_files(&args.exports, checkpoints, &keys, args.partial, &selected)?;
    let skipped: BTreeSet<&str> = checkpoint_tables
        .iter()
        .chain(verdict.tables.iter())
        .map(String::as_str)
        .filter(|t| !selected(t))
        .collect();
    let mut intact = true;
    for wanted in &args.tables {
        if !verdict.tables.iter().any(|t| names(wanted, t))
            && !checkpoint_tables.iter().any(|t| names(wanted, t))
        {
            intact = false;
            println!("FAILED  {wanted}: no rows and no checkpoint of it in the evidence given");
        }
    }
    if verdict.tables.is_empty() && checkpoint_tables.is_empty() && args.tables.is_empty() {
        println!(
            "FAILED  the evidence given holds no rows and no checkpoints: nothing was verified"
        );
        return Ok(false);
    }
    for table in &skipped {
        println!("skipped {table}: not selected (--table)");
    }
    for r in verdict.reports {
        let chain = r.chain.map(|c| format!(" chain {c}")).unwrap_or_default();
        if r.ok {
            println!("ok      {}{chain}: {}", r.table, r.detail);
        } else {
            intact = false;
            let at = r
                .first_bad_seq
                .map(|s| format!(" at seq {s}"))
                .unwrap_or_default();
            println!("FAILED  {}{chain}{at}: {}", r.table, r.detail);
        }
    }
    Ok(intact)
}
