//! The `vsql_vault` logical-decoding output plugin: every transaction leaves the server as one
//! sealed, signed, chained batch (or several bounded chunks of a large one). Brokers and files
//! between `pg_recvlogical` and `vsql-vault decrypt` see ciphertext only.
//!
//! This file holds what PostgreSQL calls (the entry point and the callbacks) and the session's
//! state they share; each callback decides what to publish and hands the work to the sibling
//! modules, so the control flow of a decoding session reads top to bottom here.

use super::batch::{flush, push};
use super::exclusions::{current_snapshot, excluded_columns, published, SnapshotId};
use super::kek;
use super::options::{parse_options, Options};
use super::record::{close_record, message_record, open_record, write_row};
use super::relation_cache::{forget_all, relation_of};
use super::sent::{resume_lsn, slot_positions, source, Sent};
use pgrx::prelude::*;
use std::ffi::CStr;
use vsql_vault_core::continuity::{Resumption, Source};
use vsql_vault_core::envelope::Kek;
use vsql_vault_core::stream::{Origin, Sealer};

/// One decoding session's state, boxed by `startup` and freed by `shutdown`.
pub(super) struct State {
    options: Options,
    /// What leaves of each relation, read under the historic snapshot `scope_under` with
    /// `vsql_vault.sync_allow_list_required` as `scope_required`; read again whenever a change is
    /// decoded under another snapshot (an exclusion or publication committed while the
    /// transaction was open gives its later changes a new one) or the setting changed.
    scope: std::collections::HashMap<pg_sys::Oid, std::rc::Rc<Scope>>,
    scope_under: SnapshotId,
    scope_required: bool,
    /// The largest change record so far: new records start with room for it.
    record_capacity: usize,
    pub(super) kek: Kek,
    /// `kek::kek_stamp()` when `kek` was loaded.
    pub(super) kek_stamp: String,
    pub(super) sealer: Option<Sealer>,
    /// When the current data key was made (microseconds) and the plaintext bytes it has sealed.
    pub(super) dek_started: i64,
    pub(super) dek_bytes: u64,
    pub(super) pending: Vec<String>,
    pub(super) pending_bytes: usize,
    pub(super) tables: std::collections::BTreeSet<String>,
    pub(super) first_lsn: u64,
    /// The source and where this decoding session resumed (issue 16, items 7 and 8); `prev` is
    /// what was sent on the slot before the next session line: from the slot's log at first, then
    /// the last batch this decoding session sent.
    pub(super) origin: Origin,
    /// The slot's log of sent emissions (`None` in the context that creates the slot).
    pub(super) sent: Option<Sent>,
    /// The emission being sent (commit record of the transaction, or the non-transactional
    /// message) and the change records of it sent so far.
    pub(super) emission: u64,
    pub(super) emission_records: u64,
    context: pg_sys::MemoryContext,
}

/// The plugin's state for this decoding session.
///
/// # Safety
///
/// `ctx` must be a live decoding context whose `startup` callback ran (so `output_plugin_private`
/// is the `State` it boxed) and whose `shutdown` has not. The reference must not outlive the
/// callback, and no other reference to that `State` may be used while it is: callers take it
/// afresh and stop using the previous one before calling something that takes its own.
pub(super) unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
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

