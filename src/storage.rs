//! The storage API: vault_put, vault_get, vault_head, vault_list.
//!
//! Each `*_impl` function returns its failure as `(sqlstate, message)` columns; the SQL wrappers in
//! `sql/api.sql` raise them (see `errors.rs` for why). Every call, granted or refused, is made
//! durable in `vault.access_log` before anything is returned.

// pgrx reads a function's result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use crate::access_log::Event;
use crate::audited_call::audited_call;
use crate::errors::{status, VaultError};
use crate::identity::{AsOwner, Caller};
use crate::plans::{self, types::*};
use crate::settings;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::decide::{self, EntryFacts, PutFacts, Refusal};
use vsql_vault_core::rules::{self, required};
use vsql_vault_core::Limits;

/// What a refusal's message names.
pub struct Subject<'a> {
    pub caller: &'a Caller,
    pub purpose: &'a str,
    pub external_id: &'a str,
    pub access_policy: &'a str,
}

/// The error of a refused decision, with the message and SQLSTATE the API documents.
pub fn refusal_error(r: Refusal, s: &Subject) -> VaultError {
    let (purpose, external_id) = (s.purpose.to_owned(), s.external_id.to_owned());
    match r {
        Refusal::NotMember { roles } => VaultError::Denied(format!(
            "role \"{}\" is not a member of {roles}",
            s.caller.role_name
        )),
        Refusal::NoRetentionPolicy => VaultError::NoRetentionPolicy(purpose),
        Refusal::UnknownPolicy => VaultError::UnknownPolicy(s.access_policy.to_owned()),
        // The put's own message carries the limit; see `put`.
        Refusal::BeyondRetention | Refusal::ExpiryInPast => {
            VaultError::Internal("a retention refusal without its limit".into())
        }
        Refusal::PolicyForbidsStore => VaultError::Denied(format!(
            "access policy \"{}\" does not let role \"{}\" store",
            s.access_policy, s.caller.role_name
        )),
        Refusal::OwnedByAnother => VaultError::Denied(format!(
            "entry \"{external_id}\" of purpose \"{purpose}\" belongs to another role"
        )),
        Refusal::NotFound => VaultError::NotFound {
            purpose,
            external_id,
        },
        Refusal::Gone { why } => VaultError::Gone {
            purpose,
            external_id,
            why,
        },
        // Members learn that the entry exists (42501 against P0002 for an unknown id, as the
        // service this replaces answered 403 against 404), but not the policy's name: vault_app
        // cannot read the policies. The record keeps the name for auditors.
        Refusal::PolicyForbidsRetrieve => VaultError::Denied(format!(
            "role \"{}\" may not retrieve this entry (its access policy does not allow it)",
            s.caller.role_name
        )),
        Refusal::PolicyForbidsPurge => VaultError::Denied(format!(
            "role \"{}\" may not purge this entry",
            s.caller.role_name
        )),
    }
}

/// Whether role `$1` may use the storage API at all.
macro_rules! member {
    () => {
        "(pg_catalog.pg_has_role($1, 'vault_app', 'USAGE') OR pg_catalog.pg_has_role($1, 'vault_admin', 'USAGE'))"
    };
}

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
     WHERE e.owner = EXCLUDED.owner
     RETURNING id";

macro_rules! find_query {
    ($value:literal) => {
        concat!(
            "SELECT ",
            member!(),
            " AS is_member, e.id, ",
            $value,
            " AS encrypted_value, e.algorithm_hint, e.key_ref, e.metadata::text AS metadata,
                e.owner::text AS owner, e.created_at, e.expires_at, e.access_policy,
                e.purged_at IS NOT NULL AS purged, e.expires_at <= now() AS expired, p.max_retrievals,
                vault.role_allowed(p.retrieve_roles, $1, e.owner, e.purpose) AS policy_lets_retrieve,
                e.id IS NULL AND EXISTS (SELECT 1 FROM vault.purge_log pl
                                         WHERE pl.purpose = $2 AND pl.external_id = $3) AS destroyed
             FROM (SELECT 1) AS one
             LEFT JOIN vault.entries e ON e.purpose = $2 AND e.external_id = $3
             LEFT JOIN vault.access_policies p ON p.name = e.access_policy"
        )
    };
}
const FIND_WITH_VALUE: &str = find_query!("e.encrypted_value");
const FIND_WITHOUT_VALUE: &str = find_query!("NULL::bytea");

