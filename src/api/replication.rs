//! SQL side of replication: which columns never leave the server, and the signed scope report.

use crate::audited_call::audited_call;
use crate::errors::{status, VaultError};
use crate::pg::select_one;
use crate::security::{require, AsOwner};
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn sync_scope_impl(
    tbl: Option<pg_sys::Oid>,
    col: Option<&str>,
    exclude: bool,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let operation = if exclude {
        "sync_exclude"
    } else {
        "sync_include"
    };
    let result = audited_call(operation, None, None, |event| {
        let caller = event.caller;
        event.details =
            Some(serde_json::json!({ "table_oid": tbl.map(|o| o.to_u32()), "column": col }));
        let tbl = tbl.ok_or(vsql_vault_core::InputError::Null("tbl"))?;
        let col = col.ok_or(vsql_vault_core::InputError::Null("col"))?;
        require(caller, &["vault_admin"])?;
        let _owner = AsOwner::enter();
        lock_for_scope_change(tbl);
        let name = select_one::<String>(
            "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c WHERE c.oid = $1",
            &[tbl.into()],
        )?
        .ok_or_else(|| VaultError::UnknownColumn(col.to_owned()))?;
        // Bound by identity (relation OID and attnum): by the column's current name here, and
        // followed through renames of the column, the table and its schema afterwards.
        let attnum = select_one::<i16>(
            "SELECT a.attnum FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[tbl.into(), col.into()],
        )?
        .ok_or_else(|| VaultError::UnknownColumn(col.to_owned()))?;
        event.details = Some(serde_json::json!({ "table": name, "column": col, "attnum": attnum }));
        let query = if exclude {
            "INSERT INTO vault.sync_exclusions (relid, attnum, column_name, table_name, excluded_by)
             SELECT $1, $2, $3, $4, $5
             WHERE NOT EXISTS (SELECT 1 FROM vault.sync_exclusions WHERE relid = $1 AND attnum = $2)"
        } else {
            "DELETE FROM vault.sync_exclusions WHERE relid = $1 AND attnum = $2
               AND $3 IS NOT NULL AND $4 IS NOT NULL AND $5 IS NOT NULL"
        };
        Spi::connect_mut(|c| {
            c.update(
                query,
                None,
                &[
                    tbl.into(),
                    attnum.into(),
                    col.into(),
                    name.as_str().into(),
                    caller.role_name.as_str().into(),
                ],
            )
            .map(|_| ())
        })?;
        Ok(())
    });
    TableIterator::once(status(&result))
}

/// `vault_sync_publish` / `vault_sync_unpublish`: the allow-list of tables that may leave through
/// the output plugin (the vault's own tables only when listed; every table only when listed while
/// `vsql_vault.sync_allow_list_required` is on).
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn sync_publish_impl(
    tbl: Option<pg_sys::Oid>,
    publish: bool,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
    ),
> {
    let operation = if publish {
        "sync_publish"
    } else {
        "sync_unpublish"
    };
    let result = audited_call(operation, None, None, |event| {
        let caller = event.caller;
        event.details = Some(serde_json::json!({ "table_oid": tbl.map(|o| o.to_u32()) }));
        let tbl = tbl.ok_or(vsql_vault_core::InputError::Null("tbl"))?;
        require(caller, &["vault_admin"])?;
        let _owner = AsOwner::enter();
        // A table starts (or stops) leaving exactly with the transactions that commit after this.
        lock_for_scope_change(tbl);
        let name = select_one::<String>(
            "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c WHERE c.oid = $1 AND c.relkind IN ('r', 'p')",
            &[tbl.into()],
        )?
        .ok_or_else(|| VaultError::NotPublishable(tbl.to_u32().to_string()))?;
        event.details = Some(serde_json::json!({ "table": name }));
        let query = if publish {
            "INSERT INTO vault.sync_published (relid, table_name, published_by)
             SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM vault.sync_published WHERE relid = $1)"
        } else {
            "DELETE FROM vault.sync_published WHERE relid = $1 AND $2 IS NOT NULL AND $3 IS NOT NULL"
        };
        Spi::connect_mut(|c| {
            c.update(
                query,
                None,
                &[
                    tbl.into(),
                    name.as_str().into(),
                    caller.role_name.as_str().into(),
                ],
            )
            .map(|_| ())
        })?;
        Ok(())
    });
    TableIterator::once(status(&result))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn scope_report_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(report, Option<String>),
    ),
