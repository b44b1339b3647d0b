//! Retention enforcement: sweeps of expired entries, manual deletes, and the signed purge proofs
//! that make every destruction evidence. Removal and proof happen in one transaction: never a
//! proof without a purge, never a purge without a proof.

use crate::errors::VaultError;
use crate::keys;
use crate::security::AsOwner;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::purge::{prove_batch, EntrySnapshot, ProvedLeaf, PurgeStatement};

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
       e.created_at, e.updated_at, e.expires_at,
       rp.max_retention_days, rp.default_ttl_days, rp.purge_method";

fn read_doomed(query: &str, args: &[DatumWithOid]) -> Result<Vec<Doomed>, VaultError> {
    Spi::connect_mut(|c| {
        let mut out = Vec::new();
        for row in crate::pg::plans::update_with(c, query, args)? {
            let text = |name: &str| row.get_by_name::<String, _>(name);
            let int = |name: &str| row.get_by_name::<i64, _>(name).map(|v| v.unwrap_or(0));
            let days = |name: &str| row.get_by_name::<i32, _>(name).map(|v| v.unwrap_or(0));
            // A timestamptz is its microseconds since 2000-01-01 UTC.
            let micros = |name: &str| {
                row.get_by_name::<pgrx::datum::TimestampWithTimeZone, _>(name)
                    .map(|t| t.map_or(0, pg_sys::TimestampTz::from))
            };
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
                    created_at: micros("created_at")?,
                    updated_at: micros("updated_at")?,
                    expires_at: micros("expires_at")?,
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
    Ok(prove(doomed, reason, purged_by, sweep_id, true)?.proof_ids)
}

/// One batch of proofs as written: its signed batch and the purge_log ids, in leaf order.
pub struct ProvedBatch {
    pub batch_id: i64,
    pub proof_ids: Vec<i64>,
}

/// Writes the proofs of `doomed` and, with `remove`, destroys them; a put replaces the entry it
/// proves superseded itself.
fn prove(
    doomed: Vec<Doomed>,
    reason: Option<&str>,
    purged_by: &str,
    sweep_id: Option<i64>,
    remove: bool,
) -> Result<ProvedBatch, VaultError> {
    if doomed.is_empty() {
        return Ok(ProvedBatch {
            batch_id: 0,
            proof_ids: Vec::new(),
        });
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
    let proved = prove_batch(statements, batch_id, now, &key)?;
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
        if remove {
            remove_entries(c, &doomed)?;
        }
        Ok::<_, pgrx::spi::Error>(ids)
    })
    .map_err(|e| VaultError::Internal(format!("purging failed: {e}")))?;
    chain.finish()?;
    Ok(ProvedBatch {
        batch_id,
        proof_ids: ids,
    })
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
/// `{path}` stands for the expression that makes a proof's `bytea[]` inclusion path from its
/// nodes, which travel concatenated in one `bytea` (`path_expression`).
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
                    {path},
                    $20, $16, $21, $22
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int4[],
                         $8::int4[], $9::text[], $10::text[], $11::text[], $12::bytea[], $13::int8[],
                         $14::int8[], $15::bytea[])
                  WITH ORDINALITY AS r(purpose, external_id, owner, entry_id, created_at_us, expires_at_us,
                                       max_days, ttl_days, method, access_policy, reason, entry_hash,
                                       leaf_index, tree_size, path, ord)
             ORDER BY r.ord
             RETURNING id";

/// The SQL expression that turns `r.path`, the nodes of an inclusion path concatenated, into
/// the path as a `bytea[]`, for paths of up to `longest` nodes: the array of each 32-byte slice,
/// cut to the path's length. Plain built-in functions, no parsing: an array literal per proof
/// (array_in) cost more than the rest of the proof's row.
fn path_expression(longest: usize) -> String {
    if longest == 0 {
        return "'{}'::bytea[]".to_owned();
    }
    let nodes: Vec<String> = (0..longest)
        .map(|i| format!("substr(r.path, {}, 32)", i * 32 + 1))
        .collect();
    format!("(ARRAY[{}])[1:length(r.path) / 32]", nodes.join(", "))
}

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
        // Each path travels as its nodes concatenated (path_expression).
        proved
            .iter()
            .map(|l| l.path.concat())
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
    let longest = proved.iter().map(|l| l.path.len()).max().unwrap_or(0);
    let insert = INSERT_PROOFS.replace("{path}", &path_expression(longest));
    for row in crate::pg::plans::update_with(c, &insert, &args)? {
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
        crate::pg::plans::update_with(
            c,
            "DELETE FROM vault.entries WHERE id = ANY($1)",
            &[ids_delete.into()],
        )?;
    }
    if !ids_shred.is_empty() {
        crate::pg::plans::update_with(
            c,
            "UPDATE vault.entries SET encrypted_value = '\\x'::bytea, purged_at = now() WHERE id = ANY($1)",
            &[ids_shred.into()],
        )?;
    }
    Ok(())
}

/// What one sweep batch destroyed.
pub struct SweptBatch {
    pub entry_ids: Vec<i64>,
    /// The `(expires_at in microseconds, id)` of the last entry it took: the next batch of the
    /// same sweep starts after it.
    pub last: Option<(i64, i64)>,
    /// Entries destroyed per purpose.
    pub purposes: std::collections::BTreeMap<String, i64>,
    pub proved: ProvedBatch,
}

impl SweptBatch {
    pub fn len(&self) -> i64 {
        self.entry_ids.len() as i64
    }
}

/// Purges up to `limit` expired entries in the current transaction, in `(expires_at, id)` order
/// and after `after` (the `last` of the sweep's previous batch); returns what it destroyed.
///
/// Resuming after the previous batch's last entry keeps a sweep's rate steady when its batches
/// share one transaction (`vault_purge_sweep`): the entries it already destroyed are dead only
/// once it commits, and a scan from the start of the index would walk past all of them again
/// in every batch.
pub fn sweep_batch(
    limit: i64,
    purged_by: &str,
    sweep_id: Option<i64>,
    after: Option<(i64, i64)>,
) -> Result<SweptBatch, VaultError> {
    let _owner = AsOwner::enter();
    let (resume, args): (&str, Vec<DatumWithOid>) = match after {
        None => ("", vec![limit.into()]),
        Some((expires_at, id)) => (
            "AND (e.expires_at, e.id) > ('2000-01-01 00:00:00+00'::timestamptz + $2 * interval '1 microsecond', $3)",
            vec![limit.into(), expires_at.into(), id.into()],
        ),
    };
    let doomed = read_doomed(
        &format!(
            "SELECT {SELECT_COLUMNS} FROM vault.entries e JOIN vault.retention_policies rp ON rp.purpose = e.purpose
             WHERE e.expires_at <= now() AND e.purged_at IS NULL {resume}
             ORDER BY e.expires_at, e.id LIMIT $1 FOR UPDATE OF e SKIP LOCKED"
        ),
        &args,
    )?;
    let last = doomed
        .last()
        .map(|d| (d.snapshot.expires_at, d.snapshot.id));
    let entry_ids = doomed.iter().map(|d| d.snapshot.id).collect();
    let mut purposes = std::collections::BTreeMap::new();
    for d in &doomed {
        *purposes.entry(d.snapshot.purpose.clone()).or_insert(0) += 1;
    }
    let proved = prove(doomed, None, purged_by, sweep_id, true)?;
    Ok(SweptBatch {
        entry_ids,
        last,
        purposes,
        proved,
    })
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

/// The live version of an entry a put is about to replace, locked until the put commits.
pub struct Replaced(Doomed);

impl Replaced {
    pub fn entry_id(&self) -> i64 {
        self.0.snapshot.id
    }
}

/// Locks the caller's live entry `(purpose, external_id)` for replacement; None when there is
/// none (new, purged, or another role's: the put's own statement tells those apart). Waits for
/// the row lock as long as the caller's lock_timeout allows.
pub fn lock_for_replacement(
    purpose: &str,
    external_id: &str,
    owner: &str,
) -> Result<Option<Replaced>, VaultError> {
    let _owner = AsOwner::enter();
    let mut found = read_doomed(
        &format!(
            "SELECT {SELECT_COLUMNS} FROM vault.entries e JOIN vault.retention_policies rp ON rp.purpose = e.purpose
             WHERE e.purpose = $1 AND e.external_id = $2 AND e.owner = $3 AND e.purged_at IS NULL
             FOR UPDATE OF e"
        ),
        &[purpose.into(), external_id.into(), owner.into()],
    )?;
    Ok(found.pop().map(Replaced))
}

/// Writes the signed proof (reason `superseded`) of a version a put replaces, in the put's
/// transaction: what existed and when it was destroyed stays complete. Fails when no proof can
/// be made (no signing key), and then the put fails with it.
pub fn prove_superseded(replaced: Replaced, replaced_by: &str) -> Result<i64, VaultError> {
    let _owner = AsOwner::enter();
    prove(
        vec![replaced.0],
        Some("superseded"),
        replaced_by,
        None,
        false,
    )?
    .proof_ids
    .first()
    .copied()
    .ok_or_else(|| VaultError::Internal("no proof written".into()))
}
