//! The keys in-database verification trusts: `vault.signing_keys` read in its chain's order, each
//! row checked against its own hash and link, then `vsql_vault_core::trust::establish`. A key row
//! added behind the triggers' back, or a key not vouched for by an earlier trusted key, is not
//! trusted, so checkpoints it signed do not verify.

use super::*;
use vsql_vault_core::trust::{self, KeyRecord, KeyTrust};

fn text(row: &ExportRow, name: &str) -> Option<String> {
    row.columns
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| match v {
            Value::Text(t) => Some(t.clone()),
            _ => None,
        })
}

fn record(row: &ExportRow, intact: bool) -> KeyRecord {
    let column = |name: &str| row.columns.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    KeyRecord {
        key_id: text(row, "key_id").unwrap_or_default(),
        public_key: text(row, "public_key").unwrap_or_default(),
        source: text(row, "source").unwrap_or_default(),
        chained: intact,
        previous_key_id: text(row, "previous_key_id"),
        signed_at: match column("signed_at_us") {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        },
        signature: match column("rotation_signature") {
            Some(Value::Bytes(b)) => Some(hex::encode(b)),
            _ => None,
        },
    }
}

/// The chain of trust of the registered keys.
pub fn trusted_keys() -> Result<KeyTrust, VaultError> {
    let table = protected_tables(None)?
        .into_iter()
        .find(|t| t.name == "vault.signing_keys");
    let Some(table) = table else {
        // A 0.1.0 schema (library updated, ALTER EXTENSION UPDATE not run yet): its keys are
        // the trust roots, as they will be after the update.
        return legacy_roots();
    };
    let mut records = Vec::new();
    let mut prev = GENESIS;
    let read = {
        let _owner = AsOwner::enter();
        scan_rows(table.relid, &table.identity, 0, |row| {
            let intact = row.is_chained()
                && row.prev_hash == prev
                && chain::row_hash(&row.table, row.chain, row.seq, &row.prev_hash, &row.columns)
                    == row.row_hash;
            if row.is_chained() {
                prev = row.row_hash;
            }
            records.push(record(&row, intact));
        })?
    };
    if read.is_err() {
        return Err(VaultError::Internal(
            "vault.signing_keys could not be read for verification".into(),
        ));
    }
    Ok(trust::establish(&records))
}

fn legacy_roots() -> Result<KeyTrust, VaultError> {
    let _owner = AsOwner::enter();
    let mut out = KeyTrust::default();
    for key in public_keys()? {
        let id = vsql_vault_core::keys::key_id(&key);
        out.roots.push(id.clone());
        out.trusted.insert(id, key);
    }
    Ok(out)
}