const IS_MEMBER: &str = concat!("SELECT ", member!(), " AS is_member");

const LIST: &str = "SELECT e.external_id, e.owner::text AS owner, e.algorithm_hint, e.key_ref,
        e.metadata::text AS metadata, e.access_policy, e.created_at, e.expires_at
     FROM vault.entries e JOIN vault.access_policies p ON p.name = e.access_policy
     WHERE e.purpose = $2 AND e.purged_at IS NULL
       AND (pg_catalog.pg_has_role($1, 'vault_admin', 'USAGE')
            OR vault.role_allowed(p.retrieve_roles, $1, e.owner, e.purpose))
     ORDER BY e.external_id";

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
    let result = audited_call("put", purpose, external_id, |event| put(event, &input));
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

/// Validates, decides, and stores; the executor records the outcome.
fn put(event: &mut Event, input: &PutInput) -> Result<TimestampWithTimeZone, VaultError> {
    let caller = event.caller;
    let purpose = required(input.purpose, "purpose")?;
    let external_id = required(input.external_id, "external_id")?;
    let value = required(input.encrypted_value, "encrypted_value")?;
    let metadata = required(input.metadata, "metadata")?;
    let access_policy = required(input.access_policy, "access_policy")?;
    rules::purpose(purpose)?;
    rules::external_id(external_id)?;
    let limits = Limits {
        max_value_bytes: settings::MAX_VALUE_BYTES.get().max(1) as usize,
    };
    rules::encrypted_value(value, limits)?;
    rules::metadata(metadata)?;
    event.details = Some(serde_json::json!({"access_policy": access_policy, "bytes": value.len()}));

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
        other => refusal_error(other, &subject),
    })?;
    let effective = plan
        .effective_expiry
        .ok_or_else(|| VaultError::Internal("no effective expiry computed".into()))?;

    let args: Vec<DatumWithOid> = vec![
        purpose.into(),
        external_id.into(),
        value.into(),
        input.algorithm_hint.into(),
        input.key_ref.into(),
        metadata.into(),
        access_policy.into(),
        caller.role_name.as_str().into(),
        effective.into(),
    ];
    // Another transaction's uncommitted write of the same (purpose, external_id), maybe another
    // tenant's, must not hold this put forever, unrecorded: wait at most
    // vsql_vault.put_lock_timeout, then refuse with 55P03 and a record. (The executor's
    // subtransaction, rolled back on the refusal, restores lock_timeout.)
    let _owner = AsOwner::enter();
    let id = PgTryBuilder::new(|| {
        let _lock_timeout = crate::identity::TemporarySetting::set(
            c"lock_timeout",
            &format!("{}ms", settings::PUT_LOCK_TIMEOUT_MS.get().max(1)),
        );
        Spi::connect_mut(|client| {
            let stmt = plans::plan(
                client,
                UPSERT,
                &[TEXT, TEXT, BYTEA, TEXT, TEXT, TEXT, TEXT, TEXT, TIMESTAMPTZ],
                true,
            )?;
            client.update(&*stmt, None, &args)?.first().get_one::<i64>()
        })
        .map_err(VaultError::from)
    })
    .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| {
        Err(VaultError::Busy(format!(
            "entry \"{external_id}\" of purpose \"{purpose}\" is being written by another transaction"
        )))
    })
    .execute()?;
    // No row: the conflicting entry belongs to another role (it changed since the decision).
    let id = id.ok_or_else(|| refusal_error(Refusal::OwnedByAnother, &subject))?;
    event.entry_id = Some(id);
    Ok(effective)
}

/// What a retrieval reads about an entry before deciding.
struct Found {
    facts: EntryFacts,
    id: Option<i64>,
    value: Option<Vec<u8>>,
    algorithm_hint: Option<String>,
    key_ref: Option<String>,
    metadata: Option<String>,
    owner: Option<String>,
    created_at: Option<TimestampWithTimeZone>,
    expires_at: Option<TimestampWithTimeZone>,
    access_policy: Option<String>,
    max_retrievals: Option<i32>,
}

