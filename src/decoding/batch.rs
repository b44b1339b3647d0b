//! How change records leave the server: collected per transaction, sealed into one signed,
//! chained batch line (in bounded chunks when large, so memory stays bounded), and written to the
//! walsender. A session's data key is replaced after a fixed number of batches, at
//! `vsql_vault.data_key_max_age` and `vsql_vault.data_key_max_bytes`, and a shared
//! counter of sealed batches feeds `vault_metrics()`.

use super::plugin::state;
use super::{fail, lsn_text};
use pgrx::prelude::*;
use vsql_vault_core::continuity::Position;
use vsql_vault_core::stream::Sealer;

/// A transaction larger than this is sent in several batches, so memory stays bounded.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// A session's data key is replaced after this many batches.
const BATCHES_PER_DEK: i64 = 100_000;

/// Whether the session's data key must be replaced before sealing the next batch: after
/// `BATCHES_PER_DEK` batches, at `vsql_vault.data_key_max_age`, or when the batch would take the
/// plaintext sealed under it past `vsql_vault.data_key_max_bytes` (a key that has sealed nothing
/// yet takes a batch of any size, so a batch larger than the bound gets a fresh key of its own).
fn dek_due(
    sealed: i64,
    age_us: i64,
    sealed_bytes: u64,
    batch_bytes: u64,
    max_age_us: i64,
    max_bytes: u64,
) -> bool {
    sealed >= BATCHES_PER_DEK
        || age_us >= max_age_us
        || (sealed_bytes > 0 && sealed_bytes + batch_bytes > max_bytes)
}

/// Adds a change record to the pending batch, flushing a bounded chunk when it is large.
///
/// # Safety
///
/// As for `flush`.
pub(super) unsafe fn push(
    ctx: *mut pg_sys::LogicalDecodingContext,
    lsn: u64,
    xid: u32,
    record: String,
) {
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

/// Seals what is pending into one batch line (opening a session first if needed) and writes it.
///
/// # Safety
///
/// As for `state` and `write_line`: a live decoding context, after `startup`, in a callback that
/// may write, with no other reference to the State in use.
pub(super) unsafe fn flush(
    ctx: *mut pg_sys::LogicalDecodingContext,
    lsn_end: u64,
    xid: u32,
    commit_time: i64,
    last: bool,
) {
    // SAFETY: the caller's guarantee; `st` is the only reference to the State in this function.
    let st = unsafe { state(ctx) };
    // An emission whose earlier chunks were sent ends with a batch, empty if need be, that says
    // it is complete.
    if st.pending.is_empty() && !(last && st.emission_records > 0) {
        return;
    }
    let now = crate::pg::now_micros();
    let max_age_us = i64::from(crate::settings::DATA_KEY_MAX_AGE_S.get()) * 1_000_000;
    let max_bytes = u64::try_from(crate::settings::DATA_KEY_MAX_KB.get()).unwrap_or(1) * 1024;
    let batch_bytes = st.pending_bytes as u64;
    // A rotated or revoked KEK (file rewritten, or a setting changed on reload): load it again
    // and wrap a new data key under the version active now, so a revoked one is never used again.
    let stamp = super::kek::kek_stamp();
    let kek_changed = stamp != st.kek_stamp;
    if kek_changed {
        st.kek = super::kek::session_kek();
        st.kek_stamp = stamp;
    }
    if kek_changed
        || st.sealer.as_ref().is_none_or(|s| {
            dek_due(
                s.sealed(),
                now - st.dek_started,
                st.dek_bytes,
                batch_bytes,
                max_age_us,
                max_bytes,
            )
        })
    {
        // Never generates: the audit writer made the key when the server first started.
        let key = crate::keys::existing()
            .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, e.to_string()));
        let (sealer, header) =
            Sealer::start_from(&st.origin, &st.kek, key, crate::pg::now_micros())
                .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string()));
        st.sealer = Some(sealer);
        st.dek_started = now;
        st.dek_bytes = 0;
        // SAFETY: the caller's guarantee: a callback that may write; write_line does not touch
        // the State.
        unsafe { write_line(ctx, &header, false) };
    }
    let tables: Vec<String> = st.tables.iter().cloned().collect();
    let emission = lsn_text(st.emission);
    let line = st
        .sealer
        .as_mut()
        .map(|s| {
            s.batch_of(
                Some((&emission, last)),
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
    st.dek_bytes += batch_bytes;
    st.emission_records += st.pending.len() as u64;
    // What a session line started after this batch states as sent before it; a complete
    // emission is written to the slot's log before its last batch leaves (Sent::record).
    st.origin.resumption.prev = Some(Position {
        lsn: st.emission,
        partial: (!last).then_some(st.emission_records),
    });
    if last {
        // SAFETY: the caller's guarantee: a live decoding context.
        let (_, restart) = unsafe { super::sent::slot_positions(ctx) };
        if let Some(sent) = st.sent.as_mut() {
            sent.record(st.emission, restart);
        }
    }
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

/// Batches sealed by every walsender and SQL decoding call since the server started, for
/// `vault_metrics()`. Shared memory exists only when the library is preloaded.
// SAFETY: a shared-memory name of its own: this library's four names (here, the audit queue's two
// and the retention worker's) are distinct and all start with "vsql_vault_".
static BATCHES_SEALED: pgrx::PgAtomic<std::sync::atomic::AtomicU64> =
    unsafe { pgrx::PgAtomic::new(c"vsql_vault_batches_sealed") };

/// Registers the counter's shared memory (only when the library is preloaded).
pub(crate) fn init_shmem() {
    pgrx::pg_shmem_init!(BATCHES_SEALED);
}

/// The counter's value, `None` when the library is not preloaded.
pub(crate) fn batches_sealed() -> Option<u64> {
    crate::preloaded().then(|| {
        BATCHES_SEALED
            .get()
            .load(std::sync::atomic::Ordering::Relaxed)
    })
}
