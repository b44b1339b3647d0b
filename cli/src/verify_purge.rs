//! `vsql-vault verify-purge`: each purge proof alone, its statement's inclusion under the signed
//! root and the root's signature by one of the given keys.

use crate::input::{public_keys, read_lines};
use vsql_vault_core::keys;
use vsql_vault_core::purge::PurgeProof;

#[derive(clap::Args)]
pub struct Args {
    /// A file of purge proofs (`vault_export_purge_proofs()`), one JSON object per line; repeatable.
    #[arg(long = "proofs", value_name = "FILE", required = true)]
    proofs: Vec<String>,
    /// A trusted Ed25519 public key, 64 hex characters; repeatable.
    #[arg(long = "public-key", value_name = "HEX", required = true)]
    public_keys: Vec<String>,
}

pub fn run(args: &Args) -> Result<bool, String> {
    let keys = public_keys(&args.public_keys)?;
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
    if count == 0 {
        // As for `verify`: evidence with nothing in it is not a pass.
        println!("FAILED  the files given hold no purge proofs: nothing was verified");
        return Ok(false);
    }
    if intact {
        println!("ok      {count} purge proofs verify");
    }
    Ok(intact)
}