> {
    let result = audited_call("scope_report", None, None, |event| {
        require(event.caller, crate::report::AUDITORS)?;
        let _owner = AsOwner::enter();
        let body = select_one::<pgrx::JsonB>(
            "SELECT jsonb_build_object(
               'tables', COALESCE((SELECT jsonb_agg(jsonb_build_object(
                   'table', c.oid::regclass::text,
                   'published', (SELECT COALESCE(jsonb_agg(a.attname ORDER BY a.attnum), '[]')
                                 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                   AND NOT EXISTS (SELECT 1 FROM vault.sync_exclusions x
                                                   WHERE x.relid = c.oid AND x.attnum = a.attnum)),
                   'excluded', (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                                     'column', CASE WHEN a.attisdropped OR a.attnum IS NULL THEN x.column_name::text
                                                    ELSE a.attname::text END,
                                     'since', x.excluded_at, 'by', x.excluded_by)
                                   || CASE WHEN a.attisdropped THEN jsonb_build_object('dropped', true)
                                           WHEN a.attnum IS NULL THEN jsonb_build_object('unbound', true)
                                           ELSE '{}'::jsonb END
                                   ORDER BY x.attnum), '[]')
                                FROM vault.sync_exclusions x
                                LEFT JOIN pg_attribute a ON a.attrelid = x.relid AND a.attnum = x.attnum
                                WHERE x.relid = c.oid)) ORDER BY c.oid::regclass::text)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
                   -- Every table that leaves: the vault's own only when published, and every
                   -- table only when published while the allow-list is required.
                   AND (EXISTS (SELECT 1 FROM vault.sync_published p WHERE p.relid = c.oid)
                        OR (NOT $1 AND n.nspname <> 'vault'))), '[]'),
               'allow_list', jsonb_build_object('required', $1,
                   'tables', COALESCE((SELECT jsonb_agg(jsonb_build_object('table', c.oid::regclass::text,
                                         'since', p.published_at, 'by', p.published_by) ORDER BY c.oid::regclass::text)
                                       FROM vault.sync_published p JOIN pg_class c ON c.oid = p.relid), '[]')),
               'slots', COALESCE((SELECT jsonb_agg(jsonb_build_object('slot', slot_name, 'database', database,
                                                   'active', active) ORDER BY slot_name)
                                  FROM pg_replication_slots WHERE plugin = 'vsql_vault'), '[]'),
               'generated_at', now())",
            &[crate::settings::SYNC_ALLOW_LIST_REQUIRED.get().into()],
        )?
        .map(|j| j.0)
        .unwrap_or_default();
        let mut report = body;
        report["kek_ids"] = serde_json::json!(crate::decoding::kek_ids());
        report["extension_version"] = serde_json::json!(env!("CARGO_PKG_VERSION"));
        report["report"] = serde_json::json!("vsql_vault scope report");
        crate::report::sign(&mut report)?;
        Ok(report.to_string())
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

/// Takes a SHARE lock on `tbl`, held until this transaction ends: it makes the order of a scope
/// change (an exclusion, a publication) and the writes to its table well defined. SHARE
/// conflicts with the ROW EXCLUSIVE lock every INSERT/UPDATE/DELETE/COPY holds until its
/// transaction ends, so: a transaction that wrote to the table before this call commits before
/// the change does (this call waits for it), and one that writes after this call waits until the
/// change has committed, so every one of its changes is decoded under a snapshot that holds it.
/// Hence the promise: no value of an excluded column appears in any transaction that commits
/// after the exclusion commits, whatever its start time. It also keeps the table's columns and
/// names stable until commit (ALTER TABLE conflicts too).
fn lock_for_scope_change(tbl: pg_sys::Oid) {
    // SAFETY: a plain heavyweight lock request on a relation OID, inside a transaction; released
    // at its end. A relation dropped meanwhile fails the caller's lookup that follows.
    unsafe { pg_sys::LockRelationOid(tbl, pg_sys::ShareLock as i32) };
}
