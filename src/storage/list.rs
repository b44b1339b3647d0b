//! vault_list: the live entries of a purpose that the caller may retrieve, one keyset page at a
//! time: at most `max_rows` entries with `external_id` after `after`, in the order of
//! `vault.entries`' unique index on (purpose, external_id) (the database's collation). Only a
//! page is held in memory, never the whole purpose; the next page starts after the last id of
//! this one.

// pgrx reads a function's result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use super::{refusal_error, Subject};
use crate::access_log::Event;
use crate::audited_call::audited_call;
use crate::errors::{status, VaultError};
use crate::pg::plans::{self, types::*};
use crate::security::AsOwner;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::decide::Refusal;
use vsql_vault_core::rules::{self, required};

const IS_MEMBER: &str = concat!("SELECT ", member!(), " AS is_member");

// Entries under a policy with require_identity are listed only to a call that states an identity
// ($5), as they would be retrieved. The LIMIT applies after the policy filter: a page has
// max_rows entries the caller may see whenever that many remain after `after`.
const LIST: &str = concat!(
    "SELECT e.external_id, e.owner::text AS owner, e.algorithm_hint, e.key_ref,
        e.metadata::text AS metadata, e.access_policy, e.created_at, e.expires_at
     FROM vault.entries e JOIN vault.access_policies p ON p.name = e.access_policy
     WHERE e.purpose = $2 AND e.purged_at IS NULL
       -- '' sorts before every id (ids are not empty; ties under the collation fall back to
       -- byte order): one index range, also in a generic plan.
       AND e.external_id > coalesce($3, '')
       AND (pg_catalog.pg_has_role($1, 'vault_admin', 'USAGE')
            OR vault.role_allowed(p.retrieve_roles, $1, e.owner, e.purpose))
       AND ($5 OR NOT ",
    requires_identity!("p"),
    ")
     ORDER BY e.external_id
     LIMIT $4"
);

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

/// Where a page starts and how long it is.
#[derive(Clone, Copy)]
struct Page<'a> {
    after: Option<&'a str>,
    max_rows: Option<i32>,
}

fn list(event: &mut Event, purpose: Option<&str>, page: Page) -> Result<Vec<Listed>, VaultError> {
    let caller = event.caller;
    let purpose = required(purpose, "purpose")?;
    rules::purpose(purpose)?;
    let max_rows = required(page.max_rows, "max_rows")?;
    rules::max_rows(max_rows)?;
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
        let args: Vec<DatumWithOid> = vec![
            caller.role_oid.into(),
            purpose.into(),
            page.after.into(),
            max_rows.into(),
            caller.on_behalf_of.is_some().into(),
        ];
        let mut out = Vec::with_capacity(max_rows.min(1000) as usize);
        let stmt = plans::plan(client, LIST, &[OID, TEXT, TEXT, INT4, BOOL], false)?;
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
    event.details = Some(serde_json::json!({
        "entries": rows.len(), "after": page.after, "max_rows": max_rows,
    }));
    Ok(rows)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn list_page_impl(
    purpose: Option<&str>,
    after: Option<&str>,
    max_rows: Option<i32>,
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
    let page = Page { after, max_rows };
    let result = audited_call("list", purpose, None, |event| list(event, purpose, page));
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

/// `vault.list_impl(text)` of 0.1.0, which its `vault_list(purpose)` calls between a library update
/// and ALTER EXTENSION UPDATE (which drops it): the first page, as `vault_list(purpose)` gives
/// now. Declared by no SQL of this version.
#[pg_extern(volatile, parallel_unsafe, schema = "vault", sql = false)]
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
    list_page_impl(purpose, None, Some(1000))
}
