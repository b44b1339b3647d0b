//! The shared queue between backends and the audit writer.
//!
//! A backend that made an access decision puts the record in a slot, wakes the writer and waits
//! on its own latch until the writer reports the record durable (or refused, or failed). The
//! writer takes every pending slot at once and commits them in one transaction, so one WAL flush
//! serves many concurrent callers and the writer alone sequences the log. PostgreSQL has no
//! autonomous transactions; this is how a record survives the caller's ROLLBACK.

pub use super::fixed_str::FixedStr;
use crate::errors::VaultError;
use crate::launcher::{self, MAX_DATABASES};
use crate::settings;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::time::{Duration, Instant};

pub const SLOTS: usize = 256;

/// Details longer than a slot's field travel whole in one of these (a policy change with long
/// role lists, a refused call's long input): a governance record never loses its substance.
pub const LARGE_SLOTS: usize = 4;
/// The longest details a record can carry.
pub const LARGE_BYTES: usize = 128 * 1024;

/// Where a slot is in its life: a caller claims a free one and fills it (pending), the writer
/// takes it (writing) and reports its outcome (done), the caller reads that and frees it.
/// Zero is `Free`: zeroed shared memory is a queue of free slots.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u32)]
enum SlotState {
    Free = 0,
    Pending = 1,
    Writing = 2,
    Done = 3,
}

/// What the writer decided for a record. Zero is `Written`, the value a claimed slot starts with.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Outcome {
    Written = 0,
    /// The entry's `max_retrievals` was reached: the record was written as a denial.
    LimitReached = 1,
    /// The writer could not commit the batch; the record is not durable.
    Failed = 2,
}

/// One access record as the writer inserts it into `vault.access_log`.
#[derive(Copy, Clone)]
#[repr(C)]
pub struct RawRecord {
    pub logged_at: i64,
    pub backend_pid: i32,
    pub granted: bool,
    pub has_entry: bool,
    pub entry_id: i64,
    /// 0: no limit. Otherwise the writer refuses a granted get once this many are logged.
    pub max_retrievals: i32,
    pub has_xid: bool,
    pub caller_xid: u64,
    /// Handed over without waiting (the caller holds a lock the writer needs until it aborts).
    pub detached: bool,
    /// 1 + the index of the large-details slot holding this record's details; 0 for none.
    pub large: u32,
    pub role_name: FixedStr<64>,
    pub session_user: FixedStr<64>,
    pub application_name: FixedStr<64>,
    pub client_addr: FixedStr<48>,
    pub operation: FixedStr<32>,
    pub purpose: FixedStr<64>,
    pub external_id: FixedStr<256>,
    pub sqlstate: FixedStr<5>,
    pub reason: FixedStr<320>,
    pub details: FixedStr<1536>,
    /// `vsql_vault.on_behalf_of`, whole: the setting refuses longer values.
    pub on_behalf_of: FixedStr<128>,
}

#[derive(Copy, Clone)]
#[repr(C)]
struct Slot {
    state: SlotState,
    outcome: Outcome,
    /// The caller gave up waiting: the writer frees the slot itself once it is written.
    abandoned: bool,
    latch: usize,
    /// The database of the caller: only that database's writer takes the record.
    db: u32,
    record: RawRecord,
}

/// The audit writer of one database.
#[derive(Copy, Clone)]
#[repr(C)]
struct WriterRef {
    db: u32,
    latch: usize,
    pid: i32,
}

#[derive(Copy, Clone)]
#[repr(C)]
pub struct AuditQueue {
    slots: [Slot; SLOTS],
    next: usize,
    writers: [WriterRef; MAX_DATABASES],
}

// SAFETY: AuditQueue is `repr(C)` and `Copy` plain data (integers, bools and fixed byte arrays):
// it owns no heap memory and holds no reference into one process's memory, so every backend can
// use the copy mapped at the same address in its shared memory. The latches it stores are
// addresses of PGPROC latches, which live in shared memory too, kept as integers and only ever
// handed to SetLatch. Every access goes through QUEUE's LWLock.
unsafe impl PGRXSharedMemory for AuditQueue {}

