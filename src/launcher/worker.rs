//! The launcher: one background worker per cluster, connected to no database, that keeps an audit
//! writer and a retention worker running in every database that has the extension.

use super::{unix_now, DatabaseEntry, DATABASES};
use crate::settings;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const LAUNCHER_NAME: &str = "vsql_vault launcher";
pub const WRITER_NAME: &str = "vsql_vault audit writer";
pub const RETENTION_NAME: &str = crate::retention::worker::WORKER_NAME;

/// How long a database without the extension is left alone before a writer looks again (an
/// audited call there, after CREATE EXTENSION, asks at once).
const RECHECK_WITHOUT_EXTENSION_S: i64 = 60;
/// A DROP DATABASE that failed leaves its database stopped this long at most.
const STOPPING_AT_MOST_S: i64 = 10;

pub fn register() {
    BackgroundWorkerBuilder::new(LAUNCHER_NAME)
        .set_type(LAUNCHER_NAME)
        .set_function("vsql_vault_launcher_main")
        .set_library("vsql_vault")
        // A connection to no database (shared catalogs only); its workers run only outside
        // recovery, as the records they write need a primary.
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

fn start(name: &str, function: &str, db: u32) -> Option<DynamicBackgroundWorker> {
    // SAFETY: a plain read of a process global, on the launcher's only thread.
    let me = unsafe { pg_sys::MyProcPid };
    let started = BackgroundWorkerBuilder::new(name)
        .set_type(name)
        .set_function(function)
        .set_library("vsql_vault")
        .enable_spi_access()
        .set_argument(Some(pg_sys::Datum::from(db)))
        // The launcher restarts its workers itself: it knows whether their database still
        // exists, the postmaster does not.
        .set_restart_time(None)
        .set_notify_pid(me)
        .load_dynamic();
    match started {
        Ok(handle) => Some(handle),
        Err(_) => {
            warning!("{LAUNCHER_NAME} could not start a {name} for database {db}: raise max_worker_processes");
            None
        }
    }
}

fn alive(handle: &Option<DynamicBackgroundWorker>) -> bool {
    handle
        .as_ref()
        .is_some_and(|h| matches!(h.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)))
}

#[derive(Default)]
struct Workers {
    writer: Option<DynamicBackgroundWorker>,
    retention: Option<DynamicBackgroundWorker>,
    writer_started: Option<Instant>,
    retention_started: Option<Instant>,
    /// When the launcher first saw the retention worker gone: it restarts 5 s after its exit, so
    /// a worker that was stopped is reported failing for that long (vault_health()).
    retention_gone: Option<Instant>,
}

/// Whether a worker last started (or seen gone) at `since` may start again: a worker that fails
/// at once is not restarted in a tight loop (the restart times the postmaster applied to these
/// workers before the launcher: 1 s for the writer, 5 s after its exit for the retention worker).
fn may_restart(since: Option<Instant>, after: Duration) -> bool {
    since.is_none_or(|t| t.elapsed() >= after)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn vsql_vault_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: a plain read of a process global on the worker's thread: after InitProcess, MyLatch
    // is this process's PGPROC latch, in shared memory.
    DATABASES.exclusive().launcher_latch = unsafe { pg_sys::MyLatch as usize };
    let mut workers: HashMap<u32, Workers> = HashMap::new();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the reload a background worker makes in its main loop: on its thread,
            // between transactions, no LWLock held.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // vsql_vault.database may now admit a database looked at and left before: look again.
            for e in DATABASES.exclusive().entries.iter_mut() {
                e.no_extension_at = 0;
            }
        }
        // SAFETY: inside the transaction BackgroundWorker::transaction opens.
        let databases = BackgroundWorker::transaction(|| unsafe { connectable_databases() });
        supervise(&databases, &mut workers);
    }
    DATABASES.exclusive().launcher_latch = 0;
    // SAFETY: outside any transaction, no LWLock held; proc_exit never returns. Exit code 1: the
    // postmaster starts a new launcher (after pg_terminate_backend; at shutdown it does not).
    unsafe { pg_sys::proc_exit(1) };
}

