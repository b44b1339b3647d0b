//! Every database of the cluster where `CREATE EXTENSION vsql_vault` has run gets its own audit
//! writer and retention worker. A launcher (a background worker connected to no database) reads
//! `pg_database`, starts both workers for each database, up to `vsql_vault.max_databases`, and
//! restarts them when they stop; a worker that finds no extension in its database (or sees it
//! dropped) says so here and leaves. `DROP DATABASE` first stops that database's workers
//! (`catalog_events`), so the drop is not refused for their connections and they are not started
//! again into a database that is gone.
//!
//! This module holds the state the processes share: one entry per database the launcher knows.

mod catalog_events;
mod worker;

pub use catalog_events::install as install_catalog_hooks;
pub use worker::register;

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// The most databases one cluster can serve (the array in shared memory); the setting
/// `vsql_vault.max_databases` chooses up to this many.
pub const MAX_DATABASES: usize = 64;

#[derive(Copy, Clone, Default)]
#[repr(C)]
pub struct DatabaseEntry {
    /// The database's OID; 0: a free entry.
    pub db: u32,
    /// A backend of this database needs its workers (an audited call found no writer).
    pub wanted: bool,
    /// When a worker last found no extension in the database (Unix seconds; 0: it had one).
    pub no_extension_at: i64,
    /// When `DROP DATABASE` began to stop the workers (Unix seconds; 0: not dropping).
    pub stopping_at: i64,
    /// The database could not be served: `vsql_vault.max_databases` others are.
    pub over_capacity: bool,
    pub writer_pid: i32,
    pub retention_pid: i32,
    pub retention_latch: usize,
    pub vacuum_requested: bool,
}

#[derive(Copy, Clone)]
#[repr(C)]
pub struct Databases {
    pub launcher_latch: usize,
    pub entries: [DatabaseEntry; MAX_DATABASES],
}

impl Default for Databases {
    fn default() -> Self {
        Databases {
            launcher_latch: 0,
            entries: [DatabaseEntry::default(); MAX_DATABASES],
        }
    }
}

// SAFETY: `repr(C)`, `Copy` plain data (integers and bools) that owns nothing and refers to no
// process-local memory: the latches are addresses of PGPROC latches, in shared memory, only ever
// handed to SetLatch. Every access goes through DATABASES' LWLock.
unsafe impl PGRXSharedMemory for Databases {}

// SAFETY: a shared-memory name of its own: this library's names (here, the audit queue's two,
// decoding's batch counter) are distinct and all start with "vsql_vault_".
static DATABASES: PgLwLock<Databases> = unsafe { PgLwLock::new(c"vsql_vault_databases") };

pub fn init_shmem() {
    pg_shmem_init!(DATABASES);
}

pub fn my_database() -> u32 {
    // SAFETY: a plain read of a process global set when this process connected, on its only
    // thread.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: a non-zero latch stored here is the MyLatch a process of this cluster
        // published: a PGPROC latch in shared memory, mapped at the same address everywhere and
        // never freed. If its owner has exited, SetLatch only causes a spurious wake-up.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) }
    }
}

/// Runs `f` on this database's entry, creating it if there is room.
fn with_entry<R>(db: u32, f: impl FnOnce(&mut DatabaseEntry) -> R) -> Option<R> {
    let mut d = DATABASES.exclusive();
    let index = d
        .entries
        .iter()
        .position(|e| e.db == db)
        .or_else(|| d.entries.iter().position(|e| e.db == 0))?;
    let entry = &mut d.entries[index];
    entry.db = db;
    Some(f(entry))
}

/// An audited call found no writer for its database: ask the launcher to start one. Returns
/// false when the database cannot be served (`vsql_vault.max_databases` others are).
pub fn want_workers() -> bool {
    let db = my_database();
    let over = with_entry(db, |e| {
        e.wanted = true;
        e.over_capacity
    })
    .unwrap_or(true);
    set_latch(DATABASES.share().launcher_latch);
    !over
}

/// The launcher could not serve this database: `vsql_vault.max_databases` others are.
pub fn over_capacity() -> bool {
    let db = my_database();
    DATABASES
        .share()
        .entries
        .iter()
        .any(|e| e.db == db && e.over_capacity)
}

/// A worker of `db` says it has started, or (pid 0) that it is leaving.
pub fn worker_started(retention: bool, pid: i32, latch: usize) {
    let db = my_database();
    with_entry(db, |e| {
        if retention {
            e.retention_pid = pid;
            e.retention_latch = latch;
        } else {
            e.writer_pid = pid;
        }
        if pid != 0 {
            e.no_extension_at = 0;
        }
    });
}

/// A worker found no extension in its database: the launcher waits before it looks again, unless
/// a backend asks.
pub fn no_extension_here() {
    let db = my_database();
    with_entry(db, |e| e.no_extension_at = unix_now());
    set_latch(DATABASES.share().launcher_latch);
}

/// False when `vsql_vault.database` names another database than this process's (in a
/// transaction: the name is read from the catalog).
pub fn serves_this_database() -> bool {
    let Some(served) = crate::settings::database_restriction() else {
        return true;
    };
    // SAFETY: get_database_name returns a palloc'd copy or NULL, copied at once.
    let name = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    };
    name.as_deref() == Some(served.as_str())
}

/// Whether `pg_restore` is connected to this database (its sessions name themselves so). A
/// database's workers start as soon as a restore has created the extension, while the evidence
/// rows are still on their way: until it is gone they publish no key, sign no checkpoint and
/// sweep nothing, so nothing they write collides with rows the restore brings (a key row, a sweep
/// run). Runs in its own transaction.
pub fn restore_in_progress() -> bool {
    pgrx::bgworkers::BackgroundWorker::transaction(|| {
        crate::pg::select_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity
                WHERE datid OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_database
                                                     WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
                  AND application_name OPERATOR(pg_catalog.=) 'pg_restore')",
            &[],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// Called by any backend that destroyed entries: its database's retention worker vacuums soon
/// (within `vsql_vault.vacuum_delay`). Only the first request since the worker's last VACUUM
/// wakes it: a re-put requests one every call, and a wake-up per put cost the worker a
/// transaction each.
pub fn request_vacuum() {
    if !crate::preloaded() {
        return;
    }
    let db = my_database();
    let latch = with_entry(db, |e| {
        let first = !e.vacuum_requested;
        e.vacuum_requested = true;
        first.then_some(e.retention_latch)
    });
    set_latch(latch.flatten().unwrap_or(0));
}

/// Whether a backend asked the retention worker of this database for a VACUUM since it took the
/// last request.
pub fn vacuum_requested() -> bool {
    with_entry(my_database(), |e| e.vacuum_requested).unwrap_or(false)
}

/// The retention worker takes its database's vacuum request, just before it vacuums: a request
/// made while the VACUUM runs is kept for the next one.
pub fn take_vacuum_request() -> bool {
    with_entry(my_database(), |e| std::mem::take(&mut e.vacuum_requested)).unwrap_or(false)
}
