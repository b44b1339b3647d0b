//! A plain `pg_dump` / `pg_restore` of a vault database, with no special setting.
//!
//! Two things stood in its way. The rows of the evidence tables arrive by COPY, which the chain
//! trigger refused as direct inserts; now a row that carries all its chain fields is kept when it
//! links to its chain's head exactly (next sequence number, the head's hash as its link, and its
//! own hash recomputed from its contents), and the head moves to it: a dump of an intact chain
//! restores, anything else is refused. The extension marks those tables to be dumped in chain
//! order (`ORDER BY chain_id, chain_seq` as their dump condition) so their rows arrive in the order
//! that links. And the DDL guard refused the commands with which pg_restore rebuilds a protected
//! user table after its rows: its constraints, and the vault's own triggers. Those are let
//! through when they only rebuild the protection (`protection_restored`).

use super::trigger::{statement_key, StatementKey};
use super::*;
use pgrx::PgList;

thread_local! {
    /// Chains whose restored rows a running statement has linked in memory, per table, chain and
    /// statement; written back by the AFTER STATEMENT trigger with the statement's other heads.
    pub(crate) static LINKED: RefCell<HashMap<(u32, i32, StatementKey), Head>> = RefCell::new(HashMap::new());
}

/// The four chain fields a new row arrives with.
pub(crate) struct CarriedFields {
    pub(crate) chain: i32,
    pub(crate) seq: i64,
    prev: Vec<u8>,
    pub(crate) hash: Vec<u8>,
}

/// The chain fields a new row carries, when it carries all four.
pub(crate) fn carried_chain_fields(
    trigger: &PgTrigger,
) -> Result<Option<CarriedFields>, VaultError> {
    let new = trigger
        .new()
        .ok_or_else(|| VaultError::Internal("no new row".into()))?;
    let get = |e: pgrx::datum::TryFromDatumError| VaultError::Internal(e.to_string());
    let chain = new.get_by_name::<i32>("chain_id").map_err(get)?;
    let seq = new.get_by_name::<i64>("chain_seq").map_err(get)?;
    let prev = new.get_by_name::<&[u8]>("prev_hash").map_err(get)?;
    let hash = new.get_by_name::<&[u8]>("row_hash").map_err(get)?;
    Ok(match (chain, seq, prev, hash) {
        (Some(chain), Some(seq), Some(prev), Some(hash)) => Some(CarriedFields {
            chain,
            seq,
            prev: prev.to_vec(),
            hash: hash.to_vec(),
        }),
        _ => None,
    })
}

/// Whether a row carrying `fields` continues its chain exactly: the next sequence number after
/// the chain's head, the head's hash as its link, and a row hash that its contents reproduce.
/// When it does, the head (held for the statement) moves to it.
pub(crate) fn links_to_head(
    relid: u32,
    fields: &CarriedFields,
    columns: &[(&str, Value)],
) -> Result<bool, VaultError> {
    let CarriedFields {
        chain,
        seq,
        prev,
        hash,
    } = fields;
    let key = (relid, *chain, statement_key());
    let held = LINKED.with(|l| l.borrow_mut().remove(&key));
    let mut head = match held {
        Some(head) => head,
        None => match take_numbered_chain(relid, *chain)? {
            Some(head) => head,
            None => return Ok(false),
        },
    };
    let expected = chain::row_hash(&head.identity, *chain, *seq, prev, columns);
    let links =
        *seq == head.seq + 1 && *prev == head.hash && expected.as_slice() == hash.as_slice();
    if links {
        head.seq = *seq;
        head.hash = hash.clone();
    }
    LINKED.with(|l| l.borrow_mut().insert(key, head));
    Ok(links)
}

/// Locks chain `chain` of relation `relid` for this transaction and returns its head; None when
/// the table has no such chain.
fn take_numbered_chain(relid: u32, chain: i32) -> Result<Option<Head>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect_mut(|c| {
        let rows = c.update(
            &format!(
                "SELECT h.identity, h.seq, h.head_hash FROM vault.chain_heads h JOIN vault.protected_tables p
                   ON p.identity OPERATOR(pg_catalog.=) h.identity
                 WHERE {} OPERATOR(pg_catalog.=) $1 AND h.chain_id OPERATOR(pg_catalog.=) $2
                 FOR UPDATE OF h",
                registered_oid()
            ),
            None,
            &[pg_sys::Oid::from(relid).into(), chain.into()],
        )?;
        match rows.into_iter().next() {
            Some(row) => Ok(Some(Head {
                identity: row.get_by_name::<String, _>("identity")?.unwrap_or_default(),
                chain,
                seq: row.get_by_name::<i64, _>("seq")?.unwrap_or(0),
                hash: row
                    .get_by_name::<Vec<u8>, _>("head_hash")?
                    .unwrap_or_default(),
            })),
            None => Ok(None),
        }
    })
    .map_err(|e: pgrx::spi::Error| VaultError::Internal(format!("taking a chain head failed: {e}")))
}

/// The heads that restored rows of `table` moved during the statement `subxid` of `xid`, taken
/// out for writing back (entries of transactions that are over are dropped on the way).
pub(crate) fn linked_heads(table: u32, (xid, subxid): StatementKey) -> Vec<Head> {
    LINKED.with(|l| {
        let mut l = l.borrow_mut();
        l.retain(|(_, _, k), _| k.0 == xid);
        let keys: Vec<_> = l
            .keys()
            .filter(|(t, _, k)| *t == table && k.1 == subxid)
            .cloned()
            .collect();
        keys.into_iter().filter_map(|k| l.remove(&k)).collect()
    })
}

