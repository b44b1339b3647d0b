//! Who is calling, and running the API's table access as the extension's owner.
//!
//! The API functions are not SECURITY DEFINER: inside one, `current_user` would be the owner and
//! the caller's effective role (after SET ROLE) would be lost. Instead they read the caller's
//! identity first, then switch the user id to the owner of the vault tables for their own queries
//! only, exactly as PostgreSQL does for a SECURITY DEFINER call, and switch back.

use pgrx::prelude::*;
use std::cell::OnceCell;
use std::ffi::CStr;

#[derive(Debug, Clone)]
pub struct Caller {
    pub role_oid: pg_sys::Oid,
    pub role_name: String,
    pub session_user: String,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_pid: i32,
}

thread_local! {
    static CLIENT_ADDR: OnceCell<Option<String>> = const { OnceCell::new() };
    static OWNER: OnceCell<pg_sys::Oid> = const { OnceCell::new() };
}

fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: called inside a transaction (from Caller::current, in an SQL call), so the syscache
    // lookup is allowed; with noerr = true an unknown OID gives NULL, checked here. Otherwise the
    // result is a palloc'd NUL-terminated copy in the current memory context, copied into a
    // String before anything could reset that context.
    unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("oid {}", oid.to_u32())
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Caller {
    pub fn current() -> Caller {
        // SAFETY: both only read this backend's user ids, which are set (valid OIDs) once a
        // session is authenticated, as it is in any SQL call; on the backend's only thread.
        let role_oid = unsafe { pg_sys::GetUserId() };
        // SAFETY: as above.
        let session_oid = unsafe { pg_sys::GetSessionUserId() };
        // SAFETY: `application_name` is the GUC's string variable: NULL or a NUL-terminated
        // string owned by the GUC machinery, which nothing replaces while this block copies it
        // (no setting is changed in between).
        let application_name = unsafe {
            let p = pg_sys::application_name;
            (!p.is_null())
                .then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
        };
        let client_addr = CLIENT_ADDR.with(|c| {
            c.get_or_init(|| {
                select_one::<String>("SELECT inet_client_addr()::text", &[])
                    .ok()
                    .flatten()
            })
            .clone()
        });
        Caller {
            role_oid,
            role_name: role_name(role_oid),
            session_user: role_name(session_oid),
            application_name,
            client_addr,
            // SAFETY: a plain read of a process global set at process start.
            backend_pid: unsafe { pg_sys::MyProcPid },
        }
    }
}

/// The owner of the vault tables (the role that ran CREATE EXTENSION), cached per backend.
fn vault_owner() -> pg_sys::Oid {
    OWNER.with(|o| {
        *o.get_or_init(|| {
            select_one::<pg_sys::Oid>(
                "SELECT relowner FROM pg_catalog.pg_class WHERE oid = 'vault.entries'::pg_catalog.regclass",
                &[],
            )
            .ok()
            .flatten()
            .unwrap_or_else(|| pgrx::error!("vsql_vault: cannot find the owner of vault.entries"))
        })
    })
}

/// Restores the caller's user id when dropped, also when an error unwinds through it.
pub struct AsOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
}

impl AsOwner {
    pub fn enter() -> AsOwner {
        let owner = vault_owner();
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        // SAFETY: plain reads and writes of this backend's current user id and security context
        // through pointers to two live locals; `owner` is the valid role OID that owns
        // vault.entries. The saved pair is put back exactly by Drop (guards nest as scopes do), and
        // a transaction abort restores the outer values anyway.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                owner,
                saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
            );
        }
        AsOwner {
            saved_user,
            saved_context,
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the user id and security context `enter` saved, still valid values,
        // on the same backend thread.
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}

/// Runs as the owner of a user's table under `SECURITY_RESTRICTED_OPERATION`, with
/// `search_path` pinned, the way PostgreSQL runs VACUUM, ANALYZE and REFRESH MATERIALIZED VIEW
/// since CVE-2022-1552: whatever code the table reaches (constraints, index expressions,
/// generated columns, output functions of its types) runs with the table owner's rights, which
/// that owner could use anyway, and cannot change role or leave state behind.
pub struct AsTableOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    _search_path: TemporarySetting,
}

impl AsTableOwner {
    pub fn enter(table_owner: pg_sys::Oid) -> AsTableOwner {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        // SAFETY: as in AsOwner::enter; `table_owner` is the relowner read from pg_class (or the
        // bootstrap superuser), a valid role OID. Drop restores the saved pair.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                table_owner,
                saved_context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        AsTableOwner {
            saved_user,
            saved_context,
            _search_path: TemporarySetting::set(c"search_path", "pg_catalog, pg_temp"),
        }
    }
}

impl Drop for AsTableOwner {
    fn drop(&mut self) {
        // SAFETY: as for AsOwner: restores the pair `enter` saved.
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}

/// A setting changed until this guard is dropped, as `SET` inside a function with a `SET`
/// clause: the previous value comes back on drop, or with the (sub)transaction's abort on an
/// error.
pub struct TemporarySetting {
    guc_level: i32,
}

impl TemporarySetting {
    pub fn set(name: &std::ffi::CStr, value: &str) -> TemporarySetting {
        TemporarySetting::set_all(&[(name, value)])
    }

