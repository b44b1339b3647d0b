//! Where a decoding session resumed and what the slot sent before it (issue 16, item 7): the
//! per-slot log of sent emissions (`pg_replslot/<slot>/vsql_vault.sent`, so it goes with the slot
//! when the slot is dropped), and the source a session line names (item 8). The decisions on its
//! contents are `vsql_vault_core::continuity::SentLog`'s.

use super::fail;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::io::Write;
use vsql_vault_core::continuity::{Position, SentLog, Source, SENT_NOTHING};

/// More entries than this in one session's log: fold what the slot can no longer resume before.
const FOLD_AFTER: usize = 100_000;

unsafe extern "C-unwind" {
    /// `ptr < builder->start_decoding_at` (snapbuild.c, exported; not in pgrx's bindings).
    fn SnapBuildXactNeedsSkip(builder: *mut pg_sys::SnapBuild, ptr: pg_sys::XLogRecPtr) -> bool;
}

fn io_failed(path: &str, e: std::io::Error) -> ! {
    fail(
        PgSqlErrorCode::ERRCODE_IO_ERROR,
        format!("vsql_vault: the record of what slot sent, {path}: {e}"),
    )
}

/// How often at most the log is synced while a session sends (and always when it ends).
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The log of one slot, open for appending.
pub(super) struct Sent {
    path: String,
    file: std::fs::File,
    log: SentLog,
    /// When the log was last synced, and whether it was written since.
    synced: std::time::Instant,
    dirty: bool,
}

impl Drop for Sent {
    /// At the end of the decoding session: what it wrote reaches the disk. (A failure here cannot
    /// be raised; a later session's first `record` or `open` fails on a broken file instead.)
    fn drop(&mut self) {
        if self.dirty {
            let _ = self.file.sync_data();
        }
    }
}