/// Every database that accepts connections and is not a template: (OID, name).
///
/// # Safety
/// Inside a transaction of a background worker connected to no database (pg_database is a shared
/// catalog, read with a catalog snapshot as `table_beginscan_catalog` takes it).
unsafe fn connectable_databases() -> Vec<(u32, String)> {
    // SAFETY: by the caller's guarantee (a transaction); each tuple heap_getnext returns is
    // valid until the next call, and its fixed part is read before that.
    unsafe {
        let rel = pg_sys::table_open(
            pg_sys::DatabaseRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut out = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if (*form).datallowconn && !(*form).datistemplate {
                let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                out.push(((*form).oid.to_u32(), name));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        out
    }
}

/// Forgets the entries of databases that are gone and ends stops a failed DROP DATABASE left.
fn tidy_entries(databases: &[(u32, String)], now: i64) -> Vec<DatabaseEntry> {
    let mut d = DATABASES.exclusive();
    for e in d.entries.iter_mut().filter(|e| e.db != 0) {
        if !databases.iter().any(|(db, _)| *db == e.db) {
            *e = DatabaseEntry::default();
        } else if e.stopping_at != 0 && now - e.stopping_at > STOPPING_AT_MOST_S {
            e.stopping_at = 0;
        }
    }
    d.entries.to_vec()
}

fn supervise(databases: &[(u32, String)], workers: &mut HashMap<u32, Workers>) {
    // SAFETY: a plain read of a process global the postmaster set at start.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        // pg_upgrade's server restores schemas only: no writer, and above all no sweep.
        return;
    }
    let now = unix_now();
    let entries = tidy_entries(databases, now);
    workers.retain(|db, _| databases.iter().any(|(d, _)| d == db));
    let restriction = settings::database_restriction();
    let max = settings::MAX_DATABASES.get().max(1) as usize;
    let entry_of = |db: u32| entries.iter().find(|e| e.db == db).copied();
    let mut serving = databases
        .iter()
        .filter(|(db, _)| {
            let w = workers.get(db);
            let e = entry_of(*db).unwrap_or_default();
            w.is_some_and(|w| alive(&w.writer) || alive(&w.retention))
                || e.writer_pid != 0
                || e.retention_pid != 0
        })
        .count();
    for (db, name) in databases {
        if restriction.as_deref().is_some_and(|r| r != name) {
            continue;
        }
        let e = entry_of(*db).unwrap_or_default();
        if e.stopping_at != 0 {
            continue;
        }
        let w = workers.entry(*db).or_default();
        let writer_up = alive(&w.writer) || e.writer_pid != 0;
        let retention_up = alive(&w.retention) || e.retention_pid != 0;
        if retention_up {
            w.retention_gone = None;
        } else if w.retention_started.is_some() && w.retention_gone.is_none() {
            w.retention_gone = Some(Instant::now());
        }
        if !writer_up {
            let recently_absent =
                e.no_extension_at != 0 && now - e.no_extension_at < RECHECK_WITHOUT_EXTENSION_S;
            if recently_absent && !e.wanted {
                continue;
            }
            if !retention_up && serving >= max {
                super::with_entry(*db, |e| e.over_capacity = e.wanted);
                continue;
            }
            if !may_restart(w.writer_started, Duration::from_secs(1)) {
                continue;
            }
            w.writer = start(WRITER_NAME, "vsql_vault_audit_writer_main", *db);
            w.writer_started = Some(Instant::now());
            serving += usize::from(!retention_up);
            super::with_entry(*db, |e| {
                e.wanted = false;
                e.over_capacity = false;
            });
        } else if !retention_up
            && e.writer_pid != 0
            && e.no_extension_at == 0
            && may_restart(w.retention_gone, Duration::from_secs(5))
        {
            // The writer found the extension: the database is served, retention follows.
            w.retention_started = Some(Instant::now());
            w.retention = start(RETENTION_NAME, "vsql_vault_retention_worker_main", *db);
        }
    }
}
