-- Tamper-evident audit: chain bookkeeping, signing keys, checkpoints, and the protection of the
-- extension's own append-only tables. Runs last in CREATE EXTENSION.

-- Tables whose rows are hash-chained and append-only (vault_protect_table).
-- `identity` names the table inside hashes and checkpoints: its name and the number of this
-- protection, so a table dropped under break-glass and created again never inherits old evidence.
CREATE TABLE vault.protected_tables (
    id           bigserial UNIQUE,
    table_name   text PRIMARY KEY,
    identity     text UNIQUE NOT NULL,
    chains       int NOT NULL CHECK (chains BETWEEN 1 AND 256),
    builtin      bool NOT NULL DEFAULT false,
    protected_at timestamptz NOT NULL DEFAULT now(),
    protected_by name NOT NULL DEFAULT current_user,
    -- The table itself. Everything that finds a protected table (the chain trigger, the DDL guard,
    -- verification, export) goes by this OID, never by a name looked up later; as regclass it is
    -- dumped as a name and restored as the new table's OID.
    relid        regclass UNIQUE
);

-- The current head of every chain. Not evidence itself (verification recomputes everything from
-- the rows and the signed checkpoints); it is where writers find the link for the next row.
CREATE TABLE vault.chain_heads (
    identity   text NOT NULL,
    chain_id   int NOT NULL,
    seq        bigint NOT NULL DEFAULT 0,
    head_hash  bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
    PRIMARY KEY (identity, chain_id)
);

-- Public halves of the Ed25519 keys that signed checkpoints; private keys never enter SQL.
-- Append-only and chained (below). Every key after the first carries a rotation statement:
-- `rotation_signature` by key `previous_key_id` over docs/audit-format.md's
-- `vsql_vault.key_rotation` message, so in-database verification trusts only keys on that chain.
-- `retired_at` is kept from 0.1.0 (it set it at rotation); the current key is the newest row.
CREATE TABLE vault.signing_keys (
    key_id     text PRIMARY KEY,
    public_key text NOT NULL,
    source     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz,
    previous_key_id    text,
    signed_at_us       bigint,
    rotation_signature bytea
);

-- Signed chain heads. Itself append-only and chained.
CREATE TABLE vault.audit_checkpoints (
    id              bigserial PRIMARY KEY,
    checkpointed_at timestamptz NOT NULL,
    table_identity  text NOT NULL,
    chain           int NOT NULL,
    seq             bigint NOT NULL,
    head_hash       bytea NOT NULL,
    signed_at_us    bigint NOT NULL,
    key_id          text NOT NULL,
    signature       bytea NOT NULL
);
CREATE INDEX audit_checkpoints_chain ON vault.audit_checkpoints (table_identity, chain, id);

REVOKE ALL ON vault.protected_tables, vault.chain_heads, vault.signing_keys, vault.audit_checkpoints
    FROM PUBLIC;
GRANT SELECT ON vault.protected_tables, vault.chain_heads, vault.signing_keys, vault.audit_checkpoints
    TO vault_auditor, vault_admin;

-- The chain triggers run as the inserting role; their queries switch to the owner, and with it
-- to the API's search_path (AsOwner). Neither has a SET clause of its own: vault.chain_row() runs
-- per row and vault.chain_flush() per statement, and a SET clause costs a GUC save and restore
-- per call.
REVOKE ALL ON FUNCTION vault.protect_builtin(oid, int) FROM PUBLIC;

-- The issue-2 append-only triggers of the access log give way to the uniform protection.
DROP TRIGGER access_log_append_only ON vault.access_log;
DROP TRIGGER access_log_no_truncate ON vault.access_log;
-- The audit writer appends to the access log's chain 0 alone; chains 1-16 take the records
-- written in a caller's own transaction (granted puts, break-glass commands, the extension's
-- update), each held by one transaction at a time (SKIP LOCKED), so an open transaction holding
-- one never blocks the writer and concurrent puts rarely wait for each other (src/chain/head.rs,
-- ChainUse). The checkpointer alone appends to the checkpoints.
SELECT vault.protect_builtin('vault.access_log'::regclass::oid, 17);
SELECT vault.protect_builtin('vault.audit_checkpoints'::regclass::oid, 1);
UPDATE vault.protected_tables SET builtin = true;

