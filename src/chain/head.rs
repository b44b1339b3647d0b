//! Chain heads: taking a chain for a transaction (a free one if any), writing its head back,
//! and the batch a single writer holds for many rows (`ChainBatch`).

use super::*;

thread_local! {
    pub(crate) static CURSOR: RefCell<Option<Cursor>> = const { RefCell::new(None) };
    /// The chain this backend's current transaction already holds, per table, so that a
    /// transaction inserting many rows stays on one chain.
    pub(crate) static HELD: RefCell<HashMap<u32, (pg_sys::TransactionId, i32)>> = RefCell::new(HashMap::new());
}

/// A chain a single writer holds for a whole batch (the audit writer and the access log): rows
/// are linked in memory and the head is written back once, when the batch is done.
pub(crate) struct Cursor {
    pub(crate) relid: u32,
    pub(crate) head: Head,
}

macro_rules! chain_query {
    ($lock:literal, $registered:expr) => {
        concat!(
            "SELECT h.chain_id, h.seq, h.head_hash, h.identity FROM vault.chain_heads h
             WHERE h.identity OPERATOR(pg_catalog.=) (SELECT p.identity FROM vault.protected_tables p
                                                       WHERE ",
            $registered,
            " OPERATOR(pg_catalog.=) $1)
               AND h.chain_id OPERATOR(pg_catalog.>=) $4 AND h.chain_id OPERATOR(pg_catalog.<=) $5
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
#[derive(Clone)]
pub struct Head {
    pub(crate) identity: String,
    pub(crate) chain: i32,
    pub(crate) seq: i64,
    pub(crate) hash: Vec<u8>,
}

/// Which chains of a table a transaction may take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ChainUse {
    /// The single batch writer of one of the extension's own tables (the audit writer, a purge
    /// batch, the checkpointer): chain 0 only, so that it never waits behind a caller's
    /// transaction.
    Writer,
    /// A row inserted in a caller's own transaction: any chain of a user table; for the access
    /// log (a break-glass record), its chains other than 0, so that an open transaction holding
    /// its record never blocks the audit writer, and the caller's own audited calls later in
    /// that transaction do not wait for the writer behind themselves. Chain 0 only where a table
    /// has no other (the access log of a 0.1.0 schema before ALTER EXTENSION UPDATE).
    Caller,
}

/// The range of chain numbers `usage` takes in `table`, then the range to fall back to when the
/// table has no chain in the first.
pub(crate) fn chain_ranges(table: u32, usage: ChainUse) -> [(i32, i32); 2] {
    match usage {
        ChainUse::Writer => [(0, 0), (0, 0)],
        ChainUse::Caller if has_writer_chain(table) => [(1, i32::MAX), (0, 0)],
        ChainUse::Caller => [(0, i32::MAX), (0, i32::MAX)],
    }
}

/// Whether `table` is one of the extension's own logs whose chain 0 belongs to a single batch
/// writer (the audit writer, the retention worker): the access log, and the purge log, whose
/// callers' proofs (a re-put's superseded version, `vault_delete`, `vault_purge_sweep`) take the
/// other chains with SKIP LOCKED, so that concurrent puts do not wait for each other's commit
/// behind one head row.
fn has_writer_chain(table: u32) -> bool {
    ["vault.access_log", "vault.purge_log"]
        .iter()
        .any(|name| vault_relation(name).map(|o| o.to_u32()) == Some(table))
}

/// Locks a chain of relation `table` for this transaction (a free one if any, among those `usage`
/// may take) and returns its head.
pub(crate) fn take_chain(table: u32, usage: ChainUse) -> Result<Head, VaultError> {
    if usage == ChainUse::Caller {
        if let Some(head) = super::held::held(table) {
            return Ok(head);
        }
    }
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
    let ranges = chain_ranges(table, usage);
    let found = Spi::connect_mut(|c| {
        let queries = if registry_by_oid() {
            TAKE_CHAIN
        } else {
            TAKE_CHAIN_BY_NAME
        };
        for ((low, high), query) in ranges
            .into_iter()
            .flat_map(|range| queries.into_iter().map(move |q| (range, q)))
        {
            let args = [
                pg_sys::Oid::from(table).into(),
                pid.into(),
                held.into(),
                low.into(),
                high.into(),
            ];
            let stmt = plans::plan(c, query, &[OID, INT4, INT4, INT4, INT4], true)?;
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
    if usage == ChainUse::Caller {
        super::held::hold(table, &found);
    }
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
        // The batch writers (the audit writer, the retention worker) keep chain 0 to themselves;
        // a batch written in a caller's transaction (a re-put's superseded version, vault_delete,
        // vault_purge_sweep) takes a free caller chain, so that concurrent callers do not queue
        // behind one head row until each other's commit.
        // SAFETY: a plain read of a process global set once at process start.
        let usage = if unsafe { pg_sys::MyBackendType } == pg_sys::BackendType::B_BG_WORKER {
            ChainUse::Writer
        } else {
            ChainUse::Caller
        };
        let head = take_chain(relid, usage)?;
        CURSOR.with(|c| *c.borrow_mut() = Some(Cursor { relid, head }));
        Ok(ChainBatch { finished: false })
    }

    pub fn finish(mut self) -> Result<(), VaultError> {
        self.finished = true;
        match CURSOR.with(|c| c.borrow_mut().take()) {
            // A caller's transaction writes the head back at its commit (`held`).
            Some(cur) if super::held::advance(cur.relid, &cur.head) => Ok(()),
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

pub(crate) fn advance_chain(
    table: &str,
    chain: i32,
    seq: i64,
    head: &[u8],
) -> Result<(), VaultError> {
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

pub(crate) fn take_chain_zero(
    relid: pg_sys::Oid,
) -> Result<(String, i32, i64, Vec<u8>), VaultError> {
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
