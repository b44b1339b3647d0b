//! SQL functions of retention enforcement; failures come back as (sqlstate, message) for the
//! wrappers in `sql/retention.sql` to raise.

use crate::audited_call::audited_call;
use crate::errors::{status, VaultError};
use crate::retention::worker::request_vacuum;
use crate::retention::{destroy, proofs};
use crate::security::{has_role, AsOwner, Caller};
use crate::storage::{refusal_error, Subject};
use pgrx::prelude::*;
use vsql_vault_core::decide::{decide_delete, DeleteFacts};
use vsql_vault_core::rules::{self, required};

/// What a delete decides on: the entry, whether it is gone, whether the caller may purge it, and
/// whether its policy requires an identity.
const DELETE_FACTS: &str = "SELECT e.id,
                e.purged_at IS NOT NULL OR (e.id IS NULL AND EXISTS (
                    SELECT 1 FROM vault.purge_log pl WHERE pl.purpose = $2 AND pl.external_id = $3)) AS purged,
                (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = $1) = e.owner
                OR vault.role_allowed(p.purge_roles, $1, e.owner, e.purpose)
                OR pg_catalog.pg_has_role($1, 'vault_admin', 'USAGE') AS may_purge,
                pg_catalog.pg_has_role($1, 'vault_app', 'USAGE')
                OR pg_catalog.pg_has_role($1, 'vault_admin', 'USAGE')
                OR pg_catalog.pg_has_role($1, 'vault_auditor', 'USAGE') AS is_member,
                -- As storage's requires_identity!: a 0.1.0 schema has no column.
                coalesce((pg_catalog.to_jsonb(p) ->> 'require_identity')::bool, false)
                    AS identity_required
         FROM (SELECT 1) one
         LEFT JOIN vault.entries e ON e.purpose = $2 AND e.external_id = $3
         LEFT JOIN vault.access_policies p ON p.name = e.access_policy";

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn delete_impl(
    purpose: Option<&str>,
    external_id: Option<&str>,
    reason: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(purge_id, Option<i64>),
    ),