-- pg_dump keeps user-table registrations, their chain heads, keys and checkpoints (the built-in
-- tables' registrations and heads come back with CREATE EXTENSION and move forward while their
-- rows are restored, see vsql_vault.restore_mode).
SELECT pg_catalog.pg_extension_config_dump('vault.protected_tables', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('vault.chain_heads',
    'WHERE identity NOT IN (SELECT identity FROM vault.protected_tables WHERE builtin)');
SELECT pg_catalog.pg_extension_config_dump('vault.protected_tables_id_seq', '');
-- Chained at the end of the install (sql/compliance.sql): dumped in chain order.
SELECT pg_catalog.pg_extension_config_dump('vault.signing_keys', 'ORDER BY chain_id, chain_seq');
-- Dumped in chain order, the order in which a restore's rows link to their chains
-- (src/chain/restore.rs); pg_dump places the condition after FROM.
SELECT pg_catalog.pg_extension_config_dump('vault.audit_checkpoints', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.audit_checkpoints_id_seq', '');

CREATE FUNCTION vault_protect_table(tbl regclass, chains int DEFAULT 16) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.protect_table_impl($1::oid, $2) r;
END
$fn$;

CREATE FUNCTION vault_checkpoint() RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.checkpoints FROM vault.checkpoint_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_rotate_signing_key() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.key_id FROM vault.rotate_signing_key_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_verify_audit(tbl regclass DEFAULT NULL)
RETURNS TABLE (table_name text, chain int, rows_checked bigint, first_bad_seq bigint, ok bool,
               detail text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.table_name, r.chain, r.rows_checked, r.first_bad_seq, r.ok, r.detail
                   FROM vault.verify_audit_impl($1::oid) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE FUNCTION vault_export_audit(tbl regclass, from_seq bigint DEFAULT 0) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.line
                   FROM vault.export_audit_impl($1::oid, $2) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE FUNCTION vault_export_checkpoints() RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.line
                   FROM vault.export_checkpoints_impl() r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

-- A registration whose table is gone (dropped while the event triggers were off, or a temporary
-- table registered by 0.1.0) makes every verification report it missing; an admin removes it,
-- and the removal is recorded with the heads its chains had reached.
CREATE FUNCTION vault_forget_missing_table(identity text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.forget_missing_table_impl($1) r;
END
$fn$;

-- DDL guard: ALTER (including DISABLE TRIGGER and RENAME, under whatever keyword PostgreSQL
-- accepts for a table) and DROP of a protected table or of its triggers are refused unless a
-- superuser turned on vsql_vault.break_glass, and either way the attempt is recorded in the
-- (chained) access log. Protected tables are recognised by OID.

-- A 'schema.table' name as vault_protect_table recorded it (unquoted). Kept for upgrades from
-- 0.1.0, which registered tables by name only.
CREATE FUNCTION vault.table_oid(qualified text) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = split_part(qualified, '.', 1)
       AND c.relname = substr(qualified, length(split_part(qualified, '.', 1)) + 2)
$fn$;

CREATE FUNCTION vault.is_protected(rel oid) RETURNS bool
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM vault.protected_tables p WHERE p.relid = rel)
$fn$;

-- After a break-glass DROP the table's registration goes too, so a new table that gets the same
-- name (or OID) starts a fresh chain.
CREATE FUNCTION vault.forget_table(rel oid) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DELETE FROM vault.chain_heads
     WHERE identity IN (SELECT identity FROM vault.protected_tables WHERE relid = rel);
    DELETE FROM vault.protected_tables WHERE relid = rel;
$fn$;
REVOKE ALL ON FUNCTION vault.forget_table(oid) FROM PUBLIC;

-- The protected table a DDL command's object belongs to, or NULL: the table itself (whatever
-- the command's keyword: ALTER INDEX, ALTER SEQUENCE, ALTER VIEW ... RENAME all accept a table),
-- the table of a trigger, rule or row-security policy, or a protected table in a schema.
CREATE FUNCTION vault.protected_target(classid oid, objid oid) RETURNS oid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT p.relid::oid FROM vault.protected_tables p
     WHERE p.relid = CASE classid
        WHEN 'pg_class'::regclass THEN objid
        WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = objid)
        WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = objid)
        WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = objid)
        END
    UNION ALL
    SELECT p.relid::oid FROM vault.protected_tables p JOIN pg_class c ON c.oid = p.relid
     WHERE classid = 'pg_namespace'::regclass AND c.relnamespace = objid
    LIMIT 1
