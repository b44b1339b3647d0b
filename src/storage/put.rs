//! vault_put: validate, read the facts of the decision in one query, decide, upsert.

use super::{refusal_error, Subject};
use crate::access_log::Event;
use crate::audited_call::audited_change;
use crate::errors::{status, VaultError};
use crate::pg::plans::{self, types::*};
use crate::retention::destroy;
use crate::security::{AsOwner, Caller};
use crate::settings;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::decide::{self, PutFacts, Refusal};
use vsql_vault_core::rules::{self, required};
use vsql_vault_core::Limits;

const PUT_DECISION: &str = concat!(
    "SELECT ",
    member!(),
    " AS is_member,
        rp.purpose IS NOT NULL AS has_retention_policy,
        rp.max_retention_days,
        ap.name IS NOT NULL AS policy_exists,
        vault.role_allowed(ap.store_roles, $1, $5, $2) AS policy_lets_store,
        e.id AS existing_id,
        e.owner::text AS existing_owner,
        vault.role_allowed(eap.store_roles, $1, e.owner, $2) AS existing_policy_lets_store,
        ", requires_identity!("ap"), " OR ", requires_identity!("eap"), " AS identity_required,
        COALESCE($6, LEAST(now() + pg_catalog.make_interval(days => rp.default_ttl_days), lim.until)) AS effective_expiry,
        COALESCE($6, now()) > lim.until OR lim.until <= now() AS beyond_retention,
        $6 <= now() AS expiry_in_past,
        lim.until::text AS retention_limit,
        COALESCE($6, now() + pg_catalog.make_interval(days => rp.default_ttl_days))::text AS requested_expiry
     FROM (SELECT 1) AS one
     LEFT JOIN vault.retention_policies rp ON rp.purpose = $2
     LEFT JOIN vault.access_policies ap ON ap.name = $4
     LEFT JOIN vault.entries e ON e.purpose = $2 AND e.external_id = $3
     LEFT JOIN vault.access_policies eap ON eap.name = e.access_policy
     -- The retention clock starts at the entry's first storage and survives replacement: a
     -- re-put cannot push the data past created_at + max_retention_days (a purged entry starts
     -- over).
     CROSS JOIN LATERAL (SELECT CASE WHEN e.id IS NOT NULL AND e.purged_at IS NULL THEN e.created_at
                                     ELSE now() END
                                + pg_catalog.make_interval(days => rp.max_retention_days) AS until) lim"
);

const UPSERT: &str = "INSERT INTO vault.entries AS e
        (purpose, external_id, encrypted_value, algorithm_hint, key_ref, metadata,
         access_policy, owner, created_at, updated_at, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, now(), now(), $9)
     ON CONFLICT (purpose, external_id) DO UPDATE SET
        id = nextval('vault.entries_id_seq'),
        encrypted_value = EXCLUDED.encrypted_value,
        algorithm_hint = EXCLUDED.algorithm_hint,
        key_ref = EXCLUDED.key_ref,
        metadata = EXCLUDED.metadata,
        access_policy = EXCLUDED.access_policy,
        updated_at = now(),
        expires_at = EXCLUDED.expires_at,
        created_at = CASE WHEN e.purged_at IS NULL THEN e.created_at ELSE now() END,
        purged_at = NULL
     -- A live version is replaced only when it is the one this put locked and proved superseded
     -- ($10): one committed by another transaction since then is left alone, and the put retries.
     WHERE e.owner = EXCLUDED.owner AND (e.purged_at IS NOT NULL OR e.id = $10)
     RETURNING id";

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn put_impl(
    purpose: Option<&str>,
    external_id: Option<&str>,
    encrypted_value: Option<&[u8]>,
    algorithm_hint: Option<&str>,
    key_ref: Option<&str>,
    metadata: Option<&str>,
    expires_at: Option<TimestampWithTimeZone>,
    access_policy: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let input = PutInput {
        purpose,
        external_id,
        encrypted_value,
        algorithm_hint,
        key_ref,
        metadata,
        expires_at,
        access_policy,
    };
    let result = audited_change("put", purpose, external_id, |event| put(event, &input));
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

/// The arguments of `vault_put`, as SQL passed them.
struct PutInput<'a> {
    purpose: Option<&'a str>,
    external_id: Option<&'a str>,
    encrypted_value: Option<&'a [u8]>,
    algorithm_hint: Option<&'a str>,
    key_ref: Option<&'a str>,
    metadata: Option<&'a str>,
    expires_at: Option<TimestampWithTimeZone>,
    access_policy: Option<&'a str>,
}

/// What the put's decision query read, besides the facts the decision takes.
struct PutPlan {
    facts: PutFacts,
    existing_id: Option<i64>,
    max_retention_days: i32,
    effective_expiry: Option<TimestampWithTimeZone>,
    retention_limit: String,
    requested_expiry: String,
}

