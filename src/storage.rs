//! The storage API: vault_put, vault_get, vault_head, vault_list.
//!
//! Each `*_impl` function returns its failure as `(sqlstate, message)` columns; the SQL wrappers in
//! `sql/api.sql` raise them (see `errors.rs` for why). Every call, granted or refused, is made
//! durable in `vault.access_log` before anything is returned.

// pgrx reads a function's result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use crate::access_log::{write_then_log, Event};
use crate::errors::{status, VaultError};
use crate::identity::{AsOwner, Caller};
use crate::plans::{self, types::*};
use crate::settings;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::rules::{self, required};
use vsql_vault_core::Limits;

/// Runs the decision, logs it either way, and returns the data only when its record is durable.
fn decide_and_log<T>(
    event: &mut Event,
    decide: impl FnOnce(&mut Event) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    match decide(event) {
        Ok(v) => match event.granted() {
            Ok(()) => Ok(v),
            Err(e) => Err(e),
        },
        Err(e) => Err(event.refused(e)),
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
    ",
        rp.purpose IS NOT NULL,
        rp.max_retention_days,
        ap.name IS NOT NULL,
        vault.role_allowed(ap.store_roles, $1, $5, $2),
        e.id,
        e.owner::text,
        vault.role_allowed(eap.store_roles, $1, e.owner, $2),
        COALESCE($6, LEAST(now() + pg_catalog.make_interval(days => rp.default_ttl_days), lim.until)),
        COALESCE($6, now()) > lim.until OR lim.until <= now(),
        $6 <= now(),
        lim.until::text,
        COALESCE($6, now() + pg_catalog.make_interval(days => rp.default_ttl_days))::text
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
            ", NULL::bool, e.id, ",
            $value,
            ", e.algorithm_hint, e.key_ref, e.metadata::text, e.owner::text,
                e.created_at, e.expires_at, e.access_policy,
                e.purged_at IS NOT NULL, e.expires_at <= now(), p.max_retrievals,
                vault.role_allowed(p.retrieve_roles, $1, e.owner, e.purpose),
                e.id IS NULL AND EXISTS (SELECT 1 FROM vault.purge_log pl
                                         WHERE pl.purpose = $2 AND pl.external_id = $3)
             FROM (SELECT 1) AS one
             LEFT JOIN vault.entries e ON e.purpose = $2 AND e.external_id = $3
             LEFT JOIN vault.access_policies p ON p.name = e.access_policy"
        )
    };
}
const FIND_WITH_VALUE: &str = find_query!("e.encrypted_value");
const FIND_WITHOUT_VALUE: &str = find_query!("NULL::bytea");

const IS_MEMBER: &str = concat!("SELECT ", member!());

const LIST: &str =
    "SELECT e.external_id, e.owner::text, e.algorithm_hint, e.key_ref, e.metadata::text,
        e.access_policy, e.created_at, e.expires_at
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
    let caller = Caller::current();
    let mut event = Event::new(&caller, "put", purpose, external_id);
    let result = put(
        &caller,
        &mut event,
        purpose,
        external_id,
        encrypted_value,
        algorithm_hint,
        key_ref,
        metadata,
        expires_at,
        access_policy,
    );
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

