//! The retention worker: sweeps expired entries every `vsql_vault.sweep_interval`, one committed
//! batch at a time (each batch's removals and proofs commit together), records each run in
//! `vault.sweep_runs`, and vacuums the entries table afterwards so destroyed values do not stay
//! readable in dead tuples.

use crate::settings;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::{Duration, SystemTime};
use vsql_vault_core::schedule::{next_sweep_due, parse_time_of_day};

pub const WORKER_NAME: &str = "vsql_vault retention worker";

thread_local! {
    /// This transaction destroyed a value and will ask for a VACUUM when it commits.
    static VACUUM_AT_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Called by any backend that destroyed entries: once its transaction commits, its database's
/// worker vacuums within `vsql_vault.vacuum_delay`. Asked at commit, not at once: a VACUUM that
/// ran before the commit could not remove the replaced version, which would then wait for the
/// next request or for autovacuum.
pub fn request_vacuum() {
    if VACUUM_AT_COMMIT.with(|f| f.replace(true)) {
        return;
    }
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        VACUUM_AT_COMMIT.with(|f| f.set(false));
        crate::launcher::request_vacuum();
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
        VACUUM_AT_COMMIT.with(|f| f.set(false));
    });
}

/// SIGTERM arrived (pgrx's flag for it is cleared when read; this one is not).
fn stop_requested() -> bool {
    // SAFETY: reads an int-sized `sig_atomic_t` that only the SIGTERM handler (pgrx's) sets, on
    // the worker's only thread; a torn read is impossible. It is a plain rather than a volatile
    // read, but every read is a fresh call separated from the last by opaque FFI calls, so the
    // compiler cannot cache it.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

fn extension_present() -> bool {
    BackgroundWorker::transaction(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT to_regclass('vault.sweep_runs') IS NOT NULL",
                None,
                &[],
            )?
            .first()
            .get_one::<bool>()
        })
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn vsql_vault_retention_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // The launcher starts one worker per database, named by its OID.
    let database = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !extension_present() {
        crate::launcher::no_extension_here();
        // SAFETY: outside any transaction, no LWLock held; proc_exit never returns.
        unsafe { pg_sys::proc_exit(0) };
    }
    on_exit_detach();
    log!("{WORKER_NAME} started for database {}", database.to_u32());

    let started = unix_now();
    // The end of the last finished run: read once the extension is there, then after each sweep.
    let mut last_run: Option<i64> = None;
    let mut runs_read = false;
    let mut daily_at = sweep_at();
    // When the last VACUUM of vault.entries ended, and when the one requested since is due.
    let mut last_vacuum: Option<std::time::Instant> = None;
    let mut vacuum_due: Option<std::time::Instant> = None;
    loop {
        if !runs_read && extension_present() {
            last_run = last_finished_run().or(last_run);
            runs_read = true;
        }
        let interval = i64::from(settings::SWEEP_INTERVAL_S.get().max(1));
        let due = next_sweep_due(last_run.unwrap_or(started), interval, daily_at);
        let until_sweep = Duration::from_secs(due.saturating_sub(unix_now()).max(0) as u64);
        let until_vacuum = vacuum_due.map_or(until_sweep, |at| {
            at.saturating_duration_since(std::time::Instant::now())
        });
        // Wake at least every second so SIGTERM and SIGHUP are handled promptly.
        if !BackgroundWorker::wait_latch(Some(
            until_sweep
                .min(until_vacuum)
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(10)),
        )) || stop_requested()
        {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the reload a background worker makes in its main loop (as PostgreSQL's own
            // workers do): on the worker's thread, between transactions, no LWLock held.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if !BackgroundWorker::transaction(crate::launcher::serves_this_database) {
                break;
            }
            daily_at = sweep_at();
            continue;
        }
        if unix_now() >= due && !crate::launcher::restore_in_progress() {
            if extension_present() {
                scheduled_sweep();
                last_run = last_finished_run();
                runs_read = true;
            }
            // No run recorded (no extension yet, or no record could be made): wait an interval.
            last_run = last_run.filter(|&t| t >= due).or(Some(unix_now()));
        }
        if !extension_present() {
            // DROP EXTENSION: CREATE EXTENSION asks the launcher for new workers.
            crate::launcher::no_extension_here();
            break;
        }
        if vacuum_due.is_none() && crate::launcher::vacuum_requested() {
            let delay = Duration::from_secs(settings::VACUUM_DELAY_S.get().max(0) as u64);
            let now = std::time::Instant::now();
            vacuum_due = Some(last_vacuum.map_or(now, |t| (t + delay).max(now)));
        }
        if vacuum_due.is_some_and(|at| at <= std::time::Instant::now()) {
            vacuum_due = None;
            if crate::launcher::take_vacuum_request() {
                vacuum_entries();
                last_vacuum = Some(std::time::Instant::now());
            }
        }
    }
    // The launcher, not the postmaster, decides whether a new worker starts.
    // SAFETY: as above: between transactions, no LWLock held, and nothing runs after it.
    unsafe { pg_sys::proc_exit(0) };
}