fn read_put_plan(
    caller: &Caller,
    purpose: &str,
    external_id: &str,
    access_policy: &str,
    expires_at: Option<TimestampWithTimeZone>,
) -> Result<PutPlan, VaultError> {
    let _owner = AsOwner::enter();
    Ok(Spi::connect(|client| {
        let args: Vec<DatumWithOid> = vec![
            caller.role_oid.into(),
            purpose.into(),
            external_id.into(),
            access_policy.into(),
            caller.role_name.as_str().into(),
            expires_at.into(),
        ];
        let stmt = plans::plan(
            client,
            PUT_DECISION,
            &[OID, TEXT, TEXT, TEXT, TEXT, TIMESTAMPTZ],
            false,
        )?;
        let row = client.select(&*stmt, None, &args)?.first();
        let flag = |name: &str| row.get_by_name::<bool, _>(name).map(|v| v.unwrap_or(false));
        Ok::<_, pgrx::spi::Error>(PutPlan {
            facts: PutFacts {
                is_member: flag("is_member")?,
                has_retention_policy: flag("has_retention_policy")?,
                policy_exists: flag("policy_exists")?,
                policy_lets_store: flag("policy_lets_store")?,
                existing_owner: row.get_by_name::<String, _>("existing_owner")?,
                existing_policy_lets_store: flag("existing_policy_lets_store")?,
                beyond_retention: flag("beyond_retention")?,
                expiry_in_past: flag("expiry_in_past")?,
                identity: decide::IdentityFacts {
                    required: flag("identity_required")?,
                    stated: caller.on_behalf_of.is_some(),
                },
            },
            existing_id: row.get_by_name::<i64, _>("existing_id")?,
            max_retention_days: row
                .get_by_name::<i32, _>("max_retention_days")?
                .unwrap_or(0),
            effective_expiry: row.get_by_name::<TimestampWithTimeZone, _>("effective_expiry")?,
            retention_limit: row
                .get_by_name::<String, _>("retention_limit")?
                .unwrap_or_default(),
            requested_expiry: row
                .get_by_name::<String, _>("requested_expiry")?
                .unwrap_or_default(),
        })
    })?)
}

/// The arguments of a put that passed the core's input rules.
#[derive(Clone, Copy)]
struct Checked<'a> {
    purpose: &'a str,
    external_id: &'a str,
    value: &'a [u8],
    metadata: &'a str,
    access_policy: &'a str,
}

fn check<'a>(input: &PutInput<'a>) -> Result<Checked<'a>, VaultError> {
    let checked = Checked {
        purpose: required(input.purpose, "purpose")?,
        external_id: required(input.external_id, "external_id")?,
        value: required(input.encrypted_value, "encrypted_value")?,
        metadata: required(input.metadata, "metadata")?,
        access_policy: required(input.access_policy, "access_policy")?,
    };
    rules::purpose(checked.purpose)?;
    rules::external_id(checked.external_id)?;
    let limits = Limits {
        max_value_bytes: settings::MAX_VALUE_BYTES.get().max(1) as usize,
    };
    rules::encrypted_value(checked.value, limits)?;
    rules::metadata(checked.metadata)?;
    Ok(checked)
}

/// Validates, decides, and stores; the executor records the outcome.
fn put(event: &mut Event, input: &PutInput) -> Result<TimestampWithTimeZone, VaultError> {
    let caller = event.caller;
    let checked = check(input)?;
    let Checked {
        purpose,
        external_id,
        access_policy,
        ..
    } = checked;
    event.details =
        Some(serde_json::json!({"access_policy": access_policy, "bytes": checked.value.len()}));

    let plan = read_put_plan(
        caller,
        purpose,
        external_id,
        access_policy,
        input.expires_at,
    )?;
    event.entry_id = plan.existing_id;
    let subject = Subject {
        caller,
        purpose,
        external_id,
        access_policy,
    };
    decide::decide_put(&caller.role_name, &plan.facts).map_err(|r| match r {
        Refusal::BeyondRetention => VaultError::BeyondRetention {
            purpose: purpose.to_owned(),
            requested: plan.requested_expiry.clone(),
            max_days: plan.max_retention_days,
            limit: plan.retention_limit.clone(),
        },
        Refusal::ExpiryInPast => VaultError::ExpiryInPast(plan.requested_expiry.clone()),
        Refusal::IdentityRequired => {
            event.details = Some(serde_json::json!({ "access_policy": access_policy }));
            VaultError::IdentityRequired
        }
        other => refusal_error(other, &subject),
    })?;
    // Key governance (issue 18): after the access decision, so that a caller who may not store
    // here learns nothing about the directives.
    let grace = crate::governance::check_put(input.key_ref, input.algorithm_hint)?;
    let effective = plan
        .effective_expiry
        .ok_or_else(|| VaultError::Internal("no effective expiry computed".into()))?;
    let stored = upsert(&checked, input, caller, effective)?;
    // No row: the conflicting entry belongs to another role (it changed since the decision).
    let (id, proof) = stored.ok_or_else(|| refusal_error(Refusal::OwnedByAnother, &subject))?;
    event.entry_id = Some(id);
    if let Some((replaced, proof)) = proof {
        // The record names the proof of the version this put replaced; its value must not stay
        // readable in a dead tuple.
        event.details = Some(serde_json::json!({
            "access_policy": access_policy, "bytes": checked.value.len(),
            "superseded": {"entry_id": replaced, "proof_id": proof},
        }));
        crate::retention::worker::request_vacuum();
    }
    if !grace.is_empty() {
        let ids: Vec<serde_json::Value> = grace
            .iter()
            .map(|(id, deadline)| serde_json::json!({"directive_id": id, "deadline": deadline}))
            .collect();
        if let Some(d) = event.details.as_mut() {
            d["key_directive_grace"] = ids.into();
        }
        crate::governance::warn_grace(&grace);
    }
    Ok(effective)
}