impl Default for AuditQueue {
    fn default() -> Self {
        // SAFETY: every field is plain data for which all-zero bytes are a valid value
        // (`SlotState::Free` and `Outcome::Written` are 0: free slots, absent strings, no writer).
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: the one ShmemInitStruct / LWLock tranche of this name, and no other code could take it:
// the four shared-memory names of this library (here, LARGE, retention::worker::SHARED and
// decoding::BATCHES_SEALED) are distinct and all start with "vsql_vault_".
static QUEUE: PgLwLock<AuditQueue> = unsafe { PgLwLock::new(c"vsql_vault_audit_queue") };

#[derive(Copy, Clone)]
#[repr(C)]
pub struct LargeDetails {
    in_use: [bool; LARGE_SLOTS],
    len: [u32; LARGE_SLOTS],
    bytes: [[u8; LARGE_BYTES]; LARGE_SLOTS],
}

// SAFETY: as for AuditQueue: `repr(C)`, `Copy`, only bools, integers and byte arrays, used by
// every process only under LARGE's LWLock.
unsafe impl PGRXSharedMemory for LargeDetails {}

impl Default for LargeDetails {
    fn default() -> Self {
        // SAFETY: all-zero is a valid LargeDetails (every slot free).
        unsafe { std::mem::zeroed() }
    }
}

// SAFETY: a name of its own, as for QUEUE.
static LARGE: PgLwLock<LargeDetails> = unsafe { PgLwLock::new(c"vsql_vault_audit_large_details") };

pub fn init_shmem() {
    pg_shmem_init!(QUEUE);
    pg_shmem_init!(LARGE);
}

/// Puts `details` into a free large-details slot, waiting until `deadline` for one.
fn claim_large(details: &str, deadline: Instant) -> Result<u32, VaultError> {
    loop {
        {
            let mut l = LARGE.exclusive();
            if let Some(i) = (0..LARGE_SLOTS).find(|&i| !l.in_use[i]) {
                let n = details.len().min(LARGE_BYTES);
                l.in_use[i] = true;
                l.len[i] = n as u32;
                l.bytes[i][..n].copy_from_slice(&details.as_bytes()[..n]);
                return Ok(i as u32 + 1);
            }
        }
        if Instant::now() >= deadline {
            return Err(VaultError::AuditUnavailable(
                "no room for the record's long details".into(),
            ));
        }
        wait_my_latch(Duration::from_millis(1));
    }
}

fn release_large(large: u32) {
    if large > 0 {
        LARGE.exclusive().in_use[large as usize - 1] = false;
    }
}

/// The details of a taken record, from its slot or from its large-details slot.
pub fn details_of(record: &RawRecord) -> Option<String> {
    if record.large == 0 {
        return record.details.get();
    }
    let l = LARGE.share();
    let i = record.large as usize - 1;
    Some(String::from_utf8_lossy(&l.bytes[i][..l.len[i] as usize]).into_owned())
}

pub fn empty_record() -> RawRecord {
    // SAFETY: as for AuditQueue, all-zero is a valid RawRecord.
    unsafe { std::mem::zeroed() }
}

fn my_latch() -> usize {
    // SAFETY: a plain read of a process global on the backend's thread. Its callers run in a
    // backend or worker after InitProcess, where MyLatch is this process's PGPROC latch (in shared
    // memory, so its address is meaningful to the other processes it is published to).
    unsafe { pg_sys::MyLatch as usize }
}

fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: a non-zero `latch` is a `my_latch()` some process of this cluster stored in the
        // queue: a PGPROC latch in shared memory, mapped at the same address in every process and
        // never freed. If its owner has exited meanwhile, SetLatch only sets the flag or signals
        // whichever process owns the latch now, a spurious wake-up every latch user tolerates.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) }
    }
}

/// Frees the slot if the caller leaves (error, cancel) before it has read the outcome.
struct SlotClaim {
    index: usize,
    settled: bool,
}

impl Drop for SlotClaim {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut q = QUEUE.exclusive();
        let slot = &mut q.slots[self.index];
        if slot.state == SlotState::Done {
            slot.state = SlotState::Free;
        } else {
            slot.abandoned = true;
        }
    }
}

/// Hands `record` to the audit writer without waiting for it: for a refusal made while the caller
/// holds a lock the writer needs, which it releases as soon as it raises its error.
pub fn submit_detached(record: &RawRecord, large: Option<&str>) -> Result<(), VaultError> {
    let mut r = *record;
    r.detached = true;
    let claim = claim_slot(&r, large)?;
    let mut q = QUEUE.exclusive();
    let slot = &mut q.slots[claim.index];
    if slot.state == SlotState::Done {
        slot.state = SlotState::Free;
    } else {
        slot.abandoned = true;
    }
    drop(q);
    std::mem::forget(claim);
    Ok(())
}

