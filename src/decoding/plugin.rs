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
///
/// # Safety
///
/// `list` must be NIL or a valid `List` of `DefElem` nodes (a decoding context's
/// `output_plugin_options`), alive for the duration of the call.
unsafe fn parse_options(list: *mut pg_sys::List) -> Options {
    let mut o = Options {
        include_xids: true,
        ..Default::default()
    };
    // SAFETY: by the caller's guarantee `list` is NIL (PgList handles null) or a List whose
    // elements are DefElem pointers; the wrapper is only iterated here, not freed or kept.
    let opts = unsafe { pgrx::PgList::<pg_sys::DefElem>::from_pg(list) };
    for d in opts.iter_ptr() {
        // SAFETY: `d` is a DefElem of that list: its `defname` is a non-null NUL-terminated
        // string, and defGetString is called only for a non-null `arg` (it ERRORs on a node type
        // it cannot print). Both strings are copied into Rust Strings at once.
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

/// The plugin's state for this decoding session.
///
/// # Safety
///
/// `ctx` must be a live decoding context whose `startup` callback ran (so `output_plugin_private`
/// is the `State` it boxed) and whose `shutdown` has not. The reference must not outlive the
/// callback, and no other reference to that `State` may be used while it is: callers take it
/// afresh and stop using the previous one before calling something that takes its own.
unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
    // SAFETY: by the caller's guarantee the pointer is the live, uniquely borrowed State made by
    // `Box::into_raw` in `startup`: non-null, aligned and initialised.
    unsafe { &mut *((*ctx).output_plugin_private as *mut State) }
}

/// The entry point PostgreSQL looks up when a slot uses this library as its output plugin.
///
/// # Safety
///
/// Called by PostgreSQL (LoadOutputPlugin) only, with `cb` pointing to its zeroed
/// OutputPluginCallbacks.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: `cb` is the valid, writable struct PostgreSQL passes; each callback's type is
    // checked by the compiler against the bindgen field type, i.e. PostgreSQL's signature.
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

/// Startup callback: parses the options, loads the KEK and sets up the session's state.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with a live decoding context and its options.
#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    // SAFETY: PostgreSQL passes a live `ctx` and a writable `options`. `ctx->slot` is the slot
    // being decoded (never null while a decoding context exists) and its name a NUL-terminated
    // NameData; `output_plugin_options` is NIL or a List of DefElem, as parse_options requires.
    // The memory context is made under `ctx->context` (so it dies with the decoding context) with
    // a static name and valid sizes. The boxed State is freed by `shutdown` only.
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

/// Shutdown callback: frees the session's state (its sealer zeroizes the data key).
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with the live decoding context.
#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    // SAFETY: `output_plugin_private` is null or the pointer `startup` made with Box::into_raw and
    // nobody else frees; it is reset to null right after, so it is freed once. No reference from
    // `state` is alive: callbacks do not overlap.
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

/// Begin callback: starts an empty batch.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with a live decoding context.
#[pg_guard]
unsafe extern "C-unwind" fn begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: a callback after `startup`, so the State exists; this is the only reference to it.
    let st = unsafe { state(ctx) };
    st.pending.clear();
    st.pending_bytes = 0;
    st.tables.clear();
    st.first_lsn = 0;
    st.excluded.clear();
}

