//! `vsql-vault verify-report`: a signed JSON report (the scope report), with the public key alone.

use vsql_vault_core::keys;

#[derive(clap::Args)]
pub struct Args {
    /// The report, one JSON object (`SELECT vault_scope_report()`).
    #[arg(long = "report", alias = "input", value_name = "FILE")]
    report: String,
    /// A trusted Ed25519 public key, 64 hex characters; repeatable.
    #[arg(long = "public-key", value_name = "HEX", required = true)]
    public_keys: Vec<String>,
}

pub fn run(args: &Args) -> Result<bool, String> {
    let path = &args.report;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let report: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("{path}: {e}"))?;
    let key_id = report["signing_key_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sig = hex::decode(report["signature"].as_str().unwrap_or_default()).unwrap_or_default();
    let msg = vsql_vault_core::canonical::report_message(&report);
    for public in crate::input::public_keys(&args.public_keys)? {
        if keys::key_id(&public) == key_id && keys::verify(&public, &msg, &sig) {
            println!("ok      report signed by key {key_id}");
            return Ok(true);
        }
    }
    println!("FAILED  report signature does not verify with the given keys (key {key_id})");
    Ok(false)
}
