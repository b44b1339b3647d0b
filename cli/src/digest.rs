//! `vsql-vault digest`: the digest of a table from its export (`vault_table_digest_export`),
//! computed again from the values with the core's encoding, order and tree
//! (docs/table-digest.md): the same root as `vault_table_digest`, and with `--ranges N` the same
//! rows as `vault_table_digest_ranges(tbl, N)`.

use vsql_vault_core::digest::{self, TableDigest};

#[derive(clap::Args)]
pub struct Args {
    /// The export, one JSON line per row, in any order
    /// (`psql -Atc "SELECT vault_table_digest_export('tbl')" > tbl.jsonl`).
    #[arg(long = "input", value_name = "FILE")]
    input: String,
    /// Also print the roots of N key-hash buckets (1 to 4096), as `vault_table_digest_ranges`.
    #[arg(long = "ranges", value_name = "N")]
    ranges: Option<i64>,
}

/// Prints `{"rows":..,"root":".."}`, then with `--ranges` one line per bucket:
/// `{"bucket":..,"first_key":..,"last_key":..,"rows":..,"root":".."}`.
pub fn run(args: &Args) -> Result<bool, String> {
    let path = &args.input;
    let buckets = digest::bucket_count(args.ranges.unwrap_or(1)).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let d = digest::digest_export(&text, buckets).map_err(|e| format!("{path}: {e}"))?;
    for line in lines(&d, args.ranges.is_some())? {
        println!("{line}");
    }
    Ok(true)
}

fn lines(d: &TableDigest, ranges: bool) -> Result<Vec<String>, String> {
    let mut out =
        vec![serde_json::json!({"rows": d.rows(), "root": hex::encode(d.root())}).to_string()];
    if ranges {
        let key = |k: &Option<Vec<u8>>| {
            k.as_deref()
                .map(digest::key_json)
                .transpose()
                .map_err(|e| e.to_string())
        };
        for r in d.ranges() {
            out.push(
                serde_json::json!({
                    "bucket": r.bucket,
                    "first_key": key(&r.first_key)?,
                    "last_key": key(&r.last_key)?,
                    "rows": r.rows,
                    "root": hex::encode(r.root),
                })
                .to_string(),
            );
        }
    }
    Ok(out)
}
