//! `vsql-vault`: checks vsql_vault evidence with no database, using the same core crate as the
//! extension, so the verdict an auditor gets here is the database's own logic.
//!
//!   vsql-vault verify --export FILE [--export FILE ...] [--checkpoints FILE]
//!                     --public-key HEX [--public-key HEX ...] [--partial] [--table NAME ...]
//!   vsql-vault verify-purge --proofs FILE --public-key HEX [--public-key HEX ...]
//!   vsql-vault verify-report --report FILE --public-key HEX [--public-key HEX ...]
//!   vsql-vault decrypt (--kek-file FILE | --kek-command CMD) --public-key HEX [...] [--input FILE]
//!
//! Exit status: 0 when every chain is intact, 1 when one is not (the first bad row and the reason
//! are printed), 2 on a usage or input error.

use std::io::BufRead;
use std::process::ExitCode;
use vsql_vault_core::chain::{Checkpoint, ExportRow, Verifier};
use vsql_vault_core::keys;
use vsql_vault_core::purge::PurgeProof;

const USAGE: &str =
    "usage: vsql-vault verify --export FILE [--export FILE ...] [--checkpoints FILE] \
--public-key HEX [--public-key HEX ...] [--partial] [--table NAME ...]
       vsql-vault verify-purge --proofs FILE --public-key HEX [--public-key HEX ...]
       vsql-vault verify-report --report FILE --public-key HEX [--public-key HEX ...]
       vsql-vault decrypt (--kek-file FILE | --kek-command CMD) --public-key HEX [--public-key HEX ...] [--input FILE]";

struct Args {
    command: String,
    kek_command: Option<String>,
    kek_file: Option<String>,
    input: Option<String>,
    proofs: Vec<String>,
    exports: Vec<String>,
    checkpoints: Vec<String>,
    public_keys: Vec<String>,
    partial: bool,
    /// Tables to verify (identity, or schema.table); none: every table the evidence names.
    tables: Vec<String>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let command = match argv.next().as_deref() {
        Some(c @ ("verify" | "verify-purge" | "verify-report" | "decrypt")) => c.to_owned(),
        Some("-h" | "--help") | None => return Err(USAGE.into()),
        Some(other) => return Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    let mut a = Args {
        command,
        kek_command: None,
        kek_file: None,
        input: None,
        proofs: vec![],
        exports: vec![],
        checkpoints: vec![],
        public_keys: vec![],
        partial: false,
        tables: vec![],
    };
    while let Some(flag) = argv.next() {
        let mut value = || {
            argv.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--export" => a.exports.push(value()?),
            "--proofs" => a.proofs.push(value()?),
            "--kek-file" => a.kek_file = Some(value()?),
            "--kek-command" => a.kek_command = Some(value()?),
            "--input" | "--report" => a.input = Some(value()?),
            "--checkpoints" => a.checkpoints.push(value()?),
            "--public-key" => a.public_keys.push(value()?),
            "--partial" => a.partial = true,
            "--table" => a.tables.push(value()?),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    let missing = match a.command.as_str() {
        "verify" => a.exports.is_empty(),
        "verify-purge" => a.proofs.is_empty(),
        "verify-report" => a.input.is_none(),
        _ => a.kek_file.is_none() && a.kek_command.is_none(),
    };
    if missing || a.public_keys.is_empty() {
        return Err(USAGE.into());
    }
    Ok(a)
}

/// Reads one JSON object per non-empty line.
fn read_lines<T: serde::de::DeserializeOwned>(path: &str) -> Result<Vec<T>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{path}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| format!("{path} line {}: {e}", n + 1))?);
    }
    Ok(out)
}