/// Startup callback: parses the options, loads the KEK and sets up the session's state.
///
/// # Safety
///
/// Called by PostgreSQL's logical decoding only, with a live decoding context and its options.
#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    // SAFETY: PostgreSQL passes a live `ctx` and a writable `options`. `ctx->slot` is the slot
    // being decoded (never null while a decoding context exists) and its name a NUL-terminated
    // NameData; `output_plugin_options` is NIL or a List of DefElem, as parse_options requires.
    // The memory context is made under `ctx->context` (so it dies with the decoding context) with
    // a static name and valid sizes. The boxed State is freed by `shutdown` only. slot_positions,
    // resume_lsn and source need a live context whose slot and snapshot builder exist, in the
    // startup callback (before any historic snapshot): this one.
    unsafe {
        (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
        let options = parse_options((*ctx).output_plugin_options);
        let slot = CStr::from_ptr((*(*ctx).slot).data.name.data.as_ptr())
            .to_string_lossy()
            .into_owned();
        let (confirmed, restart) = slot_positions(ctx);
        let resume = resume_lsn(ctx);
        let sent = if is_init {
            // A new slot: it has sent nothing (its first session resumes where it was created).
            Sent::create(&slot);
            None
        } else {
            // (A fast-forward context, pg_replication_slot_advance, does not load the plugin.)
            Sent::open(&slot, restart)
        };
        let origin = Origin {
            // The context that creates the slot sends nothing: it needs no source (and, in a
            // walsender, must not start a transaction to read the database's name).
            source: if is_init {
                Source {
                    system_id: String::new(),
                    database: String::new(),
                    database_oid: 0,
                    slot: slot.clone(),
                }
            } else {
                source(&slot)
            },
            resumption: Resumption {
                confirmed,
                resume,
                prev: sent.as_ref().and_then(|s| s.before(resume)),
            },
        };
        let context = pg_sys::AllocSetContextCreateInternal(
            (*ctx).context,
            c"vsql_vault decoding".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        let st = Box::new(State {
            options,
            scope: Default::default(),
            scope_under: SnapshotId::default(),
            scope_required: false,
            record_capacity: 256,
            kek_stamp: kek::kek_stamp(),
            kek: kek::session_kek(),
            sealer: None,
            dek_started: 0,
            dek_bytes: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            tables: Default::default(),
            first_lsn: 0,
            origin,
            sent,
            emission: 0,
            emission_records: 0,
            context,
        });
        (*ctx).output_plugin_private = Box::into_raw(st) as *mut std::ffi::c_void;
        // Cached output functions live in this session's memory: start afresh.
        forget_all();
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
            forget_all();
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
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: a callback after `startup`, so the State exists; this is the only reference to it.
    // `txn` is the live transaction being replayed after its commit was decoded, so `final_lsn`
    // is its commit record's position.
    let (st, commit_lsn) = unsafe { (state(ctx), (*txn).final_lsn) };
    st.emission = commit_lsn;
    st.emission_records = 0;
    st.pending.clear();
    st.pending_bytes = 0;
    st.tables.clear();
    st.first_lsn = 0;
    st.scope.clear();
}

/// What of one relation leaves the server.
struct Scope {
    /// Whether its changes leave at all: the vault's own tables (schema `vault`) only when a
    /// `vault_admin` published them, and every table only then while
    /// `vsql_vault.sync_allow_list_required` is on.
    leaves: bool,
    /// The attribute numbers of its excluded columns.
    excluded: Vec<i16>,
}

/// What of `relid` (in `schema`) leaves the server, as of the change being decoded.
///
/// # Safety
///
/// Call from a change or truncate callback, with the historic snapshot set up.
unsafe fn scope_of(st: &mut State, relid: pg_sys::Oid, schema: &str) -> std::rc::Rc<Scope> {
    // SAFETY: the caller's guarantee, which both reads need.
    unsafe {
        let snapshot = current_snapshot();
        let required = crate::settings::SYNC_ALLOW_LIST_REQUIRED.get();
        if snapshot != st.scope_under || required != st.scope_required {
            st.scope.clear();
            st.scope_under = snapshot;
            st.scope_required = required;
        }
        st.scope
            .entry(relid)
            .or_insert_with(|| {
                let leaves = !(required || schema == "vault") || published(relid);
                let excluded = if leaves {
                    excluded_columns(relid)
                } else {
                    Vec::new()
                };
                std::rc::Rc::new(Scope { leaves, excluded })
            })
            .clone()
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
        let scope = scope_of(st, (*rel).rd_id, &r.schema);
        if !scope.leaves {
            return;
        }
        let tp = (*change).data.tp;
        let previous = pg_sys::MemoryContextSwitchTo(st.context);
        let mut record = String::with_capacity(st.record_capacity);
        open_record(&mut record, action, &r);
        let (new, old) = (new.then_some(tp.newtuple), old.then_some(tp.oldtuple));
        write_row(&mut record, &r, (*rel).rd_att, new, old, &scope.excluded);
        close_record(&mut record, (*change).lsn, &st.options, txn);
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
            let rel = *relations.add(i);
            let r = relation_of(rel, (*ctx).context);
            if !state(ctx).options.wants(&r.schema, &r.table)
                || !scope_of(state(ctx), (*rel).rd_id, &r.schema).leaves
            {
                continue;
            }
            let mut record = String::new();
            open_record(&mut record, "T", &r);
            close_record(&mut record, (*change).lsn, &state(ctx).options, txn);
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
        let record = message_record(&prefix, bytes, transactional, lsn, xid);
        if !transactional {
            // Sent on its own, at its own position.
            let st = state(ctx);
            st.emission = lsn;
            st.emission_records = 0;
        }
        push(ctx, lsn, xid, record);
        if !transactional {
            // A non-transactional message is not part of any commit: it is its own batch.
            flush(ctx, lsn, xid, crate::pg::now_micros(), true);
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
