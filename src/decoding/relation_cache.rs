//! This backend's cache of what change records need of each relation (its names; per column the
//! name, type and output function), so the catalogs are consulted once per relation rather than
//! once per row. Invalidation callbacks drop an entry as soon as PostgreSQL says the relation or
//! a schema changed, and each session starts with it empty: the output functions live in the
//! session's memory.

use pgrx::prelude::*;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::rc::Rc;
use vsql_vault_core::canonical::push_json_str;

/// What the plugin needs of each live column of a relation, looked up once per relation (the
/// per-column catalog lookups are the known hot spot of decoding plugins) and dropped whenever
/// the relation cache says the relation changed.
pub(super) struct Column {
    pub(super) index: usize,
    /// The attribute number: what exclusions are bound to.
    pub(super) attnum: i16,
    pub(super) attlen: i16,
    /// Part of the replica identity (every column under REPLICA IDENTITY FULL): sent in the old
    /// key, NULL or not, and named in the change's `"key"`.
    pub(super) in_key: bool,
    /// The name as a JSON string, already escaped.
    pub(super) json_name: String,
    /// Output functions write their cache (`fn_extra`) through this while the column is shared,
    /// hence the cell.
    pub(super) output: Box<UnsafeCell<pg_sys::FmgrInfo>>,
    /// `[name,type` already escaped: each row only appends its value (see
    /// `vsql_vault_core::stream::expand_columns` for the wire form).
    pub(super) prefix: String,
}

/// A relation as the change records name it, with its columns.
pub(super) struct Relation {
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) qualified: String,
    /// `"schema":...,"table":...` already escaped.
    pub(super) names: String,
    pub(super) columns: Vec<Column>,
}

thread_local! {
    static RELATIONS: RefCell<HashMap<pg_sys::Oid, Rc<Relation>>> = RefCell::new(HashMap::new());
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Empties the cache: its output functions live in a decoding session's memory.
pub(super) fn forget_all() {
    RELATIONS.with(|c| c.borrow_mut().clear());
}

/// Relcache invalidation callback (registered in `relation_of`).
///
/// # Safety
///
/// Called by PostgreSQL's invalidation machinery only; it touches nothing but this backend's
/// Rust cache.
#[pg_guard]
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    RELATIONS.with(|c| {
        let mut c = c.borrow_mut();
        if relid == pg_sys::Oid::INVALID {
            c.clear();
        } else {
            c.remove(&relid);
        }
    });
}

/// A renamed schema does not invalidate its relations' cache entries: forget them all.
///
/// # Safety
///
/// As for `relation_changed`: a syscache callback of PostgreSQL's.
#[pg_guard]
unsafe extern "C-unwind" fn namespace_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    forget_all();
}

/// A C string copied into a `String` (lossily); null gives the empty string.
///
/// # Safety
///
/// `ptr` must be null or point to a NUL-terminated string alive for the duration of the call.
unsafe fn c_text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null here, and NUL-terminated and alive by the caller's guarantee.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// The cached description of `rel`, made on first use.
///
/// # Safety
///
/// Call from a decoding callback (catalog lookups allowed) with `rel` the open relation the
/// callback was given, and `long_lived` a memory context that outlives the cache entry (the
/// decoding context's: `startup` clears the cache for every new session, and the relcache
/// callback clears it when PostgreSQL resets its caches after an error).
pub(super) unsafe fn relation_of(
    rel: pg_sys::Relation,
    long_lived: pg_sys::MemoryContext,
) -> Rc<Relation> {
    // SAFETY: `rel` is a live relation by the caller's guarantee.
    let relid = unsafe { (*rel).rd_id };
    // No RefCell borrow of RELATIONS is held across a PostgreSQL call, so an invalidation
    // callback fired from one can take its own.
    if let Some(r) = RELATIONS.with(|c| c.borrow().get(&relid).cloned()) {
        return r;
    }
    register_callbacks();
    // SAFETY: the caller's guarantee, passed on unchanged.
    let r = Rc::new(unsafe { describe(rel, long_lived) });
    RELATIONS.with(|c| c.borrow_mut().insert(relid, r.clone()));
    r
}