$fn$;

-- A protected table that relation `rel` is now a parent or child of (CREATE TABLE ... INHERITS or
-- PARTITION OF, ALTER TABLE ... INHERIT or ATTACH PARTITION): a parent's ALTER TABLE recurses to
-- its children, so a protected table must stay outside inheritance trees.
CREATE FUNCTION vault.protected_relative(rel oid) RETURNS oid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT p.relid::oid FROM vault.protected_tables p JOIN pg_inherits i
        ON (i.inhrelid = rel AND i.inhparent = p.relid) OR (i.inhparent = rel AND i.inhrelid = p.relid)
    LIMIT 1
$fn$;

-- True for the extension's own functions: replacing one (CREATE OR REPLACE FUNCTION
-- vault.refuse_modification, say) would switch the protection off for every table at once.
CREATE FUNCTION vault.is_vault_function(classid oid, objid oid) RETURNS bool
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT classid = 'pg_proc'::regclass AND EXISTS (
        SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_proc'::regclass AND d.objid = is_vault_function.objid
           AND d.deptype = 'e' AND e.extname = 'vsql_vault')
$fn$;

-- Asked by the guard for ALTER EXTENSION vsql_vault: an UPDATE by a superuser is allowed without
-- break-glass and recorded (its argument is the command the event trigger reports).
CREATE FUNCTION vault.extension_update_recorded(command pg_ddl_command) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'extension_update_recorded_wrapper';

-- Asked by the guard before it refuses a command on a protected table: whether the command only
-- rebuilds the table's protection, as pg_restore does after restoring its rows (the vault's own
-- triggers as vault_protect_table defines them, enabling them ALWAYS, and constraints while some
-- of them are missing). Its argument is the command the event trigger reports.
CREATE FUNCTION vault.protection_restored(command pg_ddl_command, rel oid) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'protection_restored_wrapper';

CREATE FUNCTION vault.guard_alter() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE c record; target oid;
BEGIN
    FOR c IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        target := vault.protected_target(c.classid, c.objid);
        IF target IS NOT NULL
           AND NOT vault.protection_restored(c.command, target)
           AND NOT vault.ddl_guard_allows_relation(c.command_tag, c.object_identity, target) THEN
            RAISE EXCEPTION USING ERRCODE = 'VV403',
                MESSAGE = CASE WHEN c.classid = 'pg_class'::regclass
                    THEN format('%s on protected table %s is refused (vsql_vault.break_glass is off)',
                                c.command_tag, c.object_identity)
                    ELSE format('%s %s on protected table %s is refused (vsql_vault.break_glass is off)',
                                c.command_tag, c.object_identity, target::regclass)
                END;
        END IF;
        IF c.classid = 'pg_class'::regclass THEN
            target := vault.protected_relative(c.objid);
            IF target IS NOT NULL
               AND NOT vault.ddl_guard_allows_relation(c.command_tag, c.object_identity, target) THEN
                RAISE EXCEPTION USING ERRCODE = 'VV403',
                    MESSAGE = format('%s %s would put protected table %s into an inheritance tree: refused (vsql_vault.break_glass is off)',
                                     c.command_tag, c.object_identity, target::regclass);
            END IF;
        END IF;
        -- Taking a function out of the extension (ALTER EXTENSION ... DROP) would let it be
        -- replaced unguarded: such ALTER EXTENSION vsql_vault forms go through break-glass. An
        -- UPDATE by a superuser is allowed and recorded.
        IF c.classid = 'pg_extension'::regclass
           AND c.objid = (SELECT oid FROM pg_extension WHERE extname = 'vsql_vault')
           AND NOT vault.extension_update_recorded(c.command)
           AND NOT vault.ddl_guard_allows(c.command_tag, c.object_identity) THEN
            RAISE EXCEPTION USING ERRCODE = 'VV403',
                MESSAGE = format('%s %s is refused (vsql_vault.break_glass is off)',
                                 c.command_tag, c.object_identity);
        END IF;
        IF NOT c.in_extension AND vault.is_vault_function(c.classid, c.objid)
           AND NOT vault.ddl_guard_allows(c.command_tag, c.object_identity) THEN
            RAISE EXCEPTION USING ERRCODE = 'VV403',
                MESSAGE = format('%s of vsql_vault''s own function %s is refused (vsql_vault.break_glass is off)',
                                 c.command_tag, c.object_identity);
        END IF;
    END LOOP;
