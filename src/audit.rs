//! Tamper-evident audit: hash-chained append-only tables, signed checkpoints, export and
//! verification. The row hash, the checkpoint message and the verifier all come from
//! `vsql_vault_core::chain`, which the offline tool uses too.

use crate::column_values::{datum_value, pins_output, PinnedOutput};
use crate::errors::VaultError;
use crate::identity::{AsOwner, AsTableOwner};
use crate::plans::{self, types::*};
use crate::{keys, settings};
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use vsql_vault_core::canonical::Value;
use vsql_vault_core::chain::{self, Checkpoint, ExportRow, Verifier, CHAIN_COLUMNS, GENESIS};

/// The table's columns other than generated ones, quoted, for a select list. A query result's
/// descriptor does not say which columns are generated, and the chain trigger (which runs before
/// they are computed) hashes without them: an export or a check must read without them too.
fn stored_columns(relid: pg_sys::Oid) -> Result<String, VaultError> {
    crate::identity::select_one::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.quote_ident(attname), ', ' ORDER BY attnum)
           FROM pg_catalog.pg_attribute
          WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
        &[relid.into()],
    )
    .map_err(|e| VaultError::Internal(e.to_string()))?
    .ok_or_else(|| VaultError::Internal(format!("relation {} has no columns", relid.to_u32())))
}

/// The hashed columns of a table: live, not generated, not the chain's own fields.
fn hashed_attributes(tupdesc: pg_sys::TupleDesc) -> Vec<(usize, String, pg_sys::Oid)> {
    // SAFETY: every caller passes a live descriptor: the trigger relation's `rd_att` (chain_row,
    // valid for the trigger call) or the `tupdesc` of the current SPI result (export_row via
    // scan_rows, chain_existing_rows), valid until SPI_finish. The wrapper does not outlive this
    // function and, made with `from_pg_unchecked`, never releases the descriptor.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
    desc.iter()
        .enumerate()
        .filter(|(_, a)| {
            !a.attisdropped && a.attgenerated == 0 && !CHAIN_COLUMNS.contains(&a.name())
        })
        .map(|(i, a)| (i, a.name().to_owned(), a.atttypid))
        .collect()
}

/// A chain a single writer holds for a whole batch (the audit writer and the access log): rows
/// are linked in memory and the head is written back once, when the batch is done.
struct Cursor {
    relid: u32,
    head: Head,
}

thread_local! {
    static CURSOR: RefCell<Option<Cursor>> = const { RefCell::new(None) };
    /// The relation vault_protect_table is protecting right now (0 for none): the DDL guard lets
    /// the protection's own commands on that one relation through, and nothing else.
    static PROTECTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// The chain this backend's current transaction already holds, per table, so that a
    /// transaction inserting many rows stays on one chain.
    static HELD: RefCell<HashMap<u32, (pg_sys::TransactionId, i32)>> = RefCell::new(HashMap::new());
    /// Chains held by the statements running in this backend, per table: the rows of one
    /// statement are linked in memory and the head is written back once, by the AFTER STATEMENT
    /// trigger. (Writing the head row back for every row made a 20,000-row INSERT ... SELECT
    /// quadratic: each update of the same row inside one transaction lengthens its version chain.)
    static STATEMENTS: RefCell<HashMap<(u32, StatementKey), Head>> = RefCell::new(HashMap::new());
}

/// Whether `relid` is the relation this backend's vault_protect_table is protecting.
pub fn protecting(relid: pg_sys::Oid) -> bool {
    relid != pg_sys::Oid::INVALID && PROTECTING.with(|p| p.get()) == relid.to_u32()
}

/// Before the update from 0.1.0 the DDL guard passes objects by name only: whether `object` (a
/// `pg_event_trigger_ddl_commands` identity) is the table being protected, or one of its triggers.
pub fn protecting_object(object: &str) -> bool {
    let relid = PROTECTING.with(|p| p.get());
    if relid == 0 {
        return false;
    }
    let quoted = {
        let _owner = AsOwner::enter();
        crate::identity::select_one::<String>(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
              WHERE c.oid OPERATOR(pg_catalog.=) $1",
            &[pg_sys::Oid::from(relid).into()],
        )
        .ok()
        .flatten()
    };
    quoted.is_some_and(|q| object == q || object.ends_with(&format!(" on {q}")))
}

/// The relation a trigger fired on, by OID: names can change under a running session.
fn trigger_relid(trigger: &PgTrigger) -> u32 {
    // SAFETY: `trigger_data()` is the TriggerData PostgreSQL passed to this trigger call;
    // `tg_relation` is the open relation the trigger fired on, non-null and valid for as long as
    // `trigger` is borrowed.
    unsafe { (*trigger.trigger_data().tg_relation).rd_id.to_u32() }
}

/// The (transaction, subtransaction) a statement runs in. Not the command id: the chain's own
/// queries advance it between rows. A statement's entry ends with its AFTER STATEMENT trigger, or
/// with its (sub)transaction when it fails.
type StatementKey = (pg_sys::TransactionId, pg_sys::SubTransactionId);

fn statement_key() -> StatementKey {
    // SAFETY: called from the chain triggers (chain_row, flush_statement), so inside a transaction
    // on the backend's thread. Both functions only read the transaction state (the first may
    // assign the top-level xid, which an INSERT's transaction needs anyway); a refusal, e.g. in a
    // read-only transaction, is an ERROR that pgrx turns into a Rust panic.
    unsafe {
        (
            pg_sys::GetTopTransactionId(),
            pg_sys::GetCurrentSubTransactionId(),
        )
    }
}

/// AFTER STATEMENT: writes back the heads the statement's rows advanced in memory.
pub fn flush_statement(trigger: &PgTrigger) -> Result<(), VaultError> {
    let table = trigger_relid(trigger);
    let (xid, subxid) = statement_key();
    let done: Vec<Head> = STATEMENTS.with(|s| {
        let mut s = s.borrow_mut();
        // Entries of transactions that are over (an error ended them) are dropped on the way.
        s.retain(|(_, k), _| k.0 == xid);
        let keys: Vec<(u32, StatementKey)> = s
            .keys()
            .filter(|(t, k)| *t == table && k.1 == subxid)
            .cloned()
            .collect();
        keys.into_iter().filter_map(|k| s.remove(&k)).collect()
    });
    for head in done {
        advance_chain(&head.identity, head.chain, head.seq, &head.hash)?;
    }
    Ok(())
}