/// Hands `record` to the audit writer and waits until it is durable.
/// Returns the writer's outcome (`Outcome::Written` or `Outcome::LimitReached`).
/// `large`: details too long for the record's own field (see `LARGE_BYTES`).
pub fn submit(record: &RawRecord, large: Option<&str>) -> Result<Outcome, VaultError> {
    let timeout = Duration::from_millis(settings::AUDIT_TIMEOUT_MS.get().max(1) as u64);
    let deadline = Instant::now() + timeout;
    let claim = claim_slot(record, large)?;
    wait_for(claim, deadline, timeout)
}

/// Claims a slot for `record` (and a large-details slot for `large`); once claimed, the writer
/// owns the large-details slot and frees it when it has written the record.
fn claim_slot(record: &RawRecord, large: Option<&str>) -> Result<SlotClaim, VaultError> {
    if !crate::preloaded() {
        return Err(VaultError::NotPreloaded);
    }
    let timeout = Duration::from_millis(settings::AUDIT_TIMEOUT_MS.get().max(1) as u64);
    let deadline = Instant::now() + timeout;
    // SAFETY: a plain read of a process global set when this backend connected, on its only
    // thread.
    let my_db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut record = *record;
    if let Some(details) = large {
        record.large = claim_large(details, deadline)?;
    }
    let claimed = claim_free_slot(&record, my_db, deadline);
    if claimed.is_err() {
        release_large(record.large);
    }
    claimed
}

fn claim_free_slot(
    record: &RawRecord,
    my_db: u32,
    deadline: Instant,
) -> Result<SlotClaim, VaultError> {
    let claim = loop {
        {
            let mut q = QUEUE.exclusive();
            let start = q.next;
            let found = (0..SLOTS)
                .map(|i| (start + i) % SLOTS)
                .find(|&i| q.slots[i].state == SlotState::Free);
            if let Some(i) = found {
                let latch = my_latch();
                let slot = &mut q.slots[i];
                slot.state = SlotState::Pending;
                slot.outcome = Outcome::Written;
                slot.abandoned = false;
                slot.latch = latch;
                slot.db = my_db;
                slot.record = *record;
                q.next = (i + 1) % SLOTS;
                let writer = q.writers.iter().find(|w| w.db == my_db).map(|w| w.latch);
                drop(q);
                match writer {
                    Some(latch) => set_latch(latch),
                    // The record waits in its slot for the writer the launcher starts.
                    None => {
                        if !launcher::want_workers() {
                            let mut q = QUEUE.exclusive();
                            q.slots[i] = Slot {
                                state: SlotState::Free,
                                ..q.slots[i]
                            };
                            return Err(VaultError::TooManyDatabases(
                                settings::MAX_DATABASES.get(),
                            ));
                        }
                    }
                }
                break SlotClaim {
                    index: i,
                    settled: false,
                };
            }
        }
        if Instant::now() >= deadline {
            return Err(VaultError::AuditUnavailable(
                "the audit queue is full".into(),
            ));
        }
        wait_my_latch(Duration::from_millis(1));
    };
    Ok(claim)
}

fn wait_for(
    mut claim: SlotClaim,
    deadline: Instant,
    timeout: Duration,
) -> Result<Outcome, VaultError> {
    loop {
        // SAFETY: called in a backend (an audited SQL call), where MyLatch is this process's own
        // latch, valid for the life of the process; only its owner may reset it, and it is.
        unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        {
            let mut q = QUEUE.exclusive();
            let slot = &mut q.slots[claim.index];
            if slot.state == SlotState::Done {
                let outcome = slot.outcome;
                slot.state = SlotState::Free;
                claim.settled = true;
                drop(q);
                return match outcome {
                    Outcome::Failed => Err(VaultError::AuditUnavailable(
                        "the audit writer could not commit the record".into(),
                    )),
                    o => Ok(o),
                };
            }
            // A writer that died mid-batch leaves SlotState::Writing slots; its successor fails them.
            // No writer, and the launcher cannot start one: say why now rather than at the
            // timeout.
            let my_db = slot.db;
            if slot.state == SlotState::Pending
                && !q.writers.iter().any(|w| w.db == my_db)
                && launcher::over_capacity()
            {
                let slot = &mut q.slots[claim.index];
                let large = std::mem::take(&mut slot.record.large);
                slot.state = SlotState::Free;
                claim.settled = true;
                drop(q);
                release_large(large);
                return Err(VaultError::TooManyDatabases(settings::MAX_DATABASES.get()));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            // `claim` is dropped here: the slot is marked abandoned, the writer still logs it.
            return Err(VaultError::AuditUnavailable(format!(
                "no confirmation from the audit writer within {} ms (vsql_vault.audit_timeout)",
                timeout.as_millis()
            )));
        }
        wait_my_latch((deadline - now).min(Duration::from_millis(100)));
    }
}

fn wait_my_latch(d: Duration) {
    // SAFETY: called in a backend waiting for the writer, on its own latch (valid for the life of
    // the process) with valid event flags and a positive timeout; no LWLock is held across the
    // wait (every QUEUE / LARGE guard is dropped before). An interrupt (cancel, termination)
    // raised by check_for_interrupts is an ERROR that pgrx turns into a Rust panic.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            d.as_millis().max(1) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::check_for_interrupts!();
    }
}

