//! Which columns of a relation must never leave the server, as decoding sees them. They are
//! read from `vault.sync_exclusions` under the historic snapshot, so a change is filtered by the
//! exclusions in force when it was made, and a table of an unexpected layout stops decoding
//! rather than publish columns it cannot tell are excluded.
//!
//! Exclusions are bound to the column's identity (relation OID and attribute number), so a
//! renamed column, table or schema stays excluded. The allow-list (`vault.sync_published`) is
//! read the same way.

use pgrx::prelude::*;

/// What identifies the historic snapshot a change is decoded under: when it differs from the one
/// the cached exclusions were read under, they are read again. A transaction that commits a
/// change to `vault.sync_exclusions` (a user catalog table) makes decoding hand every transaction
/// in progress a new snapshot from that point on, and that snapshot differs from the previous one
/// in its bounds or in its list of committed transactions.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(super) struct SnapshotId {
    xmin: u32,
    xmax: u32,
    xcnt: u32,
    curcid: u32,
    xip_hash: u64,
}

/// The identity of the historic snapshot in force now.
///
/// # Safety
///
/// Call from a change callback of logical decoding, where the historic snapshot is set up.
pub(super) unsafe fn current_snapshot() -> SnapshotId {
    // SAFETY: under logical decoding GetCatalogSnapshot returns the historic snapshot, a live
    // snapshot whose `xip` holds `xcnt` entries (or is null when `xcnt` is 0).
    unsafe {
        let snap = pg_sys::GetCatalogSnapshot(pg_sys::Oid::INVALID);
        if snap.is_null() {
            return SnapshotId::default();
        }
        let xcnt = (*snap).xcnt;
        let mut xip_hash: u64 = 0xcbf2_9ce4_8422_2325;
        if xcnt > 0 && !(*snap).xip.is_null() {
            for x in std::slice::from_raw_parts((*snap).xip, xcnt as usize) {
                xip_hash = (xip_hash ^ u64::from(x.into_inner())).wrapping_mul(0x0100_0000_01b3);
            }
        }
        SnapshotId {
            xmin: (*snap).xmin.into_inner(),
            xmax: (*snap).xmax.into_inner(),
            xcnt,
            curcid: (*snap).curcid,
            xip_hash,
        }
    }
}

/// The position in `desc` of the column named `name` if it has type `typid`.
///
/// # Safety
///
/// `desc` must be the live descriptor of an open relation.
unsafe fn column_of(desc: pg_sys::TupleDesc, name: &str, typid: pg_sys::Oid) -> Option<usize> {
    // SAFETY: `desc` is live, so `attrs` holds `natts` entries, each with a NUL-terminated name.
    unsafe {
        let natts = (*desc).natts as usize;
        (*desc).attrs.as_slice(natts).iter().position(|a| {
            !a.attisdropped
                && a.atttypid == typid
                && std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes()
        })
    }
}

/// Scans `vault.<table>` under the historic snapshot and calls `row` with the values of the
/// columns named in `cols` (found by name, each checked to have its type; `None` for NULL).
/// A table that does not exist has no rows; one without those columns stops decoding (fail
/// closed: publishing without knowing what must stay would leak it).
///
/// # Safety
///
/// Call from a change callback of logical decoding (inside its transaction, with the historic
/// snapshot set up), where catalog and user-catalog tables may be read. `cols` must name only
/// by-value types.
unsafe fn scan_vault_table(
    table: &std::ffi::CStr,
    cols: &[(&str, pg_sys::BuiltinOid)],
    mut row: impl FnMut(&[Option<pg_sys::Datum>]),
) {
    // SAFETY: inside a decoding callback, so syscache lookups and a catalog scan of a user
    // catalog table are allowed; the relation is opened, scanned and closed here with matching
    // lock modes. heap_deform_tuple writes `natts` entries into vectors of `natts`; the columns
    // read were checked to have the by-value types the caller asked for.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"vault".as_ptr(), true);
        if nsp == pg_sys::Oid::INVALID {
            return;
        }
        let relid = pg_sys::get_relname_relid(table.as_ptr(), nsp);
        if relid == pg_sys::Oid::INVALID {
            return;
        }
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let positions: Option<Vec<usize>> = cols
            .iter()
            .map(|(name, typ)| column_of(desc, name, pg_sys::Oid::from(*typ)))
            .collect();
        let Some(positions) = positions else {
            pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
            let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
            pgrx::error!(
                "vsql_vault: vault.{} does not have the columns this library reads ({}): run ALTER EXTENSION vsql_vault UPDATE",
                table.to_string_lossy(),
                names.join(", ")
            );
        };
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        let mut picked = vec![None; positions.len()];
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            for (p, &i) in picked.iter_mut().zip(&positions) {
                *p = (!nulls[i]).then_some(values[i]);
            }
            row(&picked);
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
    }
}

/// The attribute numbers of the columns of `relid` that must never leave the server, as of the
/// change being decoded (`vault.sync_exclusions`, read under the historic snapshot).
///
/// # Safety
///
/// As for `scan_vault_table`.
pub(super) unsafe fn excluded_columns(relid: pg_sys::Oid) -> Vec<i16> {
    let mut out = Vec::new();
    let cols = [
        ("relid", pg_sys::BuiltinOid::OIDOID),
        ("attnum", pg_sys::BuiltinOid::INT2OID),
    ];
    // SAFETY: the caller's guarantee; both columns are by-value types.
    unsafe {
        scan_vault_table(c"sync_exclusions", &cols, |v| {
            if let [Some(rel), Some(att)] = v {
                if pg_sys::Oid::from(rel.value() as u32) == relid {
                    out.push(att.value() as i16);
                }
            }
        });
    }
    out
}

/// Whether a `vault_admin` published `relid` (`vault.sync_published`, read under the historic
/// snapshot): the vault's own tables leave only then, and every table only then while
/// `vsql_vault.sync_allow_list_required` is on.
///
/// # Safety
///
/// As for `scan_vault_table`.
pub(super) unsafe fn published(relid: pg_sys::Oid) -> bool {
    let mut found = false;
    let cols = [("relid", pg_sys::BuiltinOid::OIDOID)];
    // SAFETY: the caller's guarantee; the column is a by-value type.
    unsafe {
        scan_vault_table(c"sync_published", &cols, |v| {
            if let [Some(rel)] = v {
                found |= pg_sys::Oid::from(rel.value() as u32) == relid;
            }
        });
    }
    found
}
