//! Writes a generated export for timing `vsql-vault verify` without a database
//! (benches/verify.sh): `ROWS` chained rows shaped like `public.audit_events` of benches/run.sh
//! (or `access_log`: 16 columns like `vault.access_log`), in `CHAINS` chains one after another as
//! `vault_export_audit` writes them, a signed checkpoint at the end of each chain, and the public key.
//!
//!   cargo run --release -p vsql-vault --example gen_export -- DIR ROWS [audit_events|access_log] [CHAINS]
//!
//! DIR gets export.jsonl, checkpoints.jsonl and public_key.hex.

use std::io::Write;
use vsql_vault_core::canonical::Value;
use vsql_vault_core::chain::{row_hash, Checkpoint, ExportRow, GENESIS};
use vsql_vault_core::keys;

fn columns(shape: &str, id: i64) -> Vec<(String, Value)> {
    let text = |s: String| Value::Text(s);
    let at = Value::Timestamp(849_610_348_904_336 + id * 1_000);
    let c = |name: &str, v: Value| (name.to_string(), v);
    match shape {
        "access_log" => vec![
            c("id", Value::Int(id)),
            c("logged_at", at),
            c("role_name", text("bench".into())),
            c("session_user_name", text("bench".into())),
            c("application_name", text("pgbench".into())),
            c("client_addr", Value::Null),
            c("backend_pid", Value::Int(26_000 + id % 16)),
            c("operation", text("get".into())),
            c("purpose", text("bench".into())),
            c("external_id", text(format!("k{}", id % 10_000))),
            c("entry_id", Value::Int(id % 10_000)),
            c("granted", Value::Bool(true)),
            c("sqlstate", Value::Null),
            c("reason", Value::Null),
            c(
                "details",
                text(r#"{"bytes": 16, "access_policy": "owner-only"}"#.into()),
            ),
            c("caller_xid", text(format!("{}", 1_000 + id))),
            c("on_behalf_of", Value::Null),
        ],
        _ => vec![
            c("id", Value::Int(id)),
            c("at", at),
            c("tenant", text(format!("tenant-{}", id % 100))),
            c("actor", text(format!("user-{}", id % 5000))),
            c("event", text(format!("payment {id}"))),
            c("amount", text(format!("{:.2}", id as f64 * 1.25))),
        ],
    }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: gen_export DIR ROWS [audit_events|access_log] [CHAINS]";
    let dir = std::path::PathBuf::from(args.first().ok_or(usage)?);
    let rows: i64 = args.get(1).ok_or(usage)?.parse().map_err(|_| usage)?;
    let shape = args.get(2).map_or("audit_events", String::as_str);
    let chains: i64 = args
        .get(3)
        .map_or(Ok(1), |c| c.parse())
        .map_err(|_| usage)?;
    let table = match shape {
        "access_log" => "vault.access_log/1",
        _ => "public.audit_events/7",
    };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let key = keys::generate().map_err(|e| e.to_string())?;
    let file = |name: &str| {
        std::fs::File::create(dir.join(name))
            .map(std::io::BufWriter::new)
            .map_err(|e| format!("{name}: {e}"))
    };
    let (mut export, mut checkpoints) = (file("export.jsonl")?, file("checkpoints.jsonl")?);
    let mut id = 0;
    for chain in 0..chains as i32 {
        let mut prev = GENESIS;
        let n = rows / chains + i64::from(i64::from(chain) < rows % chains);
        for seq in 1..=n {
            id += 1;
            let columns = columns(shape, id);
            let hash = row_hash(table, chain, seq, &prev, &columns);
            let row = ExportRow {
                table: table.into(),
                chain,
                seq,
                prev_hash: prev,
                row_hash: hash,
                columns,
            };
            let line = serde_json::to_string(&row).map_err(|e| e.to_string())?;
            writeln!(export, "{line}").map_err(|e| e.to_string())?;
            prev = hash;
        }
        let cp = Checkpoint::sign(&key, (table, chain, n), prev, 1);
        let line = serde_json::to_string(&cp).map_err(|e| e.to_string())?;
        writeln!(checkpoints, "{line}").map_err(|e| e.to_string())?;
    }
    export.flush().map_err(|e| e.to_string())?;
    checkpoints.flush().map_err(|e| e.to_string())?;
    let public = hex::encode(key.verifying_key().as_bytes());
    std::fs::write(dir.join("public_key.hex"), format!("{public}\n")).map_err(|e| e.to_string())?;
    println!("{table}");
    Ok(())
}