impl Sent {
    /// Writes the whole log atomically (temporary file, synced, renamed, directory synced).
    fn replace(path: &str, log: &SentLog) -> std::fs::File {
        let tmp = format!("{path}.tmp");
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&log.bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = std::path::Path::new(path).parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            std::fs::OpenOptions::new().append(true).open(path)
        })();
        written.unwrap_or_else(|e| io_failed(path, e))
    }

    /// A new slot: nothing sent yet.
    pub(super) fn create(slot: &str) {
        if !has_directory(slot) {
            return;
        }
        let path = path_of(slot);
        Sent::replace(
            &path,
            &SentLog {
                base: SENT_NOTHING,
                entries: Vec::new(),
            },
        );
    }

    /// Opens the slot's log at the start of a decoding session (a slot older than the log gets
    /// one whose past is unknown), folding what the slot can no longer resume before
    /// (`restart_lsn`, persisted whenever it moves, so never ahead of a position the slot could
    /// go back to after a crash).
    pub(super) fn open(slot: &str, restart_lsn: u64) -> Option<Sent> {
        if !has_directory(slot) {
            // Every slot has one (slot.c keeps "additional data" there); should a slot come
            // without, its sessions state that nothing is known of what it sent.
            return None;
        }
        let path = path_of(slot);
        let log = match std::fs::read(&path) {
            Ok(bytes) => SentLog::parse(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SentLog::parse(&[]),
            Err(e) => io_failed(&path, e),
        };
        let (log, file) = match log.pruned(restart_lsn) {
            Some(folded) => {
                let file = Sent::replace(&path, &folded);
                (folded, file)
            }
            None => {
                let file = if std::path::Path::new(&path).exists() {
                    std::fs::OpenOptions::new().append(true).open(&path)
                } else {
                    Ok(Sent::replace(&path, &log))
                };
                (log, file.unwrap_or_else(|e| io_failed(&path, e)))
            }
        };
        Some(Sent {
            path,
            file,
            log,
            synced: std::time::Instant::now(),
            dirty: false,
        })
    }

    /// What the slot sent before `resume`.
    pub(super) fn before(&self, resume: u64) -> Option<Position> {
        self.log.sent_before(resume)
    }

    /// Records an emission sent completely, before its last batch leaves the server, so no
    /// confirmed position can pass an emission the log does not know. Written at once (a
    /// PostgreSQL crash or a killed walsender loses nothing written), synced at most once a second
    /// and when the session ends: an fdatasync per transaction cost more than the decoding itself
    /// (about 0.8 ms each on the test machine), so an operating-system crash or power loss can
    /// lose the last second of the log (README: what a gap check does not detect).
    pub(super) fn record(&mut self, emission: u64, restart_lsn: u64) {
        if self.log.entries.len() >= FOLD_AFTER {
            if let Some(folded) = self.log.pruned(restart_lsn) {
                self.file = Sent::replace(&self.path, &folded);
                self.log = folded;
            }
        }
        let due = self.synced.elapsed() >= SYNC_EVERY;
        let written = self.file.write_all(&emission.to_le_bytes()).and_then(|_| {
            if due {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            io_failed(&self.path, e);
        }
        if due {
            self.synced = std::time::Instant::now();
        }
        self.dirty = !due;
        self.log.entries.push(emission);
    }
}

fn has_directory(slot: &str) -> bool {
    std::path::Path::new(&format!("pg_replslot/{slot}")).is_dir()
}

fn path_of(slot: &str) -> String {
    // The backend's working directory is the data directory.
    format!("pg_replslot/{slot}/vsql_vault.sent")
}

/// Where decoding resumes: the smallest position `SnapBuildXactNeedsSkip` does not skip (the
/// slot's confirmed position, or a later start the client asked for).
///
/// # Safety
///
/// `ctx` must be a live decoding context whose snapshot builder exists (from `startup` on).
pub(super) unsafe fn resume_lsn(ctx: *mut pg_sys::LogicalDecodingContext) -> u64 {
    // SAFETY: the caller's guarantee; the function only compares with a field of the builder.
    let skip = |lsn: u64| unsafe { SnapBuildXactNeedsSkip((*ctx).snapshot_builder, lsn) };
    let (mut lo, mut hi) = (0u64, u64::MAX);
    if skip(hi) {
        return hi;
    }
    // Invariant: skip(x) for x < lo is true, skip(hi) is false.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if skip(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The slot's confirmed and restart positions now.
///
/// # Safety
///
/// `ctx` must be a live decoding context (its slot is acquired by this process, which alone
/// writes these fields).
pub(super) unsafe fn slot_positions(ctx: *mut pg_sys::LogicalDecodingContext) -> (u64, u64) {
    // SAFETY: the caller's guarantee: `ctx->slot` is live while the context is.
    unsafe {
        let data = &(*(*ctx).slot).data;
        (data.confirmed_flush, data.restart_lsn)
    }
}

/// The source this session decodes: the system identifier, the database and the slot.
///
/// # Safety
///
/// A backend or walsender connected to a database, in the startup callback of a decoding context
/// (no historic snapshot set up yet).
pub(super) unsafe fn source(slot: &str) -> Source {
    // SAFETY: GetSystemIdentifier reads the control file's copy in shared memory; MyDatabaseId is
    // set once connected. get_database_name needs a transaction: inside one (SQL decoding
    // functions) it is called as is; in a walsender, between replication commands, a transaction
    // is started around it and aborted, as ReorderBufferProcessTXN does there, and the memory
    // context current before is restored. It returns null or a palloc'd NUL-terminated string,
    // copied before the transaction ends.
    unsafe {
        let db = pg_sys::MyDatabaseId;
        let name_of = || {
            let n = pg_sys::get_database_name(db);
            if n.is_null() {
                String::new()
            } else {
                CStr::from_ptr(n).to_string_lossy().into_owned()
            }
        };
        let database = if pg_sys::IsTransactionOrTransactionBlock() {
            name_of()
        } else {
            let previous = pg_sys::CurrentMemoryContext;
            pg_sys::StartTransactionCommand();
            let name = name_of();
            pg_sys::AbortCurrentTransaction();
            pg_sys::MemoryContextSwitchTo(previous);
            name
        };
        Source {
            system_id: pg_sys::GetSystemIdentifier().to_string(),
            database,
            database_oid: i64::from(db.to_u32()),
            slot: slot.to_owned(),
        }
    }
}
