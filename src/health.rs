//! `vault_health()`: one row per component (audit writer, retention worker, signing key and its
//! age, KEK,
//! last sweep, last checkpoint, checkpoint export) with a status (`ok`, `warning`, `failing`) and
//! a detail, so a failure that used to be silent (a missing key file stopping every purge, a dead
//! worker) shows where monitoring looks. Also exported by `vault_metrics()`. Details name files,
//! key ids and settings, never key material.

// pgrx reads result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use crate::audited_call::refusals_recorded;
use crate::errors::{status, VaultError};
use crate::pg::select_one;
use crate::security::{has_role, require, AsOwner};
use crate::settings;
use pgrx::prelude::*;

pub struct Component {
    pub name: &'static str,
    pub status: &'static str,
    pub detail: String,
}

fn component(name: &'static str, (status, detail): (&'static str, String)) -> Component {
    Component {
        name,
        status,
        detail,
    }
}

/// Every component's row, in a fixed order.
pub fn components() -> Result<Vec<Component>, VaultError> {
    Ok(vec![
        component("audit_writer", worker("vsql_vault audit writer")?),
        component(
            "retention_worker",
            worker(crate::retention::worker::WORKER_NAME)?,
        ),
        component("signing_key", signing_key()),
        component("signing_key_age", signing_key_age()?),
        component("kek", crate::decoding::kek_health()),
        component("last_sweep", last_sweep()?),
        component("last_checkpoint", last_checkpoint()?),
        component("checkpoint_export", checkpoint_export()),
    ])
}

fn one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Option<T>, VaultError> {
    let _owner = AsOwner::enter();
    select_one::<T>(query, args).map_err(|e| VaultError::Internal(e.to_string()))
}

/// A background worker is alive when the server lists it, connected to this database.
fn worker(worker_type: &str) -> Result<(&'static str, String), VaultError> {
    Ok(match worker_pid(worker_type) {
        Some(pid) => ("ok", format!("running (pid {pid})")),
        None => (
            "failing",
            format!("no {worker_type} is running for this database (is vsql_vault in shared_preload_libraries, max_worker_processes high enough, and vsql_vault.database unset or this database?)"),
        ),
    })
}

/// The pid of background worker `worker_type` connected to this database, read from the backend
/// status array as pg_stat_activity reads it, but without that view's per-role filter (which
/// hides a worker's type from roles that are not pg_read_all_stats, the extension's owner among
/// them): only a type and a pid are read.
fn worker_pid(worker_type: &str) -> Option<i32> {
    // SAFETY: called inside a transaction on the backend's thread. pgstat_fetch_stat_numbackends
    // takes this transaction's local copy of the status array; each entry 1..=n it returns is
    // NULL or valid until the transaction ends. GetBackgroundWorkerTypeByPid returns NULL or a
    // NUL-terminated string in a static buffer, compared before the next call. MyDatabaseId is
    // set once at connection and only read here.
    unsafe {
        let n = pg_sys::pgstat_fetch_stat_numbackends();
        for i in 1..=n {
            let entry = pg_sys::pgstat_fetch_stat_local_beentry(i);
            if entry.is_null() {
                continue;
            }
            let st = &(*entry).backendStatus;
            if st.st_backendType != pg_sys::BackendType::B_BG_WORKER
                || st.st_databaseid != pg_sys::MyDatabaseId
            {
                continue;
            }
            let name = pg_sys::GetBackgroundWorkerTypeByPid(st.st_procpid);
            if !name.is_null()
                && std::ffi::CStr::from_ptr(name).to_bytes() == worker_type.as_bytes()
            {
                return Some(st.st_procpid);
            }
        }
    }
    None
}

/// The current signing key's age against `vsql_vault.signing_key_max_age`: a warning in the
/// last tenth of it, before the audit writer rotates the key (or, for a key from
/// `vsql_vault.signing_key_file`, which the vault does not rotate, once it is due).
fn signing_key_age() -> Result<(&'static str, String), VaultError> {
    use vsql_vault_core::keys::KeyAge;
    let max = settings::SIGNING_KEY_MAX_AGE_S.get();
    let Some((id, age, state)) = crate::keys::age()? else {
        return Ok(("ok", "no registered signing key yet".into()));
    };
    let managed = crate::keys::source() == "signing_key_file";
    Ok(match state {
        KeyAge::Unlimited => (
            "ok",
            format!("key {id} is {age} s old; vsql_vault.signing_key_max_age is 0 (no scheduled rotation)"),
        ),
        KeyAge::Fresh => (
            "ok",
            format!("key {id} is {age} s old of vsql_vault.signing_key_max_age {max} s"),
        ),
        KeyAge::RotatingSoon if !managed => (
            "warning",
            format!("key {id} is {age} s old: the audit writer rotates it at vsql_vault.signing_key_max_age ({max} s)"),
        ),
        KeyAge::Due if !managed => (
            "warning",
            format!("key {id} is {age} s old, past vsql_vault.signing_key_max_age ({max} s): the audit writer rotates it at its next checkpoint"),
        ),
        _ => (
            "warning",
            format!("key {id} from vsql_vault.signing_key_file is {age} s old, near or past vsql_vault.signing_key_max_age ({max} s): replace the file (the vault does not rotate a key it does not manage)"),
        ),
    })
}

