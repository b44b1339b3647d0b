//! The JSON form of one decoded change, the unit a batch seals. Rows are written straight into
//! one string from the cached column prefixes, because this runs once per changed row; the
//! consumer's `vsql-vault decrypt` reads exactly this form back (`vsql_vault_core::stream`).

use super::lsn_text;
use super::options::Options;
use super::relation_cache::Relation;
use pgrx::prelude::*;
use std::ffi::CStr;
use vsql_vault_core::canonical::push_json_str;

/// Starts a change record: `{"action":"<action>","schema":...,"table":...`.
pub(super) fn open_record(record: &mut String, action: &str, r: &Relation) {
    record.push_str("{\"action\":\"");
    record.push_str(action);
    record.push_str("\",");
    record.push_str(&r.names);
}

/// Ends a change record: its LSN, what `decorate` adds, and the closing brace.
///
/// # Safety
///
/// As for `decorate`.
pub(super) unsafe fn close_record(
    record: &mut String,
    lsn: u64,
    options: &Options,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    use std::fmt::Write as _;
    let _ = write!(
        record,
        ",\"lsn\":\"{:X}/{:X}\"",
        lsn >> 32,
        lsn & 0xffff_ffff
    );
    // SAFETY: the caller's guarantee, as `decorate` requires.
    unsafe { decorate(options, record, txn) };
    record.push('}');
}

/// Appends a row's `"columns"` (the new tuple), `"identity"` (the old key: the replica
/// identity's columns, NULL ones included) and `"key"` (the names of the identity's columns);
/// `None` writes an empty array.
///
/// # Safety
///
/// As for `write_columns`, for each tuple given.
pub(super) unsafe fn write_row(
    record: &mut String,
    r: &Relation,
    desc: pg_sys::TupleDesc,
    new: Option<*mut pg_sys::ReorderBufferTupleBuf>,
    old: Option<*mut pg_sys::ReorderBufferTupleBuf>,
    excluded: &[i16],
) {
    record.push_str(",\"columns\":");
    match new {
        // SAFETY: the caller's guarantee.
        Some(tuple) => unsafe { write_columns(record, r, desc, tuple, false, excluded) },
        None => record.push_str("[]"),
    }
    record.push_str(",\"identity\":");
    match old {
        // SAFETY: the caller's guarantee.
        Some(tuple) => unsafe { write_columns(record, r, desc, tuple, true, excluded) },
        None => record.push_str("[]"),
    }
    // The key's column names, whether or not this change carries an old key.
    record.push_str(",\"key\":[");
    let mut first = true;
    for c in r.columns.iter().filter(|c| c.in_key) {
        if excluded.contains(&c.attnum) {
            continue;
        }
        if !first {
            record.push(',');
        }
        first = false;
        record.push_str(&c.json_name);
    }
    record.push(']');
}

/// The record of a message from `pg_logical_emit_message`.
pub(super) fn message_record(
    prefix: &str,
    content: &[u8],
    transactional: bool,
    lsn: u64,
    xid: u32,
) -> String {
    let (content, encoding) = vsql_vault_core::stream::message_content(content);
    let mut record = serde_json::json!({
        "action": "M", "prefix": prefix, "content": content, "transactional": transactional,
        "lsn": lsn_text(lsn), "xid": xid,
    });
    if let Some(encoding) = encoding {
        record["content_encoding"] = encoding.into();
    }
    record.to_string()
}

/// Appends the columns of a decoded tuple as a JSON array: name, type, and the value in its text
/// form (NULL as null); an unchanged TOAST value is marked, not fetched.
///
/// # Safety
///
/// `desc` must be the descriptor of the relation `r` describes, as of the change, and `tuple`
/// null or a tuple of that change formed with it; call from a change callback.
unsafe fn write_columns(
    out: &mut String,
    r: &Relation,
    desc: pg_sys::TupleDesc,
    tuple: *mut pg_sys::ReorderBufferTupleBuf,
    key_only: bool,
    excluded: &[i16],
) {
    out.push('[');
    if tuple.is_null() {
        out.push(']');
        return;
    }
    // SAFETY: `tuple` is non-null and, with `desc`, valid by the caller's guarantee;
    // heap_deform_tuple writes `natts` entries, the vectors' length, and `c.index < natts` is
    // checked before use. A non-null varlena datum points to at least its one-byte header, and the
    // second byte is read only when the first says it is an external (1B_E) pointer, which has a
    // tag byte. The output function is the cached one for this column's type (the relcache
    // callback drops the entry when the relation changes), given a non-null datum of that type;
    // it returns a palloc'd C string, copied at once.
    // The FmgrInfo sits in an UnsafeCell: output functions such as array_out write their cache
    // (`fn_extra`) through the pointer, and no Rust reference to it exists meanwhile.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(
            &mut (*tuple).tuple,
            desc,
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        );
        let mut first = true;
        for c in &r.columns {
            let i = c.index;
            // An old key holds exactly the identity's columns, NULLs included (as wal2json).
            if i >= natts || (key_only && !c.in_key) {
                continue;
            }
            // Excluded columns never leave the server, not even sealed.
            if !excluded.is_empty() && excluded.contains(&c.attnum) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&c.prefix);
            if nulls[i] {
                out.push_str(",null]");
                continue;
            }
            let ptr = values[i].cast_mut_ptr::<u8>();
            // A varlena that is an on-disk TOAST pointer: unchanged and not part of the WAL.
            if c.attlen == -1 && *ptr == 0x01 && *ptr.add(1) == 18 {
                out.push(']');
                continue;
            }
            let finfo = c.output.get();
            let text = CStr::from_ptr(pg_sys::OutputFunctionCall(finfo, values[i]));
            out.push(',');
            match text.to_str() {
                Ok(t) => push_json_str(out, t),
                Err(_) => push_json_str(out, &text.to_string_lossy()),
            }
            out.push(']');
        }
    }
    out.push(']');
}

/// Appends the xid and commit time to a change record as the consumer asked.
///
/// # Safety
///
/// `txn` must be null or the live transaction of the decoding callback.
unsafe fn decorate(options: &Options, record: &mut String, txn: *mut pg_sys::ReorderBufferTXN) {
    use std::fmt::Write as _;
    if txn.is_null() {
        return;
    }
    // SAFETY: `txn` is non-null and live by the caller's guarantee. Only committed transactions
    // are decoded (no prepare or stream callbacks are registered), so `xact_time` holds the
    // commit time; both members of that union are a TimestampTz anyway.
    unsafe {
        if options.include_xids {
            let _ = write!(record, ",\"xid\":{}", (*txn).xid.into_inner());
        }
        if options.include_timestamp {
            let _ = write!(record, ",\"commit_time\":{}", (*txn).xact_time.commit_time);
        }
    }
}