/// Registers the invalidation callbacks, once per process.
fn register_callbacks() {
    if CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: registered once per process (the library is never unloaded, so the functions stay
    // valid), and both have PostgreSQL's callback signatures.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0usize));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(namespace_changed),
            pg_sys::Datum::from(0usize),
        );
    }
}

/// Looks `rel` up in the catalogs.
///
/// # Safety
///
/// As for `relation_of`.
unsafe fn describe(rel: pg_sys::Relation, long_lived: pg_sys::MemoryContext) -> Relation {
    // SAFETY: `rel` is a live relation, so `rd_rel` and `rd_att` are valid. The catalog lookup
    // runs inside the decoding transaction; `relname` is a NameData (NUL-terminated within its
    // 64 bytes) and get_namespace_name returns null or a palloc'd C string, both alive while
    // c_text copies them. `long_lived` is passed on under the caller's guarantee.
    // RelationGetIdentityKeyBitmap is made for decoding callbacks (pgoutput calls it from its
    // own); it returns null or a palloc'd copy, which bms_is_member only reads.
    unsafe {
        let form = (*rel).rd_rel;
        let table = c_text((*form).relname.data.as_ptr());
        let schema = c_text(pg_sys::get_namespace_name((*form).relnamespace));
        let mut names = String::from("\"schema\":");
        push_json_str(&mut names, &schema);
        names.push_str(",\"table\":");
        push_json_str(&mut names, &table);
        let full = (*form).relreplident as u8 == pg_sys::REPLICA_IDENTITY_FULL;
        // The identity index's columns (empty without one), as pgoutput reads them; the bitmap
        // is a copy in the current context, offset by FirstLowInvalidHeapAttributeNumber.
        let key_bits = if full {
            std::ptr::null_mut()
        } else {
            pg_sys::RelationGetIdentityKeyBitmap(rel)
        };
        let in_key = |attnum: i16| {
            full || pg_sys::bms_is_member(
                i32::from(attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber,
                key_bits,
            )
        };
        let columns = columns((*rel).rd_att, long_lived, in_key);
        Relation {
            qualified: format!("{schema}.{table}"),
            schema,
            table,
            names,
            columns,
        }
    }
}

/// The live columns of a relation, each with its output function looked up.
///
/// # Safety
///
/// `desc` must be the descriptor of a live relation; otherwise as for `relation_of`.
unsafe fn columns(
    desc: pg_sys::TupleDesc,
    long_lived: pg_sys::MemoryContext,
    in_key: impl Fn(i16) -> bool,
) -> Vec<Column> {
    // SAFETY: `desc` is live, so `attrs` holds `natts` entries. The catalog lookups run inside
    // the decoding transaction; `attname` is a NameData (NUL-terminated within its 64 bytes) and
    // format_type_be returns a palloc'd C string, both alive while c_text copies them. An
    // all-zero FmgrInfo is a valid value (null pointers, None, zeros) that fmgr_info_cxt then
    // fills in; it is boxed, so its address stays fixed while PostgreSQL caches state in it, in
    // `long_lived`, which outlives the cache entry by the caller's guarantee.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut columns = Vec::with_capacity(natts);
        for (i, a) in (*desc).attrs.as_slice(natts).iter().enumerate() {
            if a.attisdropped || a.attnum <= 0 {
                continue;
            }
            let mut out_fn = pg_sys::Oid::INVALID;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(a.atttypid, &mut out_fn, &mut varlena);
            let output: Box<UnsafeCell<pg_sys::FmgrInfo>> =
                Box::new(UnsafeCell::new(std::mem::zeroed()));
            pg_sys::fmgr_info_cxt(out_fn, output.get(), long_lived);
            let name = c_text(a.attname.data.as_ptr());
            let mut json_name = String::new();
            push_json_str(&mut json_name, &name);
            let mut prefix = String::from("[");
            prefix.push_str(&json_name);
            prefix.push(',');
            push_json_str(&mut prefix, &c_text(pg_sys::format_type_be(a.atttypid)));
            columns.push(Column {
                index: i,
                attnum: a.attnum,
                attlen: a.attlen,
                in_key: in_key(a.attnum),
                json_name,
                output,
                prefix,
            });
        }
        columns
    }
}
