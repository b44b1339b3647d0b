//! The SQL entry points of the chains (protect, verify, export, checkpoint, key rotation) and the
//! DDL guard's questions. As for storage, failures come back as `(sqlstate, message)` and the
//! wrappers in `sql/audit.sql` raise them.

// pgrx reads result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use crate::access_log::Event;
use crate::audited_call::audited_call;
use crate::chain;
use crate::errors::{status, VaultError};
use crate::pg::select_one;
use crate::security::{has_role, require, AsOwner, Caller};
use pgrx::prelude::*;

fn is_superuser(caller: &Caller) -> bool {
    // SAFETY: called from the audited SQL functions, inside a transaction, so the syscache lookup
    // of pg_authid is allowed; any OID is accepted (an unknown role is simply not a superuser).
    unsafe { pg_sys::superuser_arg(caller.role_oid) }
}

/// An audited call that is checked (`check`: input and role) before its work. Both see the
/// caller, read once.
fn logged<T>(
    operation: &'static str,
    details: serde_json::Value,
    check: impl FnOnce(&Caller) -> Result<(), VaultError>,
    work: impl FnOnce(&Caller) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    audited_call(operation, None, None, |event| {
        event.details = Some(details);
        check(event.caller)?;
        work(event.caller)
    })
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn protect_table_impl(
    tbl: Option<pg_sys::Oid>,
    chains: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let result = logged(
        "protect_table",
        serde_json::json!({ "table_oid": tbl.map(|o| o.to_u32()), "chains": chains }),
        |caller| {
            let tbl = tbl.ok_or(vsql_vault_core::InputError::Null("tbl"))?;
            let chains = chains.ok_or(vsql_vault_core::InputError::Null("chains"))?;
            if !(1..=256).contains(&chains) {
                return Err(VaultError::ChainCount(chains));
            }
            let owns = {
                let _owner = AsOwner::enter();
                select_one::<bool>(
                    "SELECT pg_catalog.pg_has_role($1, c.relowner, 'USAGE') FROM pg_catalog.pg_class c WHERE c.oid = $2",
                    &[caller.role_oid.into(), tbl.into()],
                )
                .ok()
                .flatten()
                .unwrap_or(false)
            };
            let in_vault_schema = {
                let _owner = AsOwner::enter();
                select_one::<bool>(
                    "SELECT c.relnamespace = 'vault'::pg_catalog.regnamespace FROM pg_catalog.pg_class c WHERE c.oid = $1",
                    &[tbl.into()],
                )
                .ok()
                .flatten()
                .unwrap_or(false)
            };
            if in_vault_schema {
                // Protecting vault.entries would make every replacement and purge fail.
                Err(VaultError::Denied(
                    "the extension's own tables are protected by the extension, not by vault_protect_table".into(),
                ))
            } else if owns || has_role(caller, "vault_admin") {
                Ok(())
            } else {
                Err(VaultError::Denied(format!(
                    "role \"{}\" neither owns the table nor is a vault_admin",
                    caller.role_name
                )))
            }
        },
        |caller| {
            chain::protect(
                tbl.unwrap_or(pg_sys::Oid::INVALID),
                chains.unwrap_or(16),
                false,
                &caller.role_name,
            )
            .map(|_| ())
        },
    );
    TableIterator::once(status(&result))
}

/// Removes the registration of a protected table that is gone, for vault_admin, recorded with the
/// heads its chains had reached.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn forget_missing_table_impl(
    identity: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let result = audited_call("forget_missing_table", None, None, |event| {
        event.details = Some(serde_json::json!({ "identity": identity }));
        require(event.caller, &["vault_admin"])?;
        let identity = identity.ok_or(vsql_vault_core::InputError::Null("identity"))?;
        event.details = Some(chain::forget_missing(identity)?);
        Ok(())
    });
    TableIterator::once(status(&result))
}

/// Protects the extension's own tables while CREATE EXTENSION runs (the audit writer cannot see
/// the uncommitted extension yet, so this is not logged). Not executable by PUBLIC.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn protect_builtin(tbl: pg_sys::Oid, chains: i32) -> String {
    chain::protect(tbl, chains, true, &Caller::current().role_name)
        .unwrap_or_else(|e| pgrx::error!("vsql_vault: protecting a built-in table failed: {e}"))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn checkpoint_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(checkpoints, Option<i64>),
    ),
> {
    let result = logged(
        "checkpoint",
        serde_json::json!({}),
        |c| require(c, &["vault_admin"]),
        |_| chain::checkpoint(),
    );
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn rotate_signing_key_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(key_id, Option<String>),
    ),
