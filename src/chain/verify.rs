//! Reading protected tables back: the rows of a table found by OID, locked and read as its owner,
//! for verification (`vault_verify_audit`) and export (`vault_export_audit`).

use super::*;

pub(crate) fn export_row(
    table: &str,
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
) -> ExportRow {
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
pub(crate) struct LiveTable {
    owner: pg_sys::Oid,
    /// Schema-qualified and quoted, for statements built after the table is locked.
    quoted: String,
}

/// The table behind a registration, provided it is still the same plain, permanent table that
/// carries the vault's append-only trigger; None for anything else (a view or a temp table that
/// took its place, a dropped table, an OID reused). Call with the table locked.
pub(crate) fn live_table(relid: pg_sys::Oid) -> Result<Option<LiveTable>, VaultError> {
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
pub(crate) fn lock_within_timeout(relid: pg_sys::Oid, lock: u32) -> bool {
    lock_within(relid, lock, settings::VERIFY_LOCK_TIMEOUT_MS.get())
}

/// Takes `lock` on `relid`, trying every 10 ms for at most `timeout_ms` milliseconds.
pub(crate) fn lock_within(relid: pg_sys::Oid, lock: u32, timeout_ms: i32) -> bool {
    let attempts = (timeout_ms.max(0) / 10) + 1;
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
pub(crate) fn scan_rows(
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

/// Checks every chain of the protected tables (or one), with the checkpoints and known keys.
pub fn verify(only: Option<pg_sys::Oid>) -> Result<Vec<chain::ChainReport>, VaultError> {
    let tables = protected_tables(only)?;
    if only.is_some() && tables.is_empty() {
        return Err(VaultError::NotProtected(format!(
            "relation {}",
            only.map(|o| o.to_u32()).unwrap_or(0)
        )));
    }
    // Only keys on the chain of trust of vault.signing_keys: a key added behind the triggers'
    // back signs nothing verification accepts.
    let trust = trusted_keys()?;
    let keys: Vec<ed25519_dalek::VerifyingKey> = trust.trusted.values().copied().collect();
    let mut reports = Vec::new();
    if only.is_none() {
        reports.push(chain::ChainReport {
            table: "vault.signing_keys (trust)".into(),
            chain: None,
            rows_checked: (trust.trusted.len() + trust.untrusted.len()) as i64,
            first_bad_seq: None,
            ok: trust.untrusted.is_empty(),
            detail: trust.summary(),
        });
    }
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
    caller: &crate::security::Caller,
    table_oid: pg_sys::Oid,
    from_seq: i64,
) -> Result<Vec<String>, VaultError> {
    let tables = protected_tables(Some(table_oid))?;
    let table = tables
        .first()
        .ok_or_else(|| VaultError::NotProtected(format!("relation {}", table_oid.to_u32())))?;
    let may_read = {
        let _owner = AsOwner::enter();
        crate::pg::select_one::<bool>(
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
