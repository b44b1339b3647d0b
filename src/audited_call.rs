//! The one path every audited SQL entry point takes: validate → decide → either refuse (the
//! refusal recorded) or act and make the grant durable → return. It owns the subtransaction that
//! keeps a call's changes only once their record is durable, the catching of database errors
//! (recorded as failed calls with their SQLSTATE), and the rule for an unavailable audit writer.
//!
//! An entry point supplies only the body: it validates its input, reads the facts, decides, and
//! acts, returning the result or the refusal. The body may fill in the `Event` (entry id,
//! details) as it learns them. The DDL guard's event triggers are the one other writer of access
//! records (`Event::granted_in_transaction`, `Event::refused_detached`): they run inside someone
//! else's DDL, not as a call of the API.

use crate::access_log::Event;
use crate::errors::VaultError;
use crate::security::Caller;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use vsql_vault_core::rules::unpack_sqlstate;

/// Runs an audited call: `body` in a subtransaction; its result is returned only when the grant
/// is durable, and its changes are kept only then. A refusal, a failure and a database error
/// raised inside `body` are recorded (with their SQLSTATE) and returned.
pub fn audited_call<T>(
    operation: &'static str,
    purpose: Option<&str>,
    external_id: Option<&str>,
    body: impl FnOnce(&mut Event) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    enter(operation, purpose, external_id, Grants::Recorded, body)
}

/// As `audited_call`, for a change whose grant is recorded in the caller's own transaction,
/// atomic with the change (a granted put: one durable commit, the caller's; a rolled-back put
/// leaves neither entry nor record). Its refusals and failures go through the writer as always,
/// since the caller's transaction may abort.
pub fn audited_change<T>(
    operation: &'static str,
    purpose: Option<&str>,
    external_id: Option<&str>,
    body: impl FnOnce(&mut Event) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    enter(operation, purpose, external_id, Grants::InTransaction, body)
}

/// As `audited_call`, for a read whose grants are deliberately not recorded (metrics scrapes
/// read counters, never an entry); its refusals and failures are.
pub fn refusals_recorded<T>(
    operation: &'static str,
    body: impl FnOnce(&mut Event) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    enter(operation, None, None, Grants::NotRecorded, body)
}

/// The entry of every audited call: the refusals no record can be made for, then the caller's
/// event, the permit check, and the call itself.
fn enter<T>(
    operation: &'static str,
    purpose: Option<&str>,
    external_id: Option<&str>,
    grants: Grants,
    body: impl FnOnce(&mut Event) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    refuse_where_nothing_can_be_recorded(operation);
    // The hot paths' statements are key lookups whose best plan does not depend on the values:
    // a generic plan, made once, instead of re-planning each kept statement on every call (the
    // plan cache keeps choosing custom plans for them, which cost more CPU than running them).
    let _generic_plans = matches!(operation, "put" | "get" | "head")
        .then(|| crate::pg::TemporarySetting::set(c"plan_cache_mode", "force_generic_plan"));
    let caller = Caller::current();
    let mut event = Event::new(&caller, operation, purpose, external_id);
    refuse_direct_call(&event, operation);
    run(&mut event, grants, body)
}

/// A call that no access record could be made for is refused before it reads anything: on a hot
/// standby, every call but the reads whose records the standby forwards to the primary
/// (`vsql_vault_core::forward::SERVED_ON_STANDBY`; read-only: 25006, at once), in a
/// database `vsql_vault.database` excludes (55000), and in a transaction holding a lock that keeps the audit writer from
/// appending (the transaction of CREATE EXTENSION or of a break-glass command on the log:
/// 55P03, at once rather than VV503 after vsql_vault.audit_timeout). None of these refusals can
/// be recorded.
fn refuse_where_nothing_can_be_recorded(operation: &str) {
    if crate::access_log::forward::on_standby()
        && !vsql_vault_core::forward::served_on_standby(operation)
    {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "this server is a hot standby: it serves vault_get, vault_head, vault_list and vault_verify_audit (their access records made durable on the primary); every other audited vsql_vault call goes to the primary"
        );
    }
    if let Some(served) = crate::settings::database_restriction() {
        if current_database().as_deref() != Some(served.as_str()) {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                VaultError::WrongDatabase(served).to_string()
            );
        }
    }

    if let Some(table) = crate::access_log::writer::blocked_by_this_transaction() {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            VaultError::WriterBlockedByThisTransaction(table.to_owned()).to_string()
        );
    }
}

pub(crate) fn current_database() -> Option<String> {
    // SAFETY: inside a transaction (an SQL call); get_database_name returns a palloc'd copy or
    // NULL, copied here before anything else runs.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    }
}

