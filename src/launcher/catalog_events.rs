//! Catalog events the launcher must hear of at once, seen by an object access hook in the backend
//! that makes them.
//!
//! `CREATE EXTENSION` (of any extension: the hook runs before the new row is visible, so it
//! cannot tell which): when its transaction commits, the backend asks the launcher for this
//! database's workers; a writer that finds no vault there leaves again.
//!
//! `DROP DATABASE` of a database the vault serves: its audit writer and retention worker are
//! connected to it, and PostgreSQL refuses to drop a database other processes use. The object
//! access hook runs in the dropping backend when `dropdb` announces the drop, after its permission
//! check and before it counts the other sessions (for up to five seconds): the hook marks the
//! database as stopping, so the launcher does not start its workers again into a database that is
//! about to be gone, and signals both workers, which leave at once. An object access hook (rather
//! than a utility hook) keeps the statement's own errors from passing through Rust frames, which
//! would turn the vault's custom SQLSTATEs into XX000. A drop that fails after the hook leaves
//! the database without workers until the launcher's bound on a stop (`STOPPING_AT_MOST_S`).

use super::{unix_now, DATABASES};
use pgrx::prelude::*;

static mut PREVIOUS_HOOK: pg_sys::object_access_hook_type = None;

/// Installs the hook in this process (from `_PG_init`).
pub fn install() {
    // SAFETY: _PG_init runs once per process, on its only thread, before any statement; the
    // previous hook is kept and called, as PostgreSQL's hook protocol asks.
    unsafe {
        PREVIOUS_HOOK = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
        pg_sys::RegisterXactCallback(Some(announce_at_commit), std::ptr::null_mut());
    }
}

thread_local! {
    /// This transaction created an extension.
    static CREATED_EXTENSION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn announce_at_commit(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        // The guard clears the flag whether or not it holds.
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            if CREATED_EXTENSION.with(|c| c.replace(false)) && crate::preloaded() =>
        {
            super::want_workers();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            CREATED_EXTENSION.with(|c| c.set(false));
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: written once in `install`, before any statement could reach this hook.
    let previous = unsafe { PREVIOUS_HOOK };
    if let Some(previous) = previous {
        // SAFETY: the previous hook, with the arguments we were given.
        unsafe { previous(access, class_id, object_id, sub_id, arg) };
    }
    if access == pg_sys::ObjectAccessType::OAT_POST_CREATE
        && class_id == pg_sys::ExtensionRelationId
    {
        CREATED_EXTENSION.with(|c| c.set(true));
    }
    if access == pg_sys::ObjectAccessType::OAT_DROP
        && class_id == pg_sys::DatabaseRelationId
        && crate::preloaded()
    {
        stop_workers(object_id.to_u32());
    }
}

fn stop_workers(db: u32) {
    let pids: Vec<i32> = {
        let mut d = DATABASES.exclusive();
        match d.entries.iter_mut().find(|e| e.db == db) {
            Some(e) => {
                e.stopping_at = unix_now();
                vec![e.writer_pid, e.retention_pid]
            }
            None => return,
        }
    };
    for pid in pids.into_iter().filter(|&p| p != 0) {
        // SAFETY: kill(2) with a pid a worker of this cluster published and SIGTERM, on which
        // both workers leave their loop; a pid that has just exited is at worst no process.
        unsafe { libc_kill(pid, 15) };
    }
}

/// kill(2); libc is not a dependency of this crate for this one call.
unsafe fn libc_kill(pid: i32, signal: i32) -> i32 {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { kill(pid, signal) }
}