> {
    let result = audited_call("delete", purpose, external_id, |event| {
        let caller = event.caller;
        let p = required(purpose, "purpose")?;
        let x = required(external_id, "external_id")?;
        let r = required(reason, "reason")?;
        rules::purpose(p)?;
        rules::external_id(x)?;
        rules::description(Some(r))?;
        event.details = Some(serde_json::json!({ "reason": r }));
        // Who may: the owner, a role in the entry's purge roles, or an admin.
        let (id, facts) = {
            let _owner = AsOwner::enter();
            Spi::connect(|c| {
                let row = c
                    .select(
                        DELETE_FACTS,
                        None,
                        &[caller.role_oid.into(), p.into(), x.into()],
                    )?
                    .first();
                let flag =
                    |name: &str| row.get_by_name::<bool, _>(name).map(|v| v.unwrap_or(false));
                let id = row.get_by_name::<i64, _>("id")?;
                Ok::<_, pgrx::spi::Error>((
                    id,
                    DeleteFacts {
                        is_member: flag("is_member")?,
                        exists: id.is_some(),
                        purged: flag("purged")?,
                        may_purge: flag("may_purge")?,
                        identity: vsql_vault_core::decide::IdentityFacts {
                            required: flag("identity_required")?,
                            stated: caller.on_behalf_of.is_some(),
                        },
                    },
                ))
            })?
        };
        event.entry_id = id;
        decide_delete(&facts).map_err(|refusal| {
            refusal_error(
                refusal,
                &Subject {
                    caller,
                    purpose: p,
                    external_id: x,
                    access_policy: "",
                },
            )
        })?;
        let proof = destroy::delete_one(p, x, r, &caller.role_name)?;
        // Destroyed values must not stay readable in dead tuples.
        request_vacuum();
        Ok(proof)
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn purge_sweep_impl(
    max_entries: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(purged, Option<i64>),
    ),
> {
    let result = audited_call("purge_sweep", None, None, |event| {
        let caller = event.caller;
        event.details = Some(serde_json::json!({ "max_entries": max_entries }));
        if !has_role(caller, "vault_admin") {
            return Err(VaultError::Denied(format!(
                "role \"{}\" is not a member of vault_admin",
                caller.role_name
            )));
        }
        if let Some(m) = max_entries.filter(|m| *m <= 0) {
            return Err(VaultError::Input(
                vsql_vault_core::InputError::NotPositive {
                    name: "max_entries",
                    value: i64::from(m),
                },
            ));
        }
        let batch = crate::settings::SWEEP_BATCH_SIZE.get().max(1) as i64;
        let run_id = {
            let _owner = AsOwner::enter();
            crate::pg::write_one::<i64>(
                "INSERT INTO vault.sweep_runs (started_by) VALUES ($1) RETURNING id",
                &[caller.role_name.as_str().into()],
            )?
        };
        let mut left = max_entries.map(i64::from).unwrap_or(i64::MAX);
        let (mut total, mut batches) = (0i64, 0i32);
        // The call's own record names the sweep and its signed batches (the worker records each
        // batch in its transaction instead: retention::record).
        let mut batch_ids = Vec::new();
        // Each batch resumes after the last entry of the one before (destroy::sweep_batch).
        let mut after = None;
        while left > 0 {
            let swept = destroy::sweep_batch(batch.min(left), &caller.role_name, run_id, after)?;
            let n = swept.len();
            if n == 0 {
                break;
            }
            after = swept.last;
            batch_ids.push(swept.proved.batch_id);
            total += n;
            left -= n;
            batches += 1;
        }
        let _owner = AsOwner::enter();
        Spi::connect_mut(|c| {
            c.update(
                "UPDATE vault.sweep_runs SET finished_at = clock_timestamp(), entries_purged = $2, batches = $3
                 WHERE id = $1",
                None,
                &[run_id.into(), total.into(), batches.into()],
            )
            .map(|_| ())
        })?;
        event.details = Some(serde_json::json!({
            "max_entries": max_entries, "purged": total, "sweep_id": run_id, "batch_ids": batch_ids,
        }));
        if total > 0 {
            request_vacuum();
        }
        Ok(total)
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

fn require_reader(caller: &Caller) -> Result<(), VaultError> {
    if has_role(caller, "vault_auditor") || has_role(caller, "vault_admin") {
        Ok(())
    } else {
        Err(VaultError::Denied(format!(
            "role \"{}\" is not a member of vault_auditor or vault_admin",
            caller.role_name
        )))
    }
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn verify_purge_proof_impl(
    id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(ok, Option<bool>),
    ),
> {
    let result = audited_call("verify_purge_proof", None, None, |event| {
        event.details = Some(serde_json::json!({ "id": id }));
        let id = required(id, "id")?;
        require_reader(event.caller)?;
        let proof = proofs::load_proof(id)?.ok_or(VaultError::NoSuchProof(id))?;
        event.purpose = Some(proof.statement.purpose.clone());
        event.external_id = Some(proof.statement.external_id.clone());
        let verdict = proofs::verify_proof(&proof)?;
        event.details = Some(
            serde_json::json!({ "id": id, "ok": verdict.is_ok(), "why": verdict.as_ref().err() }),
        );
        Ok(verdict.is_ok())
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn export_purge_proofs_impl(
    from_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(line, Option<String>),
    ),
> {
    let result = audited_call("export_purge_proofs", None, None, |event| {
        event.details = Some(serde_json::json!({ "from_id": from_id }));
        require_reader(event.caller)?;
        let proofs = proofs::load_proofs("WHERE id >= $1", &[from_id.unwrap_or(0).into()])?;
        Ok(proofs
            .iter()
            .map(|p| serde_json::to_string(p).unwrap_or_default())
            .collect::<Vec<_>>())
    });
    crate::api::chain::rows_or_error(result)
}