// ---- the writer's side ----

/// Called once by the writer after it connected: its database's callers find it here. False if
/// another writer serves this database already (this one then leaves).
pub fn writer_attach() -> bool {
    let my_db = launcher::my_database();
    // SAFETY: a plain read of a process global set when the writer started, on its only thread.
    let me = unsafe { pg_sys::MyProcPid };
    let mut q = QUEUE.exclusive();
    if q.writers
        .iter()
        .any(|w| w.db == my_db && w.pid != 0 && w.pid != me)
    {
        return false;
    }
    let Some(index) = q
        .writers
        .iter()
        .position(|w| w.db == my_db)
        .or_else(|| q.writers.iter().position(|w| w.db == 0))
    else {
        return false;
    };
    q.writers[index] = WriterRef {
        db: my_db,
        latch: my_latch(),
        pid: me,
    };
    // A previous writer of this database that died mid-batch never committed these: their
    // callers must fail.
    let mut wake = Vec::new();
    for slot in q
        .slots
        .iter_mut()
        .filter(|s| s.state == SlotState::Writing && s.db == my_db)
    {
        finish_slot(slot, Outcome::Failed, &mut wake);
    }
    drop(q);
    wake.into_iter().for_each(set_latch);
    true
}

pub fn writer_detach() {
    let mut q = QUEUE.exclusive();
    // SAFETY: a plain read of a process global set at process start, on the process's only thread.
    let me = unsafe { pg_sys::MyProcPid };
    for w in q.writers.iter_mut().filter(|w| w.pid == me) {
        *w = WriterRef {
            db: 0,
            latch: 0,
            pid: 0,
        };
    }
}

/// A record taken by the writer, with whether its caller already gave up.
pub struct Taken {
    pub index: usize,
    pub record: RawRecord,
    pub abandoned: bool,
}

/// Takes every pending record, oldest claim order first.
pub fn take_pending() -> Vec<Taken> {
    let my_db = launcher::my_database();
    let mut q = QUEUE.exclusive();
    let start = q.next;
    let mut out = Vec::new();
    for i in (0..SLOTS).map(|k| (start + k) % SLOTS) {
        let slot = &mut q.slots[i];
        if slot.state == SlotState::Pending && slot.db == my_db {
            slot.state = SlotState::Writing;
            out.push(Taken {
                index: i,
                record: slot.record,
                abandoned: slot.abandoned,
            });
        }
    }
    out
}

fn finish_slot(slot: &mut Slot, outcome: Outcome, wake: &mut Vec<usize>) {
    // The writer is done with the record: its long details, if any, are no longer needed.
    release_large(std::mem::take(&mut slot.record.large));
    if slot.abandoned {
        slot.state = SlotState::Free;
    } else {
        slot.state = SlotState::Done;
        slot.outcome = outcome;
        wake.push(slot.latch);
    }
}

/// Reports the outcome of each taken record and wakes its caller. Returns the indexes of the
/// records whose caller gave up while the writer was writing them: their data was never
/// returned.
pub fn complete(results: &[(usize, Outcome)]) -> Vec<usize> {
    let mut wake = Vec::with_capacity(results.len());
    let mut gone = Vec::new();
    {
        let mut q = QUEUE.exclusive();
        for &(index, outcome) in results {
            let slot = &mut q.slots[index];
            if slot.state == SlotState::Writing {
                if slot.abandoned && outcome == Outcome::Written {
                    gone.push(index);
                }
                finish_slot(slot, outcome, &mut wake);
            }
        }
    }
    wake.into_iter().for_each(set_latch);
    gone
}
