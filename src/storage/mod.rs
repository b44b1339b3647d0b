//! The storage API: vault_put (`put`), vault_get and vault_head (`read`), vault_list (`list`).
//!
//! Each `*_impl` function returns its failure as `(sqlstate, message)` columns; the SQL wrappers in
//! `sql/api.sql` raise them (see `errors.rs` for why). Every call, granted or refused, goes through
//! `audited_call` and is made durable in `vault.access_log` before anything is returned (a granted
//! put through `audited_change`: its record commits with the entry, in the caller's transaction); the
//! decisions themselves are the core's pure functions (`vsql_vault_core::decide`), and this module
//! only reads the facts they take and maps a refusal to the error the API documents.

use crate::errors::VaultError;
use crate::security::Caller;
use vsql_vault_core::decide::Refusal;

/// Whether role `$1` may use the storage API at all.
macro_rules! member {
    () => {
        "(pg_catalog.pg_has_role($1, 'vault_app', 'USAGE') OR pg_catalog.pg_has_role($1, 'vault_admin', 'USAGE'))"
    };
}

/// Whether access policy row `$p` has `require_identity`. Read through to_jsonb: between a
/// library update and ALTER EXTENSION UPDATE the 0.1.0 schema has no such column, and no policy
/// requires an identity.
macro_rules! requires_identity {
    ($p:literal) => {
        concat!(
            "coalesce((pg_catalog.to_jsonb(",
            $p,
            ") ->> 'require_identity')::bool, false)"
        )
    };
}

mod list;
mod put;
mod read;

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
        // Without the policy's name, as above; the record keeps it.
        Refusal::IdentityRequired => VaultError::IdentityRequired,
    }
}
