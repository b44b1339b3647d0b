//! Audited reads on a hot standby: the standby forwards each access record to its primary and
//! returns data only once the primary's audit writer has made the record durable.
//!
//! - Standby side (`submit`): the calling backend keeps one libpq connection to the primary
//!   (`vsql_vault.primary_conninfo`, the standby's database name added) and calls
//!   `vault.accept_forwarded_record` there, waiting on its latch and the socket so a cancel and
//!   `vsql_vault.audit_timeout` are honoured. No connection, an error or a timeout: VV503 at once,
//!   no data.
//! - Primary side (`accept_forwarded_record`): for members of `vault_forwarder` only. It checks
//!   the record (`vsql_vault_core::forward`), adds the standby's name and the forwarding session's
//!   user to its details (chained like every detail), takes `max_retrievals` from the primary's own
//!   entry, and hands it to the primary's audit writer, which counts retrievals atomically with
//!   every other get and makes the record durable (or a denial once the limit is reached).

use super::queue::{self, Outcome, RawRecord};
use crate::errors::VaultError;
use crate::settings;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::time::{Duration, Instant};
use vsql_vault_core::forward::{self as rules, ForwardedRecord, Verdict};

/// Whether this server is a hot standby (in recovery).
pub fn on_standby() -> bool {
    // SAFETY: a read of shared recovery state, allowed in any backend at any time.
    unsafe { pg_sys::RecoveryInProgress() }
}

// ---- the standby's side ----

/// A connection to the primary, finished when dropped.
struct Primary {
    conn: *mut pq_sys::PGconn,
    /// The setting it was opened with: a reload that changes it opens a new one.
    conninfo: String,
    /// A call was interrupted (cancel, error) while a query was in flight: not reusable.
    in_flight: bool,
}

impl Drop for Primary {
    fn drop(&mut self) {
        // SAFETY: `conn` came from PQconnectdbParams and is finished exactly once, here.
        unsafe { pq_sys::PQfinish(self.conn) };
    }
}

thread_local! {
    static PRIMARY: RefCell<Option<Primary>> = const { RefCell::new(None) };
}

fn unavailable(why: impl Into<String>) -> VaultError {
    VaultError::AuditUnavailable(why.into())
}

/// Sends `record` to the primary and waits until it is durable there.
pub fn submit(record: &RawRecord, large: Option<&str>) -> Result<Outcome, VaultError> {
    let conninfo = settings::PRIMARY_CONNINFO
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| {
            unavailable(
                "this server is a hot standby and vsql_vault.primary_conninfo is not set, so the record cannot be made durable on the primary",
            )
        })?;
    let timeout = Duration::from_millis(settings::AUDIT_TIMEOUT_MS.get().max(1) as u64);
    let deadline = Instant::now() + timeout;
    let json = serde_json::to_string(&forwarded(record, large))
        .map_err(|e| VaultError::Internal(format!("encoding a forwarded record: {e}")))?;
    let name = standby_name();
    let answer = PRIMARY.with(|cell| {
        let mut slot = cell.borrow_mut();
        let stale = slot
            .as_ref()
            .is_some_and(|p| p.in_flight || p.conninfo != conninfo || !alive(p.conn));
        if stale {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(connect(&conninfo, timeout)?);
        }
        let primary = slot.as_mut().expect("connected above");
        let result = call(primary, &name, &json, deadline);
        if result.is_err() {
            // Whatever went wrong, the next call starts from a fresh connection.
            *slot = None;
        }
        result
    })?;
    match Verdict::parse(&answer) {
        Some(Verdict::Written) => Ok(Outcome::Written),
        Some(Verdict::LimitReached) => Ok(Outcome::LimitReached),
        None => Err(unavailable(
            "the primary answered the forwarded record with something unexpected",
        )),
    }
}

