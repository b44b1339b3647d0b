//! The chains a transaction holds: a caller's transaction links its rows to a chain head kept in
//! memory from the first statement that takes the chain to its commit, and writes the head row
//! back once, just before the commit (`XACT_EVENT_PRE_COMMIT`).
//!
//! Writing the head row back after every statement made many statements in one transaction
//! quadratic: each write adds a version of the same row, which every later lookup in that
//! transaction walks (with a multixact per version, since each audited call runs in a
//! subtransaction): 2,000 puts in one transaction took 20 s, 10,000 several minutes.
//!
//! A subtransaction that aborts takes its links back: the head returns to what it was before the
//! subtransaction's first link, and when the subtransaction (or one of its ancestors) was the one
//! that locked the head row, that lock is gone and the chain is forgotten (none of its links was
//! written, so the row on disk is still right).
//!
//! Limits: inside the transaction, SQL that reads `vault.chain_heads` directly sees the head as it
//! was before the transaction (`vault_checkpoint()` writes the heads through first); every other
//! session sees head and rows change together, at commit. Rows restored with their chain fields
//! (`restore`) read and write the head row directly: a restore runs in transactions of its own
//! (pg_restore's COPY), not mixed with new rows of the same table.

use super::head::{advance_chain, Head};
use crate::errors::VaultError;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

struct HeldChain {
    xid: pg_sys::TransactionId,
    head: Head,
    /// The subtransaction whose query locked the head row.
    taken_in: pg_sys::SubTransactionId,
    /// The head before the first link each subtransaction made, oldest first.
    saved: Vec<(pg_sys::SubTransactionId, i64, Vec<u8>)>,
    moved: bool,
}

thread_local! {
    static HELD_CHAINS: RefCell<HashMap<u32, HeldChain>> = RefCell::new(HashMap::new());
    /// The transaction whose callbacks are registered: pgrx forgets transaction and
    /// subtransaction callbacks alike when a transaction ends, so each transaction that holds a
    /// chain registers its own, once.
    static CALLBACKS_OF: Cell<pg_sys::TransactionId> =
        const { Cell::new(pg_sys::InvalidTransactionId) };
}

fn current() -> (pg_sys::TransactionId, pg_sys::SubTransactionId) {
    // SAFETY: called while rows are being inserted, inside a transaction on the backend's
    // thread; GetTopTransactionId may assign the xid, which an inserting transaction has anyway.
    unsafe {
        (
            pg_sys::GetTopTransactionId(),
            pg_sys::GetCurrentSubTransactionId(),
        )
    }
}

/// The head of `table`'s chain this transaction holds, if it holds one.
pub(crate) fn held(table: u32) -> Option<Head> {
    let (xid, _) = current();
    HELD_CHAINS.with(|h| {
        h.borrow()
            .get(&table)
            .filter(|c| c.xid == xid)
            .map(|c| c.head.clone())
    })
}

/// Records that this transaction has just locked `head` of `table`'s chain.
pub(crate) fn hold(table: u32, head: &Head) {
    let (xid, subid) = current();
    HELD_CHAINS.with(|h| {
        let mut h = h.borrow_mut();
        h.retain(|_, c| c.xid == xid);
        h.insert(
            table,
            HeldChain {
                xid,
                head: head.clone(),
                taken_in: subid,
                saved: Vec::new(),
                moved: false,
            },
        );
    });
    // A flag kept for the backend's life registered the subtransaction callback in its first
    // such transaction only: a later ROLLBACK TO SAVEPOINT kept the rolled-back links, and the
    // chain had a gap where they were.
    if CALLBACKS_OF.with(|c| c.replace(xid)) != xid {
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PreCommit, || {
            write_back_or_raise()
        });
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PrePrepare, || {
            write_back_or_raise()
        });
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
            HELD_CHAINS.with(|h| h.borrow_mut().clear())
        });
        pgrx::register_subxact_callback(
            pgrx::PgSubXactCallbackEvent::AbortSub,
            |aborted, _parent| take_back(aborted),
        );
    }
}

/// The rows of a statement or batch advanced `head`: held in memory until the commit. Returns
/// false when this transaction does not hold that chain (the caller writes the head itself).
pub(crate) fn advance(table: u32, head: &Head) -> bool {
    let (xid, subid) = current();
    HELD_CHAINS.with(|h| {
        let mut h = h.borrow_mut();
        let Some(c) = h
            .get_mut(&table)
            .filter(|c| c.xid == xid && c.head.chain == head.chain)
        else {
            return false;
        };
        if c.saved.last().is_none_or(|(s, _, _)| *s < subid) {
            c.saved.push((subid, c.head.seq, c.head.hash.clone()));
        }
        c.head.seq = head.seq;
        c.head.hash = head.hash.clone();
        c.moved = true;
        true
    })
}

/// Subtransaction `aborted` rolled back: its links, and those of the subtransactions it
/// contained (all numbered after it), are gone.
fn take_back(aborted: pg_sys::SubTransactionId) {
    HELD_CHAINS.with(|h| {
        h.borrow_mut().retain(|_, c| {
            if c.taken_in >= aborted {
                return false;
            }
            while let Some((_, seq, hash)) = c.saved.pop_if(|(s, _, _)| *s >= aborted) {
                c.head.seq = seq;
                c.head.hash = hash;
            }
            true
        })
    });
}

/// Before the commit: a head that cannot be written aborts the transaction, rows and all.
fn write_back_or_raise() {
    if let Err(e) = write_back() {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("writing back the chain heads this transaction moved failed: {e}")
        );
    }
}

/// Writes every head this transaction moved, just before it commits (or is prepared).
fn write_back() -> Result<(), VaultError> {
    let moved: Vec<Head> = HELD_CHAINS.with(|h| {
        h.borrow_mut()
            .drain()
            .filter(|(_, c)| c.moved)
            .map(|(_, c)| c.head)
            .collect()
    });
    if moved.is_empty() {
        return Ok(());
    }
    // SAFETY: inside the committing transaction (PRE_COMMIT / PRE_PREPARE), where no statement is
    // running and so no snapshot is active: the head rows are written under a fresh one, popped
    // before the commit goes on (an error aborts the transaction, which pops it anyway).
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let written = moved
        .iter()
        .try_for_each(|head| advance_chain(&head.identity, head.chain, head.seq, &head.hash));
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    written
}

/// Writes the heads this transaction moved so far, for a reader later in the same transaction
/// (`vault_checkpoint()`). They stay held and are written again at commit: a savepoint rolled
/// back after this write would take the write back with it.
pub(crate) fn write_through() -> Result<(), VaultError> {
    let (xid, _) = current();
    let moved: Vec<Head> = HELD_CHAINS.with(|h| {
        h.borrow()
            .values()
            .filter(|c| c.xid == xid && c.moved)
            .map(|c| c.head.clone())
            .collect()
    });
    for head in moved {
        advance_chain(&head.identity, head.chain, head.seq, &head.hash)?;
    }
    Ok(())
}
