//! Who is calling: the caller's identity, read once per call, and its role checks.
//!
//! The API functions are not SECURITY DEFINER: inside one, `current_user` would be the owner and
//! the caller's effective role (after SET ROLE) would be lost. Instead they read the caller's
//! identity first, then switch to the owner of the vault tables for their own queries only
//! (`owner`).

use super::AsOwner;
use crate::pg::select_one;
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
    /// `vsql_vault.on_behalf_of`: whom the application says it acts for (not authenticated).
    pub on_behalf_of: Option<String>,
}

thread_local! {
    static CLIENT_ADDR: OnceCell<Option<String>> = const { OnceCell::new() };
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
            on_behalf_of: crate::settings::on_behalf_of(),
        }
    }
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
