//! The audit writer: a background worker that makes access records durable in batches.
//!
//! It is the only process that inserts into `vault.access_log`, which makes it the log's single
//! sequencer: it also enforces `max_retrievals`, because only it sees every granted get in order.

use super::queue::{self, Outcome, Taken};
use crate::pg::plans::{self, types::*};
use crate::settings;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The writer's INSERT; `$col`/`$val` add the `on_behalf_of` column, which a 0.1.0 log (library
/// updated, ALTER EXTENSION UPDATE not yet run) does not have.
macro_rules! insert_log {
    ($col:literal, $val:literal) => {
        concat!(
            "
INSERT INTO vault.access_log
    (logged_at, role_name, session_user_name, application_name, client_addr, backend_pid,
     operation, purpose, external_id, entry_id, granted, sqlstate, reason, details, caller_xid",
            $col,
            ")
SELECT '2000-01-01 00:00:00+00'::timestamptz + r.us * interval '1 microsecond',
       r.role_name, r.session_user_name, r.application_name, r.client_addr::inet, r.pid,
       r.operation, r.purpose, r.external_id, r.entry_id, r.granted, r.sqlstate, r.reason,
       r.details::jsonb, r.xid::xid8",
            $val,
            "
FROM unnest($1::int8[], $2::name[], $3::name[], $4::text[], $5::text[], $6::int4[],
            $7::text[], $8::text[], $9::text[], $10::int8[], $11::bool[], $12::text[],
            $13::text[], $14::text[], $15::text[], $16::text[])
     AS r(us, role_name, session_user_name, application_name, client_addr, pid, operation,
          purpose, external_id, entry_id, granted, sqlstate, reason, details, xid, on_behalf_of)"
        )
    };
}
const INSERT: &str = insert_log!(", on_behalf_of", ", r.on_behalf_of");
const INSERT_WITHOUT_ON_BEHALF_OF: &str = insert_log!("", "");

const LOG_PRESENT: &str =
    "SELECT pg_catalog.to_regclass('vault.access_log') IS NOT NULL AS present,
    EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
             WHERE attrelid = pg_catalog.to_regclass('vault.access_log')
               AND attname = 'on_behalf_of' AND NOT attisdropped) AS has_on_behalf_of";

/// Retrievals that count against `max_retrievals`: granted gets that returned their data.
const RETRIEVALS: &str = "SELECT
    (SELECT count(*) FROM vault.access_log WHERE entry_id = $1 AND operation = 'get' AND granted
        AND (details->>'returned') IS DISTINCT FROM 'false')
  - (SELECT count(*) FROM vault.access_log WHERE entry_id = $1 AND operation = 'get_not_returned')";

/// What the record of a get says when its caller stopped waiting: no data was returned.
const NOT_RETURNED: &str = "caller stopped waiting for this record; no data was returned";

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn vsql_vault_audit_writer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // The launcher starts one writer per database, named by its OID.
    let database = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !extension_installed() {
        crate::launcher::no_extension_here();
        leave(0);
    }
    // A writer stuck behind someone's table lock would hold every caller until its timeout; with a
    // lock timeout the batch fails, its callers fail closed, and the next writer tries again.
    BackgroundWorker::transaction(|| {
        Spi::run("SET lock_timeout = '2s'; SET synchronous_commit = on; SET application_name = 'vsql_vault audit writer'")
    })
    .unwrap_or_else(|e| pgrx::error!("vsql_vault audit writer could not configure its session: {e}"));
    if !queue::writer_attach() {
        leave(0);
    }
    on_exit_detach();
    log!(
        "vsql_vault audit writer started for database {}",
        database.to_u32()
    );
    let mut key_loaded = false;
    let mut last_checkpoint = Instant::now();

    // Records may be waiting already: the calls that asked the launcher for this writer.
    let mut woken = true;
    while woken {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the reload a background worker makes in its main loop (as PostgreSQL's own
            // workers do): on the worker's thread, between transactions, no LWLock held.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if !BackgroundWorker::transaction(crate::launcher::serves_this_database) {
                log!("vsql_vault.database names another database: audit writer leaves");
                leave(0);
            }
        }
        loop {
            let batch = queue::take_pending();
            if batch.is_empty() {
                break;
            }
            write_batch(batch);
        }
        if !extension_installed() {
            // DROP EXTENSION: nothing is left to write to; CREATE EXTENSION asks for a new writer.
            log!("vsql_vault audit writer: the extension was dropped from this database");
            crate::launcher::no_extension_here();
            leave(0);
        }
        let interval = Duration::from_secs(settings::CHECKPOINT_INTERVAL_S.get().max(1) as u64);
        let checkpoint_due = last_checkpoint.elapsed() >= interval;
        if (!key_loaded || checkpoint_due) && !crate::launcher::restore_in_progress() {
            if !key_loaded {
                load_signing_key();
                key_loaded = true;
            }
            if checkpoint_due {
                last_checkpoint = Instant::now();
                scheduled_checkpoint();
                crate::keys::rotate_when_due();
            }
        }
        woken = BackgroundWorker::wait_latch(Some(Duration::from_secs(1)));
    }
    leave(0);
}

