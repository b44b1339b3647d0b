//! The `vsql_vault` logical-decoding output plugin: every transaction leaves the server as one
//! sealed, signed, chained batch (or several bounded chunks of a large one). Brokers and files
//! between `pg_recvlogical` and `vsql-vault decrypt` see ciphertext only.

use crate::settings;
use pgrx::prelude::*;
use std::ffi::CStr;
use vsql_vault_core::canonical::push_json_str;
use vsql_vault_core::envelope::{Kek, KekRing};
use vsql_vault_core::stream::Sealer;

/// A transaction larger than this is sent in several batches, so memory stays bounded.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// A session's data key is replaced after this many batches.
const BATCHES_PER_DEK: i64 = 100_000;

/// Consumer-side options, for convenience only: they choose what a consumer receives of what
/// the server publishes (they can never widen it).
#[derive(Default)]
struct Options {
    include_xids: bool,
    include_timestamp: bool,
    add_tables: Vec<(String, String)>,
    filter_tables: Vec<(String, String)>,
}

fn matches(pattern: &str, name: &str) -> bool {
    pattern == "*" || pattern == name
}

impl Options {
    fn wants(&self, schema: &str, table: &str) -> bool {
        let hit = |list: &[(String, String)]| {
            list.iter()
                .any(|(s, t)| matches(s, schema) && matches(t, table))
        };
        (self.add_tables.is_empty() || hit(&self.add_tables)) && !hit(&self.filter_tables)
    }
}

/// `schema.table` patterns separated by commas; `*` stands for any schema or any table.
fn parse_tables(option: &str, value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('.') {
            Some((s, t)) if !s.is_empty() && !t.is_empty() => (s.to_owned(), t.to_owned()),
            _ => fail(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("vsql_vault decoding: {option} expects schema.table patterns, got \"{p}\""),
            ),
        })
        .collect()
}

fn parse_bool(option: &str, value: Option<&str>) -> bool {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("1" | "true" | "on" | "yes") => true,
        Some("0" | "false" | "off" | "no") => false,
        Some(other) => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("vsql_vault decoding: {option} expects a boolean, got \"{other}\""),
        ),
    }
}

/// Unknown options are refused rather than silently ignored.
unsafe fn parse_options(list: *mut pg_sys::List) -> Options {
    let mut o = Options {
        include_xids: true,
        ..Default::default()
    };
    let opts = unsafe { pgrx::PgList::<pg_sys::DefElem>::from_pg(list) };
    for d in opts.iter_ptr() {
        let (name, value) = unsafe {
            let name = CStr::from_ptr((*d).defname).to_string_lossy().into_owned();
            let arg = (*d).arg;
            let value = if arg.is_null() {
                None
            } else {
                Some(
                    CStr::from_ptr(pg_sys::defGetString(d))
                        .to_string_lossy()
                        .into_owned(),
                )
            };
            (name, value)
        };
        match name.as_str() {
            "include-xids" => o.include_xids = parse_bool(&name, value.as_deref()),
            "include-timestamp" => o.include_timestamp = parse_bool(&name, value.as_deref()),
            "add-tables" => o.add_tables = parse_tables(&name, value.as_deref().unwrap_or("")),
            "filter-tables" => {
                o.filter_tables = parse_tables(&name, value.as_deref().unwrap_or(""))
            }
            _ => fail(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("vsql_vault decoding: unknown option \"{name}\""),
            ),
        }
    }
    o
}

struct State {
    options: Options,
    /// Excluded columns per relation, read under the historic snapshot, for this transaction.
    excluded: std::collections::HashMap<pg_sys::Oid, std::rc::Rc<Vec<String>>>,
    /// The largest change record so far: new records start with room for it.
    record_capacity: usize,
    slot: String,
    kek: Kek,
    sealer: Option<Sealer>,
    pending: Vec<String>,
    pending_bytes: usize,
    tables: std::collections::BTreeSet<String>,
    first_lsn: u64,
    context: pg_sys::MemoryContext,
}

/// Raises an ERROR with a specific SQLSTATE (decoding errors end the walsender's session).
fn fail(code: PgSqlErrorCode, message: String) -> ! {
    pgrx::ereport!(ERROR, code, message);
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
    unsafe { &mut *((*ctx).output_plugin_private as *mut State) }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    unsafe {
        (*cb).startup_cb = Some(startup);
        (*cb).begin_cb = Some(begin);
        (*cb).change_cb = Some(change);
        (*cb).truncate_cb = Some(truncate);
        (*cb).commit_cb = Some(commit);
        (*cb).message_cb = Some(message);
        (*cb).shutdown_cb = Some(shutdown);
    }
}

