//! One public API: the `vault.*_impl` functions answer only calls made from inside one of the
//! extension's own SQL functions (the `vault_*` wrappers in `sql/*.sql`).
//!
//! The wrappers exist because pgrx cannot raise the vault's own SQLSTATEs; they run with the
//! caller's rights, so the caller could call an `*_impl` function as well, and get a refusal back
//! as a row instead of an error. PostgreSQL's function-manager hook runs around every call of a
//! function with a `SET` clause, which every wrapper has: entering one of the extension's
//! non-C functions opens a permit, and the executor (`audited_call`) takes it. A call with no
//! open permit, or whose permit was already taken, is refused with 42501 and recorded. The
//! extension's functions are found by OID through `pg_depend`, never by name.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// One permit per open call of an extension SQL function: its FmgrInfo and whether an
    /// internal call has taken it.
    static PERMITS: RefCell<Vec<(usize, bool)>> = const { RefCell::new(Vec::new()) };
    /// Whether a function is one of the extension's own non-C functions, by OID.
    static MEMBERS: RefCell<HashMap<pg_sys::Oid, bool>> = RefCell::new(HashMap::new());
}

static mut PREVIOUS_HOOK: pg_sys::fmgr_hook_type = None;

/// Installs the hook in this process (from `_PG_init`; the postmaster's is inherited by every
/// backend).
pub fn install() {
    // SAFETY: _PG_init runs once per process, on its only thread, before any function call this
    // hook could see; the previous hook is kept and called, as PostgreSQL's hook protocol asks.
    unsafe {
        PREVIOUS_HOOK = pg_sys::fmgr_hook;
        pg_sys::fmgr_hook = Some(hook);
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            Some(forget_members),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(clear_permits), std::ptr::null_mut());
    }
}

/// Takes the permit of the innermost open extension function call; false when there is none or
/// it was taken already (a direct call of an internal function, or a second one).
pub fn take_permit() -> bool {
    PERMITS.with(|p| match p.borrow_mut().last_mut() {
        Some((_, taken)) if !*taken => {
            *taken = true;
            true
        }
        _ => false,
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn hook(
    event: pg_sys::FmgrHookEventType::Type,
    flinfo: *mut pg_sys::FmgrInfo,
    private: *mut pg_sys::Datum,
) {
    let key = flinfo as usize;
    match event {
        pg_sys::FmgrHookEventType::FHET_START => {
            // SAFETY: PostgreSQL passes the FmgrInfo of the function being called.
            let fn_oid = unsafe { (*flinfo).fn_oid };
            if is_extension_sql_function(fn_oid) {
                PERMITS.with(|p| p.borrow_mut().push((key, false)));
            }
        }
        // Every start is matched by an end or, when the call raised, an abort.
        _ => PERMITS.with(|p| {
            let mut p = p.borrow_mut();
            if p.last().is_some_and(|(k, _)| *k == key) {
                p.pop();
            }
        }),
    }
    // SAFETY: written once in `install`, before any call could reach this hook.
    let previous = unsafe { PREVIOUS_HOOK };
    if let Some(previous) = previous {
        // SAFETY: a hook installed before ours, called with the arguments we were given.
        unsafe { previous(event, flinfo, private) };
    }
}

fn is_extension_sql_function(fn_oid: pg_sys::Oid) -> bool {
    if let Some(known) = MEMBERS.with(|m| m.borrow().get(&fn_oid).copied()) {
        return known;
    }
    // SAFETY: called while a function is being entered, so inside a transaction with catalog
    // access; both lookups only read the catalogs.
    let member = unsafe {
        let extension = pg_sys::get_extension_oid(c"vsql_vault".as_ptr(), true);
        extension != pg_sys::InvalidOid
            && pg_sys::getExtensionOfObject(pg_sys::ProcedureRelationId, fn_oid) == extension
            && language_of(fn_oid) != Some(C_LANGUAGE)
    };
    MEMBERS.with(|m| m.borrow_mut().insert(fn_oid, member));
    member
}

/// `pg_language`'s fixed OID of C (ClanguageId), the language of the `*_impl` functions.
const C_LANGUAGE: pg_sys::Oid = pg_sys::Oid::from_u32(13);

/// # Safety
/// Inside a transaction, with catalog access.
unsafe fn language_of(fn_oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup by OID, released before returning; the tuple's struct is
    // pg_proc's fixed-width part, where prolang lives.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(fn_oid),
        );
        if tuple.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple);
        let language = (*form).prolang;
        pg_sys::ReleaseSysCache(tuple);
        Some(language)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_members(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    MEMBERS.with(|m| m.borrow_mut().clear());
}

/// A permit never outlives its transaction, whatever path the transaction ended by.
#[pg_guard]
unsafe extern "C-unwind" fn clear_permits(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PREPARE
    ) {
        PERMITS.with(|p| p.borrow_mut().clear());
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::{is_extension_sql_function, take_permit, PERMITS};
    use pgrx::prelude::*;

    fn oid_of(signature: &str) -> pg_sys::Oid {
        Spi::get_one_with_args::<pg_sys::Oid>("SELECT $1::regprocedure::oid", &[signature.into()])
            .expect("the lookup runs")
            .expect("the function exists")
    }

    #[pg_test]
    fn only_the_extensions_own_sql_functions_open_permits() {
        Spi::run(
            "CREATE FUNCTION public.look_alike() RETURNS void LANGUAGE plpgsql AS 'BEGIN END'",
        )
        .expect("created");
        assert!(is_extension_sql_function(oid_of(
            "vault_put(text,text,bytea,text,text,jsonb,timestamptz,text)"
        )));
        assert!(is_extension_sql_function(oid_of("vault_get(text,text)")));
        // The internal functions themselves (C) and anyone else's functions do not.
        assert!(!is_extension_sql_function(oid_of(
            "vault.get_impl(text,text)"
        )));
        assert!(!is_extension_sql_function(oid_of("public.look_alike()")));
    }

    #[pg_test]
    fn a_permit_is_taken_once() {
        assert!(!take_permit(), "no extension function is running");
        PERMITS.with(|p| p.borrow_mut().push((1, false)));
        assert!(take_permit());
        assert!(
            !take_permit(),
            "a second internal call under one permit is refused"
        );
        PERMITS.with(|p| p.borrow_mut().clear());
    }
}