/// What a put stored: the entry's id, and the replaced version's entry id and proof id.
type Stored = (i64, Option<(i64, i64)>);

/// Stores the entry, or replaces the caller's own after proving the replaced version
/// superseded; returns the entry's id and the replaced version's id and proof id, or `None`
/// when the entry belongs to another role.
fn upsert(
    checked: &Checked,
    input: &PutInput,
    caller: &Caller,
    expires_at: TimestampWithTimeZone,
) -> Result<Option<Stored>, VaultError> {
    let Checked {
        purpose,
        external_id,
        ..
    } = *checked;
    let _owner = AsOwner::enter();
    // A version committed by another transaction of the same owner after this put's lock was
    // taken is not replaced unproven: the statement skips it, and the put takes it the next time.
    for _ in 0..3 {
        let replaced = with_lock_timeout(purpose, external_id, || {
            destroy::lock_for_replacement(purpose, external_id, &caller.role_name)
        })?;
        let replaced_id = replaced.as_ref().map(destroy::Replaced::entry_id);
        let proof = match replaced {
            Some(r) => Some((
                r.entry_id(),
                destroy::prove_superseded(r, &caller.role_name)?,
            )),
            None => None,
        };
        let args: Vec<DatumWithOid> = vec![
            purpose.into(),
            external_id.into(),
            checked.value.into(),
            input.algorithm_hint.into(),
            input.key_ref.into(),
            checked.metadata.into(),
            checked.access_policy.into(),
            caller.role_name.as_str().into(),
            expires_at.into(),
            replaced_id.into(),
        ];
        let stored = with_lock_timeout(purpose, external_id, || {
            Spi::connect_mut(|client| {
                let stmt = plans::plan(
                    client,
                    UPSERT,
                    &[
                        TEXT,
                        TEXT,
                        BYTEA,
                        TEXT,
                        TEXT,
                        TEXT,
                        TEXT,
                        TEXT,
                        TIMESTAMPTZ,
                        INT8,
                    ],
                    true,
                )?;
                // No row: the conflicting version was not replaced (another role's, or committed
                // after this put's lock was taken).
                let rows = client.update(&*stmt, None, &args)?;
                if rows.is_empty() {
                    return Ok(None);
                }
                rows.first().get_one::<i64>()
            })
            .map_err(VaultError::from)
        })?;
        if stored.is_some()
            || replaced_id.is_some()
            || owned_by_another(purpose, external_id, &caller.role_name)?
        {
            return Ok(stored.map(|id| (id, proof)));
        }
    }
    Err(VaultError::Busy(format!(
        "entry \"{external_id}\" of purpose \"{purpose}\" keeps being replaced by other transactions"
    )))
}

/// Whether the entry exists and belongs to a role other than `role` (read as the owner).
fn owned_by_another(purpose: &str, external_id: &str, role: &str) -> Result<bool, VaultError> {
    Ok(crate::pg::select_one::<bool>(
        "SELECT owner <> $3 FROM vault.entries WHERE purpose = $1 AND external_id = $2",
        &[purpose.into(), external_id.into(), role.into()],
    )?
    .unwrap_or(false))
}

/// Runs `f` waiting at most vsql_vault.put_lock_timeout for a row lock: another transaction's
/// uncommitted write of the same (purpose, external_id), maybe another tenant's, must not hold
/// this put forever, unrecorded. Past it, the put is refused with 55P03 and a record. (The
/// executor's subtransaction, rolled back on the refusal, restores lock_timeout.)
fn with_lock_timeout<T>(
    purpose: &str,
    external_id: &str,
    f: impl FnOnce() -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        let _lock_timeout = crate::pg::TemporarySetting::set(
            c"lock_timeout",
            &format!("{}ms", settings::PUT_LOCK_TIMEOUT_MS.get().max(1)),
        );
        f()
    }))
    .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| {
        Err(VaultError::Busy(format!(
            "entry \"{external_id}\" of purpose \"{purpose}\" is being written by another transaction"
        )))
    })
    .execute()
}