fn wrap_command() -> Option<String> {
    settings::KEK_WRAP_COMMAND
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|c| !c.is_empty())
}

/// The KEK versions the server knows (ids only), for the scope report.
pub fn kek_ids() -> Vec<String> {
    if let Some(cmd) = wrap_command() {
        return Kek::Command(cmd).ids();
    }
    let Some(path) = settings::KEK_FILE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
    else {
        return Vec::new();
    };
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(&path).unwrap_or_default());
    KekRing::parse(&path, &text)
        .map(|r| r.ids())
        .unwrap_or_default()
}

fn load_ring() -> KekRing {
    let Some(path) = settings::KEK_FILE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
    else {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "vsql_vault decoding needs a key-encryption key: set vsql_vault.kek_file".into(),
        );
    };
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| {
        fail(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            format!("KEK file {path}: {}", e.kind()),
        )
    });
    use std::os::unix::fs::MetadataExt;
    if meta.mode() & 0o077 != 0 {
        fail(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, format!("KEK file {path} is readable or writable by others; it must be owner-only (chmod 600)")
        );
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(&path).unwrap_or_default());
    KekRing::parse(&path, &text)
        .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, e.to_string()))
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    unsafe {
        (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
        let options = parse_options((*ctx).output_plugin_options);
        let slot = CStr::from_ptr((*(*ctx).slot).data.name.data.as_ptr())
            .to_string_lossy()
            .into_owned();
        let context = pg_sys::AllocSetContextCreateInternal(
            (*ctx).context,
            c"vsql_vault decoding".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        let st = Box::new(State {
            options,
            excluded: Default::default(),
            record_capacity: 256,
            slot,
            kek: match wrap_command() {
                Some(cmd) => Kek::Command(cmd),
                None => Kek::File(load_ring()),
            },
            sealer: None,
            pending: Vec::new(),
            pending_bytes: 0,
            tables: Default::default(),
            first_lsn: 0,
            context,
        });
        (*ctx).output_plugin_private = Box::into_raw(st) as *mut std::ffi::c_void;
        // Cached output functions live in this session's memory: start afresh.
        RELATIONS.with(|c| c.borrow_mut().clear());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    unsafe {
        let p = (*ctx).output_plugin_private as *mut State;
        if !p.is_null() {
            // Dropping the sealer zeroizes the session's data key.
            drop(Box::from_raw(p));
            (*ctx).output_plugin_private = std::ptr::null_mut();
            RELATIONS.with(|c| c.borrow_mut().clear());
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    let st = unsafe { state(ctx) };
    st.pending.clear();
    st.pending_bytes = 0;
    st.tables.clear();
    st.first_lsn = 0;
    st.excluded.clear();
}

/// The columns of `relid` that must never leave the server, as of the change being decoded:
/// `vault.sync_exclusions` is a user catalog table, so it is read under the historic snapshot.
unsafe fn excluded_columns(relid: pg_sys::Oid) -> Vec<String> {
    let mut out = Vec::new();
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
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let mut values = [pg_sys::Datum::from(0usize); 5];
            let mut nulls = [false; 5];
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

unsafe fn write_line(ctx: *mut pg_sys::LogicalDecodingContext, line: &str, last: bool) {
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, last);
        pg_sys::appendBinaryStringInfo(
            (*ctx).out,
            line.as_ptr() as *const std::ffi::c_char,
            line.len() as i32,
        );
        pg_sys::OutputPluginWrite(ctx, last);
    }
}

/// Seals what is pending into one batch line (opening a session first if needed) and writes it.
unsafe fn flush(
    ctx: *mut pg_sys::LogicalDecodingContext,
    lsn_end: u64,
    xid: u32,
    commit_time: i64,
    last: bool,
) {
    let st = unsafe { state(ctx) };
    if st.pending.is_empty() {
        return;
    }
    if st
        .sealer
        .as_ref()
        .is_none_or(|s| s.sealed() >= BATCHES_PER_DEK)
    {
        let key = crate::keys::current()
            .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, e.to_string()));
        let (sealer, header) = Sealer::start(&st.slot, &st.kek, key, crate::identity::now_micros())
            .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string()));
        st.sealer = Some(sealer);
        unsafe { write_line(ctx, &header, false) };
    }
    let tables: Vec<String> = st.tables.iter().cloned().collect();
    let line = st
        .sealer
        .as_mut()
        .map(|s| {
            s.batch(
                &st.pending,
                &lsn_text(st.first_lsn),
                &lsn_text(lsn_end),
                i64::from(xid),
                commit_time,
                tables,
            )
        })
        .transpose()
        .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string()))
        .unwrap_or_default();
    st.pending.clear();
    st.pending_bytes = 0;
    st.tables.clear();
    st.first_lsn = 0;
    unsafe { write_line(ctx, &line, last) };
    if crate::preloaded() {
        BATCHES_SEALED
            .get()
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Batches sealed by every walsender and SQL decoding call since the server started, for
/// `vault_metrics()`. Shared memory exists only when the library is preloaded.
static BATCHES_SEALED: pgrx::PgAtomic<std::sync::atomic::AtomicU64> =
    unsafe { pgrx::PgAtomic::new(c"vsql_vault_batches_sealed") };

pub fn init_shmem() {
    pgrx::pg_shmem_init!(BATCHES_SEALED);
}

pub fn batches_sealed() -> Option<u64> {
    crate::preloaded().then(|| {
        BATCHES_SEALED
            .get()
            .load(std::sync::atomic::Ordering::Relaxed)
    })
}

unsafe fn push(ctx: *mut pg_sys::LogicalDecodingContext, lsn: u64, xid: u32, record: String) {
    let st = unsafe { state(ctx) };
    if st.first_lsn == 0 {
        st.first_lsn = lsn;
    }
    st.pending_bytes += record.len();
    st.pending.push(record);
    if st.pending_bytes >= CHUNK_BYTES {
        // A bounded chunk of a large transaction: its own batch, the rest follows.
        unsafe { flush(ctx, lsn, xid, 0, false) };
    }
}

/// What the plugin needs of each live column of a relation, looked up once per relation (the
/// per-column catalog lookups are the known hot spot of decoding plugins) and dropped whenever
/// the relation cache says the relation changed.
struct Column {
    index: usize,
    name: String,
    attlen: i16,
    output: Box<pg_sys::FmgrInfo>,
    /// `[name,type` already escaped: each row only appends its value (see
    /// `vsql_vault_core::stream::expand_columns` for the wire form).
    prefix: String,
}

/// A relation as the change records name it, with its columns.
struct Relation {
    schema: String,
    table: String,
    qualified: String,
    /// `"schema":...,"table":...` already escaped.
    names: String,
    columns: Vec<Column>,
}

thread_local! {
    static RELATIONS: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, std::rc::Rc<Relation>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

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
#[pg_guard]
unsafe extern "C-unwind" fn namespace_changed(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    RELATIONS.with(|c| c.borrow_mut().clear());
}

fn c_text(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

unsafe fn relation_of(
    rel: pg_sys::Relation,
    long_lived: pg_sys::MemoryContext,
) -> std::rc::Rc<Relation> {
    unsafe {
        let relid = (*rel).rd_id;
        if let Some(r) = RELATIONS.with(|c| c.borrow().get(&relid).cloned()) {
            return r;
        }
        if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(relation_changed),
                pg_sys::Datum::from(0usize),
            );
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
                Some(namespace_changed),
                pg_sys::Datum::from(0usize),
            );
        }
        let form = (*rel).rd_rel;
        let table = c_text((*form).relname.data.as_ptr());
        let schema = c_text(pg_sys::get_namespace_name((*form).relnamespace));
        let mut names = String::from("\"schema\":");
        push_json_str(&mut names, &schema);
        names.push_str(",\"table\":");
        push_json_str(&mut names, &table);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut columns = Vec::with_capacity(natts);
        for (i, a) in (*desc).attrs.as_slice(natts).iter().enumerate() {
            if a.attisdropped || a.attnum <= 0 {
                continue;
            }
            let mut out_fn = pg_sys::Oid::INVALID;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(a.atttypid, &mut out_fn, &mut varlena);
            let mut output: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
            pg_sys::fmgr_info_cxt(out_fn, output.as_mut(), long_lived);
            let name = c_text(a.attname.data.as_ptr());
            let mut prefix = String::from("[");
            push_json_str(&mut prefix, &name);
            prefix.push(',');
            push_json_str(&mut prefix, &c_text(pg_sys::format_type_be(a.atttypid)));
            columns.push(Column {
                index: i,
                name,
                attlen: a.attlen,
                output,
                prefix,
            });
        }
        let r = std::rc::Rc::new(Relation {
            qualified: format!("{schema}.{table}"),
            schema,
            table,
            names,
            columns,
        });
        RELATIONS.with(|c| c.borrow_mut().insert(relid, r.clone()));
        r
    }
}