/// However the worker ends, the launcher sees it gone and backends stop waking it.
fn on_exit_detach() {
    #[pg_guard]
    unsafe extern "C-unwind" fn detach(_code: i32, _arg: pg_sys::Datum) {
        crate::launcher::worker_started(true, 0, 0);
    }
    // SAFETY: registers a callback PostgreSQL runs once at process exit, on this thread.
    unsafe { pg_sys::before_shmem_exit(Some(detach), pg_sys::Datum::from(0)) };
    // SAFETY: plain reads of process globals on the worker's thread. After InitProcess, MyLatch
    // is its PGPROC latch in shared memory, so the address means the same in the backends that
    // SetLatch it (request_vacuum).
    let (pid, latch) = unsafe { (pg_sys::MyProcPid, pg_sys::MyLatch as usize) };
    crate::launcher::worker_started(true, pid, latch);
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `vsql_vault.sweep_at` as seconds after midnight UTC; an invalid value is reported and the
/// interval used instead.
fn sweep_at() -> Option<i64> {
    let text = settings::SWEEP_AT
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse_time_of_day(&text).unwrap_or_else(|e| {
        warning!("{WORKER_NAME}: {e}; sweeping every vsql_vault.sweep_interval instead");
        None
    })
}

/// When the last finished sweep run ended (Unix seconds), scheduled or called.
fn last_finished_run() -> Option<i64> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT floor(extract(epoch FROM max(finished_at)))::int8 AS last FROM vault.sweep_runs",
                None,
                &[],
            )?
            .first()
            .get_by_name::<i64, _>("last")
        })
        .ok()
        .flatten()
    })
}

/// One run: batches until nothing is expired, SIGTERM, or an error (recorded in the run's row).
fn scheduled_sweep() {
    let run_id = BackgroundWorker::transaction(|| {
        Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO vault.sweep_runs (started_by) VALUES ('schedule') RETURNING id",
                None,
                &[],
            )?
            .first()
            .get_one::<i64>()
        })
    });
    let Ok(Some(run_id)) = run_id else {
        warning!("{WORKER_NAME}: could not record a sweep run");
        return;
    };
    let batch = settings::SWEEP_BATCH_SIZE.get().max(1) as i64;
    let (mut purged, mut batches, mut error) = (0i64, 0i32, None::<String>);
    // Each batch resumes after the last entry of the one before (destroy::sweep_batch).
    let mut after = None;
    loop {
        if stop_requested() {
            break;
        }
        // A failure is raised inside the batch's transaction so that it aborts: never a proof
        // without its purge or a purge without its proof.
        let result = PgTryBuilder::new(|| {
            Ok(BackgroundWorker::transaction(|| {
                sweep_one_batch(batch, run_id, after).unwrap_or_else(|e| pgrx::error!("{e}"))
            }))
        })
        .catch_others(|e| {
            // SAFETY: on the worker's thread, after pgrx caught the error (it has already copied
            // the error data and flushed PostgreSQL's error state). AbortCurrentTransaction aborts
            // and cleans up the batch's transaction whatever state the error left it in (active
            // snapshot, resource owner and memory contexts included), and does nothing if no
            // transaction was open; nothing from that transaction is used afterwards (`e` is
            // owned Rust data).
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(match e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    r.message().to_owned()
                }
            })
        })
        .execute();
        match result {
            Ok((0, _)) => break,
            Ok((n, last)) => {
                after = last;
                purged += n;
                batches += 1;
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let recorded = BackgroundWorker::transaction(|| {
        Spi::connect_mut(|c| {
            c.update(
                "UPDATE vault.sweep_runs SET finished_at = clock_timestamp(), entries_purged = $2, batches = $3,
                        errors = $4 WHERE id = $1",
                None,
                &[run_id.into(), purged.into(), batches.into(), error.clone().into()],
            )
            .map(|_| ())
        })
    });
    if let Err(e) = recorded {
        warning!("{WORKER_NAME}: could not finish the sweep run record: {e}");
    }
    if let Some(e) = error {
        warning!("{WORKER_NAME}: sweep {run_id} stopped: {e}");
    }
    if purged > 0 {
        vacuum_entries();
    }
}

/// Where a sweep's next batch starts: after this `(expires_at in microseconds, id)`.
type Resume = Option<(i64, i64)>;

/// One batch of a scheduled run, in the caller's transaction: its removals, its proofs and its
/// access record (every destruction reaches the access log) commit together. Returns how many,
/// and where the next batch resumes.
fn sweep_one_batch(
    batch: i64,
    run_id: i64,
    after: Resume,
) -> Result<(i64, Resume), crate::errors::VaultError> {
    let swept = super::destroy::sweep_batch(batch, WORKER_NAME, Some(run_id), after)?;
    if swept.len() > 0 {
        super::record::record_worker_batch(&swept, run_id, WORKER_NAME)?;
    }
    Ok((swept.len(), swept.last))
}

/// VACUUM vault.entries, which only works outside a transaction block: the worker runs it the
/// way a top-level command runs.
fn vacuum_entries() {
    // SAFETY: called from the worker's main loop and at the end of a sweep, never inside a
    // transaction: StartTransactionCommand opens a fresh one, not a transaction block, which is
    // what VACUUM with isTopLevel = true needs. vacuum() commits that transaction and starts new
    // ones, so, as autovacuum does, the parse tree and PortalContext live in a context of their
    // own under TopMemoryContext that survives those commits, deleted once the work is done.
    // raw_parser on this constant either ERRORs or returns a one-element list whose RawStmt is a
    // VacuumStmt, so the two dereferences and the cast are valid; make_parsestate accepts a null
    // parent.
    unsafe {
        let portal = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"vsql_vault vacuum".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        pg_sys::PortalContext = portal;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::MemoryContextSwitchTo(portal);
        let stmts = pg_sys::raw_parser(
            c"VACUUM vault.entries".as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        );
        let raw = (*(*stmts).elements).ptr_value as *mut pg_sys::RawStmt;
        let stmt = (*raw).stmt as *mut pg_sys::VacuumStmt;
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::ExecVacuum(pstate, stmt, true);
        pg_sys::CommitTransactionCommand();
        pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        pg_sys::PortalContext = std::ptr::null_mut();
        pg_sys::MemoryContextDelete(portal);
    }
}
