//! `vsql-vault sign-directive`: makes a key directive document signed by a governance authority
//! (docs/key-governance.md), for `vault_apply_directive`. For tests, and for authorities without
//! a tool of their own.

use vsql_vault_core::directive_doc::{self, FORMAT};
use vsql_vault_core::keys;

#[derive(clap::Args)]
pub struct Args {
    /// The authority's Ed25519 key file (64 hex characters, owner-only).
    #[arg(long = "key", value_name = "FILE")]
    key: String,
    /// retire-key, deny-algorithm or cryptoperiod.
    #[arg(long)]
    kind: String,
    /// A key_ref, a prefix pattern such as kms://payments/*, or an algorithm_hint.
    #[arg(long)]
    target: String,
    /// When the directive takes effect (RFC 3339); default: when it is applied.
    #[arg(long = "effective-at", value_name = "TIME")]
    effective_at: Option<String>,
    /// Grace period after effective-at, in seconds.
    #[arg(long = "grace-seconds", value_name = "N")]
    grace_seconds: Option<i64>,
    /// A cryptoperiod's maximum age, in seconds.
    #[arg(long = "max-age-seconds", value_name = "N")]
    max_age_seconds: Option<i64>,
    #[arg(long)]
    reason: Option<String>,
    /// Until when the document may be applied (RFC 3339).
    #[arg(long = "expires-at", value_name = "TIME")]
    expires_at: String,
    /// Default: 16 random bytes in hex.
    #[arg(long)]
    nonce: Option<String>,
}

pub fn run(args: &Args) -> Result<bool, String> {
    let path = &args.key;
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        keys::check_permissions(path, &meta, meta.uid()).map_err(|e| e.to_string())?;
    }
    let contents =
        zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?);
    let key = keys::decode_file(path, &contents).map_err(|e| e.to_string())?;
    let nonce = match &args.nonce {
        Some(n) => n.clone(),
        None => directive_doc::random_nonce().map_err(|e| e.to_string())?,
    };
    let mut doc = serde_json::json!({
        "format": FORMAT, "kind": args.kind, "target": args.target, "nonce": nonce,
        "expires_at": args.expires_at,
    });
    let optional = [
        (
            "effective_at",
            args.effective_at.clone().map(serde_json::Value::from),
        ),
        (
            "grace_seconds",
            args.grace_seconds.map(serde_json::Value::from),
        ),
        (
            "max_age_seconds",
            args.max_age_seconds.map(serde_json::Value::from),
        ),
        ("reason", args.reason.clone().map(serde_json::Value::from)),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            doc[name] = v;
        }
    }
    directive_doc::sign(&mut doc, &key).map_err(|e| e.to_string())?;
    println!("{doc}");
    Ok(true)
}