/// Appends the columns of a decoded tuple as a JSON array: name, type, and the value in its text
/// form (NULL as null); an unchanged TOAST value is marked, not fetched.
unsafe fn write_columns(
    out: &mut String,
    r: &Relation,
    desc: pg_sys::TupleDesc,
    tuple: *mut pg_sys::ReorderBufferTupleBuf,
    key_only: bool,
    excluded: &[String],
) {
    out.push('[');
    if tuple.is_null() {
        out.push(']');
        return;
    }
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
            if i >= natts || (key_only && nulls[i]) {
                continue;
            }
            // Excluded columns never leave the server, not even sealed.
            if !excluded.is_empty() && excluded.contains(&c.name) {
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
            let finfo = (c.output.as_ref() as *const pg_sys::FmgrInfo).cast_mut();
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
unsafe fn decorate(options: &Options, record: &mut String, txn: *mut pg_sys::ReorderBufferTXN) {
    use std::fmt::Write as _;
    if txn.is_null() {
        return;
    }
    unsafe {
        if options.include_xids {
            let _ = write!(record, ",\"xid\":{}", (*txn).xid.into_inner());
        }
        if options.include_timestamp {
            let _ = write!(record, ",\"commit_time\":{}", (*txn).xact_time.commit_time);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    unsafe {
        let st = state(ctx);
        let r = relation_of(rel, (*ctx).context);
        if !st.options.wants(&r.schema, &r.table) {
            return;
        }
        let (action, new, old) = match (*change).action {
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => ("I", true, false),
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => ("U", true, true),
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => ("D", false, true),
            _ => return,
        };
        let relid = (*rel).rd_id;
        let excluded = st
            .excluded
            .entry(relid)
            .or_insert_with(|| std::rc::Rc::new(excluded_columns(relid)))
            .clone();
        let tp = (*change).data.tp;
        let desc = (*rel).rd_att;
        let previous = pg_sys::MemoryContextSwitchTo(st.context);
        let mut record = String::with_capacity(st.record_capacity);
        record.push_str("{\"action\":\"");
        record.push_str(action);
        record.push_str("\",");
        record.push_str(&r.names);
        record.push_str(",\"columns\":");
        if new {
            write_columns(&mut record, &r, desc, tp.newtuple, false, &excluded);
        } else {
            record.push_str("[]");
        }
        record.push_str(",\"identity\":");
        if old {
            write_columns(&mut record, &r, desc, tp.oldtuple, true, &excluded);
        } else {
            record.push_str("[]");
        }
        {
            use std::fmt::Write as _;
            let lsn = (*change).lsn;
            let _ = write!(
                record,
                ",\"lsn\":\"{:X}/{:X}\"",
                lsn >> 32,
                lsn & 0xffff_ffff
            );
        }
        decorate(&st.options, &mut record, txn);
        record.push('}');
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::MemoryContextReset(st.context);
        st.record_capacity = st.record_capacity.max(record.len() + 16);
        if !st.tables.contains(&r.qualified) {
            st.tables.insert(r.qualified.clone());
        }
        push(ctx, (*change).lsn, (*txn).xid.into_inner(), record);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    unsafe {
        for i in 0..nrelations as usize {
            let r = relation_of(*relations.add(i), (*ctx).context);
            if !state(ctx).options.wants(&r.schema, &r.table) {
                continue;
            }
            let mut record = String::from("{\"action\":\"T\",");
            record.push_str(&r.names);
            record.push_str(",\"lsn\":\"");
            record.push_str(&lsn_text((*change).lsn));
            record.push('"');
            decorate(&state(ctx).options, &mut record, txn);
            record.push('}');
            state(ctx).tables.insert(r.qualified.clone());
            push(ctx, (*change).lsn, (*txn).xid.into_inner(), record);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    content: *const std::ffi::c_char,
) {
    unsafe {
        let prefix = CStr::from_ptr(prefix).to_string_lossy().into_owned();
        let bytes = std::slice::from_raw_parts(content as *const u8, size);
        let xid = if txn.is_null() {
            0
        } else {
            (*txn).xid.into_inner()
        };
        let record = serde_json::json!({
            "action": "M", "prefix": prefix, "content": String::from_utf8_lossy(bytes), "transactional": transactional,
            "lsn": lsn_text(lsn), "xid": xid,
        })
        .to_string();
        push(ctx, lsn, xid, record);
        if !transactional {
            // A non-transactional message is not part of any commit: it is its own batch.
            flush(ctx, lsn, xid, crate::identity::now_micros(), true);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    unsafe {
        let commit_time = (*txn).xact_time.commit_time;
        flush(ctx, commit_lsn, (*txn).xid.into_inner(), commit_time, true);
    }
}