> {
    // The only way a new key is made once one is registered; its record names both keys (and
    // why the old one could not be loaded, if it could not).
    let result = audited_call("rotate_signing_key", None, None, |event| {
        event.details = Some(serde_json::json!({}));
        if !is_superuser(event.caller) {
            return Err(VaultError::Denied(
                "only a superuser rotates the signing key".into(),
            ));
        }
        let old = crate::keys::existing().map(|k| {
            vsql_vault_core::keys::key_id(&vsql_vault_core::keys::SignEvidence::public(&k))
        });
        let new = crate::keys::rotate()?;
        event.details = Some(serde_json::json!({
            "old_key_id": old.as_ref().ok(),
            "old_key_error": old.as_ref().err().map(|e| e.to_string()),
            "new_key_id": new,
        }));
        Ok(new)
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

/// The summary of a verification kept in its access record: small enough for the record's
/// details (the first failures are named, the rest counted).
fn verdict(
    tbl: Option<pg_sys::Oid>,
    reports: &[vsql_vault_core::chain::ChainReport],
) -> serde_json::Value {
    let failed: Vec<&vsql_vault_core::chain::ChainReport> =
        reports.iter().filter(|r| !r.ok).collect();
    let tables: std::collections::BTreeSet<&str> =
        reports.iter().map(|r| r.table.as_str()).collect();
    serde_json::json!({
        "table_oid": tbl.map(|o| o.to_u32()),
        "scope": if tbl.is_some() { "table" } else { "all" },
        "tables": tables,
        "ok": failed.is_empty(),
        "chains": reports.len(),
        "rows_checked": reports.iter().map(|r| r.rows_checked).sum::<i64>(),
        "failed_chains": failed.len(),
        "failed": failed.iter().take(8).map(|r| serde_json::json!({
            "table": r.table, "chain": r.chain, "first_bad_seq": r.first_bad_seq
        })).collect::<Vec<_>>(),
    })
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn verify_audit_impl(
    tbl: Option<pg_sys::Oid>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(table_name, Option<String>),
        name!(chain, Option<i32>),
        name!(rows_checked, Option<i64>),
        name!(first_bad_seq, Option<i64>),
        name!(ok, Option<bool>),
        name!(detail, Option<String>),
    ),
> {
    // The verdict goes into the access record itself, so the last verification and its result
    // are chained evidence that the compliance report and the audit_integrity view read back.
    let result = audited_call("verify_audit", None, None, |event| {
        event.details = Some(serde_json::json!({ "table_oid": tbl.map(|o| o.to_u32()) }));
        require(event.caller, crate::report::AUDITORS)?;
        let reports = chain::verify(tbl)?;
        event.details = Some(verdict(tbl, &reports));
        Ok(reports)
    });
    match result {
        Ok(reports) => TableIterator::new(
            reports
                .into_iter()
                .map(|r| {
                    (
                        None,
                        None,
                        Some(r.table),
                        r.chain,
                        Some(r.rows_checked),
                        r.first_bad_seq,
                        Some(r.ok),
                        Some(r.detail),
                    )
                })
                .collect::<Vec<_>>(),
        ),
        Err(e) => TableIterator::new(vec![(
            Some(e.sqlstate().to_owned()),
            Some(e.to_string()),
            None,
            None,
            None,
            None,
            None,
            None,
        )]),
    }
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn export_audit_impl(
    tbl: Option<pg_sys::Oid>,
    from_seq: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(line, Option<String>),
    ),
> {
    let result = logged(
        "export_audit",
        serde_json::json!({ "table_oid": tbl.map(|o| o.to_u32()), "from_seq": from_seq }),
        |c| {
            tbl.ok_or(vsql_vault_core::InputError::Null("tbl"))?;
            require(c, crate::report::AUDITORS)
        },
        |caller| {
            chain::export(
                caller,
                tbl.unwrap_or(pg_sys::Oid::INVALID),
                from_seq.unwrap_or(0),
            )
        },
    );
    rows_or_error(result)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn export_checkpoints_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(line, Option<String>),
    ),
> {
    let result = logged(
        "export_checkpoints",
        serde_json::json!({}),
        |c| require(c, crate::report::AUDITORS),
        |_| chain::export_checkpoints(),
    );
    rows_or_error(result)
}

/// JSON lines as rows, or the one error row the SQL wrapper raises.
pub(crate) fn rows_or_error(
    result: Result<Vec<String>, VaultError>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(line, Option<String>),
    ),
> {
    match result {
        Ok(lines) => TableIterator::new(
            lines
                .into_iter()
                .map(|l| (None, None, Some(l)))
                .collect::<Vec<_>>(),
        ),
        Err(e) => TableIterator::new(vec![(
            Some(e.sqlstate().to_owned()),
            Some(e.to_string()),
            None,
        )]),
    }
}

/// Whether this is vsql_vault's own install or update script (CREATE / ALTER EXTENSION), which
/// sets up and changes the protected tables itself. Only a superuser runs it (the extension is
/// not trusted), and an ALTER EXTENSION is itself refused without break-glass and recorded.
fn running_own_script() -> bool {
    // SAFETY: called from the DDL guard's SQL function, inside a transaction on the backend's
    // thread: `creating_extension` and `CurrentExtensionObject` are plain process globals, and
    // get_extension_oid is a catalog lookup by a NUL-terminated static name with missing_ok.
    unsafe {
        pg_sys::creating_extension
            && pg_sys::CurrentExtensionObject
                == pg_sys::get_extension_oid(c"vsql_vault".as_ptr(), true)
    }
}

/// Whether this server runs in pg_upgrade's binary-upgrade mode. pg_upgrade's schema restore
/// rebuilds the extension object by object (`ALTER EXTENSION ... ADD` for each member, the
/// guarded tables' triggers and constraints), and only pg_upgrade can connect to such a server.
/// Nothing could be recorded then anyway: the evidence tables' files are copied in afterwards.
fn in_binary_upgrade() -> bool {
    // SAFETY: a read of a postmaster-wide flag set at startup and never changed afterwards.
    unsafe { pg_sys::IsBinaryUpgrade }
}

/// Asked by the DDL guard for each `ALTER EXTENSION vsql_vault`: an update to another version
/// (`ALTER EXTENSION vsql_vault UPDATE`), run by a superuser, needs no break-glass; it is recorded
/// in the chained log in the same transaction, so the record commits exactly when the update
/// does. Adding or dropping a member, or moving the extension, still goes through break-glass.
/// Declared by hand in sql/audit.sql: its argument is a `pg_ddl_command`.
#[pg_extern(volatile, parallel_unsafe, schema = "vault", sql = false)]
fn extension_update_recorded(command: pgrx::datum::Internal) -> bool {
    if in_binary_upgrade() {
        return true;
    }
    // SAFETY: the SQL declaration takes a pg_ddl_command, which pg_event_trigger_ddl_commands()
    // produces as a pointer to the CollectedCommand of the command being reported, live for the
    // event trigger's run; its parse tree is a Node, whose tag is read before anything else.
    let is_update = unsafe {
        command
            .get::<pg_sys::CollectedCommand>()
            .map(|c| c.parsetree)
            .filter(|tree| !tree.is_null())
            .is_some_and(|tree| (*tree).type_ == pg_sys::NodeTag::T_AlterExtensionStmt)
    };
    let caller = Caller::current();
    if !is_update || !is_superuser(&caller) {
        return false;
    }
    let version = {
        let _owner = AsOwner::enter();
        select_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'vsql_vault'",
            &[],
        )
        .ok()
        .flatten()
    };
    let mut event = Event::new(&caller, "extension_update", None, None);
    event.details = Some(
        serde_json::json!({ "command": "ALTER EXTENSION vsql_vault UPDATE", "version": version }),
    );
    match event.granted_in_transaction() {
        Ok(()) => true,
        Err(e) => pgrx::error!("vsql_vault: the extension update could not be recorded: {e}"),
    }
}

/// Asked by the DDL guard before it refuses a command on protected table `rel`: whether the
/// command only rebuilds the table's protection, as pg_restore does (`chain::protection_restored`).
/// Declared by hand in sql/audit.sql: its first argument is a `pg_ddl_command`.
#[pg_extern(volatile, parallel_unsafe, schema = "vault", sql = false)]
fn protection_restored(command: pgrx::datum::Internal, rel: pg_sys::Oid) -> bool {
    // SAFETY: the SQL declaration takes a pg_ddl_command, which pg_event_trigger_ddl_commands()
    // produces as a pointer to the CollectedCommand of the command being reported, live for the
    // event trigger's run.
    unsafe {
        command
            .get::<pg_sys::CollectedCommand>()
            .is_some_and(|c| chain::protection_restored(c, rel))
    }
}

/// Asked by the DDL event triggers before a command touches protected table `rel` (by OID):
/// vault_protect_table's own commands on the one table it is protecting pass; anything else is
/// decided by `ddl_guard_allows`.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn ddl_guard_allows_relation(command: &str, object: &str, rel: pg_sys::Oid) -> bool {
    chain::protecting(rel) || ddl_guard_allows(command, object)
}

/// Asked by the DDL event triggers before a command touches a protected table or the extension:
/// allowed under `vsql_vault.break_glass` (recorded); refused otherwise (also recorded).
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn ddl_guard_allows(command: &str, object: &str) -> bool {
    if in_binary_upgrade() {
        return true;
    }
    // pg_restore recreates protected tables and their triggers; restore mode is superuser-only.
    if crate::settings::RESTORE_MODE.get() || running_own_script() {
        return true;
    }
    // The guard of a 0.1.0 schema (library updated, ALTER EXTENSION UPDATE not yet run) only
    // knows names: let the protection's own commands on its one table through.
    if !chain::registry_by_oid() && chain::protecting_object(object) {
        return true;
    }
    let caller = Caller::current();
    let mut event = Event::new(&caller, "break_glass", None, None);
    event.details = Some(serde_json::json!({ "command": command, "object": object }));
    if crate::settings::BREAK_GLASS.get() {
        match event.granted_in_transaction() {
            Ok(()) => true,
            Err(e) => pgrx::error!("vsql_vault: a break-glass command could not be recorded: {e}"),
        }
    } else {
        let _ = event.refused_detached(VaultError::ProtectedDdl(format!("{command} on {object}")));
        false
    }
}
