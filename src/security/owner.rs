//! Running the API's table access as the extension's owner, and a user's table as its owner, the
//! way PostgreSQL runs a SECURITY DEFINER call or VACUUM: the user id is switched for the
//! guarded section only and restored when the guard drops, also when an error unwinds.

use crate::pg::{select_one, TemporarySetting};
use pgrx::prelude::*;
use std::cell::OnceCell;

thread_local! {
    static OWNER: OnceCell<pg_sys::Oid> = const { OnceCell::new() };
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

/// The search_path the vault's own queries run under, as in the SET clause of the API functions.
const VAULT_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// Pins `search_path` unless it is pinned already (inside an API function), so that the vault's
/// queries never resolve a name through a path the caller chose, and their saved plans are always
/// made under one path. The chain trigger relies on this instead of a SET clause of its own, which
/// cost a GUC save and restore per inserted row.
fn pin_search_path() -> Option<TemporarySetting> {
    // SAFETY: GetConfigOption returns the setting's current value (or NULL), valid until the
    // setting changes; it is compared before anything else runs.
    let pinned = unsafe {
        let p = pg_sys::GetConfigOption(c"search_path".as_ptr(), true, false);
        !p.is_null() && std::ffi::CStr::from_ptr(p).to_bytes() == VAULT_SEARCH_PATH.as_bytes()
    };
    (!pinned).then(|| TemporarySetting::set(c"search_path", VAULT_SEARCH_PATH))
}

/// Restores the caller's user id (and search_path) when dropped, also when an error unwinds
/// through it.
pub struct AsOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    /// Dropped after `drop` has restored the user id: guards nest as scopes do.
    _search_path: Option<TemporarySetting>,
}

impl AsOwner {
    pub fn enter() -> AsOwner {
        let search_path = pin_search_path();
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
            _search_path: search_path,
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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::AsTableOwner;
    use crate::pg::select_one;
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