/// Checks each purge proof alone: its statement's inclusion under the signed root, and the root's
/// signature by one of the given keys.
fn run_purge(args: Args) -> Result<bool, String> {
    let keys = args
        .public_keys
        .iter()
        .map(|k| keys::parse_public(k).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let by_id = |id: &str| keys.iter().find(|k| keys::key_id(k) == id).copied();
    let mut intact = true;
    let mut count = 0;
    for path in &args.proofs {
        for p in read_lines::<PurgeProof>(path)? {
            count += 1;
            if let Err(why) = p.check(&by_id) {
                intact = false;
                println!(
                    "FAILED  purge proof {} ({} / {}): {why}",
                    p.id, p.statement.purpose, p.statement.external_id
                );
            }
        }
    }
    if intact {
        println!("ok      {count} purge proofs verify");
    }
    Ok(intact)
}

/// Decrypts a vsql_vault replication stream, checking every signature, tag, sequence and link;
/// prints one plaintext JSON line per change, and stops at the first fault.
fn run_decrypt(args: Args) -> Result<bool, String> {
    use std::io::Write;
    let keys = args
        .public_keys
        .iter()
        .map(|k| keys::parse_public(k).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let kek = match (&args.kek_command, &args.kek_file) {
        (Some(cmd), _) => vsql_vault_core::envelope::Kek::Command(cmd.clone()),
        (None, path) => {
            let path = path.clone().unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            vsql_vault_core::envelope::Kek::File(
                vsql_vault_core::envelope::KekRing::parse(&path, &text)
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    let mut reader = vsql_vault_core::stream::Reader::new(kek, keys);
    let input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{p}: {e}"))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    // One write per batch, not per change (stdout alone is line-buffered); flushed after each
    // batch so a live consumer passes changes on as soon as they are verified.
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    for line in input.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        match reader.feed(&line) {
            Ok(changes) => {
                for c in changes {
                    writeln!(out, "{c}").map_err(|e| e.to_string())?;
                }
                out.flush().map_err(|e| e.to_string())?;
            }
            Err(e) => {
                eprintln!("vsql-vault decrypt: {e}");
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Checks a signed JSON report (the scope report) with the public key alone.
fn run_report(args: Args) -> Result<bool, String> {
    let path = args.input.clone().unwrap_or_default();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let report: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("{path}: {e}"))?;
    let key_id = report["signing_key_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sig = hex::decode(report["signature"].as_str().unwrap_or_default()).unwrap_or_default();
    let msg = vsql_vault_core::canonical::report_message(&report);
    for k in &args.public_keys {
        let public = keys::parse_public(k).map_err(|e| e.to_string())?;
        if keys::key_id(&public) == key_id && keys::verify(&public, &msg, &sig) {
            println!("ok      report signed by key {key_id}");
            return Ok(true);
        }
    }
    println!("FAILED  report signature does not verify with the given keys (key {key_id})");
    Ok(false)
}

fn run(args: Args) -> Result<bool, String> {
    if args.command == "verify-report" {
        return run_report(args);
    }
    if args.command == "verify-purge" {
        return run_purge(args);
    }
    if args.command == "decrypt" {
        return run_decrypt(args);
    }
    let keys = args
        .public_keys
        .iter()
        .map(|k| keys::parse_public(k).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for path in &args.checkpoints {
        checkpoints.extend(read_lines::<Checkpoint>(path)?);
    }
    let mut rows: Vec<ExportRow> = Vec::new();
    for path in &args.exports {
        rows.extend(read_lines::<ExportRow>(path)?);
    }
    // Every signed checkpoint is accounted for: its table's rows must be in the exports (a chain
    // with a checkpoint and no rows fails), unless the table is left out by name with --table,
    // which the output then says. An export emptied before it was taken does not verify.
    let selected = |table: &str| {
        args.tables.is_empty()
            || args
                .tables
                .iter()
                .any(|t| t == table || table.split_once('/').map(|(name, _)| name) == Some(t))
    };
    let mut skipped: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    skipped.extend(
        checkpoints
            .iter()
            .map(|c| c.table.clone())
            .filter(|t| !selected(t)),
    );
    skipped.extend(
        rows.iter()
            .map(|r| r.table.clone())
            .filter(|t| !selected(t)),
    );
    let checkpoints: Vec<Checkpoint> = checkpoints
        .into_iter()
        .filter(|c| selected(&c.table))
        .collect();
    rows.retain(|r| selected(&r.table));
    let mut intact = true;
    for wanted in &args.tables {
        let named = |table: &str| {
            table == wanted || table.split_once('/').map(|(name, _)| name) == Some(wanted.as_str())
        };
        if !rows.iter().any(|r| named(&r.table)) && !checkpoints.iter().any(|c| named(&c.table)) {
            intact = false;
            println!("FAILED  {wanted}: no rows and no checkpoint of it in the evidence given");
        }
    }
    if rows.is_empty() && checkpoints.is_empty() && args.tables.is_empty() {
        println!(
            "FAILED  the evidence given holds no rows and no checkpoints: nothing was verified"
        );
        return Ok(false);
    }
    for table in &skipped {
        println!("skipped {table}: not selected (--table)");
    }
    rows.sort_by(|a, b| (&a.table, a.chain, a.seq).cmp(&(&b.table, b.chain, b.seq)));
    let mut v = Verifier::with_partial(checkpoints, &keys, args.partial);
    rows.iter().for_each(|r| v.push(r));
    for r in v.finish() {
        match r.first_bad_seq {
            None if r.ok => println!("ok      {} chain {}: {}", r.table, r.chain, r.detail),
            bad => {
                intact = false;
                let at = bad.map(|s| format!(" at seq {s}")).unwrap_or_default();
                println!("FAILED  {} chain {}{}: {}", r.table, r.chain, at, r.detail);
            }
        }
    }
    Ok(intact)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vsql-vault: {e}");
            ExitCode::from(2)
        }
    }
}