/// The OID of `vault.<name>` (given as `vault.<name>`), if it exists.
fn vault_relation(qualified: &str) -> Option<pg_sys::Oid> {
    let name = std::ffi::CString::new(qualified.strip_prefix("vault.")?).ok()?;
    // SAFETY: syscache lookups, made inside a transaction (SQL functions, triggers, and the
    // workers' `BackgroundWorker::transaction` bodies). Both names are NUL-terminated and outlive
    // the calls; `missing_ok` is true, and an invalid namespace OID just finds no relation.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"vault".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(name.as_ptr(), ns);
        (ns != pg_sys::Oid::INVALID && rel != pg_sys::Oid::INVALID).then_some(rel)
    }
}

/// Whether `vault.protected_tables` has its `relid` column. It has not between installing this
/// version's library over 0.1.0 and `ALTER EXTENSION vsql_vault UPDATE`: tables are then still
/// registered by name, and the chains must keep working (the audit writer too) until the update.
/// Two syscache lookups, cheap enough for every chained statement.
pub fn registry_by_oid() -> bool {
    // SAFETY: a syscache lookup inside a transaction (as for `vault_relation`); `rel` is a
    // relation OID just found, the attribute name a NUL-terminated static string, and an unknown
    // name gives InvalidAttrNumber rather than an error.
    vault_relation("vault.protected_tables").is_none_or(|rel| unsafe {
        pg_sys::get_attnum(rel, c"relid".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    })
}

/// The OID of registration `p`'s table from the name 0.1.0 recorded (`schema.table`, unquoted),
/// written out rather than through `vault.table_oid`, which a 0.1.0 install creates only after
/// it protects its own tables.
macro_rules! oid_by_recorded_name {
    () => {
        "(SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n
                ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
           WHERE n.nspname OPERATOR(pg_catalog.=) pg_catalog.split_part(p.table_name, '.', 1)
             AND c.relname OPERATOR(pg_catalog.=) pg_catalog.substr(p.table_name,
                     pg_catalog.length(pg_catalog.split_part(p.table_name, '.', 1)) OPERATOR(pg_catalog.+) 2))"
    };
}

/// The SQL expression for the OID of registration `p`'s table (see `registry_by_oid`).
fn registered_oid() -> &'static str {
    if registry_by_oid() {
        "p.relid::pg_catalog.oid"
    } else {
        oid_by_recorded_name!()
    }
}

