//! `vsql-vault sign-evidence`: a ready `vsql_vault.signing_command` for a key kept on another host
//! (reached over ssh, say), so the private evidence key never sits on the database host. It speaks
//! the signing command's protocol (core `keys::EvidenceSigner`): `public-key` prints the public key
//! in hex, `sign` reads the message in hex on stdin and prints the signature in hex.

use std::io::Read;
use vsql_vault_core::keys;

#[derive(clap::Args)]
pub struct Args {
    /// The Ed25519 key file (the seed in hex, as vsql_vault writes it), owner-only.
    #[arg(long = "key", value_name = "FILE")]
    key: String,
    /// `public-key` or `sign`; by default the VSQL_VAULT_OP the server sets.
    #[arg(long = "op", value_name = "OP")]
    op: Option<String>,
}

pub fn run(args: &Args) -> Result<bool, String> {
    let path = &args.key;
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // The owner is whoever runs the signer; only the mode is checked here.
        keys::check_permissions(path, &meta, meta.uid()).map_err(|e| e.to_string())?;
    }
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?);
    let key = keys::decode_file(path, &bytes).map_err(|e| e.to_string())?;
    let op = args
        .op
        .clone()
        .or_else(|| std::env::var("VSQL_VAULT_OP").ok())
        .unwrap_or_default();
    match op.as_str() {
        "public-key" => println!("{}", hex::encode(key.verifying_key().as_bytes())),
        "sign" => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(|e| format!("stdin: {e}"))?;
            let message = hex::decode(input.trim())
                .map_err(|_| "stdin is not a message in hex".to_owned())?;
            println!("{}", hex::encode(keys::sign(&key, &message)));
        }
        other => return Err(format!("unknown op {other:?}: expected public-key or sign")),
    }
    Ok(true)
}
