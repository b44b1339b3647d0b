//! Tamper-evident audit: hash-chained append-only tables, signed checkpoints, export and
//! verification. The row hash, the checkpoint message and the verifier all come from
//! `vsql_vault_core::chain`, which the offline tool uses too.

use crate::errors::VaultError;
use crate::identity::AsOwner;
use crate::plans::{self, types::*};
use crate::{keys, settings};
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io::Write;
use vsql_vault_core::canonical::Value;
use vsql_vault_core::chain::{self, Checkpoint, ExportRow, Verifier, CHAIN_COLUMNS, GENESIS};

/// A column value in its canonical form. Types whose text output depends on session settings
/// (timestamps, dates) are taken in their internal form; others by their output function.
pub fn datum_value(datum: Option<pg_sys::Datum>, typid: pg_sys::Oid) -> Value {
    let Some(d) = datum else {
        return Value::Null;
    };
    unsafe {
        match pg_sys::BuiltinOid::from_u32(typid.to_u32()) {
            Ok(pg_sys::BuiltinOid::BOOLOID) => Value::Bool(d.value() != 0),
            Ok(pg_sys::BuiltinOid::INT2OID) => Value::Int(i64::from(d.value() as i16)),
            Ok(pg_sys::BuiltinOid::INT4OID) => Value::Int(i64::from(d.value() as i32)),
            Ok(pg_sys::BuiltinOid::INT8OID) => Value::Int(d.value() as i64),
            Ok(pg_sys::BuiltinOid::OIDOID) => Value::Int(i64::from(d.value() as u32)),
            Ok(pg_sys::BuiltinOid::DATEOID) => Value::Int(i64::from(d.value() as i32)),
            Ok(pg_sys::BuiltinOid::TIMESTAMPTZOID | pg_sys::BuiltinOid::TIMESTAMPOID) => {
                Value::Timestamp(d.value() as i64)
            }
            Ok(pg_sys::BuiltinOid::BYTEAOID) => {
                Value::Bytes(<Vec<u8> as FromDatum>::from_datum(d, false).unwrap_or_default())
            }
            _ => {
                let mut out = pg_sys::Oid::INVALID;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(typid, &mut out, &mut varlena);
                let p = pg_sys::OidOutputFunctionCall(out, d);
                Value::Text(CStr::from_ptr(p).to_string_lossy().into_owned())
            }
        }
    }
}

/// The hashed columns of a table: live, not generated, not the chain's own fields.
fn hashed_attributes(tupdesc: pg_sys::TupleDesc) -> Vec<(usize, String, pg_sys::Oid)> {
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
    table: String,
    head: Head,
}

thread_local! {
    static CURSOR: RefCell<Option<Cursor>> = const { RefCell::new(None) };
    /// Set while vault_protect_table itself alters the table it protects.
    pub static PROTECTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The chain this backend's current transaction already holds, per table, so that a
    /// transaction inserting many rows stays on one chain.
    static HELD: RefCell<HashMap<String, (pg_sys::TransactionId, i32)>> = RefCell::new(HashMap::new());
    /// Chains held by the statements running in this backend, per table: the rows of one
    /// statement are linked in memory and the head is written back once, by the AFTER STATEMENT
    /// trigger. (Writing the head row back for every row made a 20,000-row INSERT ... SELECT
    /// quadratic: each update of the same row inside one transaction lengthens its version chain.)
    static STATEMENTS: RefCell<HashMap<(String, StatementKey), Head>> = RefCell::new(HashMap::new());
}

/// The (transaction, subtransaction) a statement runs in. Not the command id: the chain's own
/// queries advance it between rows. A statement's entry ends with its AFTER STATEMENT trigger, or
/// with its (sub)transaction when it fails.
type StatementKey = (pg_sys::TransactionId, pg_sys::SubTransactionId);

fn statement_key() -> StatementKey {
    unsafe {
        (
            pg_sys::GetTopTransactionId(),
            pg_sys::GetCurrentSubTransactionId(),
        )
    }
}