END
$fn$;

CREATE FUNCTION vault.guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE o record; rel oid;
BEGIN
    FOR o IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
        rel := NULL;
        IF o.classid = 'pg_class'::regclass AND o.objsubid = 0 THEN
            rel := o.objid;
        ELSIF o.object_type = 'trigger'
              AND o.address_names[3] IN ('vault_chain', 'vault_chain_flush', 'vault_append_only',
                                         'vault_no_truncate') THEN
            -- The trigger's row is gone; its table is still there (a dropped table comes as a
            -- pg_class object of its own), resolved in this same command.
            rel := to_regclass(format('%I.%I', o.address_names[1], o.address_names[2]));
        END IF;
        IF rel IS NOT NULL AND vault.is_protected(rel) THEN
            IF NOT vault.ddl_guard_allows_relation('DROP ' || upper(o.object_type), o.object_identity, rel) THEN
                RAISE EXCEPTION USING ERRCODE = 'VV403',
                    MESSAGE = format('DROP of %s %s is refused: the table is protected (vsql_vault.break_glass is off)',
                                     o.object_type, o.object_identity);
            END IF;
            IF o.classid = 'pg_class'::regclass THEN
                PERFORM vault.forget_table(rel);
            END IF;
        END IF;
    END LOOP;
END
$fn$;

CREATE EVENT TRIGGER vault_guard_alter ON ddl_command_end
    -- Every tag whose command can reach an ordinary table, from PostgreSQL 15's grammar: ALTER
    -- INDEX ... RENAME, ALTER VIEW / MATERIALIZED VIEW / FOREIGN TABLE ... RENAME COLUMN and
    -- ALTER TYPE ... RENAME ATTRIBUTE all accept a table; CREATE TABLE / CREATE FOREIGN TABLE /
    -- CREATE SCHEMA ... INHERITS make one a parent. (docs/security.md lists them with their tests.)
    WHEN TAG IN ('ALTER TABLE', 'ALTER INDEX', 'ALTER SEQUENCE', 'ALTER VIEW',
                 'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE', 'ALTER TYPE', 'ALTER SCHEMA',
                 'CREATE TABLE', 'CREATE FOREIGN TABLE', 'CREATE SCHEMA', 'CREATE TRIGGER',
                 'ALTER TRIGGER', 'CREATE RULE', 'ALTER RULE', 'CREATE POLICY', 'ALTER POLICY',
                 'CREATE FUNCTION', 'ALTER FUNCTION', 'ALTER EXTENSION')
    EXECUTE FUNCTION vault.guard_alter();
CREATE EVENT TRIGGER vault_guard_drop ON sql_drop EXECUTE FUNCTION vault.guard_drop();
ALTER EVENT TRIGGER vault_guard_alter ENABLE ALWAYS;
ALTER EVENT TRIGGER vault_guard_drop ENABLE ALWAYS;