/// The columns of `relid` that must never leave the server, as of the change being decoded:
/// `vault.sync_exclusions` is a user catalog table, so it is read under the historic snapshot.
///
/// # Safety
///
/// Call from a change callback of logical decoding (inside its transaction, with the historic
/// snapshot set up), where catalog and user-catalog tables may be read.
unsafe fn excluded_columns(relid: pg_sys::Oid) -> Vec<String> {
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

/// Writes one line of output.
///
/// # Safety
///
/// `ctx` must be the live decoding context of a callback that may write (begin, change,
/// truncate, message, commit).
unsafe fn write_line(ctx: *mut pg_sys::LogicalDecodingContext, line: &str, last: bool) {
    // SAFETY: by the caller's guarantee `ctx` and its `out` StringInfo are live (PostgreSQL
    // ERRORs if writes are not accepted); `line` is a valid buffer of `line.len()` bytes that
    // appendBinaryStringInfo copies. A length beyond i32 (which a StringInfo cannot hold anyway)
    // would be refused by enlargeStringInfo with an ERROR, or append a shorter prefix.
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
///
/// # Safety
///
/// As for `state` and `write_line`: a live decoding context, after `startup`, in a callback that
/// may write, with no other reference to the State in use.
unsafe fn flush(
    ctx: *mut pg_sys::LogicalDecodingContext,
    lsn_end: u64,
    xid: u32,
    commit_time: i64,
    last: bool,
) {
    // SAFETY: the caller's guarantee; `st` is the only reference to the State in this function.
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
        // SAFETY: the caller's guarantee: a callback that may write; write_line does not touch
        // the State.
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
    // SAFETY: as above.
    unsafe { write_line(ctx, &line, last) };
    if crate::preloaded() {
        BATCHES_SEALED
            .get()
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Batches sealed by every walsender and SQL decoding call since the server started, for
/// `vault_metrics()`. Shared memory exists only when the library is preloaded.
// SAFETY: a shared-memory name of its own: this library's four names (here, the audit queue's two
// and the retention worker's) are distinct and all start with "vsql_vault_".
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

/// Adds a change record to the pending batch, flushing a bounded chunk when it is large.
///
/// # Safety
///
/// As for `flush`.
unsafe fn push(ctx: *mut pg_sys::LogicalDecodingContext, lsn: u64, xid: u32, record: String) {
    // SAFETY: the caller's guarantee; the callers stop using their own reference before this.
    let st = unsafe { state(ctx) };
    if st.first_lsn == 0 {
        st.first_lsn = lsn;
    }
    st.pending_bytes += record.len();
    st.pending.push(record);
    if st.pending_bytes >= CHUNK_BYTES {
        // A bounded chunk of a large transaction: its own batch, the rest follows.
        // SAFETY: the caller's guarantee; `st` is not used after this call.
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
    /// Output functions write their cache (`fn_extra`) through this while the column is shared,
    /// hence the cell.
    output: Box<std::cell::UnsafeCell<pg_sys::FmgrInfo>>,
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
    RELATIONS.with(|c| c.borrow_mut().clear());
}

fn c_text(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: every caller (relation_of) passes a NameData's `data` (NUL-terminated within its
    // 64 bytes) or a palloc'd C string from get_namespace_name / format_type_be, alive for this
    // call; null is handled above. This is a safe fn over a raw pointer, so the compiler does not
    // enforce that (reported).
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
unsafe fn relation_of(
    rel: pg_sys::Relation,
    long_lived: pg_sys::MemoryContext,
) -> std::rc::Rc<Relation> {
    // SAFETY: `rel` is a live relation, so `rd_rel` and `rd_att` are valid and `attrs` holds
    // `natts` entries. The callbacks are registered once per process (the library is never
    // unloaded) and have PostgreSQL's callback signatures. The catalog lookups run inside the
    // decoding transaction; the strings they return are copied at once (c_text). An all-zero
    // FmgrInfo is a valid value (null pointers, None, zeros) that fmgr_info_cxt then fills in;
    // it is boxed, so its address stays fixed while PostgreSQL caches state in it. No RefCell
    // borrow of RELATIONS is held across a PostgreSQL call, so an invalidation callback fired
    // from one can take its own.
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
            let output: Box<std::cell::UnsafeCell<pg_sys::FmgrInfo>> =
                Box::new(std::cell::UnsafeCell::new(std::mem::zeroed()));
            pg_sys::fmgr_info_cxt(out_fn, output.get(), long_lived);
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
    excluded: &[String],
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

/// Change callback: one record per inserted, updated or deleted row.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with live arguments.
#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: PostgreSQL passes a live context (after `startup`), transaction (never null here),
    // relation (opened under the historic snapshot, so `rd_att` matches the change's tuples) and
    // change. `data.tp` is read only for INSERT/UPDATE/DELETE, the actions whose union member it
    // is; its tuples may be null, which write_columns handles. `st` is the only State reference
    // until its last use, before push takes its own. The record is built in the plugin's own
    // context, switched back and only then reset (never the current context); the palloc'd
    // strings made in it were copied into `record` first.
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

/// Truncate callback: one record per truncated relation.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with live arguments.
#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: `relations` holds `nrelations` live, open relations, and `ctx`, `txn` (never null
    // here) and `change` are live. Each `state(ctx)` reference is a temporary that ends before the
    // next is taken and before push takes its own.
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

/// Message callback (pg_logical_emit_message): a record of its own.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with live arguments.
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
    // SAFETY: `prefix` is the message's NUL-terminated prefix and `content` points to its `size`
    // bytes (non-null even when empty: it points into the decoded record), both alive for the
    // callback. `txn` is null for a non-transactional message, checked before use. push and flush
    // get the live context, in a callback that may write.
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

/// Commit callback: seals and writes the transaction's batch.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with live arguments.
#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: `txn` is the live, committed transaction (so `xact_time` holds its commit time) and
    // `ctx` the live context, in a callback that may write, as flush requires.
    unsafe {
        let commit_time = (*txn).xact_time.commit_time;
        flush(ctx, commit_lsn, (*txn).xid.into_inner(), commit_time, true);
    }
}