/// The record as it travels: the standby's `RawRecord`, whole details included.
fn forwarded(r: &RawRecord, large: Option<&str>) -> ForwardedRecord {
    let details = large
        .map(str::to_owned)
        .or_else(|| r.details.get())
        .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok());
    ForwardedRecord {
        logged_at_us: r.logged_at,
        role_name: r.role_name.get().unwrap_or_default(),
        session_user: r.session_user.get().unwrap_or_default(),
        application_name: r.application_name.get(),
        client_addr: r.client_addr.get(),
        backend_pid: r.backend_pid,
        operation: r.operation.get().unwrap_or_default(),
        purpose: r.purpose.get(),
        external_id: r.external_id.get(),
        entry_id: r.has_entry.then_some(r.entry_id),
        max_retrievals: (r.max_retrievals > 0).then_some(r.max_retrievals),
        granted: r.granted,
        sqlstate: r.sqlstate.get(),
        reason: r.reason.get(),
        details,
        on_behalf_of: r.on_behalf_of.get(),
    }
}

/// The name the standby gives the primary: its `cluster_name`.
fn standby_name() -> String {
    // SAFETY: GetConfigOption returns a pointer to the setting's current value (or NULL), valid
    // until the setting changes; it is copied at once, on the backend's only thread.
    let name = unsafe {
        let p = pg_sys::GetConfigOption(c"cluster_name".as_ptr(), true, false);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    if rules::validate_standby_name(&name).is_ok() {
        name
    } else {
        "unnamed standby (cluster_name not set)".to_owned()
    }
}

fn connected(conn: *mut pq_sys::PGconn) -> bool {
    // SAFETY: `conn` is a live connection of this backend.
    unsafe { pq_sys::PQstatus(conn) == pq_sys::ConnStatusType::CONNECTION_OK }
}

/// Whether an idle connection is still usable. An idle connection has nothing to read: when the
/// socket is readable the server sent something unasked (its termination message, the end of
/// the connection after a restart) and the connection is replaced before a record is sent, so
/// the call reconnects instead of failing. (A notice read this way costs one reconnection.)
fn alive(conn: *mut pq_sys::PGconn) -> bool {
    // SAFETY: `conn` is a live connection of this backend.
    let socket = unsafe { pq_sys::PQsocket(conn) };
    if socket < 0 || !connected(conn) {
        return false;
    }
    // SAFETY: a zero-timeout poll of the connection's socket; no latch is waited on, no LWLock
    // is held.
    let events = unsafe {
        pg_sys::WaitLatchOrSocket(
            std::ptr::null_mut(),
            (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            socket,
            0,
            pg_sys::PG_WAIT_EXTENSION,
        )
    };
    events & pg_sys::WL_SOCKET_READABLE as i32 == 0
}

/// A message of libpq's, copied (it may be NULL).
fn message(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libpq returns NUL-terminated strings that live as long as their connection or
    // result, both alive here.
    unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_owned()
}

fn connect(conninfo: &str, timeout: Duration) -> Result<Primary, VaultError> {
    // A malformed string's error message can quote it, password and all: parse it first and say
    // only that it is malformed.
    let info = CString::new(conninfo)
        .map_err(|_| unavailable("vsql_vault.primary_conninfo is not a valid connection string"))?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: `info` is NUL-terminated; the parsed options and any error message are freed here.
    let parsed = unsafe {
        let options = pq_sys::PQconninfoParse(info.as_ptr(), &mut err);
        if !err.is_null() {
            pq_sys::PQfreemem(err.cast());
        }
        let ok = !options.is_null();
        if ok {
            pq_sys::PQconninfoFree(options);
        }
        ok
    };
    if !parsed {
        return Err(unavailable(
            "vsql_vault.primary_conninfo is not a valid connection string",
        ));
    }
    let database = crate::audited_call::current_database()
        .ok_or_else(|| VaultError::Internal("this database has no name".into()))?;
    let dbname = CString::new(database)
        .map_err(|_| VaultError::Internal("database name with a NUL".into()))?;
    // libpq waits forever for a host that does not answer unless told otherwise; a conninfo of
    // its own connect_timeout (listed later) wins.
    let seconds = CString::new(timeout.as_secs().clamp(2, 600).to_string()).expect("digits");
    let keywords = [
        c"connect_timeout".as_ptr(),
        c"dbname".as_ptr(),
        c"dbname".as_ptr(),
        c"fallback_application_name".as_ptr(),
        std::ptr::null(),
    ];
    let values = [
        seconds.as_ptr(),
        info.as_ptr(),
        dbname.as_ptr(),
        c"vsql_vault standby forwarder".as_ptr(),
        std::ptr::null(),
    ];
    // SAFETY: both arrays are NULL-terminated, of equal length, and outlive the call; the
    // first dbname is expanded as a connection string, the second is the database name.
    let conn = unsafe { pq_sys::PQconnectdbParams(keywords.as_ptr(), values.as_ptr(), 1) };
    if conn.is_null() {
        return Err(unavailable(
            "could not allocate a connection to the primary",
        ));
    }
    let primary = Primary {
        conn,
        conninfo: conninfo.to_owned(),
        in_flight: false,
    };
    if !connected(conn) {
        // SAFETY: `conn` is alive (finished when `primary` drops, after this copy).
        let why = message(unsafe { pq_sys::PQerrorMessage(conn) });
        return Err(unavailable(format!(
            "the primary (vsql_vault.primary_conninfo) cannot be reached: {why}"
        )));
    }
    Ok(primary)
}

const ACCEPT: &CStr = c"SELECT vault.accept_forwarded_record($1, $2)";

/// Calls the primary's accept function and returns its answer, waiting at most until `deadline`.
fn call(
    primary: &mut Primary,
    name: &str,
    json: &str,
    deadline: Instant,
) -> Result<String, VaultError> {
    let conn = primary.conn;
    let name =
        CString::new(name).map_err(|_| VaultError::Internal("standby name with a NUL".into()))?;
    let json = CString::new(json)
        .map_err(|_| VaultError::Internal("forwarded record with a NUL".into()))?;
    let params = [name.as_ptr(), json.as_ptr()];
    // SAFETY: `conn` is a live connection; the query and the two text parameters are
    // NUL-terminated and outlive the call (libpq copies them into its output buffer).
    let sent = unsafe {
        pq_sys::PQsendQueryParams(
            conn,
            ACCEPT.as_ptr(),
            2,
            std::ptr::null(),
            params.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
        )
    };
    if sent == 0 {
        // SAFETY: as above.
        let why = message(unsafe { pq_sys::PQerrorMessage(conn) });
        return Err(unavailable(format!("the primary cannot be reached: {why}")));
    }
    primary.in_flight = true;
    // SAFETY: as above.
    let socket = unsafe { pq_sys::PQsocket(conn) };
    loop {
        // SAFETY: as above; PQconsumeInput reads what the socket has without blocking.
        let busy = unsafe {
            if pq_sys::PQconsumeInput(conn) == 0 {
                let why = message(pq_sys::PQerrorMessage(conn));
                return Err(unavailable(format!(
                    "the connection to the primary failed: {why}"
                )));
            }
            pq_sys::PQisBusy(conn) != 0
        };
        if !busy {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(unavailable(
                "no confirmation from the primary within vsql_vault.audit_timeout",
            ));
        }
        let wait = (deadline - now).as_millis().max(1) as std::ffi::c_long;
        // SAFETY: waits on this backend's own latch and the connection's socket; no LWLock is
        // held. An interrupt raised by check_for_interrupts unwinds with `in_flight` still set,
        // so the next call opens a new connection.
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET
                    | pg_sys::WL_SOCKET_READABLE
                    | pg_sys::WL_TIMEOUT
                    | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                socket,
                wait,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            pg_sys::check_for_interrupts!();
        }
    }
    let mut answer: Result<String, VaultError> = Err(unavailable("the primary returned no answer"));
    loop {
        // SAFETY: no more input is pending (PQisBusy was false), so PQgetResult does not block;
        // every result is cleared before the next.
        let res = unsafe { pq_sys::PQgetResult(conn) };
        if res.is_null() {
            break;
        }
        // SAFETY: `res` is a live result, cleared at the end of this block.
        unsafe {
            if pq_sys::PQresultStatus(res) == pq_sys::ExecStatusType::PGRES_TUPLES_OK
                && pq_sys::PQntuples(res) == 1
                && pq_sys::PQgetisnull(res, 0, 0) == 0
            {
                answer = Ok(message(pq_sys::PQgetvalue(res, 0, 0)));
            } else {
                let sqlstate = message(pq_sys::PQresultErrorField(res, b'C' as i32));
                let why = message(pq_sys::PQresultErrorMessage(res));
                answer = Err(unavailable(format!(
                    "the primary refused the forwarded record ({sqlstate}): {why}"
                )));
            }
            pq_sys::PQclear(res);
        }
    }
    primary.in_flight = false;
    answer
}

// ---- the primary's side ----

/// The entry's `max_retrievals` as the primary knows it; for an entry the primary no longer has
/// (the standby lags behind its deletion) the limit the standby saw.
const MAX_RETRIEVALS: &str = "SELECT coalesce(p.max_retrievals, 0) FROM vault.entries e
      LEFT JOIN vault.access_policies p ON p.name = e.access_policy WHERE e.id = $1";

/// Records an access record a hot standby forwards (see the module's documentation). Returns
/// `written`, or `limit_reached` for a get the primary denied because the entry's
/// `max_retrievals` is used up. EXECUTE is granted to `vault_forwarder` only.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn accept_forwarded_record(standby: &str, record: &str) -> String {
    match accept(standby, record) {
        Ok(v) => v.as_str().to_owned(),
        Err((code, message)) => {
            pgrx::ereport!(ERROR, code, message);
        }
    }
}