#[allow(clippy::too_many_arguments)]
fn put(
    caller: &Caller,
    event: &mut Event,
    purpose: Option<&str>,
    external_id: Option<&str>,
    encrypted_value: Option<&[u8]>,
    algorithm_hint: Option<&str>,
    key_ref: Option<&str>,
    metadata: Option<&str>,
    expires_at: Option<TimestampWithTimeZone>,
    access_policy: Option<&str>,
) -> Result<TimestampWithTimeZone, VaultError> {
    let checked = (|| {
        let purpose = required(purpose, "purpose")?;
        let external_id = required(external_id, "external_id")?;
        let value = required(encrypted_value, "encrypted_value")?;
        let metadata = required(metadata, "metadata")?;
        let access_policy = required(access_policy, "access_policy")?;
        rules::purpose(purpose)?;
        rules::external_id(external_id)?;
        let limits = Limits {
            max_value_bytes: settings::MAX_VALUE_BYTES.get().max(1) as usize,
        };
        rules::encrypted_value(value, limits)?;
        rules::metadata(metadata)?;
        Ok::<_, VaultError>((purpose, external_id, value, metadata, access_policy))
    })();
    let (purpose, external_id, value, metadata, access_policy) = match checked {
        Ok(v) => v,
        Err(e) => return Err(event.refused(e)),
    };
    event.details = Some(serde_json::json!({"access_policy": access_policy, "bytes": value.len()}));

    let _owner = AsOwner::enter();
    let decision = Spi::connect(|client| {
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
        Ok::<_, pgrx::spi::Error>((
            row.get::<bool>(1)?.unwrap_or(false),
            row.get::<bool>(2)?.unwrap_or(false),
            row.get::<i32>(3)?.unwrap_or(0),
            row.get::<bool>(4)?.unwrap_or(false),
            row.get::<bool>(5)?.unwrap_or(false),
            row.get::<i64>(6)?,
            row.get::<String>(7)?,
            row.get::<bool>(8)?.unwrap_or(false),
            row.get::<TimestampWithTimeZone>(9)?,
            row.get::<bool>(10)?.unwrap_or(false),
            row.get::<bool>(11)?.unwrap_or(false),
            row.get::<String>(12)?.unwrap_or_default(),
            row.get::<String>(13)?.unwrap_or_default(),
        ))
    })
    .unwrap_or_else(|e| pgrx::error!("vsql_vault: reading policies failed: {e}"));
    let (
        member,
        has_retention,
        max_days,
        policy_exists,
        may_store,
        existing_id,
        existing_owner,
        may_store_existing,
        effective,
        beyond,
        in_past,
        limit,
        requested,
    ) = decision;
    event.entry_id = existing_id;

    let refuse = |event: &Event, e: VaultError| Err(event.refused(e));
    if !member {
        return refuse(
            event,
            VaultError::Denied(format!(
                "role \"{}\" is not a member of vault_app or vault_admin",
                caller.role_name
            )),
        );
    }
    if !has_retention {
        return refuse(event, VaultError::NoRetentionPolicy(purpose.to_owned()));
    }
    if !policy_exists {
        return refuse(event, VaultError::UnknownPolicy(access_policy.to_owned()));
    }
    if beyond {
        return refuse(
            event,
            VaultError::BeyondRetention {
                purpose: purpose.to_owned(),
                requested,
                max_days,
                limit,
            },
        );
    }
    if in_past {
        return refuse(event, VaultError::ExpiryInPast(requested));
    }
    if !may_store {
        return refuse(
            event,
            VaultError::Denied(format!(
                "access policy \"{access_policy}\" does not let role \"{}\" store",
                caller.role_name
            )),
        );
    }
    if let Some(owner) = existing_owner.as_deref() {
        if owner != caller.role_name || !may_store_existing {
            return refuse(
                event,
                VaultError::Denied(format!(
                    "entry \"{external_id}\" of purpose \"{purpose}\" belongs to another role"
                )),
            );
        }
    }
    let Some(effective) = effective else {
        pgrx::error!("vsql_vault: no effective expiry computed");
    };

    let written = write_then_log(
        || {
            let args: Vec<DatumWithOid> = vec![
                purpose.into(),
                external_id.into(),
                value.into(),
                algorithm_hint.into(),
                key_ref.into(),
                metadata.into(),
                access_policy.into(),
                caller.role_name.as_str().into(),
                effective.into(),
            ];
            // Another transaction's uncommitted write of the same (purpose, external_id), maybe
            // another tenant's, must not hold this put forever, unrecorded: wait at most
            // vsql_vault.put_lock_timeout, then refuse with 55P03 and a record. (The wait is
            // inside write_then_log's subtransaction, whose rollback restores lock_timeout.)
            let id = PgTryBuilder::new(|| {
                let _lock_timeout = crate::identity::TemporarySetting::set(
                    c"lock_timeout",
                    &format!("{}ms", settings::PUT_LOCK_TIMEOUT_MS.get().max(1)),
                );
                let id = Spi::connect_mut(|client| {
                    let stmt = plans::plan(
                        client,
                        UPSERT,
                        &[TEXT, TEXT, BYTEA, TEXT, TEXT, TEXT, TEXT, TEXT, TIMESTAMPTZ],
                        true,
                    )?;
                    client.update(&*stmt, None, &args)?.first().get_one::<i64>()
                })
                .unwrap_or_else(|e| pgrx::error!("vsql_vault: storing the entry failed: {e}"));
                Ok(id)
            })
            .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| {
                Err(VaultError::Busy(format!(
                    "entry \"{external_id}\" of purpose \"{purpose}\" is being written by another transaction"
                )))
            })
            .execute()?;
            id.ok_or_else(|| {
                VaultError::Denied(format!(
                    "entry \"{external_id}\" of purpose \"{purpose}\" belongs to another role"
                ))
            })
        },
        |id| {
            event.entry_id = Some(*id);
            event.granted()
        },
    );
    match written {
        Ok(_) => Ok(effective),
        Err(e @ VaultError::AuditUnavailable(_)) => Err(e),
        Err(e) => Err(event.refused(e)),
    }
}

