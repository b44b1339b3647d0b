//! The daily access counters (`vault.access_daily`) of the records a caller's transaction writes
//! itself (`Event::granted_in_transaction`), added once, just before that transaction commits.
//!
//! The counting trigger on the access log (`vault.count_access`, per statement) upserts one
//! counter row per (day, role, purpose, operation, granted, chain). A transaction of many puts
//! updated the same row once per put, and each update lengthened the row's version chain that the
//! next upsert walks: quadratic in the number of puts. The trigger now asks
//! `vault.access_counted_by_caller()` first and leaves these records to this module, which keeps
//! their counts per subtransaction (a rolled-back savepoint takes its records, and so its counts,
//! back) and writes them once at commit, in the same transaction as the records.

use crate::errors::VaultError;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

struct Count {
    xid: pg_sys::TransactionId,
    subid: pg_sys::SubTransactionId,
    day: i32,
    role_name: String,
    purpose: String,
    operation: String,
    chain: i32,
    identified: bool,
}

thread_local! {
    /// Set while `granted_in_transaction` inserts its record.
    static INSERTING: Cell<bool> = const { Cell::new(false) };
    /// The trigger asked during that insert, so it left the count to us (a 0.1.0 trigger, before
    /// ALTER EXTENSION UPDATE, counts the record itself and never asks).
    static ASKED: Cell<bool> = const { Cell::new(false) };
    static PENDING: RefCell<Vec<Count>> = const { RefCell::new(Vec::new()) };
    /// The transaction whose callbacks are registered: pgrx forgets transaction and
    /// subtransaction callbacks alike when a transaction ends (as in chain/held.rs).
    static CALLBACKS_OF: Cell<pg_sys::TransactionId> =
        const { Cell::new(pg_sys::InvalidTransactionId) };
}

/// Asked by `vault.count_access()` for each statement on the access log: true while this backend
/// is inserting a record it counts itself at commit.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
fn access_counted_by_caller() -> bool {
    let inserting = INSERTING.with(Cell::get);
    if inserting {
        ASKED.with(|a| a.set(true));
    }
    inserting
}

/// Held while `granted_in_transaction` inserts its record.
pub(crate) struct Inserting;

impl Inserting {
    pub(crate) fn enter() -> Inserting {
        ASKED.with(|a| a.set(false));
        INSERTING.with(|i| i.set(true));
        Inserting
    }

    /// Whether the counting trigger left this insert's count to the caller.
    pub(crate) fn left_to_caller(&self) -> bool {
        ASKED.with(Cell::get)
    }
}

impl Drop for Inserting {
    fn drop(&mut self) {
        INSERTING.with(|i| i.set(false));
    }
}

/// Counts one granted record of this transaction, written at its commit.
pub(crate) fn count(
    logged_at_micros: i64,
    role_name: &str,
    purpose: &str,
    operation: &str,
    chain: i32,
    identified: bool,
) {
    // SAFETY: inside the transaction that has just inserted the record (it has an xid).
    let (xid, subid) = unsafe {
        (
            pg_sys::GetTopTransactionId(),
            pg_sys::GetCurrentSubTransactionId(),
        )
    };
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|c| c.xid == xid);
        p.push(Count {
            xid,
            subid,
            // UTC days since 2000-01-01, PostgreSQL's epoch, as `(logged_at AT TIME ZONE
            // 'UTC')::date` gives them.
            day: i32::try_from(logged_at_micros.div_euclid(86_400_000_000)).unwrap_or(0),
            role_name: role_name.to_owned(),
            purpose: purpose.to_owned(),
            operation: operation.to_owned(),
            chain,
            identified,
        });
    });
    // A flag kept for the backend's life registered the subtransaction callback in its first
    // such transaction only: later, calls rolled back to a savepoint were counted all the same.
    if CALLBACKS_OF.with(|c| c.replace(xid)) != xid {
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PreCommit, write_or_raise);
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PrePrepare, write_or_raise);
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
            PENDING.with(|p| p.borrow_mut().clear())
        });
        pgrx::register_subxact_callback(
            pgrx::PgSubXactCallbackEvent::AbortSub,
            |aborted, _parent| {
                PENDING.with(|p| p.borrow_mut().retain(|c| c.subid < aborted));
            },
        );
    }
}

fn write_or_raise() {
    if let Err(e) = write() {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("adding this transaction's calls to vault.access_daily failed: {e}")
        );
    }
}

type Key = (i32, String, String, String, i32);

fn write() -> Result<(), VaultError> {
    let counts: Vec<Count> = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let mut totals: std::collections::BTreeMap<Key, (i64, i64)> = Default::default();
    for c in counts {
        let t = totals
            .entry((c.day, c.role_name, c.purpose, c.operation, c.chain))
            .or_default();
        t.0 += 1;
        t.1 += i64::from(c.identified);
    }
    if totals.is_empty() {
        return Ok(());
    }
    let _owner = crate::security::AsOwner::enter();
    // SAFETY: at PRE_COMMIT / PRE_PREPARE no statement runs and no snapshot is active: the
    // counters are written under a fresh one, popped before the commit goes on.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let written = Spi::connect_mut(|c| {
        for ((day, role, purpose, operation, chain), (calls, identified)) in totals {
            let args: Vec<pgrx::datum::DatumWithOid> = vec![
                day.into(),
                role.as_str().into(),
                purpose.as_str().into(),
                operation.as_str().into(),
                chain.into(),
                calls.into(),
                identified.into(),
            ];
            crate::pg::plans::update_with(c, ADD_COUNTS, &args)?;
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(|e| VaultError::Internal(e.to_string()));
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    written
}

const ADD_COUNTS: &str = "INSERT INTO vault.access_daily AS d
        (day, role_name, purpose, operation, granted, chain, calls, identified)
     VALUES ('2000-01-01'::pg_catalog.date OPERATOR(pg_catalog.+) $1, $2, $3, $4, true, $5, $6, $7)
     ON CONFLICT (day, role_name, purpose, operation, granted, chain)
     DO UPDATE SET calls = d.calls OPERATOR(pg_catalog.+) EXCLUDED.calls,
                   identified = d.identified OPERATOR(pg_catalog.+) EXCLUDED.identified";
