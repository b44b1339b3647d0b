//! Key governance (issue 18): `vault_key_directive`, `vault_revoke_directive`, and the check a
//! put makes against the directives in force. Directives live in `vault.key_directives`, an
//! append-only chained table: a revocation is a new row. The decisions are the core's
//! (`vsql_vault_core::governance`); this module reads the facts and writes the rows.

use crate::audited_call::audited_call;
use crate::errors::{status, VaultError};
use crate::pg::plans::{self, types::TEXT};
use crate::pg::{select_one, write_one};
use crate::security::{require, AsOwner};
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::prelude::*;
use vsql_vault_core::governance::{self, ActiveDirective, DirectiveArgs, Kind, PutVerdict};
use vsql_vault_core::rules::required;

/// The directives in force (not revoked), with the time comparisons a put needs. `$1` is the
/// put's key reference: a cryptoperiod is exceeded when that key protects live ciphertext older
/// than `max_age` (its oldest use in the vault, read through `entries_key_ref`).
const ACTIVE: &str = "SELECT d.id, d.kind, d.target,
        now() >= d.effective_at AS in_effect,
        now() >= d.effective_at + coalesce(d.grace, interval '0') AS past_grace,
        (d.kind OPERATOR(pg_catalog.<>) 'cryptoperiod' OR EXISTS (
            SELECT 1 FROM vault.entries e
             WHERE e.key_ref OPERATOR(pg_catalog.=) $1 AND e.purged_at IS NULL
               AND e.updated_at < now() - d.max_age)) AS age_exceeded,
        (d.effective_at + coalesce(d.grace, interval '0'))::text AS deadline
   FROM vault.key_directives d
  WHERE d.kind OPERATOR(pg_catalog.<>) 'revoke'
    AND NOT EXISTS (SELECT 1 FROM vault.key_directives r WHERE r.revokes = d.id)";

/// The outcome of a put's check: nothing, or the directives in their grace period (id and
/// deadline), which the put's record and a WARNING name.
pub type Grace = Vec<(i64, String)>;

