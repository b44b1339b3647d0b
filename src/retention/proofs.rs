//! Reading purge proofs back from `vault.purge_log` and checking them: the signed statement,
//! and the columns people read that the signature does not cover.

use crate::errors::VaultError;
use crate::security::AsOwner;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::purge::{DisplayedTimes, PurgeProof, PurgeStatement};

pub fn load_proof(id: i64) -> Result<Option<PurgeProof>, VaultError> {
    Ok(load_proofs("WHERE id = $1", &[id.into()])?
        .into_iter()
        .next())
}

pub fn load_proofs(filter: &str, args: &[DatumWithOid]) -> Result<Vec<PurgeProof>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            &format!(
                "SELECT id, purpose, external_id, owner::text AS owner, entry_id, created_at_us, expires_at_us,
                        max_retention_days, default_ttl_days, purge_method, access_policy, reason, purged_by,
                        purged_at_us, entry_hash, batch_id, leaf_index, tree_size,
                        (SELECT string_agg(encode(p, 'hex'), ',' ORDER BY n)
                           FROM unnest(inclusion_path) WITH ORDINALITY AS x(p, n)) AS path,
                        merkle_root, signed_at_us, key_id, signature,
                        vault.to_us(purged_at) AS shown_purged_at, vault.to_us(created_at) AS shown_created_at,
                        vault.to_us(expires_at) AS shown_expires_at
                 FROM vault.purge_log {filter} ORDER BY id"
            ),
            None,
            args,
        )? {
            let hash32 = |v: Option<Vec<u8>>| {
                let mut h = [0u8; 32];
                if let Some(v) = v.filter(|v| v.len() == 32) {
                    h.copy_from_slice(&v);
                }
                h
            };
            let text = |name: &str| row.get_by_name::<String, _>(name).map(Option::unwrap_or_default);
            let int = |name: &str| row.get_by_name::<i64, _>(name).map(|v| v.unwrap_or(0));
            let days = |name: &str| row.get_by_name::<i32, _>(name).map(|v| v.unwrap_or(0));
            let bytes = |name: &str| row.get_by_name::<Vec<u8>, _>(name);
            out.push(PurgeProof {
                id: int("id")?,
                statement: PurgeStatement {
                    purpose: text("purpose")?,
                    external_id: text("external_id")?,
                    owner: text("owner")?,
                    entry_id: int("entry_id")?,
                    created_at: int("created_at_us")?,
                    expires_at: int("expires_at_us")?,
                    max_retention_days: days("max_retention_days")?,
                    default_ttl_days: days("default_ttl_days")?,
                    purge_method: text("purge_method")?,
                    access_policy: text("access_policy")?,
                    reason: text("reason")?,
                    purged_by: text("purged_by")?,
                    purged_at: int("purged_at_us")?,
                    entry_hash: hash32(bytes("entry_hash")?),
                },
                batch_id: int("batch_id")?,
                leaf_index: int("leaf_index")?,
                tree_size: int("tree_size")?,
                path: row
                    .get_by_name::<String, _>("path")?
                    .map(|p| p.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                root: hash32(bytes("merkle_root")?),
                signed_at: int("signed_at_us")?,
                key_id: text("key_id")?,
                signature: hex::encode(bytes("signature")?.unwrap_or_default()),
                displayed: Some(DisplayedTimes {
                    purged_at: int("shown_purged_at")?,
                    created_at: int("shown_created_at")?,
                    expires_at: int("shown_expires_at")?,
                }),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

pub fn verify_proof(proof: &PurgeProof) -> Result<Result<(), String>, VaultError> {
    let _owner = AsOwner::enter();
    // Only keys on the chain of trust of vault.signing_keys (issue 15, item 7).
    let keys: Vec<_> = crate::chain::trusted_keys()?
        .trusted
        .into_values()
        .collect();
    let by_id = |id: &str| {
        keys.iter()
            .find(|k| vsql_vault_core::keys::key_id(k) == id)
            .copied()
    };
    if let Err(why) = proof.check(&by_id) {
        return Ok(Err(why));
    }
    batch_consistent(proof)
}

/// `sweep_id` is not part of the signed statement: every proof of a signed batch must name the
/// same sweep, a run of `vault.sweep_runs` going on at the signed purge time, and the batch must
/// hold exactly the proofs its signed tree size says, so an edit of one proof's sweep_id (or a
/// proof added to or removed from a batch) shows in each proof of it. (A whole batch's sweep_id
/// set to NULL, or to another run of the same time, is found only by the purge log's hash chain.)
fn batch_consistent(proof: &PurgeProof) -> Result<Result<(), String>, VaultError> {
    let row = Spi::connect(|c| {
        let row = c
            .select(
                "SELECT count(*) AS proofs, count(DISTINCT COALESCE(sweep_id, -1)) AS sweeps,
                        count(DISTINCT leaf_index) AS leaves,
                        count(*) FILTER (WHERE sweep_id IS NOT NULL AND NOT EXISTS (
                            SELECT 1 FROM vault.sweep_runs r
                             WHERE r.id = g.sweep_id AND vault.to_us(r.started_at) <= g.purged_at_us
                               AND (r.finished_at IS NULL OR vault.to_us(r.finished_at) >= g.purged_at_us))) AS strays
                   FROM vault.purge_log g WHERE batch_id = $1",
                None,
                &[proof.batch_id.into()],
            )?
            .first();
        let n = |name: &str| row.get_by_name::<i64, _>(name).map(|v| v.unwrap_or(0));
        Ok::<_, pgrx::spi::Error>((n("proofs")?, n("sweeps")?, n("leaves")?, n("strays")?))
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    let (proofs, sweeps, leaves, strays) = row;
    if proofs != proof.tree_size || leaves != proof.tree_size {
        return Ok(Err(format!(
            "batch {} holds {proofs} proofs ({leaves} distinct leaves) where its signed tree has {}",
            proof.batch_id, proof.tree_size
        )));
    }
    if sweeps != 1 || strays != 0 {
        return Ok(Err(format!(
            "the proofs of batch {} name {sweeps} different sweeps, {strays} of them not a sweep run going on when they were made",
            proof.batch_id
        )));
    }
    Ok(Ok(()))
}