/// AFTER STATEMENT: writes back the heads the statement's rows advanced in memory.
pub fn flush_statement(trigger: &PgTrigger) -> Result<(), VaultError> {
    let table = qualified_name(trigger)?;
    let (xid, subxid) = statement_key();
    let done: Vec<Head> = STATEMENTS.with(|s| {
        let mut s = s.borrow_mut();
        // Entries of transactions that are over (an error ended them) are dropped on the way.
        s.retain(|(_, k), _| k.0 == xid);
        let keys: Vec<(String, StatementKey)> = s
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

macro_rules! chain_query {
    ($lock:literal) => {
        concat!(
            "SELECT h.chain_id, h.seq, h.head_hash, h.identity FROM vault.chain_heads h
             WHERE h.identity OPERATOR(pg_catalog.=) (SELECT p.identity FROM vault.protected_tables p
                                                       WHERE p.table_name OPERATOR(pg_catalog.=) $1)
             ORDER BY h.chain_id OPERATOR(pg_catalog.=) $3 DESC, h.chain_id OPERATOR(pg_catalog.#) $2
             LIMIT 1 FOR UPDATE OF h",
            $lock
        )
    };
}
const TAKE_CHAIN: &str = chain_query!(" SKIP LOCKED");
const WAIT_CHAIN: &str = chain_query!("");
const ADVANCE_CHAIN: &str = "UPDATE vault.chain_heads SET seq = $3, head_hash = $4
     WHERE identity OPERATOR(pg_catalog.=) $1 AND chain_id OPERATOR(pg_catalog.=) $2";

/// A locked chain: the table's identity, the chain, and its head.
pub struct Head {
    identity: String,
    chain: i32,
    seq: i64,
    hash: Vec<u8>,
}

/// Locks a chain of `table` for this transaction (a free one if any) and returns its head.
fn take_chain(table: &str) -> Result<Head, VaultError> {
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    let held = HELD
        .with(|h| {
            h.borrow()
                .get(table)
                .filter(|(x, _)| *x == xid)
                .map(|(_, c)| *c)
        })
        .unwrap_or(-1);
    let pid = unsafe { pg_sys::MyProcPid };
    let _owner = AsOwner::enter();
    let found = Spi::connect_mut(|c| {
        let args = [table.into(), pid.into(), held.into()];
        for query in [TAKE_CHAIN, WAIT_CHAIN] {
            let stmt = plans::plan(c, query, &[TEXT, INT4, INT4], true)?;
            let rows = c.update(&*stmt, None, &args)?;
            if let Some(row) = rows.into_iter().next() {
                return Ok(Some(Head {
                    chain: row.get::<i32>(1)?.unwrap_or(0),
                    seq: row.get::<i64>(2)?.unwrap_or(0),
                    hash: row.get::<Vec<u8>>(3)?.unwrap_or_default(),
                    identity: row.get::<String>(4)?.unwrap_or_default(),
                }));
            }
        }
        Ok::<_, pgrx::spi::Error>(None)
    })
    .map_err(|e| VaultError::Internal(format!("taking a chain head failed: {e}")))?;
    let found = found.ok_or_else(|| VaultError::NotProtected(table.to_owned()))?;
    HELD.with(|h| h.borrow_mut().insert(table.to_owned(), (xid, found.chain)));
    Ok(found)
}

/// Locks `table`'s chain for the rest of the transaction and links the rows this process inserts
/// into it in memory, until `end_batch` writes the head back. For a table with one writer.
pub fn begin_batch(table: &str) -> Result<(), VaultError> {
    CURSOR.with(|c| *c.borrow_mut() = None);
    let head = take_chain(table)?;
    CURSOR.with(|c| {
        *c.borrow_mut() = Some(Cursor {
            table: table.to_owned(),
            head,
        })
    });
    Ok(())
}

/// Writes the batch's final head back (in the same transaction as its rows).
pub fn end_batch() -> Result<(), VaultError> {
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

/// Forgets a batch whose transaction failed.
pub fn abandon_batch() {
    CURSOR.with(|c| *c.borrow_mut() = None);
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
    let columns = unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let values = deform(td.tg_trigtuple, tupdesc);
        columns_of(&values, &hashed_attributes(tupdesc))
    };
    if settings::RESTORE_MODE.get() {
        if let Some(kept) = restored_row(trigger, &table)? {
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
        Some(mut cur) if cur.table == table => {
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
            let key = (table.clone(), statement_key());
            let held = STATEMENTS.with(|s| s.borrow_mut().remove(&key));
            let mut head = match held {
                Some(head) => head,
                None => take_chain(&table)?,
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
unsafe fn deform(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
) -> Vec<Option<pg_sys::Datum>> {
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
    attrs
        .iter()
        .map(|(i, name, typid)| (name.clone(), datum_value(values[*i], *typid)))
        .collect()
}

/// Index of a named attribute in a tuple descriptor.
fn attribute_index(tupdesc: pg_sys::TupleDesc, name: &str) -> Option<usize> {
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
    desc.iter()
        .position(|a| !a.attisdropped && a.name() == name)
}

/// Calls `each` with every tuple of the current SPI result (`SPI_tuptable`) and its descriptor.
unsafe fn for_each_spi_tuple(mut each: impl FnMut(pg_sys::HeapTuple, pg_sys::TupleDesc)) {
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
    table: &str,
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
            "INSERT INTO vault.chain_heads AS h (identity, chain_id, seq, head_hash)
             SELECT p.identity, $2, $3, $4 FROM vault.protected_tables p WHERE p.table_name = $1
             ON CONFLICT (identity, chain_id) DO UPDATE SET seq = EXCLUDED.seq, head_hash = EXCLUDED.head_hash
             WHERE h.seq < EXCLUDED.seq",
            None,
            &[table.into(), chain_id.into(), seq.into(), hash.as_slice().into()],
        )
        .map(|_| ())
    })
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(Some(new.into_owned()))
}

fn export_row(table: &str, tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> ExportRow {
    let values = unsafe { deform(tuple, tupdesc) };
    let get = |name: &str| attribute_index(tupdesc, name).and_then(|i| values[i]);
    let hash32 = |d: Option<pg_sys::Datum>| -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Some(v) = d.and_then(|d| unsafe { <Vec<u8> as FromDatum>::from_datum(d, false) }) {
            if v.len() == 32 {
                out.copy_from_slice(&v);
            }
        }
        out
    };
    ExportRow {
        table: table.to_owned(),
        chain: get("chain_id").map(|d| d.value() as i32).unwrap_or(-1),
        seq: get("chain_seq").map(|d| d.value() as i64).unwrap_or(0),
        prev_hash: hash32(get("prev_hash")),
        row_hash: hash32(get("row_hash")),
        columns: columns_of(&values, &hashed_attributes(tupdesc)),
    }
}

/// Streams the rows of a protected table in chain order to `each`.
fn scan_rows(
    table: &str,
    identity: &str,
    from_seq: i64,
    mut each: impl FnMut(ExportRow),
) -> Result<(), VaultError> {
    let query = format!(
        "SELECT * FROM {} WHERE chain_seq IS NULL OR chain_seq >= $1 ORDER BY chain_id NULLS FIRST, chain_seq",
        table.split('.').map(spi::quote_identifier).collect::<Vec<_>>().join(".")
    );
    Spi::connect(|c| {
        let mut cursor = c.try_open_cursor(query.as_str(), &[from_seq.into()])?;
        loop {
            let batch = cursor.fetch(1000)?;
            if batch.is_empty() {
                break;
            }
            unsafe { for_each_spi_tuple(|t, d| each(export_row(identity, t, d))) };
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(|e| VaultError::Internal(format!("reading {table} failed: {e}")))
}

/// (name, identity) of the protected tables, or of one.
pub fn protected_tables(only: Option<pg_sys::Oid>) -> Result<Vec<(String, String)>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            "SELECT table_name, identity FROM vault.protected_tables
             WHERE $1 IS NULL OR vault.table_oid(table_name) OPERATOR(pg_catalog.=) $1
             ORDER BY table_name",
            None,
            &[only.into()],
        )? {
            if let (Some(t), Some(i)) = (row.get::<String>(1)?, row.get::<String>(2)?) {
                out.push((t, i));
            }
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
            if let Some(h) = row.get::<Vec<u8>>(4)?.filter(|h| h.len() == 32) {
                head.copy_from_slice(&h);
            }
            out.push(Checkpoint {
                table: row.get::<String>(1)?.unwrap_or_default(),
                chain: row.get::<i32>(2)?.unwrap_or(0),
                seq: row.get::<i64>(3)?.unwrap_or(0),
                head_hash: head,
                signed_at: row.get::<i64>(5)?.unwrap_or(0),
                key_id: row.get::<String>(6)?.unwrap_or_default(),
                signature: hex::encode(row.get::<Vec<u8>>(7)?.unwrap_or_default()),
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
            out.extend(row.get::<String>(1)?);
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
    let _owner = AsOwner::enter();
    let keys = public_keys()?;
    let mut reports = Vec::new();
    for (table, identity) in tables {
        let exists = crate::identity::select_one::<bool>(
            "SELECT vault.table_oid($1) IS NOT NULL",
            &[table.as_str().into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !exists {
            reports.push(chain::ChainReport {
                table: identity.clone(),
                chain: 0,
                rows_checked: 0,
                first_bad_seq: None,
                ok: false,
                detail: format!(
                    "protected table {table} is missing (dropped or renamed around the guard?)"
                ),
            });
            continue;
        }
        let mut v = Verifier::new(load_checkpoints(Some(&identity))?, &keys);
        scan_rows(&table, &identity, 0, |row| v.push(&row))?;
        let mut r = v.finish();
        if r.is_empty() {
            r.push(chain::ChainReport {
                table: identity.clone(),
                chain: 0,
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

pub fn export(table_oid: pg_sys::Oid, from_seq: i64) -> Result<Vec<String>, VaultError> {
    let tables = protected_tables(Some(table_oid))?;
    let (table, identity) = tables
        .first()
        .ok_or_else(|| VaultError::NotProtected(format!("relation {}", table_oid.to_u32())))?;
    let _owner = AsOwner::enter();
    let mut lines = Vec::new();
    scan_rows(table, identity, from_seq, |row| {
        lines.push(serde_json::to_string(&row).unwrap_or_default())
    })?;
    Ok(lines)
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
            "SELECT h.identity, h.chain_id, h.seq, h.head_hash
             FROM vault.chain_heads h JOIN vault.protected_tables p ON p.identity = h.identity
             WHERE h.seq > 0 AND p.table_name <> 'vault.audit_checkpoints'
               AND h.seq > COALESCE((SELECT max(k.seq) FROM vault.audit_checkpoints k
                                     WHERE k.table_identity = h.identity AND k.chain = h.chain_id), 0)
             ORDER BY 1, 2",
            None,
            &[],
        )? {
            out.push((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<i32>(2)?.unwrap_or(0),
                row.get::<i64>(3)?.unwrap_or(0),
                row.get::<Vec<u8>>(4)?.unwrap_or_default(),
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

fn quote_qualified(table: &str) -> String {
    table
        .split('.')
        .map(spi::quote_identifier)
        .collect::<Vec<_>>()
        .join(".")
}

/// Makes `table` append-only and hash-chained: adds the chain fields, chains the rows it already
/// holds, and installs the triggers (ENABLE ALWAYS).
pub fn protect(table_oid: pg_sys::Oid, chains: i32) -> Result<String, VaultError> {
    struct Protecting;
    impl Drop for Protecting {
        fn drop(&mut self) {
            PROTECTING.with(|p| p.set(false));
        }
    }
    PROTECTING.with(|p| p.set(true));
    let _protecting = Protecting;
    let _owner = AsOwner::enter();
    let name = crate::identity::select_one::<String>(
        "SELECT n.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) c.relname
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.oid OPERATOR(pg_catalog.=) $1 AND c.relkind OPERATOR(pg_catalog.=) 'r'",
        &[table_oid.into()],
    )
    .ok()
    .flatten()
    .ok_or(VaultError::NotATable)?;
    let q = quote_qualified(&name);
    let ddl = format!(
        "ALTER TABLE {q} ADD COLUMN IF NOT EXISTS chain_id int, ADD COLUMN IF NOT EXISTS chain_seq bigint,
             ADD COLUMN IF NOT EXISTS prev_hash bytea, ADD COLUMN IF NOT EXISTS row_hash bytea;
         CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {q} (chain_id, chain_seq);
         INSERT INTO vault.protected_tables (id, table_name, identity, chains)
             SELECT n.id, {lit}, {lit} || '/' || n.id, {chains}
             FROM (SELECT pg_catalog.nextval('vault.protected_tables_id_seq') AS id) n
             WHERE NOT EXISTS (SELECT 1 FROM vault.protected_tables WHERE table_name = {lit});
         INSERT INTO vault.chain_heads (identity, chain_id)
             SELECT p.identity, g FROM vault.protected_tables p, pg_catalog.generate_series(0, {last}) g
             WHERE p.table_name = {lit} ON CONFLICT DO NOTHING;",
        idx = spi::quote_identifier(format!("{}_vault_chain", name.rsplit('.').next().unwrap_or("t"))),
        lit = spi::quote_literal(&name),
        last = chains - 1,
    );
    Spi::run(&ddl).map_err(|e| VaultError::Internal(e.to_string()))?;
    chain_existing_rows(&name)?;
    let triggers = format!(
        "CREATE OR REPLACE TRIGGER vault_chain BEFORE INSERT ON {q} FOR EACH ROW EXECUTE FUNCTION vault.chain_row();
         CREATE OR REPLACE TRIGGER vault_append_only BEFORE UPDATE OR DELETE ON {q}
             FOR EACH ROW EXECUTE FUNCTION vault.refuse_modification();
         CREATE OR REPLACE TRIGGER vault_chain_flush AFTER INSERT ON {q}
             FOR EACH STATEMENT EXECUTE FUNCTION vault.chain_flush();
         CREATE OR REPLACE TRIGGER vault_no_truncate BEFORE TRUNCATE ON {q}
             FOR EACH STATEMENT EXECUTE FUNCTION vault.refuse_modification();
         ALTER TABLE {q} ENABLE ALWAYS TRIGGER vault_chain, ENABLE ALWAYS TRIGGER vault_append_only,
             ENABLE ALWAYS TRIGGER vault_no_truncate, ENABLE ALWAYS TRIGGER vault_chain_flush;"
    );
    Spi::run(&triggers).map_err(|e| VaultError::Internal(e.to_string()))?;
    Ok(name)
}

/// Rows a table held before it was protected are chained in physical order on chain 0.
fn chain_existing_rows(table: &str) -> Result<(), VaultError> {
    let q = quote_qualified(table);
    let rows: Vec<(String, Vec<(String, Value)>)> = Spi::connect(|c| {
        let mut out = Vec::new();
        c.select(&format!("SELECT ctid::pg_catalog.text AS vault_ctid, * FROM {q} WHERE chain_id IS NULL ORDER BY ctid"), None, &[])?;
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
    let (identity, chain_id, mut seq, mut prev) = take_chain_zero(table)?;
    for (ctid, cols) in rows {
        seq += 1;
        let hash = chain::row_hash(&identity, chain_id, seq, &prev, &cols);
        Spi::connect_mut(|c| {
            c.update(
                &format!("UPDATE {q} SET chain_id = $1, chain_seq = $2, prev_hash = $3, row_hash = $4 WHERE ctid = $5::tid"),
                None,
                &[chain_id.into(), seq.into(), prev.as_slice().into(), hash.as_slice().into(), ctid.as_str().into()],
            )
            .map(|_| ())
        })
        .map_err(|e| VaultError::Internal(e.to_string()))?;
        prev = hash.to_vec();
    }
    advance_chain(&identity, chain_id, seq, &prev)
}

fn take_chain_zero(table: &str) -> Result<(String, i32, i64, Vec<u8>), VaultError> {
    Spi::connect_mut(|c| {
        let row = c
            .update(
                "SELECT h.identity, h.seq, h.head_hash FROM vault.chain_heads h JOIN vault.protected_tables p
                   ON p.identity = h.identity
                 WHERE p.table_name = $1 AND h.chain_id = 0 FOR UPDATE OF h",
                None,
                &[table.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>((
            row.get::<String>(1)?.unwrap_or_default(),
            0,
            row.get::<i64>(2)?.unwrap_or(0),
            row.get::<Vec<u8>>(3)?.unwrap_or(GENESIS.to_vec()),
        ))
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}