/// Checks a put under `key_ref` / `algorithm_hint` against the directives in force: `VV426`
/// past a directive's grace period, the directives in grace otherwise.
pub fn check_put(key_ref: Option<&str>, algorithm_hint: Option<&str>) -> Result<Grace, VaultError> {
    let _owner = AsOwner::enter();
    if !installed()? {
        return Ok(Vec::new());
    }
    let mut deadlines = std::collections::HashMap::new();
    let directives = Spi::connect(|c| {
        let stmt = plans::plan(c, ACTIVE, &[TEXT], false)?;
        let rows = c.select(&*stmt, None, &[key_ref.into()])?;
        let mut out = Vec::new();
        for row in rows {
            let id = row.get_by_name::<i64, _>("id")?.unwrap_or(0);
            let kind = row.get_by_name::<String, _>("kind")?.unwrap_or_default();
            let Ok(kind) = Kind::parse(&kind) else {
                continue;
            };
            let flag = |n: &str| row.get_by_name::<bool, _>(n).map(|v| v.unwrap_or(false));
            deadlines.insert(
                id,
                row.get_by_name::<String, _>("deadline")?
                    .unwrap_or_default(),
            );
            out.push(ActiveDirective {
                id,
                kind,
                target: row.get_by_name::<String, _>("target")?.unwrap_or_default(),
                in_effect: flag("in_effect")?,
                past_grace: flag("past_grace")?,
                age_exceeded: flag("age_exceeded")?,
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })?;
    match governance::decide_put(&directives, key_ref, algorithm_hint) {
        PutVerdict::Allowed => Ok(Vec::new()),
        PutVerdict::Grace(ids) => Ok(ids
            .into_iter()
            .map(|id| (id, deadlines.remove(&id).unwrap_or_default()))
            .collect()),
        PutVerdict::Refused { id, kind, target } => Err(VaultError::KeyDirective {
            id,
            kind: kind.as_str(),
            target,
        }),
    }
}

thread_local! {
    /// Set once `vault.key_directives` was found in this backend's database.
    static INSTALLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the schema has key directives: a 0.1.0 schema on the new library (before ALTER
/// EXTENSION UPDATE) has none, and its puts go on as before.
pub fn installed() -> Result<bool, VaultError> {
    if INSTALLED.with(|i| i.get()) {
        return Ok(true);
    }
    let found = select_one::<bool>(
        "SELECT pg_catalog.to_regclass('vault.key_directives') IS NOT NULL",
        &[],
    )?
    .unwrap_or(false);
    INSTALLED.with(|i| i.set(found));
    Ok(found)
}

/// Tells the caller about the directives whose grace period a put used.
pub fn warn_grace(grace: &Grace) {
    // The deadline is in the put's access record (details.key_directive_grace) and in
    // vault.reencryption_queue; the warning stays the same text whatever the time.
    for (id, _deadline) in grace {
        pgrx::warning!(
            "key directive {id} governs this key or algorithm: new data under it will be refused (VV426) when its grace period ends; re-encrypt under a compliant key"
        );
    }
}

/// The signs of the intervals the core's validation needs (compared in SQL, where interval
/// arithmetic is).
fn negative(i: Option<Interval>) -> Result<Option<bool>, VaultError> {
    match i {
        None => Ok(None),
        Some(i) => Ok(select_one::<bool>(
            "SELECT $1 < interval '0'",
            &[DatumWithOid::from(i)],
        )?),
    }
}

fn positive(i: Option<Interval>) -> Result<Option<bool>, VaultError> {
    match i {
        None => Ok(None),
        Some(i) => Ok(select_one::<bool>(
            "SELECT $1 > interval '0'",
            &[DatumWithOid::from(i)],
        )?),
    }
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn key_directive_impl(
    kind: Option<&str>,
    target: Option<&str>,
    effective_at: Option<TimestampWithTimeZone>,
    grace: Option<Interval>,
    reason: Option<&str>,
    max_age: Option<Interval>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(id, Option<i64>),
    ),
> {
    let result = audited_call("key_directive", None, None, |event| {
        event.details = Some(serde_json::json!({
            "kind": kind, "target": target, "reason": reason,
            "effective_at": effective_at.map(|t| t.to_string()),
            "grace": grace.map(|g| g.to_string()),
            "max_age": max_age.map(|g| g.to_string()),
        }));
        let kind_text = required(kind, "kind")?;
        let target = required(target, "target")?;
        let effective_at = required(effective_at, "effective_at")?;
        governance::validate(&DirectiveArgs {
            kind: kind_text,
            target,
            grace_negative: negative(grace)?.unwrap_or(false),
            max_age_positive: positive(max_age)?,
            reason,
        })?;
        require(event.caller, &["vault_admin"])?;
        let _owner = AsOwner::enter();
        let _writing = crate::chain::VaultWriting::enter();
        let id = write_one::<i64>(
            "INSERT INTO vault.key_directives
                (kind, target, max_age, effective_at, grace, reason, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                kind_text.into(),
                target.into(),
                max_age.into(),
                effective_at.into(),
                grace.into(),
                reason.into(),
                event.caller.role_name.as_str().into(),
            ],
        )?
        .ok_or_else(|| VaultError::Internal("the directive was not stored".into()))?;
        if let Some(d) = event.details.as_mut() {
            d["directive_id"] = id.into();
        }
        Ok(id)
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn revoke_directive_impl(
    id: Option<i64>,
    reason: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let result = audited_call("revoke_directive", None, None, |event| {
        event.details = Some(serde_json::json!({ "directive_id": id, "reason": reason }));
        let id = required(id, "id")?;
        let reason = required(reason, "reason")?;
        governance::reason(Some(reason))?;
        require(event.caller, &["vault_admin"])?;
        let _owner = AsOwner::enter();
        // Two concurrent revocations of one directive both pass this check; the unique index on
        // `revokes` refuses the second (23505, recorded as a failed call).
        let state = select_one::<String>(
            "SELECT CASE WHEN d.kind OPERATOR(pg_catalog.=) 'revoke' THEN 'revocation'
                         WHEN EXISTS (SELECT 1 FROM vault.key_directives r WHERE r.revokes = d.id)
                         THEN 'revoked' ELSE 'active' END
               FROM vault.key_directives d WHERE d.id = $1",
            &[id.into()],
        )?;
        match state.as_deref() {
            None => return Err(VaultError::NoSuchDirective(id)),
            Some("revocation") | Some("revoked") => {
                return Err(VaultError::DirectiveNotActive(id));
            }
            _ => {}
        }
        let _writing = crate::chain::VaultWriting::enter();
        write_one::<i64>(
            "INSERT INTO vault.key_directives
                (kind, target, effective_at, reason, revokes, created_by)
             SELECT 'revoke', d.target, now(), $2, d.id, $3
               FROM vault.key_directives d WHERE d.id = $1 RETURNING id",
            &[
                id.into(),
                reason.into(),
                event.caller.role_name.as_str().into(),
            ],
        )?;
        Ok(())
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m))
}

/// Every directive (revoked ones too, with their revocation) and how many live entries it
/// governs, is out of compliance with (in effect) and overdue on: the `key_directives` of the key
/// status and of the compliance report. Read as the vault's owner.
const DIRECTIVES: &str = "SELECT coalesce(jsonb_agg(jsonb_build_object(
          'id', d.id, 'kind', d.kind, 'target', d.target, 'max_age', d.max_age,
          'effective_at', d.effective_at, 'grace', d.grace,
          'deadline', d.effective_at + coalesce(d.grace, interval '0'),
          'reason', d.reason, 'created_at', d.created_at, 'created_by', d.created_by,
          'revoked', r.id IS NOT NULL, 'revoked_at', r.created_at, 'revoked_by', r.created_by,
          'revocation_reason', r.reason,
          'entries_governed', coalesce(c.governed, 0),
          'entries_out_of_compliance', coalesce(c.out_of_compliance, 0),
          'entries_overdue', coalesce(c.overdue, 0)) ORDER BY d.id), '[]')
     FROM vault.key_directives d
     LEFT JOIN vault.key_directives r ON r.revokes = d.id
     LEFT JOIN (SELECT directive_id, count(*) AS governed,
                       count(*) FILTER (WHERE now() >= effective_at) AS out_of_compliance,
                       count(*) FILTER (WHERE now() >= deadline) AS overdue
                  FROM vault.key_directive_matches GROUP BY directive_id) c ON c.directive_id = d.id
    WHERE d.kind <> 'revoke'";

/// The `key_directives` section: see `DIRECTIVES`.
pub fn directives() -> Result<serde_json::Value, VaultError> {
    let _owner = AsOwner::enter();
    Ok(select_one::<pgrx::JsonB>(DIRECTIVES, &[])?
        .map(|j| j.0)
        .unwrap_or_default())
}

/// The key status: every key_ref and algorithm_hint of the live entries (one pass, grouping
/// sets) with the directives that govern them, and the vault's own signing keys.
const KEY_STATUS: &str = "WITH u AS (
    SELECT GROUPING(e.key_ref) AS by_algorithm, e.key_ref, e.algorithm_hint, count(*) AS entries,
           min(e.updated_at) AS oldest, max(e.updated_at) AS newest
      FROM vault.entries e WHERE e.purged_at IS NULL
     GROUP BY GROUPING SETS ((e.key_ref), (e.algorithm_hint))
),
m AS (
    SELECT m.entry_id, m.key_ref, m.algorithm_hint, m.directive_id,
           now() >= m.effective_at AS in_effect
      FROM vault.key_directive_matches m
),
by_key AS (
    SELECT m.key_ref, array_agg(DISTINCT m.directive_id ORDER BY m.directive_id) AS directives,
           count(DISTINCT m.entry_id) FILTER (WHERE m.in_effect) AS out_of_compliance
      FROM m GROUP BY m.key_ref
),
by_alg AS (
    SELECT m.algorithm_hint, array_agg(DISTINCT m.directive_id ORDER BY m.directive_id) AS directives,
           count(DISTINCT m.entry_id) FILTER (WHERE m.in_effect) AS out_of_compliance
      FROM m GROUP BY m.algorithm_hint
)
SELECT jsonb_build_object(
  'report', 'vsql_vault key status',
  'database', current_database(),
  'generated_at', now(),
  'key_refs', (SELECT coalesce(jsonb_agg(jsonb_build_object(
          'key_ref', u.key_ref, 'entries', u.entries, 'oldest_ciphertext', u.oldest,
          'newest_ciphertext', u.newest,
          'directives', coalesce(to_jsonb(b.directives), '[]'),
          'entries_out_of_compliance', coalesce(b.out_of_compliance, 0))
          ORDER BY u.key_ref NULLS FIRST), '[]')
        FROM u LEFT JOIN by_key b ON b.key_ref IS NOT DISTINCT FROM u.key_ref
       WHERE u.by_algorithm = 0),
  'algorithm_hints', (SELECT coalesce(jsonb_agg(jsonb_build_object(
          'algorithm_hint', u.algorithm_hint, 'entries', u.entries, 'oldest_ciphertext', u.oldest,
          'newest_ciphertext', u.newest,
          'directives', coalesce(to_jsonb(b.directives), '[]'),
          'entries_out_of_compliance', coalesce(b.out_of_compliance, 0))
          ORDER BY u.algorithm_hint NULLS FIRST), '[]')
        FROM u LEFT JOIN by_alg b ON b.algorithm_hint IS NOT DISTINCT FROM u.algorithm_hint
       WHERE u.by_algorithm = 1),
  'signing_keys', (SELECT coalesce(jsonb_agg(jsonb_build_object(
          'key_id', k.key_id, 'source', k.source, 'created_at', k.created_at,
          'age_days', floor(extract(epoch FROM now() - k.created_at) / 86400)::bigint,
          'previous_key_id', k.previous_key_id, 'retired_at', k.retired_at,
          'current', k.chain_seq = (SELECT max(chain_seq) FROM vault.signing_keys))
          ORDER BY k.chain_seq), '[]') FROM vault.signing_keys k)
)";

/// `vault_key_status()`: the key status reported up to the governance authority, signed like
/// the compliance report (`vsql-vault verify-report` checks it offline).
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn key_status_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(status, Option<String>),
    ),
> {
    let result = audited_call("key_status", None, None, |event| {
        require(event.caller, crate::report::AUDITORS)?;
        let mut status = {
            let _owner = AsOwner::enter();
            select_one::<pgrx::JsonB>(KEY_STATUS, &[])?
                .map(|j| j.0)
                .unwrap_or_default()
        };
        status["directives"] = directives()?;
        status["kek_versions"] = serde_json::json!(crate::decoding::kek_ids());
        status["extension_version"] = serde_json::json!(env!("CARGO_PKG_VERSION"));
        {
            let _owner = AsOwner::enter();
            crate::report::sign(&mut status)?;
        }
        Ok(status.to_string())
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

/// The governance authorities' public keys from `vsql_vault.directive_public_keys`.
fn trusted_keys() -> Result<Vec<vsql_vault_core::keys::VerifyingKey>, VaultError> {
    let text = crate::settings::DIRECTIVE_PUBLIC_KEYS
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    let keys = text
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            vsql_vault_core::keys::parse_public(k)
                .map_err(|e| VaultError::DirectiveKeys(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(VaultError::DirectiveKeys(
            "no governance authority key is set: a superuser lists them first".into(),
        ));
    }
    Ok(keys)
}

/// `vault_apply_directive(signed jsonb)`: a directive document signed by a governance authority
/// (docs/key-governance.md), verified in the core, refused when expired or already applied
/// (its nonce), stored whole with its signature. For vault_admin.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn apply_directive_impl(
    signed: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(id, Option<i64>),
    ),
> {
    let result = audited_call("apply_directive", None, None, |event| {
        let text = required(signed, "signed")?;
        let doc: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| vsql_vault_core::directive_doc::DocError::Malformed(e.to_string()))?;
        // The record names the document (without its signature) whatever the outcome.
        event.details = Some(serde_json::json!({
            "key_id": doc.get("key_id"), "nonce": doc.get("nonce"), "kind": doc.get("kind"),
            "target": doc.get("target"), "expires_at": doc.get("expires_at"),
        }));
        require(event.caller, &["vault_admin"])?;
        let d = vsql_vault_core::directive_doc::verify(&doc, &trusted_keys()?)?;
        governance::validate(&DirectiveArgs {
            kind: &d.kind,
            target: &d.target,
            grace_negative: false,
            max_age_positive: d.max_age_seconds.map(|s| s > 0),
            reason: d.reason.as_deref(),
        })?;
        let _owner = AsOwner::enter();
        let expired = select_one::<bool>(
            "SELECT $1::timestamptz <= now()",
            &[d.expires_at.as_str().into()],
        )?
        .unwrap_or(true);
        if expired {
            return Err(VaultError::DirectiveNotFresh(format!(
                "it expired at {}",
                d.expires_at
            )));
        }
        let replayed = select_one::<i64>(
            "SELECT id FROM vault.key_directives WHERE nonce = $1",
            &[d.nonce.as_str().into()],
        )?;
        if let Some(id) = replayed {
            return Err(VaultError::DirectiveNotFresh(format!(
                "its nonce was already applied as directive {id}"
            )));
        }
        let _writing = crate::chain::VaultWriting::enter();
        let id = write_one::<i64>(
            "INSERT INTO vault.key_directives
                (kind, target, max_age, effective_at, grace, reason, created_by,
                 authority_key_id, nonce, document)
             VALUES ($1, $2, pg_catalog.make_interval(secs => $3),
                     coalesce($4::timestamptz, now()), pg_catalog.make_interval(secs => $5), $6,
                     $7, $8, $9, $10::jsonb)
             RETURNING id",
            &[
                d.kind.as_str().into(),
                d.target.as_str().into(),
                d.max_age_seconds.map(|s| s as f64).into(),
                d.effective_at.as_deref().into(),
                d.grace_seconds.map(|s| s as f64).into(),
                d.reason.as_deref().into(),
                event.caller.role_name.as_str().into(),
                d.key_id.as_str().into(),
                d.nonce.as_str().into(),
                text.into(),
            ],
        )?
        .ok_or_else(|| VaultError::Internal("the directive was not stored".into()))?;
        if let Some(details) = event.details.as_mut() {
            details["directive_id"] = id.into();
        }
        Ok(id)
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}