fn accept(standby: &str, record: &str) -> Result<Verdict, (PgSqlErrorCode, String)> {
    let invalid = |e: rules::ForwardError| {
        (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            e.to_string(),
        )
    };
    if on_standby() {
        return Err((
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "this server is a standby too: forward to the primary".into(),
        ));
    }
    let member = crate::pg::select_one::<bool>(
        "SELECT pg_catalog.pg_has_role('vault_forwarder', 'MEMBER')",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !member {
        return Err((
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only members of vault_forwarder may forward access records".into(),
        ));
    }
    rules::validate_standby_name(standby).map_err(invalid)?;
    let f = rules::parse(record).map_err(invalid)?;
    let forwarded_by = crate::security::Caller::current().session_user;
    let mut r = queue::empty_record();
    // The primary's clock orders its log; the standby's time of the decision goes in the details.
    r.logged_at = crate::pg::now_micros();
    r.backend_pid = f.backend_pid;
    r.granted = f.granted;
    if let Some(id) = f.entry_id {
        r.has_entry = true;
        r.entry_id = id;
        if f.granted && f.operation == "get" {
            let _owner = crate::security::AsOwner::enter();
            let primary_limit = crate::pg::select_one::<i32>(MAX_RETRIEVALS, &[id.into()])
                .map_err(|e| {
                    (
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        format!("reading the entry: {e}"),
                    )
                })?;
            r.max_retrievals = primary_limit.unwrap_or(f.max_retrievals.unwrap_or(0));
        }
    }
    r.role_name.set(Some(&f.role_name));
    r.session_user.set(Some(&f.session_user));
    r.application_name.set(f.application_name.as_deref());
    r.client_addr.set(f.client_addr.as_deref());
    r.operation.set(Some(&f.operation));
    r.purpose.set(f.purpose.as_deref());
    r.external_id.set(f.external_id.as_deref());
    r.sqlstate.set(f.sqlstate.as_deref());
    r.reason.set(f.reason.as_deref());
    r.on_behalf_of.set(f.on_behalf_of.as_deref());
    let mut details = rules::recorded_details(f.details.as_ref(), standby, &forwarded_by);
    details["standby_logged_at_us"] = serde_json::json!(f.logged_at_us);
    let text = details.to_string();
    let large = if text.len() <= r.details.capacity() {
        r.details.set(Some(&text));
        None
    } else {
        Some(text)
    };
    match queue::submit(&r, large.as_deref()) {
        Ok(Outcome::LimitReached) => Ok(Verdict::LimitReached),
        Ok(_) => Ok(Verdict::Written),
        Err(e) => Err((
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            e.to_string(),
        )),
    }
}