fn find(
    caller: &Caller,
    purpose: &str,
    external_id: &str,
    with_value: bool,
) -> Result<Found, VaultError> {
    let _owner = AsOwner::enter();
    let query = if with_value {
        FIND_WITH_VALUE
    } else {
        FIND_WITHOUT_VALUE
    };
    Ok(Spi::connect(|client| {
        let args: Vec<DatumWithOid> =
            vec![caller.role_oid.into(), purpose.into(), external_id.into()];
        let stmt = plans::plan(client, query, &[OID, TEXT, TEXT], false)?;
        let row = client.select(&*stmt, None, &args)?.first();
        let flag = |name: &str| row.get_by_name::<bool, _>(name).map(|v| v.unwrap_or(false));
        let id = row.get_by_name::<i64, _>("id")?;
        Ok::<_, pgrx::spi::Error>(Found {
            facts: EntryFacts {
                is_member: flag("is_member")?,
                exists: id.is_some(),
                destroyed: flag("destroyed")?,
                policy_lets_retrieve: flag("policy_lets_retrieve")?,
                purged: flag("purged")?,
                expired: flag("expired")?,
            },
            id,
            value: row.get_by_name::<Vec<u8>, _>("encrypted_value")?,
            algorithm_hint: row.get_by_name::<String, _>("algorithm_hint")?,
            key_ref: row.get_by_name::<String, _>("key_ref")?,
            metadata: row.get_by_name::<String, _>("metadata")?,
            owner: row.get_by_name::<String, _>("owner")?,
            created_at: row.get_by_name::<TimestampWithTimeZone, _>("created_at")?,
            expires_at: row.get_by_name::<TimestampWithTimeZone, _>("expires_at")?,
            access_policy: row.get_by_name::<String, _>("access_policy")?,
            max_retrievals: row.get_by_name::<i32, _>("max_retrievals")?,
        })
    })?)
}

fn checked_key<'a>(
    purpose: Option<&'a str>,
    external_id: Option<&'a str>,
) -> Result<(&'a str, &'a str), VaultError> {
    let purpose = required(purpose, "purpose")?;
    let external_id = required(external_id, "external_id")?;
    rules::purpose(purpose)?;
    rules::external_id(external_id)?;
    Ok((purpose, external_id))
}