/// Whether the extension's access log exists in this database (committed).
fn extension_installed() -> bool {
    BackgroundWorker::transaction(|| {
        crate::pg::select_one::<bool>(
            "SELECT pg_catalog.to_regclass('vault.access_log') IS NOT NULL",
            &[],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// However the writer ends (a return, an ERROR, SIGTERM), its callers stop finding it and the
/// launcher sees it gone.
fn on_exit_detach() {
    #[pg_guard]
    unsafe extern "C-unwind" fn detach(_code: i32, _arg: pg_sys::Datum) {
        queue::writer_detach();
        crate::launcher::worker_started(false, 0, 0);
    }
    // SAFETY: registers a callback PostgreSQL runs once at process exit, on this thread.
    unsafe { pg_sys::before_shmem_exit(Some(detach), pg_sys::Datum::from(0)) };
    // SAFETY: a plain read of a process global, on the worker's only thread.
    crate::launcher::worker_started(false, unsafe { pg_sys::MyProcPid }, 0);
}

/// Ends the worker. The launcher, not the postmaster, decides whether a new one starts.
fn leave(code: i32) -> ! {
    // SAFETY: outside any transaction, with no LWLock held; proc_exit runs PostgreSQL's exit
    // callbacks and never returns, so no Rust code runs after it.
    unsafe { pg_sys::proc_exit(code) }
}

/// Loads (on a fresh install: generates) the signing key and publishes its public half. Inside a
/// transaction, so a key already registered is never regenerated (see `keys::current`); a key
/// that cannot be loaded is a WARNING naming its file, repeated by every scheduled checkpoint.
fn load_signing_key() {
    let loaded = BackgroundWorker::transaction(crate::keys::current);
    match loaded {
        Ok(key) => {
            log!(
                "vsql_vault signing key {}",
                vsql_vault_core::keys::key_id(&vsql_vault_core::keys::SignEvidence::public(&key))
            );
            // Publish the public key at once: consumers of the replication stream need it before
            // the first checkpoint.
            let registered = when_installed("vault.signing_keys", || {
                crate::keys::register(&key)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = registered {
                warning!("vsql_vault could not publish its signing key: {e}");
            }
        }
        Err(e) => warning!("vsql_vault cannot load its signing key: {e}"),
    }
}

/// Signs the chain heads if the extension is installed; a failure is reported and retried at the
/// next interval rather than ending the writer.
fn scheduled_checkpoint() {
    let result = when_installed("vault.audit_checkpoints", || {
        crate::chain::checkpoint()
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        warning!("vsql_vault checkpoint failed: {e}");
    }
}

/// Runs `work` in a transaction of its own if the extension's `table` exists in the served
/// database (the writer starts before CREATE EXTENSION and lives on after DROP EXTENSION).
fn when_installed(table: &str, work: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let work = std::panic::AssertUnwindSafe(std::cell::Cell::new(Some(work)));
    PgTryBuilder::new(|| {
        BackgroundWorker::transaction(|| {
            let present = crate::pg::select_one::<bool>(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                &[table.into()],
            )
            .ok()
            .flatten()
            .unwrap_or(false);
            match (present, work.take()) {
                (true, Some(w)) => w(),
                _ => Ok(()),
            }
        })
    })
    .catch_others(|e| e.rethrow())
    .execute()
}

fn write_batch(batch: Vec<Taken>) {
    let indexes: Vec<usize> = batch.iter().map(|t| t.index).collect();
    // A failure is raised inside the transaction so that it aborts: never half a batch committed.
    let result = PgTryBuilder::new(|| {
        BackgroundWorker::transaction(|| {
            insert_batch(&batch).unwrap_or_else(|e| {
                pgrx::error!("vsql_vault audit writer could not write a batch: {e}")
            })
        })
    })
    .catch_others(|e| {
        // Tell the callers now rather than at their timeout, then let the worker restart.
        let failed: Vec<(usize, Outcome)> = indexes.iter().map(|&i| (i, Outcome::Failed)).collect();
        queue::complete(&failed);
        e.rethrow()
    })
    .execute();
    let gone = queue::complete(&result);
    note_not_returned(&batch, &gone);
}

/// Granted gets whose callers gave up while their batch was being written were recorded as
/// granted, but returned nothing: a second record says so, and takes them off the entry's
/// `max_retrievals` count. (Lost if the writer dies first: a get then counts once too often,
/// never too few.)
fn note_not_returned(batch: &[Taken], gone: &[usize]) {
    let notes: Vec<Taken> = batch
        .iter()
        .filter(|t| gone.contains(&t.index) && !t.abandoned && !t.record.detached)
        .filter(|t| t.record.granted && t.record.operation.get().as_deref() == Some("get"))
        .map(|t| {
            let mut r = t.record;
            r.large = 0;
            r.granted = false;
            r.detached = true;
            r.max_retrievals = 0;
            r.operation.set(Some("get_not_returned"));
            r.reason.set(Some(NOT_RETURNED));
            r.details.set(Some(
                &serde_json::json!({ "returned": false, "get_logged_at_us": r.logged_at })
                    .to_string(),
            ));
            Taken {
                index: usize::MAX,
                record: r,
                abandoned: false,
            }
        })
        .collect();
    if notes.is_empty() {
        return;
    }
    PgTryBuilder::new(|| {
        BackgroundWorker::transaction(|| {
            insert_batch(&notes).unwrap_or_else(|e| {
                pgrx::error!("vsql_vault audit writer could not record gets not returned: {e}")
            })
        })
    })
    .catch_others(|e| e.rethrow())
    .execute();
}

#[derive(Default)]
/// One array per column of the access log, in the order of `INSERT`'s parameters.
struct Columns {
    logged_at: Vec<i64>,
    role_name: Vec<String>,
    session_user: Vec<String>,
    application_name: Vec<Option<String>>,
    client_addr: Vec<Option<String>>,
    backend_pid: Vec<i32>,
    operation: Vec<String>,
    purpose: Vec<Option<String>>,
    external_id: Vec<Option<String>>,
    entry_id: Vec<Option<i64>>,
    granted: Vec<bool>,
    sqlstate: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    details: Vec<Option<String>>,
    caller_xid: Vec<Option<String>>,
    on_behalf_of: Vec<Option<String>>,
}

fn insert_batch(batch: &[Taken]) -> Result<Vec<(usize, Outcome)>, String> {
    let _writing = crate::chain::VaultWriting::enter();
    let (present, has_on_behalf_of) = Spi::connect(|c| {
        let row = c
            .select(&*plans::plan(c, LOG_PRESENT, &[], false)?, None, &[])?
            .first();
        Ok::<_, pgrx::spi::Error>((
            row.get_by_name::<bool, _>("present")?.unwrap_or(false),
            row.get_by_name::<bool, _>("has_on_behalf_of")?
                .unwrap_or(false),
        ))
    })
    .map_err(|e| e.to_string())?;
    if !present {
        return Ok(batch.iter().map(|t| (t.index, Outcome::Failed)).collect());
    }
    // The writer is the access log's only inserter: it holds the chain for the whole batch and
    // the chain trigger links the rows in memory; the head is written back once.
    let chain = crate::chain::ChainBatch::begin("vault.access_log").map_err(|e| e.to_string())?;
    let insert = if has_on_behalf_of {
        INSERT
    } else {
        INSERT_WITHOUT_ON_BEHALF_OF
    };
    let outcomes = insert_rows(batch, insert).map_err(|e| e.to_string())?;
    chain.finish().map_err(|e| e.to_string())?;
    Ok(outcomes)
}

fn insert_rows(
    batch: &[Taken],
    insert: &'static str,
) -> Result<Vec<(usize, Outcome)>, pgrx::spi::Error> {
    Spi::connect_mut(|client| {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut retrievals: HashMap<i64, i64> = HashMap::new();
        let mut c: Columns = Default::default();
        for t in batch {
            let r = &t.record;
            let mut row = Decided {
                granted: r.granted,
                sqlstate: r.sqlstate.get(),
                reason: r.reason.get(),
                details: queue::details_of(r),
            };
            let mut outcome = Outcome::Written;
            // A caller that gave up before its record was written gets no data: the record says
            // so and the get does not count against max_retrievals.
            let returned = !t.abandoned || r.detached;
            if row.granted && returned && r.max_retrievals > 0 && r.has_entry {
                let count = match retrievals.get(&r.entry_id) {
                    Some(n) => *n,
                    None => retrievals_so_far(client, r.entry_id)?,
                };
                if count >= i64::from(r.max_retrievals) {
                    row.granted = false;
                    row.sqlstate = Some("42501".into());
                    row.reason = Some(format!("max_retrievals ({}) reached", r.max_retrievals));
                    outcome = Outcome::LimitReached;
                } else {
                    retrievals.insert(r.entry_id, count + 1);
                }
            }
            if !returned {
                row.mark_not_returned();
            }
            c.push(r, row);
            outcomes.push((t.index, outcome));
        }
        let stmt = plans::plan(
            client,
            insert,
            &[
                INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT4_ARRAY, TEXT_ARRAY,
                TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY, BOOL_ARRAY, TEXT_ARRAY, TEXT_ARRAY, TEXT_ARRAY,
                TEXT_ARRAY, TEXT_ARRAY,
            ],
            true,
        )?;
        client.update(&*stmt, None, &c.into_args())?;
        Ok(outcomes)
    })
}

/// Granted gets of an entry already in the access log.
fn retrievals_so_far(
    client: &mut pgrx::spi::SpiClient<'_>,
    entry_id: i64,
) -> Result<i64, pgrx::spi::Error> {
    Ok(client
        .select(
            &*plans::plan(client, RETRIEVALS, &[INT8], false)?,
            None,
            &[entry_id.into()],
        )?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0))
}

/// The outcome fields of one record as the writer decided them.
struct Decided {
    granted: bool,
    sqlstate: Option<String>,
    reason: Option<String>,
    details: Option<String>,
}

impl Decided {
    fn mark_not_returned(&mut self) {
        self.reason = Some(match self.reason.take() {
            Some(r) => format!("{r}; {NOT_RETURNED}"),
            None => NOT_RETURNED.to_owned(),
        });
        let mut d = self
            .details
            .take()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        d["returned"] = serde_json::json!(false);
        self.details = Some(d.to_string());
    }
}

impl Columns {
    fn push(&mut self, r: &queue::RawRecord, row: Decided) {
        self.logged_at.push(r.logged_at);
        self.role_name.push(r.role_name.get().unwrap_or_default());
        self.session_user
            .push(r.session_user.get().unwrap_or_default());
        self.application_name.push(r.application_name.get());
        self.client_addr.push(r.client_addr.get());
        self.backend_pid.push(r.backend_pid);
        self.operation.push(r.operation.get().unwrap_or_default());
        self.purpose.push(r.purpose.get());
        self.external_id.push(r.external_id.get());
        self.entry_id.push(r.has_entry.then_some(r.entry_id));
        self.granted.push(row.granted);
        self.sqlstate.push(row.sqlstate);
        self.reason.push(row.reason);
        self.details.push(row.details);
        self.caller_xid
            .push(r.has_xid.then(|| r.caller_xid.to_string()));
        self.on_behalf_of.push(r.on_behalf_of.get());
    }

    /// The arguments of INSERT, in its parameter order.
    fn into_args(self) -> Vec<DatumWithOid<'static>> {
        vec![
            self.logged_at.into(),
            self.role_name.into(),
            self.session_user.into(),
            self.application_name.into(),
            self.client_addr.into(),
            self.backend_pid.into(),
            self.operation.into(),
            self.purpose.into(),
            self.external_id.into(),
            self.entry_id.into(),
            self.granted.into(),
            self.sqlstate.into(),
            self.reason.into(),
            self.details.into(),
            self.caller_xid.into(),
            self.on_behalf_of.into(),
        ]
    }
}

/// The first of the tables the writer appends to (the access log, the chain heads) on which this
/// backend's transaction holds a lock that conflicts with the writer's row-exclusive lock: the
/// transaction that created or updated the extension (a new relation is held access-exclusive
/// until commit), or one that ran a break-glass command on them. A call made there would wait
/// for its record until vsql_vault.audit_timeout; it is refused at once instead.
pub fn blocked_by_this_transaction() -> Option<&'static str> {
    ["vault.access_log", "vault.chain_heads"]
        .into_iter()
        .find(|table| crate::chain::vault_relation(table).is_some_and(holds_conflicting_lock))
}

fn holds_conflicting_lock(relid: pg_sys::Oid) -> bool {
    // SAFETY: a plain read of a process-global set once the backend has connected to its
    // database, on the backend's only thread.
    let database = unsafe { pg_sys::MyDatabaseId };
    let tag = pg_sys::LOCKTAG {
        locktag_field1: database.to_u32(),
        locktag_field2: relid.to_u32(),
        locktag_field3: 0,
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_RELATION as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    // Every mode from ShareLock up conflicts with RowExclusiveLock.
    (pg_sys::ShareLock..=pg_sys::AccessExclusiveLock).any(|mode| {
        // SAFETY: looks the tag up in this backend's local lock table only; `tag` outlives the
        // call and the mode is a valid lock mode of the default lock method.
        unsafe { pg_sys::LockHeldByMe(&tag, mode as pg_sys::LOCKMODE) }
    })
}
