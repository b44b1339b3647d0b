//! The access record of each batch the retention worker destroys. A destruction is an access to
//! the entries it destroys, so an auditor reading `vault.access_log` sees every one: the record
//! is inserted in the batch's own transaction, chained by the log's trigger like any access
//! record, and commits exactly when the batch's removals and proofs do (a batch rolled back
//! leaves no record, a committed one never lacks it).
//!
//! Only the worker records this way: it holds no other lock the audit writer could wait for.
//! `vault_purge_sweep` runs in its caller's transaction, which must not hold the log's chain head
//! while it waits for the writer; its own access record names the sweep and its batches instead.

use super::destroy::SweptBatch;
use crate::errors::VaultError;
use crate::security::{AsOwner, Caller};
use pgrx::prelude::*;

/// What the record of a batch says: the sweep run, the signed batch, the count, the entries
/// and their proofs (consecutive ids, in leaf order), per purpose.
pub fn batch_details(batch: &SweptBatch, sweep_id: i64) -> serde_json::Value {
    serde_json::json!({
        "sweep_id": sweep_id,
        "batch_id": batch.proved.batch_id,
        "purged": batch.len(),
        "purposes": batch.purposes,
        "first_proof_id": batch.proved.proof_ids.first(),
        "last_proof_id": batch.proved.proof_ids.last(),
        "entry_ids": batch.entry_ids,
    })
}

/// Records a batch the worker destroyed, in the batch's transaction (granted, operation
/// `retention_sweep`, the worker's role and `application_name` = `worker`, its name).
pub fn record_worker_batch(
    batch: &SweptBatch,
    sweep_id: i64,
    worker: &str,
) -> Result<(), VaultError> {
    let caller = Caller::current();
    // One purpose in the column when the batch has one; all of them are in the details.
    let purpose = (batch.purposes.len() == 1)
        .then(|| batch.purposes.keys().next().cloned())
        .flatten();
    let details = batch_details(batch, sweep_id).to_string();
    let _owner = AsOwner::enter();
    let _writing = crate::chain::VaultWriting::enter();
    Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO vault.access_log
                (logged_at, role_name, session_user_name, application_name, client_addr, backend_pid,
                 operation, purpose, external_id, entry_id, granted, details, caller_xid)
             VALUES (pg_catalog.now(), $1, $2, $3, NULL, $4, 'retention_sweep', $5, NULL, NULL, true,
                     $6::pg_catalog.jsonb, pg_catalog.pg_current_xact_id())",
            None,
            &[
                caller.role_name.as_str().into(),
                caller.session_user.as_str().into(),
                worker.into(),
                caller.backend_pid.into(),
                purpose.into(),
                details.as_str().into(),
            ],
        )
        .map(|_| ())
    })
    .map_err(|e| VaultError::Internal(format!("recording the sweep batch failed: {e}")))
}
