//! Protecting a table (`vault_protect_table`): the checks that refuse what cannot be protected,
//! the registration, chaining the rows it already holds, the triggers; and forgetting a
//! registration whose table is gone.

use super::*;

thread_local! {
    /// The relation vault_protect_table is protecting right now (0 for none): the DDL guard lets
    /// the protection's own commands on that one relation through, and nothing else.
    static PROTECTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
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
        crate::pg::select_one::<String>(
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
    register(table_oid, &display, chains, protected_by)?;
    install(&table, &quoted, table_oid)?;
    Ok(display)
}

/// Records the table in vault.protected_tables and creates its chain heads.
fn register(
    table_oid: pg_sys::Oid,
    display: &str,
    chains: i32,
    protected_by: &str,
) -> Result<(), VaultError> {
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
                    display.into(),
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
        .map_err(|e| VaultError::Internal(e.to_string()))
}

/// Adds the chain fields, chains the rows already there, and creates the index and the triggers,
/// as the table's owner.
fn install(table: &Candidate, quoted: &str, table_oid: pg_sys::Oid) -> Result<(), VaultError> {
    let _table_owner = AsTableOwner::enter(table.owner);
    Spi::run(&format!(
        "ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS chain_id int, ADD COLUMN IF NOT EXISTS chain_seq bigint,
             ADD COLUMN IF NOT EXISTS prev_hash bytea, ADD COLUMN IF NOT EXISTS row_hash bytea"
    ))
    .map_err(|e| VaultError::Internal(e.to_string()))?;
    chain_existing_rows(table_oid, quoted)?;
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
    Ok(())
}

/// Rows read, hashed and chained per round of `chain_existing_rows`.
const EXISTING_ROWS_CHUNK: i64 = 50_000;

/// Rows a table held before it was protected are chained in physical order on chain 0. Called as
/// the table's owner; the chain head is read and written as the vault's owner. The rows are read
/// through a cursor and hashed in Rust, and each chunk's chain fields are written by one UPDATE
/// (from arrays, by ctid), rather than one statement per row.
fn chain_existing_rows(relid: pg_sys::Oid, quoted: &str) -> Result<(), VaultError> {
    let columns = stored_columns(relid)?;
    let (identity, chain_id, mut seq, mut prev) = {
        let _owner = AsOwner::enter();
        take_chain_zero(relid)?
    };
    let start = seq;
    let internal = |e: pgrx::spi::Error| VaultError::Internal(e.to_string());
    // A sequential scan from block 0 returns the rows in physical order without a sort of the
    // whole table (a synchronized scan could start in the middle). Each chunk's rows are then
    // found by ctid (a TID scan per row): a hash or merge join would read the whole table for
    // every chunk. The cursor's snapshot does not see the versions the UPDATEs make.
    let _settings = crate::pg::TemporarySetting::set_all(&[
        (c"synchronize_seqscans", "off"),
        (c"enable_hashjoin", "off"),
        (c"enable_mergejoin", "off"),
    ]);
    Spi::connect_mut(|c| {
        let mut cursor = c.try_open_cursor(
            format!("SELECT ctid::pg_catalog.text AS vault_ctid, {columns} FROM ONLY {quoted} WHERE chain_id IS NULL").as_str(),
            &[],
        )?;
        let update = format!(
            "UPDATE ONLY {quoted} t SET chain_id = $1, chain_seq = u.seq, prev_hash = u.prev, row_hash = u.hash
               FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]::pg_catalog.tid[]),
                               pg_catalog.unnest($3::pg_catalog.int8[]), pg_catalog.unnest($4::pg_catalog.bytea[]),
                               pg_catalog.unnest($5::pg_catalog.bytea[])) AS u(tid, seq, prev, hash)
              WHERE t.ctid OPERATOR(pg_catalog.=) u.tid"
        );
        loop {
            let (mut ctids, mut seqs, mut prevs, mut hashes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            {
                let _rows = cursor.fetch(EXISTING_ROWS_CHUNK as _)?;
                let mut attrs = None;
                // SAFETY: right after that fetch on this connection, so `SPI_tuptable` is its
                // result (valid until SPI_finish). Each tuple is deformed with the result's own
                // descriptor, and its values are hashed before the next tuple; the callback runs
                // no SPI command.
                unsafe {
                    for_each_spi_tuple(|t, d| {
                        let values = deform(t, d);
                        // Column 0 is the ctid this query adds; the table's own columns follow.
                        let attrs = attrs.get_or_insert_with(|| {
                            hashed_attributes(d).into_iter().filter(|(i, ..)| *i != 0).collect::<Vec<_>>()
                        });
                        if let Value::Text(ctid) = datum_value(values[0], pg_sys::TEXTOID) {
                            seq += 1;
                            let hash = chain::row_hash(&identity, chain_id, seq, &prev, &columns_of(&values, attrs));
                            ctids.push(ctid);
                            seqs.push(seq);
                            prevs.push(std::mem::replace(&mut prev, hash.to_vec()));
                            hashes.push(hash.to_vec());
                        }
                    })
                };
            }
            if ctids.is_empty() {
                break;
            }
            c.update(
                &update,
                None,
                &[chain_id.into(), ctids.into(), seqs.into(), prevs.into(), hashes.into()],
            )?;
        }
        Ok::<_, pgrx::spi::Error>(())
    })
    .map_err(internal)?;
    if seq == start {
        return Ok(());
    }
    let _owner = AsOwner::enter();
    advance_chain(&identity, chain_id, seq, &prev)
}