macro_rules! chain_query {
    ($lock:literal, $registered:expr) => {
        concat!(
            "SELECT h.chain_id, h.seq, h.head_hash, h.identity FROM vault.chain_heads h
             WHERE h.identity OPERATOR(pg_catalog.=) (SELECT p.identity FROM vault.protected_tables p
                                                       WHERE ",
            $registered,
            " OPERATOR(pg_catalog.=) $1)
             ORDER BY h.chain_id OPERATOR(pg_catalog.=) $3 DESC, h.chain_id OPERATOR(pg_catalog.#) $2
             LIMIT 1 FOR UPDATE OF h",
            $lock
        )
    };
}
const TAKE_CHAIN: [&str; 2] = [
    chain_query!(" SKIP LOCKED", "p.relid::pg_catalog.oid"),
    chain_query!("", "p.relid::pg_catalog.oid"),
];
const TAKE_CHAIN_BY_NAME: [&str; 2] = [
    chain_query!(" SKIP LOCKED", oid_by_recorded_name!()),
    chain_query!("", oid_by_recorded_name!()),
];
const ADVANCE_CHAIN: &str = "UPDATE vault.chain_heads SET seq = $3, head_hash = $4
     WHERE identity OPERATOR(pg_catalog.=) $1 AND chain_id OPERATOR(pg_catalog.=) $2";

/// A locked chain: the table's identity, the chain, and its head.
pub struct Head {
    identity: String,
    chain: i32,
    seq: i64,
    hash: Vec<u8>,
}

/// Locks a chain of relation `table` for this transaction (a free one if any) and returns its head.
fn take_chain(table: u32) -> Result<Head, VaultError> {
    // SAFETY: called by chain_row / ChainBatch::begin, inside a transaction that is about to insert
    // rows (assigning its xid now is harmless); an ERROR becomes a Rust panic.
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    let held = HELD
        .with(|h| {
            h.borrow()
                .get(&table)
                .filter(|(x, _)| *x == xid)
                .map(|(_, c)| *c)
        })
        .unwrap_or(-1);
    // SAFETY: a plain read of a process-global int set once at process start, on the backend's
    // only thread.
    let pid = unsafe { pg_sys::MyProcPid };
    let _owner = AsOwner::enter();
    let found = Spi::connect_mut(|c| {
        let args = [pg_sys::Oid::from(table).into(), pid.into(), held.into()];
        let queries = if registry_by_oid() {
            TAKE_CHAIN
        } else {
            TAKE_CHAIN_BY_NAME
        };
        for query in queries {
            let stmt = plans::plan(c, query, &[OID, INT4, INT4], true)?;
            let rows = c.update(&*stmt, None, &args)?;
            if let Some(row) = rows.into_iter().next() {
                return Ok(Some(Head {
                    chain: row.get_by_name::<i32, _>("chain_id")?.unwrap_or(0),
                    seq: row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
                    hash: row
                        .get_by_name::<Vec<u8>, _>("head_hash")?
                        .unwrap_or_default(),
                    identity: row
                        .get_by_name::<String, _>("identity")?
                        .unwrap_or_default(),
                }));
            }
        }
        Ok::<_, pgrx::spi::Error>(None)
    })
    .map_err(|e| VaultError::Internal(format!("taking a chain head failed: {e}")))?;
    let found = found.ok_or_else(|| VaultError::NotProtected(format!("relation {table}")))?;
    HELD.with(|h| h.borrow_mut().insert(table, (xid, found.chain)));
    Ok(found)
}

/// A chain a single writer holds for a batch (the audit writer's access-log batches, a purge
/// batch): `begin` locks the table's chain for the rest of the transaction, the chain trigger
/// links the rows this process inserts into it in memory, and `finish` writes the head back once,
/// in the same transaction. Dropped unfinished (an error), it forgets the batch, so the next one
/// starts from the head on disk.
#[must_use = "finish() writes the chain head back"]
pub struct ChainBatch {
    finished: bool,
}

impl ChainBatch {
    pub fn begin(table: &str) -> Result<ChainBatch, VaultError> {
        CURSOR.with(|c| *c.borrow_mut() = None);
        // The extension's own tables, named by the extension itself and never renamed (the DDL
        // guard): found through the syscache, not a query, once per batch.
        let relid = vault_relation(table)
            .ok_or_else(|| VaultError::NotProtected(table.to_owned()))?
            .to_u32();
        let head = take_chain(relid)?;
        CURSOR.with(|c| *c.borrow_mut() = Some(Cursor { relid, head }));
        Ok(ChainBatch { finished: false })
    }

    pub fn finish(mut self) -> Result<(), VaultError> {
        self.finished = true;
        match CURSOR.with(|c| c.borrow_mut().take()) {
            Some(cur) => advance_chain(
                &cur.head.identity,
                cur.head.chain,
                cur.head.seq,
                &cur.head.hash,
            ),
            None => Ok(()),
        }
    }
}

impl Drop for ChainBatch {
    fn drop(&mut self) {
        if !self.finished {
            CURSOR.with(|c| *c.borrow_mut() = None);
        }
    }
}

fn advance_chain(table: &str, chain: i32, seq: i64, head: &[u8]) -> Result<(), VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect_mut(|c| {
        let stmt = plans::plan(c, ADVANCE_CHAIN, &[TEXT, INT4, INT8, BYTEA], true)?;
        c.update(
            &*stmt,
            None,
            &[table.into(), chain.into(), seq.into(), head.into()],
        )
        .map(|_| ())
    })
    .map_err(|e| VaultError::Internal(format!("advancing the chain head failed: {e}")))
}

fn qualified_name(trigger: &PgTrigger) -> Result<String, VaultError> {
    let schema = trigger
        .table_schema()
        .map_err(|e| VaultError::Internal(e.to_string()))?;
    let table = trigger
        .table_name()
        .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(format!("{schema}.{table}"))
}

thread_local! {
    static VAULT_WRITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The extension's own tables of evidence: rows come from vsql_vault's code paths only.
const EVIDENCE_TABLES: [&str; 3] = [
    "vault.access_log",
    "vault.audit_checkpoints",
    "vault.purge_log",
];

/// Held while vsql_vault itself inserts into an evidence table; any other insert (by the owner
/// or a superuser, with plain SQL) is refused, so a forged record cannot be chained in as if the
/// vault had written it.
pub struct VaultWriting(bool);

impl VaultWriting {
    pub fn enter() -> VaultWriting {
        VaultWriting(VAULT_WRITING.with(|w| w.replace(true)))
    }
}

impl Drop for VaultWriting {
    fn drop(&mut self) {
        let previous = self.0;
        VAULT_WRITING.with(|w| w.set(previous));
    }
}

/// BEFORE INSERT: links the new row to its chain and fills the chain fields.
pub fn chain_row<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<PgHeapTuple<'a, AllocatedByRust>, VaultError> {
    let table = qualified_name(trigger)?;
    let relid = trigger_relid(trigger);
    if EVIDENCE_TABLES.contains(&table.as_str())
        && !VAULT_WRITING.with(|w| w.get())
        && !settings::RESTORE_MODE.get()
    {
        pgrx::ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("rows of {table} are written by vsql_vault only: a direct INSERT is refused")
        );
    }
    let td = trigger.trigger_data();
    // SAFETY: in a BEFORE INSERT row trigger `tg_relation` is the open target relation and
    // `tg_trigtuple` the new row, formed with that relation's descriptor `rd_att`; both stay
    // valid for the whole trigger call, and `deform` fills exactly `natts` slots. The datums
    // borrowed from the tuple are turned into owned `Value`s before this block ends.
    let columns = unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let values = deform(td.tg_trigtuple, tupdesc);
        columns_of(&values, &hashed_attributes(tupdesc))
    };
    if settings::RESTORE_MODE.get() {
        if let Some(kept) = restored_row(trigger, relid)? {
            return Ok(kept);
        }
        // A dump always carries the chain fields of evidence rows: one without them is not a
        // restore but a new record, and those come from the vault only.
        if EVIDENCE_TABLES.contains(&table.as_str()) && !VAULT_WRITING.with(|w| w.get()) {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("rows of {table} are written by vsql_vault only: in restore mode only rows with their chain fields are accepted")
            );
        }
    }
    let (_identity, chain_id, seq, prev, hash) = match CURSOR.with(|c| c.borrow_mut().take()) {
        // A writer that holds this table's chain for its whole batch: link in memory.
        Some(mut cur) if cur.relid == relid => {
            let seq = cur.head.seq + 1;
            let prev = std::mem::take(&mut cur.head.hash);
            let hash = chain::row_hash(&cur.head.identity, cur.head.chain, seq, &prev, &columns);
            cur.head.seq = seq;
            cur.head.hash = hash.to_vec();
            let out = (cur.head.identity.clone(), cur.head.chain, seq, prev, hash);
            CURSOR.with(|c| *c.borrow_mut() = Some(cur));
            out
        }
        other => {
            CURSOR.with(|c| *c.borrow_mut() = other);
            let key = (relid, statement_key());
            let held = STATEMENTS.with(|s| s.borrow_mut().remove(&key));
            let mut head = match held {
                Some(head) => head,
                None => take_chain(relid)?,
            };
            let seq = head.seq + 1;
            let prev = std::mem::take(&mut head.hash);
            let hash = chain::row_hash(&head.identity, head.chain, seq, &prev, &columns);
            head.seq = seq;
            head.hash = hash.to_vec();
            let out = (head.identity.clone(), head.chain, seq, prev, hash);
            STATEMENTS.with(|s| s.borrow_mut().insert(key, head));
            out
        }
    };
    let set = |e: pgrx::datum::TryFromDatumError| VaultError::Internal(e.to_string());
    let mut new = trigger
        .new()
        .ok_or_else(|| VaultError::Internal("no new row".into()))?
        .into_owned();
    new.set_by_name("chain_id", chain_id).map_err(set)?;
    new.set_by_name("chain_seq", seq).map_err(set)?;
    new.set_by_name("prev_hash", prev).map_err(set)?;
    new.set_by_name("row_hash", hash.to_vec()).map_err(set)?;
    Ok(new)
}

