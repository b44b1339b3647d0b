//! vault_get and vault_head: read an entry and the facts about it in one query, then decide.

// pgrx reads a function's result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use super::{refusal_error, Subject};
use crate::access_log::Event;
use crate::audited_call::audited_call;
use crate::errors::{status, VaultError};
use crate::pg::plans::{self, types::*};
use crate::security::{AsOwner, Caller};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::decide::{self, EntryFacts, Refusal};
use vsql_vault_core::rules::{self, required};

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
                ",
            requires_identity!("p"),
            " AS identity_required,
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
                identity: decide::IdentityFacts {
                    required: flag("identity_required")?,
                    stated: caller.on_behalf_of.is_some(),
                },
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
        if matches!(
            refusal,
            Refusal::PolicyForbidsRetrieve | Refusal::IdentityRequired
        ) {
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