    /// Several settings under one nesting level, restored together.
    pub fn set_all(settings: &[(&std::ffi::CStr, &str)]) -> TemporarySetting {
        // SAFETY: a new GUC nesting level is opened before any change and closed in Drop (or by
        // the (sub)transaction's abort), as a function's SET clause does.
        let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
        for (name, value) in settings {
            let value = std::ffi::CString::new(*value).unwrap_or_default();
            // SAFETY: both are NUL-terminated C strings that outlive the call.
            unsafe {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
        }
        TemporarySetting { guc_level }
    }
}

impl Drop for TemporarySetting {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: closes the nesting level `set_all` opened, inside the same transaction:
            // guards are dropped in reverse order of creation, so it is the innermost level still
            // open (isCommit = false restores the values saved at that level). While unwinding
            // this is skipped: the (sub)transaction abort that follows pops the level itself.
            unsafe { pg_sys::AtEOXact_GUC(false, self.guc_level) };
        }
    }
}

/// The caller's top-level transaction id, if it has one (a put has one after its write).
pub fn current_xid() -> Option<u64> {
    // SAFETY: only reads the current transaction state (no xid is assigned); valid in any backend.
    let full = unsafe { pg_sys::GetTopFullTransactionIdIfAny() };
    (full.value != 0).then_some(full.value)
}

pub fn now_micros() -> i64 {
    // SAFETY: reads the system clock (gettimeofday); no arguments, no state, valid in any process.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// One value from a read-only query; None for no row or NULL. (pgrx's `Spi::get_one` runs as a writer and assigns the
/// transaction an xid, which would turn every read into a commit with a WAL flush.)
pub fn select_one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Option<T>, pgrx::spi::Error> {
    Spi::connect(|c| {
        let rows = c.select(query, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<T>()
    })
}

/// One value from a statement that writes (INSERT ... RETURNING, nextval).
pub fn write_one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Option<T>, pgrx::spi::Error> {
    Spi::connect_mut(|c| {
        let rows = c.update(query, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<T>()
    })
}

/// Whether `caller` has the privileges of `role` (membership with inheritance, as for grants).
pub fn has_role(caller: &Caller, role: &str) -> bool {
    let _owner = AsOwner::enter();
    select_one::<bool>(
        "SELECT pg_catalog.pg_has_role($1, $2, 'USAGE')",
        &[caller.role_oid.into(), role.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Refuses a caller that is a member of none of `roles`.
pub fn require(caller: &Caller, roles: &[&str]) -> Result<(), crate::errors::VaultError> {
    if roles.iter().any(|r| has_role(caller, r)) {
        Ok(())
    } else {
        Err(crate::errors::VaultError::Denied(format!(
            "role \"{}\" is not a member of {}",
            caller.role_name,
            roles.join(" or ")
        )))
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::{select_one, AsTableOwner};
    use pgrx::prelude::*;

    fn user_and_context() -> (pg_sys::Oid, i32) {
        let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
        // SAFETY: writes this backend's current user id and security context into two live locals.
        unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
        (user, context)
    }

    /// The user id and security context, `current_user` and `search_path`.
    fn identity() -> ((pg_sys::Oid, i32), String, String) {
        let current = |query| select_one::<String>(query, &[]).unwrap().unwrap();
        (
            user_and_context(),
            current("SELECT current_user::text"),
            current("SELECT pg_catalog.current_setting('search_path')"),
        )
    }

    /// A role to switch to, created in the test's transaction (rolled back with it).
    fn new_table_owner() -> pg_sys::Oid {
        Spi::run("CREATE ROLE vsql_vault_test_owner").unwrap();
        select_one::<pg_sys::Oid>(
            "SELECT 'vsql_vault_test_owner'::pg_catalog.regrole::oid",
            &[],
        )
        .unwrap()
        .unwrap()
    }

    fn assert_switched_to(owner: pg_sys::Oid) {
        let ((user, context), current_user, search_path) = identity();
        assert_eq!(user, owner);
        assert_ne!(context & pg_sys::SECURITY_RESTRICTED_OPERATION as i32, 0);
        assert_eq!(current_user, "vsql_vault_test_owner");
        assert_eq!(search_path, "pg_catalog, pg_temp");
    }

    #[pg_test]
    fn owner_switch_is_undone_by_an_error_unwinding() {
        let owner = new_table_owner();
        let before = user_and_context();
        PgTryBuilder::new(|| {
            let _owner = AsTableOwner::enter(owner);
            assert_switched_to(owner);
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_RAISE_EXCEPTION,
                "raised as the table owner"
            );
        })
        // Only that error: a failed assertion above is not caught.
        .catch_when(PgSqlErrorCode::ERRCODE_RAISE_EXCEPTION, |_| ())
        .execute();
        // No (sub)transaction was rolled back: the guard's drop alone put the caller back.
        // (search_path comes back with the (sub)transaction's abort: see the audited-call test.)
        assert_eq!(user_and_context(), before);
    }

    #[pg_test]
    fn audited_call_failing_as_table_owner_restores_the_caller() {
        let owner = new_table_owner();
        let before = identity();
        crate::audited_call::fail_holding(|| {
            let owner_guard = AsTableOwner::enter(owner);
            assert_switched_to(owner);
            owner_guard
        });
        assert_eq!(identity(), before);
    }
}
