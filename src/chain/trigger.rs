//! The chain trigger: links each inserted row of a protected table to its chain (per statement
//! in memory, handed to the transaction's held chain by the AFTER STATEMENT trigger, the head
//! written once at commit: `held`), and keeps the chain fields a restored row carries in restore
//! mode.

use super::*;

thread_local! {
    /// Chains held by the statements running in this backend, per table: the rows of one
    /// statement are linked in memory and the head is written back once, by the AFTER STATEMENT
    /// trigger. (Writing the head row back for every row made a 20,000-row INSERT ... SELECT
    /// quadratic: each update of the same row inside one transaction lengthens its version chain.)
    pub(crate) static STATEMENTS: RefCell<HashMap<(u32, StatementKey), Head>> = RefCell::new(HashMap::new());
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
pub(crate) type StatementKey = (pg_sys::TransactionId, pg_sys::SubTransactionId);

pub(crate) fn statement_key() -> StatementKey {
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
    // The transaction holds the chain and writes its head back once, at commit (`held`).
    for head in done {
        if !super::held::advance(table, &head) {
            advance_chain(&head.identity, head.chain, head.seq, &head.hash)?;
        }
    }
    for head in super::restore::linked_heads(table, (xid, subxid)) {
        advance_chain(&head.identity, head.chain, head.seq, &head.hash)?;
    }
    Ok(())
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
const EVIDENCE_TABLES: [&str; 5] = [
    "vault.access_log",
    "vault.audit_checkpoints",
    "vault.key_directives",
    "vault.purge_log",
    "vault.signing_keys",
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
    let evidence = EVIDENCE_TABLES.contains(&table.as_str());
    let vault_writing = VAULT_WRITING.with(|w| w.get());
    // A row that carries all its chain fields (a restored dump's COPY) may be kept as it is.
    let carried = if vault_writing {
        None
    } else {
        super::restore::carried_chain_fields(trigger)?
    };
    if evidence && !vault_writing && carried.is_none() && !settings::RESTORE_MODE.get() {
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
    // borrowed from the tuple are turned into owned `Value`s before the block below ends.
    let shape = unsafe { row_shape(relid, (*td.tg_relation).rd_att) };
    // SAFETY: as above.
    let columns = unsafe {
        let values = deform(td.tg_trigtuple, (*td.tg_relation).rd_att);
        hashed_values(&values, &shape.hashed)
    };
    if let Some(fields) = carried.as_ref().filter(|_| !settings::RESTORE_MODE.get()) {
        if super::restore::links_to_head(relid, fields, &columns)? {
            return Ok(trigger
                .new()
                .ok_or_else(|| VaultError::Internal("no new row".into()))?
                .into_owned());
        }
        // A user table's row that does not continue its chain is chained anew, as before; an
        // evidence row comes from the vault or from a dump of an intact chain, nothing else.
        if evidence {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "rows of {table} are written by vsql_vault only: a row with chain fields is accepted only when it continues its chain (row {} of chain {}), as the rows of a dump of an intact chain do, in chain order",
                    fields.seq, fields.chain
                )
            );
        }
    }
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
                None => take_chain(relid, ChainUse::Caller)?,
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
    with_chain_fields(trigger, &shape, chain_id, seq, &prev, &hash)
}

/// The new row with its chain fields set, formed once (four `set_by_name` calls formed it four
/// times over, a measurable share of a purge proof's cost).
fn with_chain_fields<'a>(
    trigger: &'a PgTrigger<'a>,
    shape: &RowShape,
    chain_id: i32,
    seq: i64,
    prev: &[u8],
    hash: &[u8],
) -> Result<PgHeapTuple<'a, AllocatedByRust>, VaultError> {
    let td = trigger.trigger_data();
    // SAFETY: in a BEFORE INSERT row trigger `tg_relation` is the open target relation and
    // `tg_trigtuple` the new row, formed with its descriptor `rd_att`; both stay valid for the
    // whole trigger call. The three arrays have exactly `natts` entries, as heap_modify_tuple
    // reads; each replaced slot holds a datum of the column's own type (the shape found each
    // field with its type, for this very descriptor), made in the current memory context, which
    // heap_modify_tuple copies into the new tuple. That tuple is formed with the same descriptor.
    unsafe {
        let tupdesc = (*td.tg_relation).rd_att;
        let natts = usize::try_from((*tupdesc).natts).unwrap_or(0);
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        let mut replace = vec![false; natts];
        let fields = [
            chain_id.into_datum(),
            seq.into_datum(),
            prev.into_datum(),
            hash.into_datum(),
        ];
        for ((datum, index), name) in fields
            .into_iter()
            .zip(shape.chain_fields)
            .zip(CHAIN_COLUMNS)
        {
            let i = index.filter(|i| *i < natts).ok_or_else(|| {
                VaultError::Internal(format!(
                    "the chain field {name} is missing or of another type"
                ))
            })?;
            values[i] = datum.unwrap_or(pg_sys::Datum::from(0usize));
            replace[i] = true;
        }
        let tuple = pg_sys::heap_modify_tuple(
            td.tg_trigtuple,
            tupdesc,
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
            replace.as_mut_ptr(),
        );
        Ok(
            PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(tupdesc), tuple)
                .into_owned(),
        )
    }
}

/// In restore mode, a row that arrives with all its chain fields keeps them, and the chain's head
/// moves forward to it. Returns None for a row without chain fields (it is chained normally).
fn restored_row<'a>(
    trigger: &'a PgTrigger<'a>,
    relid: u32,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, VaultError> {
    let Some(fields) = super::restore::carried_chain_fields(trigger)? else {
        return Ok(None);
    };
    let (chain_id, seq, hash) = (fields.chain, fields.seq, fields.hash);
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
    let new = trigger
        .new()
        .ok_or_else(|| VaultError::Internal("no new row".into()))?;
    Ok(Some(new.into_owned()))
}
