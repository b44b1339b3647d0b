//! Retention enforcement: sweeps of expired entries, manual deletes, and the signed purge proofs
//! that make every destruction evidence. Removal and proof happen in one transaction: never a
//! proof without a purge, never a purge without a proof.

use crate::errors::VaultError;
use crate::keys;
use crate::security::AsOwner;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::purge::{
    prove_batch, DisplayedTimes, EntrySnapshot, ProvedLeaf, PurgeProof, PurgeStatement,
};

/// One entry chosen for destruction, with its retention policy as it stands now.
struct Doomed {
    snapshot: EntrySnapshot,
    max_retention_days: i32,
    default_ttl_days: i32,
    purge_method: String,
}

const SELECT_COLUMNS: &str =
    "e.id, e.purpose, e.external_id, e.encrypted_value, e.algorithm_hint, e.key_ref,
       e.metadata::text AS metadata, e.access_policy, e.owner::text AS owner,
       vault.to_us(e.created_at) AS created_at_us, vault.to_us(e.updated_at) AS updated_at_us,
       vault.to_us(e.expires_at) AS expires_at_us,
       rp.max_retention_days, rp.default_ttl_days, rp.purge_method";

fn read_doomed(query: &str, args: &[DatumWithOid]) -> Result<Vec<Doomed>, VaultError> {
    Spi::connect_mut(|c| {
        let mut out = Vec::new();
        for row in c.update(query, None, args)? {
            let text = |name: &str| row.get_by_name::<String, _>(name);
            let int = |name: &str| row.get_by_name::<i64, _>(name).map(|v| v.unwrap_or(0));
            let days = |name: &str| row.get_by_name::<i32, _>(name).map(|v| v.unwrap_or(0));
            out.push(Doomed {
                snapshot: EntrySnapshot {
                    id: int("id")?,
                    purpose: text("purpose")?.unwrap_or_default(),
                    external_id: text("external_id")?.unwrap_or_default(),
                    encrypted_value: row
                        .get_by_name::<Vec<u8>, _>("encrypted_value")?
                        .unwrap_or_default(),
                    algorithm_hint: text("algorithm_hint")?,
                    key_ref: text("key_ref")?,
                    metadata: text("metadata")?.unwrap_or_default(),
                    access_policy: text("access_policy")?.unwrap_or_default(),
                    owner: text("owner")?.unwrap_or_default(),
                    created_at: int("created_at_us")?,
                    updated_at: int("updated_at_us")?,
                    expires_at: int("expires_at_us")?,
                },
                max_retention_days: days("max_retention_days")?,
                default_ttl_days: days("default_ttl_days")?,
                purge_method: text("purge_method")?.unwrap_or_default(),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(format!("reading entries to purge failed: {e}")))
}

/// Destroys `doomed` and writes their proofs (one signed Merkle root for the batch).
/// Returns the purge_log ids in the same order. Runs in the caller's transaction.
fn destroy(
    doomed: Vec<Doomed>,
    reason: Option<&str>,
    purged_by: &str,
    sweep_id: Option<i64>,
) -> Result<Vec<i64>, VaultError> {
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    let key = keys::current()?;
    keys::register(&key).map_err(|e| VaultError::Internal(e.to_string()))?;
    let now = crate::pg::now_micros();
    let batch_id = crate::pg::write_one::<i64>("SELECT nextval('vault.purge_batch_seq')", &[])
        .map_err(|e| VaultError::Internal(e.to_string()))?
        .unwrap_or(0);
    let statements: Vec<PurgeStatement> = doomed
        .iter()
        .map(|d| statement(d, reason, purged_by, now))
        .collect();
    let proved = prove_batch(statements, batch_id, now, &key);
    let batch = BatchFields {
        batch_id,
        purged_at: now,
        purged_by,
        sweep_id,
    };
    // This transaction holds the purge log's chain for the batch: its rows are linked in memory
    // and the head is written once.
    let chain = crate::chain::ChainBatch::begin("vault.purge_log")?;
    let ids = Spi::connect_mut(|c| {
        let ids = insert_proofs(c, &proved, &batch)?;
        remove_entries(c, &doomed)?;
        Ok::<_, pgrx::spi::Error>(ids)
    })
    .map_err(|e| VaultError::Internal(format!("purging failed: {e}")))?;
    chain.finish()?;
    Ok(ids)
}

/// What every proof of one batch shares, besides its signed root.
struct BatchFields<'a> {
    batch_id: i64,
    purged_at: i64,
    purged_by: &'a str,
    sweep_id: Option<i64>,
}

/// The signed statement of one destruction.
fn statement(d: &Doomed, reason: Option<&str>, purged_by: &str, now: i64) -> PurgeStatement {
    let reason = match (reason, d.purge_method.as_str()) {
        (Some(r), _) => r.to_owned(),
        (None, "retention-expire") => format!(
            "retention: policy of purpose {} ({} days max)",
            d.snapshot.purpose, d.max_retention_days
        ),
        (None, _) => "expired".to_owned(),
    };
    PurgeStatement {
        purpose: d.snapshot.purpose.clone(),
        external_id: d.snapshot.external_id.clone(),
        owner: d.snapshot.owner.clone(),
        entry_id: d.snapshot.id,
        created_at: d.snapshot.created_at,
        expires_at: d.snapshot.expires_at,
        max_retention_days: d.max_retention_days,
        default_ttl_days: d.default_ttl_days,
        purge_method: d.purge_method.clone(),
        access_policy: d.snapshot.access_policy.clone(),
        reason,
        purged_by: purged_by.to_owned(),
        purged_at: now,
        entry_hash: d.snapshot.hash(),
    }
}

/// One row per proof, from parallel arrays ($1..$15) and the batch's shared values ($16..$22).
const INSERT_PROOFS: &str = "INSERT INTO vault.purge_log
                (purged_at, purged_at_us, purpose, external_id, owner, entry_id, created_at_us, expires_at_us,
                 created_at, expires_at, max_retention_days, default_ttl_days, purge_method, access_policy,
                 reason, purged_by, entry_hash, sweep_id, batch_id, leaf_index, tree_size, inclusion_path,
                 merkle_root, signed_at_us, key_id, signature)
             SELECT '2000-01-01 00:00:00+00'::timestamptz + $16 * interval '1 microsecond', $16,
                    r.purpose, r.external_id, r.owner, r.entry_id, r.created_at_us, r.expires_at_us,
                    '2000-01-01 00:00:00+00'::timestamptz + r.created_at_us * interval '1 microsecond',
                    '2000-01-01 00:00:00+00'::timestamptz + r.expires_at_us * interval '1 microsecond',
                    r.max_days, r.ttl_days, r.method, r.access_policy, r.reason, $17, r.entry_hash, $18, $19,
                    r.leaf_index, r.tree_size,
                    COALESCE((SELECT array_agg(decode(p, 'hex') ORDER BY n)
                              FROM unnest(string_to_array(NULLIF(r.path, ''), ',')) WITH ORDINALITY AS x(p, n)),
                             '{}'::bytea[]),
                    $20, $16, $21, $22
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int4[],
                         $8::int4[], $9::text[], $10::text[], $11::text[], $12::bytea[], $13::int8[],
                         $14::int8[], $15::text[])
                  WITH ORDINALITY AS r(purpose, external_id, owner, entry_id, created_at_us, expires_at_us,
                                       max_days, ttl_days, method, access_policy, reason, entry_hash,
                                       leaf_index, tree_size, path, ord)
             ORDER BY r.ord
             RETURNING id";

/// Inserts the batch's proofs into `vault.purge_log`, in order; returns their ids.
fn insert_proofs(
    c: &mut pgrx::spi::SpiClient<'_>,
    proved: &[ProvedLeaf],
    batch: &BatchFields,
) -> Result<Vec<i64>, pgrx::spi::Error> {
    // The batch's root, key and signature are the same for every proof of the batch.
    let Some(first) = proved.first() else {
        return Ok(Vec::new());
    };
    let st = |f: fn(&PurgeStatement) -> String| {
        proved.iter().map(|l| f(&l.statement)).collect::<Vec<_>>()
    };
    let int =
        |f: fn(&PurgeStatement) -> i64| proved.iter().map(|l| f(&l.statement)).collect::<Vec<_>>();
    let args: Vec<DatumWithOid> = vec![
        st(|s| s.purpose.clone()).into(),
        st(|s| s.external_id.clone()).into(),
        st(|s| s.owner.clone()).into(),
        int(|s| s.entry_id).into(),
        int(|s| s.created_at).into(),
        int(|s| s.expires_at).into(),
        proved
            .iter()
            .map(|l| l.statement.max_retention_days)
            .collect::<Vec<_>>()
            .into(),
        proved
            .iter()
            .map(|l| l.statement.default_ttl_days)
            .collect::<Vec<_>>()
            .into(),
        st(|s| s.purge_method.clone()).into(),
        st(|s| s.access_policy.clone()).into(),
        st(|s| s.reason.clone()).into(),
        proved
            .iter()
            .map(|l| l.statement.entry_hash.to_vec())
            .collect::<Vec<_>>()
            .into(),
        proved
            .iter()
            .map(|l| l.leaf_index)
            .collect::<Vec<_>>()
            .into(),
        proved
            .iter()
            .map(|l| l.tree_size)
            .collect::<Vec<_>>()
            .into(),
        // Paths travel as one hex text per proof, turned back into bytea[] in SQL.
        proved
            .iter()
            .map(|l| l.path.iter().map(hex::encode).collect::<Vec<_>>().join(","))
            .collect::<Vec<_>>()
            .into(),
        batch.purged_at.into(),
        batch.purged_by.into(),
        batch.sweep_id.into(),
        batch.batch_id.into(),
        first.root.as_slice().into(),
        first.key_id.as_str().into(),
        first.signature.as_slice().into(),
    ];
    let mut ids = Vec::new();
    let _writing = crate::chain::VaultWriting::enter();
    for row in c.update(INSERT_PROOFS, None, &args)? {
        ids.push(row.get_by_name::<i64, _>("id")?.unwrap_or(0));
    }
    Ok(ids)
}

/// Deletes the entries of `delete` purpose policies; crypto-shreds the others (the ciphertext is
/// overwritten and the row stays as a tombstone with purged_at set).
fn remove_entries(
    c: &mut pgrx::spi::SpiClient<'_>,
    doomed: &[Doomed],
) -> Result<(), pgrx::spi::Error> {
    let (shred, delete): (Vec<&Doomed>, Vec<&Doomed>) = doomed
        .iter()
        .partition(|d| d.purge_method == "crypto-shred");
    let ids = |list: Vec<&Doomed>| list.iter().map(|d| d.snapshot.id).collect::<Vec<i64>>();
    let (ids_shred, ids_delete) = (ids(shred), ids(delete));
    if !ids_delete.is_empty() {
        c.update(
            "DELETE FROM vault.entries WHERE id = ANY($1)",
            None,
            &[ids_delete.into()],
        )?;
    }
    if !ids_shred.is_empty() {
        c.update(
            "UPDATE vault.entries SET encrypted_value = '\\x'::bytea, purged_at = now() WHERE id = ANY($1)",
            None,
            &[ids_shred.into()],
        )?;
    }
    Ok(())
}

/// Purges up to `limit` expired entries in the current transaction; returns how many.
pub fn sweep_batch(limit: i64, purged_by: &str, sweep_id: Option<i64>) -> Result<i64, VaultError> {
    let _owner = AsOwner::enter();
    let doomed = read_doomed(
        &format!(
            "SELECT {SELECT_COLUMNS} FROM vault.entries e JOIN vault.retention_policies rp ON rp.purpose = e.purpose
             WHERE e.expires_at <= now() AND e.purged_at IS NULL
             ORDER BY e.expires_at LIMIT $1 FOR UPDATE OF e SKIP LOCKED"
        ),
        &[limit.into()],
    )?;
    let n = doomed.len() as i64;
    destroy(doomed, None, purged_by, sweep_id)?;
    Ok(n)
}

/// Purges one entry now (vault_delete), returning its proof's id.
pub fn delete_one(
    purpose: &str,
    external_id: &str,
    reason: &str,
    purged_by: &str,
) -> Result<i64, VaultError> {
    let _owner = AsOwner::enter();
    let doomed = read_doomed(
        &format!(
            "SELECT {SELECT_COLUMNS} FROM vault.entries e JOIN vault.retention_policies rp ON rp.purpose = e.purpose
             WHERE e.purpose = $1 AND e.external_id = $2 AND e.purged_at IS NULL FOR UPDATE OF e"
        ),
        &[purpose.into(), external_id.into()],
    )?;
    if doomed.is_empty() {
        return Err(VaultError::Gone {
            purpose: purpose.into(),
            external_id: external_id.into(),
            why: "purged",
        });
    }
    destroy(doomed, Some(reason), purged_by, None)?
        .first()
        .copied()
        .ok_or_else(|| VaultError::Internal("no proof written".into()))
}

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
    let keys = crate::chain::public_keys()?;
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