/// The attribute values of a heap tuple, NULL as None.
///
/// # Safety
///
/// `tuple` must be a valid heap tuple formed with `tupdesc` (or an earlier version of it with
/// fewer attributes), and `tupdesc` a valid descriptor. By-reference datums in the result point
/// into `tuple` and are valid only as long as it is.
unsafe fn deform(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
) -> Vec<Option<pg_sys::Datum>> {
    // SAFETY: the caller guarantees `tuple` and `tupdesc` are valid and match;
    // heap_deform_tuple writes `natts` entries, exactly the length of both vectors.
    unsafe {
        let natts = (*tupdesc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        values
            .into_iter()
            .zip(nulls)
            .map(|(v, n)| (!n).then_some(v))
            .collect()
    }
}

fn columns_of(
    values: &[Option<pg_sys::Datum>],
    attrs: &[(usize, String, pg_sys::Oid)],
) -> Vec<(String, Value)> {
    let _pinned = attrs
        .iter()
        .any(|(i, _, typid)| values[*i].is_some() && pins_output(*typid))
        .then(PinnedOutput::enter);
    attrs
        .iter()
        .map(|(i, name, typid)| (name.clone(), datum_value(values[*i], *typid)))
        .collect()
}

/// Index of a named attribute of the given type in a tuple descriptor: a chain field is read as
/// its datum type only when the column really is of that type.
fn attribute_index(
    tupdesc: pg_sys::TupleDesc,
    name: &str,
    typid: pg_sys::BuiltinOid,
) -> Option<usize> {
    // SAFETY: its one caller, export_row, passes the `tupdesc` of the current SPI result, valid
    // until SPI_finish; the wrapper is local and never releases the descriptor.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
    desc.iter()
        .position(|a| !a.attisdropped && a.name() == name && a.atttypid == pg_sys::Oid::from(typid))
}

/// Calls `each` with every tuple of the current SPI result (`SPI_tuptable`) and its descriptor.
///
/// # Safety
///
/// Call inside an SPI connection, right after the query (or cursor fetch) whose result is to be
/// read, with no other command run on that connection in between: `SPI_tuptable` and
/// `SPI_processed` must describe that result. `each` must not run commands on the same
/// connection (a nested `Spi::connect` is fine: SPI_finish restores both variables).
unsafe fn for_each_spi_tuple(mut each: impl FnMut(pg_sys::HeapTuple, pg_sys::TupleDesc)) {
    // SAFETY: by the caller's guarantee `SPI_tuptable` is null or the result just produced,
    // allocated in the SPI procedure's memory and valid until SPI_finish; `vals` holds
    // `SPI_processed` tuples, so every `add(i)` stays in bounds.
    unsafe {
        let tt = pg_sys::SPI_tuptable;
        if tt.is_null() {
            return;
        }
        for i in 0..pg_sys::SPI_processed as usize {
            each(*(*tt).vals.add(i), (*tt).tupdesc);
        }
    }
}

/// In restore mode, a row that arrives with all its chain fields keeps them, and the chain's head
/// moves forward to it. Returns None for a row without chain fields (it is chained normally).
fn restored_row<'a>(
    trigger: &'a PgTrigger<'a>,
    relid: u32,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, VaultError> {
    let new = trigger
        .new()
        .ok_or_else(|| VaultError::Internal("no new row".into()))?;
    let get = |e: pgrx::datum::TryFromDatumError| VaultError::Internal(e.to_string());
    let chain_id = new.get_by_name::<i32>("chain_id").map_err(get)?;
    let seq = new.get_by_name::<i64>("chain_seq").map_err(get)?;
    let prev = new
        .get_by_name::<&[u8]>("prev_hash")
        .map_err(get)?
        .map(<[u8]>::to_vec);
    let hash = new
        .get_by_name::<&[u8]>("row_hash")
        .map_err(get)?
        .map(<[u8]>::to_vec);
    let (Some(chain_id), Some(seq), Some(_), Some(hash)) = (chain_id, seq, prev, hash) else {
        return Ok(None);
    };
    let _owner = AsOwner::enter();
    Spi::connect_mut(|c| {
        c.update(
            &format!("INSERT INTO vault.chain_heads AS h (identity, chain_id, seq, head_hash)
             SELECT p.identity, $2, $3, $4 FROM vault.protected_tables p
              WHERE {} OPERATOR(pg_catalog.=) $1
             ON CONFLICT (identity, chain_id) DO UPDATE SET seq = EXCLUDED.seq, head_hash = EXCLUDED.head_hash
             WHERE h.seq < EXCLUDED.seq", registered_oid()),
            None,
            &[pg_sys::Oid::from(relid).into(), chain_id.into(), seq.into(), hash.as_slice().into()],
        )
        .map(|_| ())
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(Some(new.into_owned()))
}

fn export_row(table: &str, tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> ExportRow {
    // SAFETY: its one caller, scan_rows, passes a tuple of the current SPI result with that
    // result's own descriptor (from for_each_spi_tuple); both live until the next fetch, and the
    // row is converted into an owned ExportRow before this function returns.
    let values = unsafe { deform(tuple, tupdesc) };
    use pg_sys::BuiltinOid::{BYTEAOID, INT4OID, INT8OID};
    // A chain field of another type than the vault's (vault_protect_table refuses tables that
    // have such columns) reads as missing, never as the wrong representation.
    let get = |name: &str, typid| attribute_index(tupdesc, name, typid).and_then(|i| values[i]);
    let hash32 = |d: Option<pg_sys::Datum>| -> Option<[u8; 32]> {
        // SAFETY: `d` comes from `get(.., BYTEAOID)`: a non-null datum of a bytea column of the
        // current SPI tuple, so a live varlena; its bytes are copied out at once.
        d.and_then(|d| unsafe { <Vec<u8> as FromDatum>::from_datum(d, false) })
            .and_then(|v| v.try_into().ok())
    };
    let link = match (
        get("chain_id", INT4OID),
        get("chain_seq", INT8OID),
        hash32(get("prev_hash", BYTEAOID)),
        hash32(get("row_hash", BYTEAOID)),
    ) {
        (Some(chain), Some(seq), Some(prev), Some(hash)) => {
            (chain.value() as i32, seq.value() as i64, prev, hash)
        }
        // A row missing any chain field belongs to no chain; the verifier reports it as such.
        _ => (chain::UNCHAINED, 0, GENESIS, GENESIS),
    };
    ExportRow {
        table: table.to_owned(),
        chain: link.0,
        seq: link.1,
        prev_hash: link.2,
        row_hash: link.3,
        columns: columns_of(&values, &hashed_attributes(tupdesc)),
    }
}

/// A registered protected table: its OID, the name it had when protected, and its identity in
/// hashes and checkpoints.
pub struct Protected {
    pub relid: pg_sys::Oid,
    pub name: String,
    pub identity: String,
}

/// A protected table as the catalog shows it now, resolved by OID.
struct LiveTable {
    owner: pg_sys::Oid,
    /// Schema-qualified and quoted, for statements built after the table is locked.
    quoted: String,
}

/// The table behind a registration, provided it is still the same plain, permanent table that
/// carries the vault's append-only trigger; None for anything else (a view or a temp table that
/// took its place, a dropped table, an OID reused). Call with the table locked.
fn live_table(relid: pg_sys::Oid) -> Result<Option<LiveTable>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT c.relowner, pg_catalog.format('%I.%I', n.nspname, c.relname) AS quoted
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
              WHERE c.oid OPERATOR(pg_catalog.=) $1 AND c.relkind OPERATOR(pg_catalog.=) 'r'
                AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                             WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid
                               AND t.tgname OPERATOR(pg_catalog.=) 'vault_append_only'
                               AND t.tgfoid OPERATOR(pg_catalog.=) 'vault.refuse_modification()'::pg_catalog.regprocedure)",
            Some(1),
            &[relid.into()],
        )?;
        match rows.into_iter().next() {
            None => Ok::<_, pgrx::spi::Error>(None),
            Some(row) => Ok(Some(LiveTable {
                owner: row.get_by_name::<pg_sys::Oid, _>("relowner")?.unwrap_or(pg_sys::Oid::INVALID),
                quoted: row.get_by_name::<String, _>("quoted")?.unwrap_or_default(),
            })),
        }
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

/// Takes `lock` on `relid`, waiting at most `vsql_vault.verify_lock_timeout` milliseconds.
/// A table's owner can hold ACCESS EXCLUSIVE on it for as long as they like; a verification
/// must not hang behind that.
fn lock_within_timeout(relid: pg_sys::Oid, lock: u32) -> bool {
    let attempts = (settings::VERIFY_LOCK_TIMEOUT_MS.get().max(0) / 10) + 1;
    for attempt in 0..attempts {
        // SAFETY: called inside a transaction (scan_rows serves the verify and export SQL calls);
        // locking a relation by OID is valid for any OID, even one no longer in use (the table
        // is checked again by live_table once locked), and `lock` is a valid lock mode.
        if unsafe { pg_sys::ConditionalLockRelationOid(relid, lock as pg_sys::LOCKMODE) } {
            return true;
        }
        if attempt + 1 < attempts {
            pgrx::check_for_interrupts!();
            // SAFETY: a plain sleep, valid in any backend; no pointers involved.
            unsafe { pg_sys::pg_usleep(10_000) };
        }
    }
    false
}

/// Why a registered table could not be read, as a verdict rather than an error.
pub enum Unreadable {
    Missing,
    Locked,
}

/// Streams the rows of a protected table in chain order to `each`. The table is found by OID,
/// locked, checked to be the table that was protected, and read as its owner under
/// `SECURITY_RESTRICTED_OPERATION`: output functions of its column types are user code.
fn scan_rows(
    relid: pg_sys::Oid,
    identity: &str,
    from_seq: i64,
    mut each: impl FnMut(ExportRow),
) -> Result<Result<(), Unreadable>, VaultError> {
    if !lock_within_timeout(relid, pg_sys::AccessShareLock) {
        return Ok(Err(Unreadable::Locked));
    }
    let Some(table) = live_table(relid)? else {
        return Ok(Err(Unreadable::Missing));
    };
    let query = format!(
        "SELECT {} FROM ONLY {} WHERE chain_seq IS NULL OR chain_seq >= $1 ORDER BY chain_id NULLS FIRST, chain_seq",
        stored_columns(relid)?,
        table.quoted
    );
    let _table_owner = AsTableOwner::enter(table.owner);
    Spi::connect(|c| {
        let mut cursor = c.try_open_cursor(query.as_str(), &[from_seq.into()])?;
        loop {
            let batch = cursor.fetch(1000)?;
            if batch.is_empty() {
                break;
            }
            // SAFETY: right after `cursor.fetch` inside this SPI connection: `SPI_tuptable` is that
            // batch, left alive by `batch` until the end of the iteration. `each` is the caller's
            // pure Rust callback and runs no command on this connection.
            unsafe { for_each_spi_tuple(|t, d| each(export_row(identity, t, d))) };
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(|e| VaultError::Internal(format!("reading {} failed: {e}", table.quoted)))?;
    Ok(Ok(()))
}

/// The protected tables, or one, by OID.
pub fn protected_tables(only: Option<pg_sys::Oid>) -> Result<Vec<Protected>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect(|c| {
        let mut out = Vec::new();
        let registered = registered_oid();
        for row in c.select(
            &format!("SELECT {registered} AS relid, p.table_name, p.identity FROM vault.protected_tables p
             WHERE $1 IS NULL OR {registered} OPERATOR(pg_catalog.=) $1
             ORDER BY p.id"),
            None,
            &[only.into()],
        )? {
            out.push(Protected {
                relid: row
                    .get_by_name::<pg_sys::Oid, _>("relid")?
                    .unwrap_or(pg_sys::Oid::INVALID),
                name: row.get_by_name::<String, _>("table_name")?.unwrap_or_default(),
                identity: row.get_by_name::<String, _>("identity")?.unwrap_or_default(),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

pub fn load_checkpoints(identity: Option<&str>) -> Result<Vec<Checkpoint>, VaultError> {
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            "SELECT table_identity, chain, seq, head_hash, signed_at_us, key_id, signature FROM vault.audit_checkpoints
             WHERE $1 IS NULL OR table_identity OPERATOR(pg_catalog.=) $1 ORDER BY id",
            None,
            &[identity.into()],
        )? {
            let mut head = [0u8; 32];
            let text = |name: &str| row.get_by_name::<String, _>(name).map(Option::unwrap_or_default);
            let bytes = |name: &str| row.get_by_name::<Vec<u8>, _>(name);
            if let Some(h) = bytes("head_hash")?.filter(|h| h.len() == 32) {
                head.copy_from_slice(&h);
            }
            out.push(Checkpoint {
                table: text("table_identity")?,
                chain: row.get_by_name::<i32, _>("chain")?.unwrap_or(0),
                seq: row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
                head_hash: head,
                signed_at: row.get_by_name::<i64, _>("signed_at_us")?.unwrap_or(0),
                key_id: text("key_id")?,
                signature: hex::encode(bytes("signature")?.unwrap_or_default()),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

pub fn public_keys() -> Result<Vec<ed25519_dalek::VerifyingKey>, VaultError> {
    let texts = Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select("SELECT public_key FROM vault.signing_keys", None, &[])? {
            out.extend(row.get_by_name::<String, _>("public_key")?);
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(texts
        .iter()
        .filter_map(|t| vsql_vault_core::keys::parse_public(t).ok())
        .collect())
}

/// Checks every chain of the protected tables (or one), with the checkpoints and known keys.
pub fn verify(only: Option<pg_sys::Oid>) -> Result<Vec<chain::ChainReport>, VaultError> {
    let tables = protected_tables(only)?;
    if only.is_some() && tables.is_empty() {
        return Err(VaultError::NotProtected(format!(
            "relation {}",
            only.map(|o| o.to_u32()).unwrap_or(0)
        )));
    }
    let keys = {
        let _owner = AsOwner::enter();
        public_keys()?
    };
    let mut reports = Vec::new();
    for table in tables {
        let checkpoints = {
            let _owner = AsOwner::enter();
            load_checkpoints(Some(&table.identity))?
        };
        let mut v = Verifier::new(checkpoints, &keys);
        let unreadable = match scan_rows(table.relid, &table.identity, 0, |row| v.push(&row))? {
            Ok(()) => None,
            Err(Unreadable::Missing) => Some(format!(
                "protected table {} is missing or is no longer the table that was protected (dropped around the guard?)",
                table.name
            )),
            Err(Unreadable::Locked) => Some(format!(
                "protected table {} was not verified: another session holds a lock on it (vsql_vault.verify_lock_timeout)",
                table.name
            )),
        };
        if let Some(detail) = unreadable {
            reports.push(chain::ChainReport {
                table: table.identity.clone(),
                chain: Some(0),
                rows_checked: 0,
                first_bad_seq: None,
                ok: false,
                detail,
            });
            continue;
        }
        let mut r = v.finish();
        if r.is_empty() {
            r.push(chain::ChainReport {
                table: table.identity.clone(),
                chain: Some(0),
                rows_checked: 0,
                first_bad_seq: None,
                ok: true,
                detail: "no rows".into(),
            });
        }
        reports.extend(r);
    }
    Ok(reports)
}

/// The rows of one protected table as JSON lines. Reading them takes SELECT on the table: an
/// auditor's role alone does not open a team's table.
pub fn export(
    caller: &crate::identity::Caller,
    table_oid: pg_sys::Oid,
    from_seq: i64,
) -> Result<Vec<String>, VaultError> {
    let tables = protected_tables(Some(table_oid))?;
    let table = tables
        .first()
        .ok_or_else(|| VaultError::NotProtected(format!("relation {}", table_oid.to_u32())))?;
    let may_read = {
        let _owner = AsOwner::enter();
        crate::identity::select_one::<bool>(
            "SELECT pg_catalog.has_table_privilege($1, $2, 'SELECT')",
            &[caller.role_oid.into(), table_oid.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    };
    if !may_read {
        return Err(VaultError::Denied(format!(
            "role \"{}\" has no SELECT privilege on {}",
            caller.role_name, table.name
        )));
    }
    let mut lines = Vec::new();
    let read = scan_rows(table.relid, &table.identity, from_seq, |row| {
        lines.push(serde_json::to_string(&row).unwrap_or_default())
    })?;
    match read {
        Ok(()) => Ok(lines),
        Err(Unreadable::Missing) => Err(VaultError::NotProtected(format!(
            "{} (missing, or no longer the table that was protected)",
            table.name
        ))),
        Err(Unreadable::Locked) => Err(VaultError::Locked(table.name.clone())),
    }
}

pub fn export_checkpoints() -> Result<Vec<String>, VaultError> {
    let _owner = AsOwner::enter();
    Ok(load_checkpoints(None)?
        .iter()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
        .collect())
}

/// Signs the head of every chain that moved since its last checkpoint. Returns how many.
pub fn checkpoint() -> Result<i64, VaultError> {
    let key = keys::current()?;
    let key_id = keys::register(&key).map_err(|e| VaultError::Internal(e.to_string()))?;
    let _owner = AsOwner::enter();
    let heads = Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            &format!("SELECT h.identity, h.chain_id, h.seq, h.head_hash
             FROM vault.chain_heads h JOIN vault.protected_tables p ON p.identity = h.identity
             WHERE h.seq > 0 AND {} <> 'vault.audit_checkpoints'::regclass
               AND h.seq > COALESCE((SELECT max(k.seq) FROM vault.audit_checkpoints k
                                     WHERE k.table_identity = h.identity AND k.chain = h.chain_id), 0)
             ORDER BY 1, 2", registered_oid()),
            None,
            &[],
        )? {
            out.push((
                row.get_by_name::<String, _>("identity")?.unwrap_or_default(),
                row.get_by_name::<i32, _>("chain_id")?.unwrap_or(0),
                row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
                row.get_by_name::<Vec<u8>, _>("head_hash")?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    let signed_at = crate::identity::now_micros();
    let mut lines = Vec::new();
    for (table, chain_id, seq, head) in &heads {
        let msg = Checkpoint::message(table, *chain_id, *seq, head, signed_at, &key_id);
        let sig = vsql_vault_core::keys::sign(&key, &msg);
        let _writing = VaultWriting::enter();
        Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO vault.audit_checkpoints
                    (checkpointed_at, table_identity, chain, seq, head_hash, signed_at_us, key_id, signature)
                 VALUES (now(), $1, $2, $3, $4, $5, $6, $7)",
                None,
                &[
                    table.as_str().into(),
                    (*chain_id).into(),
                    (*seq).into(),
                    head.as_slice().into(),
                    signed_at.into(),
                    key_id.as_str().into(),
                    sig.as_slice().into(),
                ],
            )
            .map(|_| ())
        })
        .map_err(|e| VaultError::Internal(e.to_string()))?;
        let mut head32 = [0u8; 32];
        if head.len() == 32 {
            head32.copy_from_slice(head);
        }
        let cp = Checkpoint {
            table: table.clone(),
            chain: *chain_id,
            seq: *seq,
            head_hash: head32,
            signed_at,
            key_id: key_id.clone(),
            signature: hex::encode(sig),
        };
        lines.push(serde_json::to_string(&cp).unwrap_or_default());
    }
    if let Some(path) = settings::CHECKPOINT_EXPORT_PATH
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty())
    {
        if !lines.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    VaultError::Internal(format!(
                        "cannot append checkpoints to {path}: {}",
                        e.kind()
                    ))
                })?;
            for l in &lines {
                writeln!(f, "{l}").map_err(|e| {
                    VaultError::Internal(format!("cannot write {path}: {}", e.kind()))
                })?;
            }
            f.sync_all()
                .map_err(|e| VaultError::Internal(format!("cannot sync {path}: {}", e.kind())))?;
        }
    }
    Ok(heads.len() as i64)
}

/// Removes the registration `identity` of a protected table that no longer exists (a temporary
/// table of 0.1.0 whose session ended, a table dropped while the event triggers were off).
/// Returns what the chains had reached, for the record. Refused while the table is there.
pub fn forget_missing(identity: &str) -> Result<serde_json::Value, VaultError> {
    let _owner = AsOwner::enter();
    let registered = protected_tables(None)?
        .into_iter()
        .find(|t| t.identity == identity)
        .ok_or_else(|| VaultError::NotProtected(identity.to_owned()))?;
    if registered.relid != pg_sys::Oid::INVALID && live_table(registered.relid)?.is_some() {
        return Err(VaultError::CannotForget(registered.name));
    }
    let heads = Spi::connect_mut(|c| {
        let mut heads = Vec::new();
        for row in c.update(
            "DELETE FROM vault.chain_heads WHERE identity OPERATOR(pg_catalog.=) $1
             RETURNING chain_id, seq, head_hash",
            None,
            &[identity.into()],
        )? {
            heads.push(serde_json::json!({
                "chain": row.get_by_name::<i32, _>("chain_id")?,
                "seq": row.get_by_name::<i64, _>("seq")?,
                "head_hash": hex::encode(row.get_by_name::<Vec<u8>, _>("head_hash")?.unwrap_or_default()),
            }));
        }
        c.update(
            "DELETE FROM vault.protected_tables WHERE identity OPERATOR(pg_catalog.=) $1",
            None,
            &[identity.into()],
        )?;
        Ok::<_, pgrx::spi::Error>(heads)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(serde_json::json!({ "identity": identity, "table": registered.name, "heads": heads }))
}

/// Sets the relation the DDL guard lets vault_protect_table's own commands touch, and clears it
/// again however protection ends.
struct Protecting(u32);

impl Protecting {
    fn enter(relid: pg_sys::Oid) -> Protecting {
        Protecting(PROTECTING.with(|p| p.replace(relid.to_u32())))
    }
}

impl Drop for Protecting {
    fn drop(&mut self) {
        let previous = self.0;
        PROTECTING.with(|p| p.set(previous));
    }
}

/// What protection needs to know about a table, read from the catalog by OID.
struct Candidate {
    owner: pg_sys::Oid,
    schema: String,
    name: String,
    kind: String,
    persistence: String,
    in_inheritance: bool,
    triggers: bool,
    rules: bool,
    policies: bool,
    /// A column named like one of the chain's own fields exists already.
    chain_columns: bool,
    registered: bool,
}

fn candidate(relid: pg_sys::Oid) -> Result<Option<Candidate>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect(|c| {
        let rows = c.select(
            &format!("SELECT c.relowner, n.nspname::pg_catalog.text AS schema, c.relname::pg_catalog.text AS name,
                    c.relkind::pg_catalog.text AS kind, c.relpersistence::pg_catalog.text AS persistence,
                    (c.relispartition OR c.relhassubclass OR c.reloftype OPERATOR(pg_catalog.<>) 0 OR EXISTS (
                        SELECT 1 FROM pg_catalog.pg_inherits i
                         WHERE i.inhrelid OPERATOR(pg_catalog.=) c.oid
                            OR i.inhparent OPERATOR(pg_catalog.=) c.oid)) AS in_inheritance,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                             WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid AND NOT t.tgisinternal) AS triggers,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r
                             WHERE r.ev_class OPERATOR(pg_catalog.=) c.oid) AS rules,
                    (c.relforcerowsecurity OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
                             WHERE p.polrelid OPERATOR(pg_catalog.=) c.oid)) AS policies,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
                               AND NOT a.attisdropped
                               AND a.attname OPERATOR(pg_catalog.=) ANY ('{{chain_id,chain_seq,prev_hash,row_hash}}'::pg_catalog.name[])) AS chain_columns,
                    EXISTS (SELECT 1 FROM vault.protected_tables p
                             WHERE {} OPERATOR(pg_catalog.=) c.oid) AS registered
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
              WHERE c.oid OPERATOR(pg_catalog.=) $1", registered_oid()),
            Some(1),
            &[relid.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok::<_, pgrx::spi::Error>(None);
        };
        let flag = |name: &str| row.get_by_name::<bool, _>(name).map(|b| b.unwrap_or(false));
        let text = |name: &str| row.get_by_name::<String, _>(name).map(|t| t.unwrap_or_default());
        Ok(Some(Candidate {
            owner: row
                .get_by_name::<pg_sys::Oid, _>("relowner")?
                .unwrap_or(pg_sys::Oid::INVALID),
            schema: text("schema")?,
            name: text("name")?,
            kind: text("kind")?,
            persistence: text("persistence")?,
            in_inheritance: flag("in_inheritance")?,
            triggers: flag("triggers")?,
            rules: flag("rules")?,
            policies: flag("policies")?,
            chain_columns: flag("chain_columns")?,
            registered: flag("registered")?,
        }))
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

/// The rules a user's table must meet to be protected. A protected table keeps no triggers,
/// rules or row-security policies but the vault's own (the DDL guard refuses new ones), so one
/// that already has them is refused rather than protected with code nobody reviewed around its
/// chain; temp and unlogged tables vanish without a record.
fn protection_refusal(t: &Candidate) -> Option<VaultError> {
    if t.kind != "r" {
        return Some(VaultError::NotATable);
    }
    if t.persistence == "t" {
        return Some(VaultError::CannotProtect(
            "a temporary table vanishes with its session, without any record".into(),
        ));
    }
    if t.persistence == "u" {
        return Some(VaultError::CannotProtect(
            "an unlogged table is emptied by a crash, without any record".into(),
        ));
    }
    if t.in_inheritance {
        return Some(VaultError::CannotProtect(
            "the table is part of an inheritance tree or of partitioning, or is a typed table"
                .into(),
        ));
    }
    // The vault adds these columns itself: a same-named column of another type would be read as
    // the chain's (a bigint taken for a bytea pointer), and rows whose chain fields were filled
    // before protection would be taken for chained ones.
    if t.chain_columns {
        return Some(VaultError::CannotProtect(
            "the table already has a column named chain_id, chain_seq, prev_hash or row_hash, which the vault adds itself"
                .into(),
        ));
    }
    if t.triggers || t.rules || t.policies {
        return Some(VaultError::CannotProtect(
            "the table has triggers, rules or row-security policies of its own; drop them first"
                .into(),
        ));
    }
    None
}

/// Makes `table_oid` append-only and hash-chained: registers it, adds the chain fields, chains
/// the rows it already holds, and installs the triggers (ENABLE ALWAYS). The work on the table
/// itself runs as the table's owner under `SECURITY_RESTRICTED_OPERATION`, never with the
/// vault's rights: constraints, index expressions and generated columns are its owner's code.
/// The extension's own tables (`builtin`) carry triggers of the vault's and skip those checks.
pub fn protect(
    table_oid: pg_sys::Oid,
    chains: i32,
    builtin: bool,
    protected_by: &str,
) -> Result<String, VaultError> {
    let _protecting = Protecting::enter(table_oid);
    // Held to the end of the transaction: nothing changes the table between the checks and the DDL.
    // SAFETY: called by protect_table_impl / protect_builtin, inside a transaction; any
    // OID can be locked (a missing table is then reported by `candidate`), and AccessExclusiveLock
    // is a valid lock mode.
    unsafe { pg_sys::LockRelationOid(table_oid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
    let table = candidate(table_oid)?.ok_or(VaultError::NotATable)?;
    let display = format!("{}.{}", table.schema, table.name);
    if table.registered {
        return Ok(display);
    }
    if table.kind != "r" {
        return Err(VaultError::NotATable);
    }
    if !builtin {
        if let Some(refusal) = protection_refusal(&table) {
            return Err(refusal);
        }
    }
    let quoted = format!(
        "{}.{}",
        spi::quote_identifier(&table.schema),
        spi::quote_identifier(&table.name)
    );
    {
        let _owner = AsOwner::enter();
        Spi::connect_mut(|c| {
            // Before the update from 0.1.0 the registration has no relid: the table is found by
            // the name recorded here until the update fills it in.
            let register = if registry_by_oid() {
                "INSERT INTO vault.protected_tables (id, table_name, identity, chains, protected_by, relid)
                 SELECT n.id, $2, $2 OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) n.id, $3, $4, $1
                   FROM (SELECT pg_catalog.nextval('vault.protected_tables_id_seq') AS id) n"
            } else {
                "INSERT INTO vault.protected_tables (id, table_name, identity, chains, protected_by)
                 SELECT n.id, $2, $2 OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) n.id, $3, $4
                   FROM (SELECT pg_catalog.nextval('vault.protected_tables_id_seq') AS id,
                                $1::pg_catalog.oid AS relid) n"
            };
            c.update(
                register,
                None,
                &[
                    table_oid.into(),
                    display.as_str().into(),
                    chains.into(),
                    protected_by.into(),
                ],
            )?;
            c.update(
                &format!("INSERT INTO vault.chain_heads (identity, chain_id)
                 SELECT p.identity, g FROM vault.protected_tables p, pg_catalog.generate_series(0, $2 OPERATOR(pg_catalog.-) 1) g
                  WHERE {} OPERATOR(pg_catalog.=) $1", registered_oid()),
                None,
                &[table_oid.into(), chains.into()],
            )
            .map(|_| ())
        })
        .map_err(|e| VaultError::Internal(e.to_string()))?;
    }
    let _table_owner = AsTableOwner::enter(table.owner);
    Spi::run(&format!(
        "ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS chain_id int, ADD COLUMN IF NOT EXISTS chain_seq bigint,
             ADD COLUMN IF NOT EXISTS prev_hash bytea, ADD COLUMN IF NOT EXISTS row_hash bytea"
    ))
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    chain_existing_rows(table_oid, &quoted)?;
    {
        // An index is a schema object: it needs CREATE on the table's schema, which an
        // application role owning its table often lacks. Built by the bootstrap superuser, still
        // restricted: on two plain columns with the built-in operator classes (only a superuser
        // can add one), building it evaluates no expression and calls no function of anyone's.
        let _builder = AsTableOwner::enter(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID));
        let index = spi::quote_identifier(format!("{}_vault_chain", table.name));
        Spi::run(&format!(
            "CREATE UNIQUE INDEX {index} ON {quoted}
                 (chain_id pg_catalog.int4_ops, chain_seq pg_catalog.int8_ops)"
        ))
        .map_err(|e| VaultError::Internal(e.to_string()))?;
    }
    Spi::run(&format!(
        "CREATE TRIGGER vault_chain BEFORE INSERT ON {quoted} FOR EACH ROW EXECUTE FUNCTION vault.chain_row();
         CREATE TRIGGER vault_append_only BEFORE UPDATE OR DELETE ON {quoted}
             FOR EACH ROW EXECUTE FUNCTION vault.refuse_modification();
         CREATE TRIGGER vault_chain_flush AFTER INSERT ON {quoted}
             FOR EACH STATEMENT EXECUTE FUNCTION vault.chain_flush();
         CREATE TRIGGER vault_no_truncate BEFORE TRUNCATE ON {quoted}
             FOR EACH STATEMENT EXECUTE FUNCTION vault.refuse_modification();
         ALTER TABLE {quoted} ENABLE ALWAYS TRIGGER vault_chain, ENABLE ALWAYS TRIGGER vault_append_only,
             ENABLE ALWAYS TRIGGER vault_no_truncate, ENABLE ALWAYS TRIGGER vault_chain_flush;"
    ))
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(display)
}

/// Rows a table held before it was protected are chained in physical order on chain 0. Called as
/// the table's owner; the chain head is read and written as the vault's owner.
fn chain_existing_rows(relid: pg_sys::Oid, quoted: &str) -> Result<(), VaultError> {
    let columns = stored_columns(relid)?;
    let rows: Vec<(String, Vec<(String, Value)>)> = Spi::connect(|c| {
        let mut out = Vec::new();
        c.select(&format!("SELECT ctid::pg_catalog.text AS vault_ctid, {columns} FROM ONLY {quoted} WHERE chain_id IS NULL ORDER BY ctid"), None, &[])?;
        // SAFETY: right after that select on this connection, so `SPI_tuptable` is its result
        // (valid until SPI_finish, at the end of this closure). Each tuple is deformed with the
        // result's own descriptor, and its values are copied into owned Rust data before the
        // next tuple; the callback runs no SPI command.
        unsafe {
            for_each_spi_tuple(|t, d| {
                let values = deform(t, d);
                // Column 0 is the ctid this query adds; the table's own columns follow.
                let attrs: Vec<_> = hashed_attributes(d).into_iter().filter(|(i, ..)| *i != 0).collect();
                if let Value::Text(ctid) = datum_value(values[0], pg_sys::TEXTOID) {
                    out.push((ctid, columns_of(&values, &attrs)));
                }
            })
        };
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    if rows.is_empty() {
        return Ok(());
    }
    let (identity, chain_id, mut seq, mut prev) = {
        let _owner = AsOwner::enter();
        take_chain_zero(relid)?
    };
    for (ctid, cols) in rows {
        seq += 1;
        let hash = chain::row_hash(&identity, chain_id, seq, &prev, &cols);
        Spi::connect_mut(|c| {
            c.update(
                &format!("UPDATE ONLY {quoted} SET chain_id = $1, chain_seq = $2, prev_hash = $3, row_hash = $4 WHERE ctid = $5::pg_catalog.tid"),
                None,
                &[chain_id.into(), seq.into(), prev.as_slice().into(), hash.as_slice().into(), ctid.as_str().into()],
            )
            .map(|_| ())
        })
        .map_err(|e| VaultError::Internal(e.to_string()))?;
        prev = hash.to_vec();
    }
    let _owner = AsOwner::enter();
    advance_chain(&identity, chain_id, seq, &prev)
}

fn take_chain_zero(relid: pg_sys::Oid) -> Result<(String, i32, i64, Vec<u8>), VaultError> {
    Spi::connect_mut(|c| {
        let row = c
            .update(
                &format!("SELECT h.identity, h.seq, h.head_hash FROM vault.chain_heads h JOIN vault.protected_tables p
                   ON p.identity OPERATOR(pg_catalog.=) h.identity
                 WHERE {} OPERATOR(pg_catalog.=) $1 AND h.chain_id OPERATOR(pg_catalog.=) 0
                 FOR UPDATE OF h", registered_oid()),
                None,
                &[relid.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>((
            row.get_by_name::<String, _>("identity")?.unwrap_or_default(),
            0,
            row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
            row.get_by_name::<Vec<u8>, _>("head_hash")?.unwrap_or(GENESIS.to_vec()),
        ))
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}