/// What a retrieval reads about an entry before deciding.
struct Found {
    member: bool,
    id: Option<i64>,
    value: Option<Vec<u8>>,
    algorithm_hint: Option<String>,
    key_ref: Option<String>,
    metadata: Option<String>,
    owner: Option<String>,
    created_at: Option<TimestampWithTimeZone>,
    expires_at: Option<TimestampWithTimeZone>,
    access_policy: Option<String>,
    purged: bool,
    expired: bool,
    max_retrievals: Option<i32>,
    allowed: bool,
    /// No entry, but a purge proof for this key: it existed and was destroyed.
    destroyed: bool,
}

fn find(caller: &Caller, purpose: &str, external_id: &str, with_value: bool) -> Found {
    let _owner = AsOwner::enter();
    let query = if with_value {
        FIND_WITH_VALUE
    } else {
        FIND_WITHOUT_VALUE
    };
    Spi::connect(|client| {
        let args: Vec<DatumWithOid> =
            vec![caller.role_oid.into(), purpose.into(), external_id.into()];
        let stmt = plans::plan(client, query, &[OID, TEXT, TEXT], false)?;
        let row = client.select(&*stmt, None, &args)?.first();
        Ok::<_, pgrx::spi::Error>(Found {
            member: row.get::<bool>(1)?.unwrap_or(false),
            id: row.get::<i64>(3)?,
            value: row.get::<Vec<u8>>(4)?,
            algorithm_hint: row.get::<String>(5)?,
            key_ref: row.get::<String>(6)?,
            metadata: row.get::<String>(7)?,
            owner: row.get::<String>(8)?,
            created_at: row.get::<TimestampWithTimeZone>(9)?,
            expires_at: row.get::<TimestampWithTimeZone>(10)?,
            access_policy: row.get::<String>(11)?,
            purged: row.get::<bool>(12)?.unwrap_or(false),
            expired: row.get::<bool>(13)?.unwrap_or(false),
            max_retrievals: row.get::<i32>(14)?,
            allowed: row.get::<bool>(15)?.unwrap_or(false),
            destroyed: row.get::<bool>(16)?.unwrap_or(false),
        })
    })
    .unwrap_or_else(|e| pgrx::error!("vsql_vault: reading the entry failed: {e}"))
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

/// A member asked for an entry its access policy keeps from it. Members learn that the entry
/// exists (42501 against P0002 for an unknown id, as the service this replaces answered 403
/// against 404), but not the policy's name: vault_app cannot read the policies. The record
/// keeps the name for auditors.
fn refused_by_policy(event: &mut Event, caller: &Caller, policy: Option<&str>) -> VaultError {
    event.details = Some(serde_json::json!({ "access_policy": policy }));
    VaultError::Denied(format!(
        "role \"{}\" may not retrieve this entry (its access policy does not allow it)",
        caller.role_name
    ))
}

fn not_member(caller: &Caller) -> VaultError {
    VaultError::Denied(format!(
        "role \"{}\" is not a member of vault_app or vault_admin",
        caller.role_name
    ))
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
    let caller = Caller::current();
    let mut event = Event::new(&caller, "get", purpose, external_id);
    let result = decide_and_log(&mut event, |event| {
        let (purpose, external_id) = checked_key(purpose, external_id)?;
        let f = find(&caller, purpose, external_id, true);
        event.entry_id = f.id;
        event.max_retrievals = f.max_retrievals;
        if !f.member {
            return Err(not_member(&caller));
        }
        if f.id.is_none() && f.destroyed {
            return Err(VaultError::Gone {
                purpose: purpose.into(),
                external_id: external_id.into(),
                why: "purged",
            });
        }
        if f.id.is_none() {
            return Err(VaultError::NotFound {
                purpose: purpose.into(),
                external_id: external_id.into(),
            });
        }
        if !f.allowed {
            return Err(refused_by_policy(
                event,
                &caller,
                f.access_policy.as_deref(),
            ));
        }
        if f.purged || f.expired {
            let why = if f.purged { "purged" } else { "expired" };
            return Err(VaultError::Gone {
                purpose: purpose.into(),
                external_id: external_id.into(),
                why,
            });
        }
        Ok(f)
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
    let caller = Caller::current();
    let mut event = Event::new(&caller, "head", purpose, external_id);
    let result = decide_and_log(&mut event, |event| {
        let (purpose, external_id) = checked_key(purpose, external_id)?;
        let f = find(&caller, purpose, external_id, false);
        event.entry_id = f.id;
        if !f.member {
            return Err(not_member(&caller));
        }
        if f.id.is_some() && !f.allowed {
            return Err(refused_by_policy(
                event,
                &caller,
                f.access_policy.as_deref(),
            ));
        }
        event.details = Some(serde_json::json!({"found": f.id.is_some()}));
        Ok(f)
    });
    let (s, m) = status(&result);
    TableIterator::once(match result {
        Ok(f) => {
            let found = f.id.is_some();
            (
                s,
                m,
                Some(found),
                Some(found && (f.expired || f.purged)),
                f.owner,
                f.access_policy,
                f.created_at,
                f.expires_at,
            )
        }
        Err(_) => (s, m, None, None, None, None, None, None),
    })
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
    let caller = Caller::current();
    let mut event = Event::new(&caller, "list", purpose, None);
    let result = decide_and_log(&mut event, |event| {
        let purpose = required(purpose, "purpose")?;
        rules::purpose(purpose)?;
        let _owner = AsOwner::enter();
        let rows = Spi::connect(|client| {
            let stmt = plans::plan(client, IS_MEMBER, &[OID], false)?;
            let member = client
                .select(&*stmt, None, &[caller.role_oid.into()])?
                .first()
                .get_one::<bool>()?
                .unwrap_or(false);
            if !member {
                return Ok(None);
            }
            let args: Vec<DatumWithOid> = vec![caller.role_oid.into(), purpose.into()];
            let mut out = Vec::new();
            let stmt = plans::plan(client, LIST, &[OID, TEXT], false)?;
            for row in client.select(&*stmt, None, &args)? {
                out.push((
                    row.get::<String>(1)?,
                    row.get::<String>(2)?,
                    row.get::<String>(3)?,
                    row.get::<String>(4)?,
                    row.get::<String>(5)?,
                    row.get::<String>(6)?,
                    row.get::<TimestampWithTimeZone>(7)?,
                    row.get::<TimestampWithTimeZone>(8)?,
                ));
            }
            Ok::<_, pgrx::spi::Error>(Some(out))
        })
        .unwrap_or_else(|e| pgrx::error!("vsql_vault: listing entries failed: {e}"));
        let rows = rows.ok_or_else(|| not_member(&caller))?;
        event.details = Some(serde_json::json!({"entries": rows.len()}));
        Ok(rows)
    });
    let (s, m) = status(&result);
    let rows: Vec<_> = match result {
        Ok(rows) => rows
            .into_iter()
            .map(|(x, o, a, k, md, p, c, e)| (None, None, x, o, a, k, md, p, c, e))
            .collect(),
        Err(_) => vec![(s, m, None, None, None, None, None, None, None, None)],
    };
    TableIterator::new(rows)
}