fn signing_key() -> (&'static str, String) {
    let path = crate::keys::path();
    match crate::keys::existing() {
        Ok(key) => {
            let id =
                vsql_vault_core::keys::key_id(&vsql_vault_core::keys::SignEvidence::public(&key));
            let registered = one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM vault.signing_keys WHERE key_id OPERATOR(pg_catalog.=) $1)",
                &[id.as_str().into()],
            )
            .ok()
            .flatten()
            .unwrap_or(false);
            if registered {
                ("ok", format!("key {id} from {path}"))
            } else {
                (
                    "warning",
                    format!(
                        "key {id} from {path} is not registered yet (it is at the next checkpoint)"
                    ),
                )
            }
        }
        Err(vsql_vault_core::keys::KeyError::Missing { .. })
            if crate::keys::source() == "generated" && !crate::keys::generated_key_registered() =>
        {
            (
                "warning",
                format!("no key yet: {path} is generated at first use"),
            )
        }
        Err(e) => ("failing", e.to_string()),
    }
}

/// The last sweep: failing when it recorded errors, a warning when none has finished within two
/// schedule periods.
fn last_sweep() -> Result<(&'static str, String), VaultError> {
    let period = if settings::SWEEP_AT.get().is_some_and(|c| !c.is_empty()) {
        86_400
    } else {
        i64::from(settings::SWEEP_INTERVAL_S.get())
    };
    let row = one::<pgrx::JsonB>(
        "SELECT pg_catalog.jsonb_build_object('started', started_at, 'finished', finished_at,
                'errors', errors, 'stale', COALESCE(finished_at, started_at)
                    < pg_catalog.now() - pg_catalog.make_interval(secs => $1))
           FROM vault.sweep_runs ORDER BY id DESC LIMIT 1",
        &[(2 * period).into()],
    )?;
    let Some(pgrx::JsonB(row)) = row else {
        return Ok(("warning", "no retention sweep has run yet".into()));
    };
    let text = |k: &str| row[k].as_str().unwrap_or("").to_owned();
    Ok(if let Some(errors) = row["errors"].as_str() {
        (
            "failing",
            format!("the sweep started {} failed: {errors}", text("started")),
        )
    } else if row["stale"].as_bool().unwrap_or(false) {
        (
            "warning",
            format!(
                "no sweep since {} (more than two sweep periods)",
                text("started")
            ),
        )
    } else if row["finished"].is_null() {
        (
            "ok",
            format!("a sweep is running since {}", text("started")),
        )
    } else {
        ("ok", format!("last sweep finished at {}", text("finished")))
    })
}

/// The last checkpoint: a warning when chain heads moved and the heads were not signed within two
/// checkpoint intervals.
fn last_checkpoint() -> Result<(&'static str, String), VaultError> {
    let interval = i64::from(settings::CHECKPOINT_INTERVAL_S.get().max(1));
    let row = one::<pgrx::JsonB>(
        "SELECT pg_catalog.jsonb_build_object(
            'last', (SELECT max(checkpointed_at) FROM vault.audit_checkpoints),
            'stale', COALESCE((SELECT max(checkpointed_at) FROM vault.audit_checkpoints), '-infinity')
                     < pg_catalog.now() - pg_catalog.make_interval(secs => $1),
            'unsigned', (SELECT count(*) FROM vault.chain_heads h
                          JOIN vault.protected_tables p ON p.identity = h.identity
                         WHERE h.seq > 0 AND p.relid <> 'vault.audit_checkpoints'::regclass
                           AND h.seq > COALESCE((SELECT max(k.seq) FROM vault.audit_checkpoints k
                                  WHERE k.table_identity = h.identity AND k.chain = h.chain_id), 0)))",
        &[(2 * interval).into()],
    )?;
    let row = row.map(|j| j.0).unwrap_or_default();
    let last = row["last"].as_str().unwrap_or("never").to_owned();
    let unsigned = row["unsigned"].as_i64().unwrap_or(0);
    Ok(if unsigned > 0 && row["stale"].as_bool().unwrap_or(true) {
        (
            "warning",
            format!("{unsigned} chain head(s) not signed; last checkpoint: {last}"),
        )
    } else {
        ("ok", format!("last checkpoint: {last}"))
    })
}

fn checkpoint_export() -> (&'static str, String) {
    let path = settings::CHECKPOINT_EXPORT_PATH
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty());
    match path {
        None => (
            "warning",
            "checkpoints are not exported (vsql_vault.checkpoint_export_path is not set): they live only in this database".into(),
        ),
        Some(p) => match std::fs::metadata(&p) {
            Ok(_) => ("ok", format!("checkpoints are exported to {p}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                "ok",
                format!("checkpoints are exported to {p} (created at the next checkpoint)"),
            ),
            Err(e) => ("failing", format!("checkpoint export file {p}: {}", e.kind())),
        },
    }
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn health_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(component, Option<String>),
        name!(status, Option<String>),
        name!(detail, Option<String>),
    ),
> {
    // Like metrics scrapes: reads of the vault's state, never an entry; refusals are recorded.
    let result = refusals_recorded("health", |event| {
        if !has_role(event.caller, "pg_monitor") {
            require(event.caller, crate::report::AUDITORS)?;
        }
        components()
    });
    match result {
        Ok(rows) => TableIterator::new(
            rows.into_iter()
                .map(|c| {
                    (
                        None,
                        None,
                        Some(c.name.to_owned()),
                        Some(c.status.to_owned()),
                        Some(c.detail),
                    )
                })
                .collect::<Vec<_>>(),
        ),
        Err(e) => {
            let (s, m) = status::<()>(&Err(e));
            TableIterator::new(vec![(s, m, None, None, None)])
        }
    }
}