/// Reads an entry and decides a get or head on it. A refusal by the entry's policy keeps the
/// policy's name in the record, for auditors.
fn find_and_decide(
    event: &mut Event,
    purpose: Option<&str>,
    external_id: Option<&str>,
    with_value: bool,
    decide: fn(&EntryFacts) -> Result<(), Refusal>,
) -> Result<Found, VaultError> {
    let caller = event.caller;
    let (purpose, external_id) = checked_key(purpose, external_id)?;
    let found = find(caller, purpose, external_id, with_value)?;
    event.entry_id = found.id;
    // Only a get returns the value, so only a get counts against max_retrievals.
    if with_value {
        event.max_retrievals = found.max_retrievals;
    }
    if let Err(refusal) = decide(&found.facts) {
        if refusal == Refusal::PolicyForbidsRetrieve {
            event.details = Some(serde_json::json!({ "access_policy": found.access_policy }));
        }
        return Err(refusal_error(
            refusal,
            &Subject {
                caller,
                purpose,
                external_id,
                access_policy: found.access_policy.as_deref().unwrap_or_default(),
            },
        ));
    }
    Ok(found)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn get_impl(
    purpose: Option<&str>,
    external_id: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(encrypted_value, Option<Vec<u8>>),
        name!(algorithm_hint, Option<String>),
        name!(key_ref, Option<String>),
        name!(metadata, Option<String>),
        name!(owner, Option<String>),
        name!(created_at, Option<TimestampWithTimeZone>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let result = audited_call("get", purpose, external_id, |event| {
        find_and_decide(event, purpose, external_id, true, decide::decide_get)
    });
    let (s, m) = status(&result);
    TableIterator::once(match result {
        Ok(f) => (
            s,
            m,
            f.value,
            f.algorithm_hint,
            f.key_ref,
            f.metadata,
            f.owner,
            f.created_at,
            f.expires_at,
        ),
        Err(_) => (s, m, None, None, None, None, None, None, None),
    })
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn head_impl(
    purpose: Option<&str>,
    external_id: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(found, Option<bool>),
        name!(expired, Option<bool>),
        name!(owner, Option<String>),
        name!(access_policy, Option<String>),
        name!(created_at, Option<TimestampWithTimeZone>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let result = audited_call("head", purpose, external_id, |event| {
        let f = find_and_decide(event, purpose, external_id, false, decide::decide_head)?;
        event.details = Some(serde_json::json!({"found": f.facts.exists}));
        Ok(f)
    });
    let (s, m) = status(&result);
    TableIterator::once(match result {
        Ok(f) => {
            let found = f.facts.exists;
            (
                s,
                m,
                Some(found),
                Some(found && (f.facts.expired || f.facts.purged)),
                f.owner,
                f.access_policy,
                f.created_at,
                f.expires_at,
            )
        }
        Err(_) => (s, m, None, None, None, None, None, None),
    })
}

/// One entry of a listing.
struct Listed {
    external_id: Option<String>,
    owner: Option<String>,
    algorithm_hint: Option<String>,
    key_ref: Option<String>,
    metadata: Option<String>,
    access_policy: Option<String>,
    created_at: Option<TimestampWithTimeZone>,
    expires_at: Option<TimestampWithTimeZone>,
}

fn list(event: &mut Event, purpose: Option<&str>) -> Result<Vec<Listed>, VaultError> {
    let caller = event.caller;
    let purpose = required(purpose, "purpose")?;
    rules::purpose(purpose)?;
    let _owner = AsOwner::enter();
    let rows = Spi::connect(|client| {
        let stmt = plans::plan(client, IS_MEMBER, &[OID], false)?;
        let member = client
            .select(&*stmt, None, &[caller.role_oid.into()])?
            .first()
            .get_by_name::<bool, _>("is_member")?
            .unwrap_or(false);
        if !member {
            return Ok(None);
        }
        let args: Vec<DatumWithOid> = vec![caller.role_oid.into(), purpose.into()];
        let mut out = Vec::new();
        let stmt = plans::plan(client, LIST, &[OID, TEXT], false)?;
        for row in client.select(&*stmt, None, &args)? {
            out.push(Listed {
                external_id: row.get_by_name("external_id")?,
                owner: row.get_by_name("owner")?,
                algorithm_hint: row.get_by_name("algorithm_hint")?,
                key_ref: row.get_by_name("key_ref")?,
                metadata: row.get_by_name("metadata")?,
                access_policy: row.get_by_name("access_policy")?,
                created_at: row.get_by_name("created_at")?,
                expires_at: row.get_by_name("expires_at")?,
            });
        }
        Ok::<_, pgrx::spi::Error>(Some(out))
    })?;
    let rows = rows.ok_or_else(|| {
        refusal_error(
            Refusal::NotMember {
                roles: "vault_app or vault_admin",
            },
            &Subject {
                caller,
                purpose,
                external_id: "",
                access_policy: "",
            },
        )
    })?;
    event.details = Some(serde_json::json!({"entries": rows.len()}));
    Ok(rows)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn list_impl(
    purpose: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(external_id, Option<String>),
        name!(owner, Option<String>),
        name!(algorithm_hint, Option<String>),
        name!(key_ref, Option<String>),
        name!(metadata, Option<String>),
        name!(access_policy, Option<String>),
        name!(created_at, Option<TimestampWithTimeZone>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let result = audited_call("list", purpose, None, |event| list(event, purpose));
    let (s, m) = status(&result);
    let rows: Vec<_> = match result {
        Ok(rows) => rows
            .into_iter()
            .map(|r| {
                (
                    None,
                    None,
                    r.external_id,
                    r.owner,
                    r.algorithm_hint,
                    r.key_ref,
                    r.metadata,
                    r.access_policy,
                    r.created_at,
                    r.expires_at,
                )
            })
            .collect(),
        Err(_) => vec![(s, m, None, None, None, None, None, None, None, None)],
    };
    TableIterator::new(rows)
}
