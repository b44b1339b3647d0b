//! Which columns of a relation must never leave the server, as decoding sees them. They are
//! read from `vault.sync_exclusions` under the historic snapshot, so a change is filtered by the
//! exclusions in force when it was made, and a table of an unexpected layout stops decoding
//! rather than publish columns it cannot tell are excluded.

use pgrx::prelude::*;
use std::ffi::CStr;

/// The columns of `relid` that must never leave the server, as of the change being decoded:
/// `vault.sync_exclusions` is a user catalog table, so it is read under the historic snapshot.
///
/// # Safety
///
/// Call from a change callback of logical decoding (inside its transaction, with the historic
/// snapshot set up), where catalog and user-catalog tables may be read.
pub(super) unsafe fn excluded_columns(relid: pg_sys::Oid) -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: inside a decoding callback, so syscache lookups and a catalog scan of a user
    // catalog table are allowed; the relation is opened, scanned and closed here with matching
    // lock modes. heap_deform_tuple writes `natts` entries into vectors of `natts`; the first
    // two columns are read only after checking they are `oid` and `name` (a by-reference,
    // NUL-terminated NameData), and each name is copied before the next heap_getnext.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"vault".as_ptr(), true);
        if nsp == pg_sys::Oid::INVALID {
            return out;
        }
        let exclusions = pg_sys::get_relname_relid(c"sync_exclusions".as_ptr(), nsp);
        if exclusions == pg_sys::Oid::INVALID {
            return out;
        }
        let rel = pg_sys::table_open(exclusions, pg_sys::AccessShareLock as i32);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let typid = |i: usize| (*(*desc).attrs.as_ptr().add(i)).atttypid;
        if natts < 2
            || typid(0) != pg_sys::Oid::from(pg_sys::BuiltinOid::OIDOID)
            || typid(1) != pg_sys::Oid::from(pg_sys::BuiltinOid::NAMEOID)
        {
            pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
            // Fail closed: publishing without knowing which columns must stay would leak them.
            pgrx::error!("vsql_vault: vault.sync_exclusions does not have the layout this library reads (relid oid, column_name name, ...)");
        }
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            if !nulls[0] && pg_sys::Oid::from(values[0].value() as u32) == relid && !nulls[1] {
                let name = values[1].cast_mut_ptr::<std::ffi::c_char>();
                out.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    }
    out
}