/// The vault's triggers on a protected table: name, function, `tgtype` bits (row 1, before 2,
/// insert 4, delete 8, update 16, truncate 32), as `vault_protect_table` creates them.
const PROTECTION_TRIGGERS: [(&str, &str, i16); 4] = [
    (
        "vault_append_only",
        "vault.refuse_modification",
        1 | 2 | 8 | 16,
    ),
    ("vault_chain", "vault.chain_row", 1 | 2 | 4),
    ("vault_chain_flush", "vault.chain_flush", 4),
    ("vault_no_truncate", "vault.refuse_modification", 2 | 32),
];

/// Whether a DDL command on protected table `table` only rebuilds its protection, as pg_restore
/// does after restoring the table's rows: creating one of the vault's own triggers exactly as
/// `vault_protect_table` defines it, enabling one of them ALWAYS, or, while the table lacks some
/// of those triggers (a restore in progress), adding constraints and indexes. Such commands
/// cannot weaken the protection, so they need no break-glass (under break-glass they are
/// recorded like any other).
///
/// # Safety
/// `command` is the CollectedCommand that pg_event_trigger_ddl_commands() reports, live for the
/// event trigger's run.
pub(crate) unsafe fn protection_restored(
    command: &pg_sys::CollectedCommand,
    table: pg_sys::Oid,
) -> bool {
    let tree = command.parsetree;
    // Under break-glass every command goes the recorded way, these included.
    if tree.is_null() || settings::BREAK_GLASS.get() {
        return false;
    }
    // SAFETY: by the caller's guarantee the parse tree is a valid Node, and the union member read
    // is the one its command type says is filled in.
    unsafe {
        match (*tree).type_ {
            pg_sys::NodeTag::T_CreateTrigStmt
                if command.type_ == pg_sys::CollectedCommandType::SCT_Simple =>
            {
                is_protection_trigger(command.d.simple.address.objectId)
            }
            pg_sys::NodeTag::T_AlterTableStmt
                if command.type_ == pg_sys::CollectedCommandType::SCT_AlterTable =>
            {
                let subcmds =
                    PgList::<pg_sys::CollectedATSubcmd>::from_pg(command.d.alterTable.subcmds);
                let incomplete = lacks_protection_triggers(table);
                !subcmds.is_empty()
                    && subcmds.iter_ptr().all(|sub| {
                        let cmd = (*sub).parsetree;
                        !cmd.is_null()
                            && (*cmd).type_ == pg_sys::NodeTag::T_AlterTableCmd
                            && restores_protection(
                                &*cmd.cast::<pg_sys::AlterTableCmd>(),
                                incomplete,
                            )
                    })
            }
            _ => false,
        }
    }
}

fn restores_protection(cmd: &pg_sys::AlterTableCmd, incomplete: bool) -> bool {
    use pg_sys::AlterTableType as At;
    match cmd.subtype {
        At::AT_EnableAlwaysTrig => {
            let name = (!cmd.name.is_null()).then(|| {
                // SAFETY: the trigger name of an ENABLE TRIGGER subcommand is a NUL-terminated
                // string of the parse tree, checked non-null above.
                let name = unsafe { std::ffi::CStr::from_ptr(cmd.name) };
                name.to_string_lossy().into_owned()
            });
            name.is_some_and(|n| PROTECTION_TRIGGERS.iter().any(|(t, _, _)| *t == n))
        }
        At::AT_AddIndex
        | At::AT_AddConstraint
        | At::AT_AddIndexConstraint
        | At::AT_ReAddConstraint
        // ADD PRIMARY KEY also sets its columns NOT NULL.
        | At::AT_SetNotNull => incomplete,
        _ => false,
    }
}

fn is_protection_trigger(trigger: pg_sys::Oid) -> bool {
    let _owner = AsOwner::enter();
    PROTECTION_TRIGGERS.iter().any(|(name, function, tgtype)| {
        crate::pg::select_one::<bool>(
            "SELECT true FROM pg_catalog.pg_trigger t
              WHERE t.oid OPERATOR(pg_catalog.=) $1 AND t.tgname OPERATOR(pg_catalog.=) $2
                AND t.tgfoid OPERATOR(pg_catalog.=) $3::pg_catalog.regproc
                AND t.tgtype OPERATOR(pg_catalog.=) $4 AND t.tgqual IS NULL AND t.tgnargs OPERATOR(pg_catalog.=) 0
                AND t.tgattr::pg_catalog.text OPERATOR(pg_catalog.=) '' AND NOT t.tgisinternal
                AND t.tgconstraint OPERATOR(pg_catalog.=) 0",
            &[trigger.into(), (*name).into(), (*function).into(), (*tgtype).into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// Whether `table` lacks one of the vault's triggers: its rows were restored and its protection
/// is being rebuilt (or a superuser dropped one under break-glass, which is on record).
fn lacks_protection_triggers(table: pg_sys::Oid) -> bool {
    let _owner = AsOwner::enter();
    let present = crate::pg::select_one::<i64>(
        "SELECT count(*) FROM pg_catalog.pg_trigger t
          WHERE t.tgrelid OPERATOR(pg_catalog.=) $1
            AND t.tgname OPERATOR(pg_catalog.=) ANY ('{vault_append_only,vault_chain,vault_chain_flush,vault_no_truncate}')",
        &[table.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(4);
    present < 4
}