/// An internal `*_impl` function called other than from the extension's own SQL function is
/// refused, recorded, and raised (42501): it does nothing and returns no row
/// (`security::api_entry`).
fn refuse_direct_call(event: &Event, operation: &str) {
    if crate::security::api_entry::take_permit() {
        return;
    }
    let refused = event.refused(VaultError::NotThroughApi(operation.to_owned()));
    pgrx::ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        refused.to_string()
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Grants {
    Recorded,
    InTransaction,
    NotRecorded,
}

fn run<T>(
    event: &mut Event,
    grants: Grants,
    body: impl FnOnce(&mut Event) -> Result<T, VaultError>,
) -> Result<T, VaultError> {
    // Every error raised while the subtransaction is open must be caught and the subtransaction
    // rolled back before it goes on: left open, an internal subtransaction turns the caller's
    // next command into "current transaction is aborted".
    let in_body = std::cell::Cell::new(true);
    let sub = SubTransaction::begin();
    let attempt = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        let value = body(event)?;
        in_body.set(false);
        match grants {
            Grants::Recorded => event.granted().map(|()| value),
            Grants::InTransaction => event.granted_in_transaction().map(|()| value),
            Grants::NotRecorded => Ok(value),
        }
    }))
    .catch_others(|caught| Err(VaultError::Raised(Box::new(caught))))
    .execute();
    match attempt {
        Ok(value) => {
            sub.keep();
            Ok(value)
        }
        Err(VaultError::Raised(caught)) => {
            sub.discard();
            match *caught {
                // A database error inside the body: a failed call, recorded with its SQLSTATE.
                CaughtError::PostgresError(report) | CaughtError::ErrorReport(report)
                    if in_body.get() =>
                {
                    Err(refusal(
                        event,
                        VaultError::Database {
                            sqlstate: unpack_sqlstate(report.sql_error_code() as i32),
                            message: report.message().to_owned(),
                        },
                    ))
                }
                // Raised while the grant was being made durable (a cancel while waiting for the
                // writer), or a Rust panic: the caller gets it as it was.
                other => other.rethrow(),
            }
        }
        // A refusal or failure of the body: recorded.
        Err(e) if in_body.get() => {
            sub.discard();
            Err(refusal(event, e))
        }
        // The writer could not make the grant durable, or refused it itself (an entry past
        // max_retrievals, recorded by the writer): nothing is kept or returned.
        Err(e) => {
            sub.discard();
            Err(e)
        }
    }
}

/// For the in-backend tests: an audited call whose body takes the guard `enter` returns and then
/// fails with a database error (division_by_zero), which the call must return as that failure.
#[cfg(any(test, feature = "pg_test"))]
pub(crate) fn fail_holding<G>(enter: impl FnOnce() -> G) {
    // `run`, not `audited_call`: a test function is not one of the extension's SQL functions,
    // so it holds no permit (`security::api_entry`).
    let caller = Caller::current();
    let mut event = Event::new(&caller, "test", None, None);
    let result = run(&mut event, Grants::Recorded, |_| {
        let _guard = enter();
        crate::pg::select_one::<i32>("SELECT 1 / 0", &[])?;
        Ok(())
    });
    assert!(
        matches!(&result, Err(VaultError::Database { sqlstate, .. }) if sqlstate == "22012"),
        "{result:?}"
    );
}

/// Records a refused or failed call and returns its error. When the writer is unavailable no
/// record can be made, and trying again would only wait a second time.
fn refusal(event: &Event, e: VaultError) -> VaultError {
    match e {
        e @ VaultError::AuditUnavailable(_) => e,
        e => event.refused(e),
    }
}

/// An internal subtransaction: kept or rolled back, with the caller's memory context and
/// resource owner restored either way.
struct SubTransaction {
    context: pg_sys::MemoryContext,
    owner: pg_sys::ResourceOwner,
    open: bool,
}

impl SubTransaction {
    fn begin() -> SubTransaction {
        // SAFETY: read before the subtransaction changes them, restored when it ends.
        let (context, owner) =
            unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
        // SAFETY: called inside a transaction (every SQL function is); the memory context is
        // switched back so the body's allocations outlive the subtransaction.
        unsafe {
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            pg_sys::MemoryContextSwitchTo(context);
        }
        SubTransaction {
            context,
            owner,
            open: true,
        }
    }

    fn keep(mut self) {
        // SAFETY: this subtransaction is the innermost one: everything the body opened inside it
        // has ended.
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        self.restore();
    }

    fn discard(mut self) {
        // SAFETY: as in `keep`; after a caught error the subtransaction is in the aborted state
        // PostgreSQL expects here.
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        self.restore();
    }

    fn restore(&mut self) {
        // SAFETY: both were valid when the subtransaction began and outlive it.
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.context);
            pg_sys::CurrentResourceOwner = self.owner;
        }
        self.open = false;
    }
}

impl Drop for SubTransaction {
    fn drop(&mut self) {
        // Left open only by a Rust panic unwinding through the call: the error that panic
        // becomes aborts the transaction, and this subtransaction with it.
        debug_assert!(!self.open || std::thread::panicking());
    }
}

impl From<pgrx::spi::Error> for VaultError {
    fn from(e: pgrx::spi::Error) -> VaultError {
        VaultError::Internal(format!("a query of the vault failed: {e}"))
    }
}
