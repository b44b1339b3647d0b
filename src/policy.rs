//! Policy administration: retention policies, access policies and purpose grants.
//! Only `vault_admin` members change policies; every attempt is logged like any access.

use crate::audited_call::audited_call;
use crate::errors::VaultError;
use crate::pg::select_one;
use crate::security::{require, AsOwner, Caller};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use vsql_vault_core::rules::{self, required, ROLE_TOKENS};

fn status_row(
    r: Result<(), VaultError>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    TableIterator::once(match r {
        Ok(()) => (None, None),
        Err(e) => (Some(e.sqlstate().to_owned()), Some(e.to_string())),
    })
}

fn role_exists(role: &str) -> bool {
    select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
        &[role.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// An audited policy change: validates, checks the caller is an admin, applies `change` as the
/// vault's owner; all or nothing, recorded either way.
fn administer(
    operation: &'static str,
    purpose: Option<&str>,
    details: serde_json::Value,
    validate: impl FnOnce() -> Result<(), VaultError>,
    change: impl FnOnce(&Caller) -> Result<(), VaultError>,
) -> Result<(), VaultError> {
    audited_call(operation, purpose, None, |event| {
        event.details = Some(details);
        validate()?;
        require(event.caller, &["vault_admin"])?;
        let _owner = AsOwner::enter();
        change(event.caller)
    })
}

fn spi_update(query: &str, args: &[DatumWithOid]) -> Result<usize, VaultError> {
    Ok(Spi::connect_mut(|c| {
        c.update(query, None, args).map(|t| t.len())
    })?)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn set_retention_policy_impl(
    purpose: Option<&str>,
    max_retention_days: Option<i32>,
    default_ttl_days: Option<i32>,
    purge_method: Option<&str>,
    require_purge_proof: Option<bool>,
    description: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let details = serde_json::json!({
        "max_retention_days": max_retention_days, "default_ttl_days": default_ttl_days,
        "purge_method": purge_method, "require_purge_proof": require_purge_proof,
        "description": description,
    });
    let validate = || {
        let p = required(purpose, "purpose")?;
        let max = required(max_retention_days, "max_retention_days")?;
        let ttl = required(default_ttl_days, "default_ttl_days")?;
        let m = required(purge_method, "purge_method")?;
        let proof = required(require_purge_proof, "require_purge_proof")?;
        rules::purpose(p)?;
        rules::require_purge_proof(proof)?;
        rules::retention_days(max, ttl)?;
        rules::purge_method(m)?;
        rules::description(description)?;
        Ok(())
    };
    let change = |caller: &Caller| {
        spi_update(
            "INSERT INTO vault.retention_policies AS r
                (purpose, max_retention_days, default_ttl_days, purge_method, require_purge_proof,
                 description, updated_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (purpose) DO UPDATE SET
                max_retention_days = EXCLUDED.max_retention_days,
                default_ttl_days = EXCLUDED.default_ttl_days,
                purge_method = EXCLUDED.purge_method,
                require_purge_proof = EXCLUDED.require_purge_proof,
                description = EXCLUDED.description,
                updated_at = now(), updated_by = EXCLUDED.updated_by",
            &[
                purpose.into(),
                max_retention_days.into(),
                default_ttl_days.into(),
                purge_method.into(),
                require_purge_proof.into(),
                description.into(),
                caller.role_name.as_str().into(),
            ],
        )?;
        Ok(())
    };
    status_row(administer(
        "set_retention_policy",
        purpose,
        details,
        validate,
        change,
    ))
}

/// The policy upsert; `$col`/`$val`/`$set` add `require_identity`, which a 0.1.0 schema does not
/// have (its `vault_set_access_policy` calls `vault.set_access_policy_impl` without it).
macro_rules! upsert_policy {
    ($col:literal, $val:literal, $set:literal) => {
        concat!(
            "INSERT INTO vault.access_policies AS p
                (name, store_roles, retrieve_roles, purge_roles, max_retrievals, description, updated_by",
            $col,
            ")
             VALUES ($1, $2::name[], $3::name[], $4::name[], $5, $6, $7",
            $val,
            ")
             ON CONFLICT (name) DO UPDATE SET
                store_roles = EXCLUDED.store_roles, retrieve_roles = EXCLUDED.retrieve_roles,
                purge_roles = EXCLUDED.purge_roles, max_retrievals = EXCLUDED.max_retrievals,
                description = EXCLUDED.description, updated_at = now(), updated_by = EXCLUDED.updated_by",
            $set,
            "
             WHERE NOT p.builtin
             RETURNING 1"
        )
    };
}

/// An access policy as `vault_set_access_policy` gives it. `require_identity`: None from 0.1.0's
/// declaration (no such parameter, no such column); Some(None) is a NULL, refused.
struct PolicyInput<'a> {
    name: Option<&'a str>,
    store_roles: Option<Vec<Option<String>>>,
    retrieve_roles: Option<Vec<Option<String>>>,
    purge_roles: Option<Vec<Option<String>>>,
    max_retrievals: Option<i32>,
    description: Option<&'a str>,
    require_identity: Option<Option<bool>>,
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn set_access_policy_v2_impl(
    name: Option<&str>,
    store_roles: Option<Vec<Option<String>>>,
    retrieve_roles: Option<Vec<Option<String>>>,
    purge_roles: Option<Vec<Option<String>>>,
    max_retrievals: Option<i32>,
    description: Option<&str>,
    require_identity: Option<bool>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    set_access_policy(PolicyInput {
        name,
        store_roles,
        retrieve_roles,
        purge_roles,
        max_retrievals,
        description,
        require_identity: Some(require_identity),
    })
}

/// `vault.set_access_policy_impl` of 0.1.0, which its `vault_set_access_policy` calls between a
/// library update and ALTER EXTENSION UPDATE (which replaces both). Declared by no SQL of this
/// version.
#[pg_extern(volatile, parallel_unsafe, schema = "vault", sql = false)]
#[search_path(pg_catalog, pg_temp)]
fn set_access_policy_impl(
    name: Option<&str>,
    store_roles: Option<Vec<Option<String>>>,
    retrieve_roles: Option<Vec<Option<String>>>,
    purge_roles: Option<Vec<Option<String>>>,
    max_retrievals: Option<i32>,
    description: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    set_access_policy(PolicyInput {
        name,
        store_roles,
        retrieve_roles,
        purge_roles,
        max_retrievals,
        description,
        require_identity: None,
    })
}

fn set_access_policy(
    p: PolicyInput,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let details = serde_json::json!({
        "name": p.name, "store_roles": p.store_roles, "retrieve_roles": p.retrieve_roles,
        "purge_roles": p.purge_roles, "max_retrievals": p.max_retrievals,
        "description": p.description, "require_identity": p.require_identity.flatten(),
    });
    let lists = [
        ("store_roles", &p.store_roles),
        ("retrieve_roles", &p.retrieve_roles),
        ("purge_roles", &p.purge_roles),
    ];
    let validate = || {
        let n = required(p.name, "name")?;
        rules::policy_name(n)?;
        for (label, list) in lists {
            let list = required(list.as_ref(), label)?;
            for role in list {
                let role = required(role.as_deref(), label)?;
                if !ROLE_TOKENS.contains(&role) && !role_exists(role) {
                    return Err(VaultError::UnknownRole(role.to_owned()));
                }
            }
        }
        rules::max_retrievals(p.max_retrievals)?;
        rules::description(p.description)?;
        if let Some(r) = p.require_identity {
            required(r, "require_identity")?;
        }
        Ok(())
    };
    let change = |caller: &Caller| {
        let n = p.name.unwrap_or_default();
        let mut args: Vec<DatumWithOid> = vec![
            n.into(),
            p.store_roles.clone().into(),
            p.retrieve_roles.clone().into(),
            p.purge_roles.clone().into(),
            p.max_retrievals.into(),
            p.description.into(),
            caller.role_name.as_str().into(),
        ];
        let upsert = match p.require_identity {
            Some(r) => {
                args.push(r.into());
                upsert_policy!(
                    ", require_identity",
                    ", $8",
                    ", require_identity = EXCLUDED.require_identity"
                )
            }
            None => upsert_policy!("", "", ""),
        };
        if spi_update(upsert, &args)? == 0 {
            return Err(VaultError::BuiltinPolicy(n.to_owned()));
        }
        Ok(())
    };
    status_row(administer(
        "set_access_policy",
        None,
        details,
        validate,
        change,
    ))
}

fn purpose_grant(
    operation: &'static str,
    purpose: Option<&str>,
    role: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let details = serde_json::json!({ "role": role });
    let validate = || {
        let p = required(purpose, "purpose")?;
        let r = required(role, "role")?;
        rules::purpose(p)?;
        if !role_exists(r) {
            return Err(VaultError::UnknownRole(r.to_owned()));
        }
        Ok(())
    };
    let change = |caller: &Caller| {
        let p = purpose.unwrap_or_default();
        let has_policy = select_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM vault.retention_policies WHERE purpose = $1)",
            &[p.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !has_policy {
            return Err(VaultError::NoRetentionPolicy(p.to_owned()));
        }
        let args: [DatumWithOid; 3] = [p.into(), role.into(), caller.role_name.as_str().into()];
        if operation == "grant_purpose" {
            spi_update(
                "INSERT INTO vault.purpose_grants (purpose, role_name, granted_by) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &args,
            )?;
        } else {
            spi_update(
                "DELETE FROM vault.purpose_grants WHERE purpose = $1 AND role_name = $2",
                &args[..2],
            )?;
        }
        Ok(())
    };
    status_row(administer(operation, purpose, details, validate, change))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn grant_purpose_impl(
    purpose: Option<&str>,
    role: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    purpose_grant("grant_purpose", purpose, role)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn revoke_purpose_impl(
    purpose: Option<&str>,
    role: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    purpose_grant("revoke_purpose", purpose, role)
}
