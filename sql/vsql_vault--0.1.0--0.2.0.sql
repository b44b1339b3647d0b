-- vsql_vault 0.1.0 -> 0.2.0: the security fixes of 0.2.0 (docs/security.md, "0.2.0").
-- Additive: no table of evidence is dropped or rewritten. Run by ALTER EXTENSION vsql_vault UPDATE,
-- which a superuser runs without vsql_vault.break_glass; the update is recorded in the chained log.
\echo Use "ALTER EXTENSION vsql_vault UPDATE TO '0.2.0'" to load this file. \quit

-- Protected tables are found by OID from now on. Registrations made by name under 0.1.0 get the
-- OID their name resolves to now; one that no longer resolves (a temp table whose session ended,
-- a table dropped around the guard) keeps a NULL and is reported missing by verification.
ALTER TABLE vault.protected_tables ADD COLUMN relid regclass UNIQUE;
UPDATE vault.protected_tables SET relid = vault.table_oid(table_name);

CREATE OR REPLACE FUNCTION vault.is_protected(rel oid) RETURNS bool
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM vault.protected_tables p WHERE p.relid = rel)
$fn$;

CREATE FUNCTION vault.forget_table(rel oid) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DELETE FROM vault.chain_heads
     WHERE identity IN (SELECT identity FROM vault.protected_tables WHERE relid = rel);
    DELETE FROM vault.protected_tables WHERE relid = rel;
$fn$;
REVOKE ALL ON FUNCTION vault.forget_table(oid) FROM PUBLIC;

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

CREATE FUNCTION vault.protected_relative(rel oid) RETURNS oid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT p.relid::oid FROM vault.protected_tables p JOIN pg_inherits i
        ON (i.inhrelid = rel AND i.inhparent = p.relid) OR (i.inhparent = rel AND i.inhrelid = p.relid)
    LIMIT 1
$fn$;

CREATE  FUNCTION vault."ddl_guard_allows_relation"(
	"command" TEXT, /* & str */
	"object" TEXT, /* & str */
	"rel" oid /* pg_sys :: Oid */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ddl_guard_allows_relation_wrapper';

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

CREATE OR REPLACE FUNCTION vault.guard_alter() RETURNS event_trigger
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

CREATE OR REPLACE FUNCTION vault.guard_drop() RETURNS event_trigger
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

-- The guard looks at every command tag that can reach a table (event triggers cannot be
-- altered in place; they do not fire on themselves).
DROP EVENT TRIGGER vault_guard_alter;
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
ALTER EVENT TRIGGER vault_guard_alter ENABLE ALWAYS;

-- The API wrappers become one statement each: a failure a vault.*_impl function reports is raised
-- by one helper (pgrx cannot raise custom SQLSTATEs; sql/schema.sql). Same signatures, results
-- and SQLSTATEs.
CREATE FUNCTION vault.raise_reported(code text, message text) RETURNS bool
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF code IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
    END IF;
    RETURN true;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_put(
    purpose text,
    external_id text,
    encrypted_value bytea,
    algorithm_hint text DEFAULT NULL,
    key_ref text DEFAULT NULL,
    metadata jsonb DEFAULT '{}',
    expires_at timestamptz DEFAULT NULL,
    access_policy text DEFAULT 'owner-only'
) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.expires_at FROM vault.put_impl($1, $2, $3, $4, $5, $6::text, $7, $8) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_get(purpose text, external_id text)
RETURNS TABLE (encrypted_value bytea, algorithm_hint text, key_ref text, metadata jsonb,
               owner name, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.encrypted_value, r.algorithm_hint, r.key_ref, r.metadata::jsonb,
                        r.owner::name, r.created_at, r.expires_at
                   FROM vault.get_impl($1, $2) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE OR REPLACE FUNCTION vault_head(purpose text, external_id text)
RETURNS TABLE (found bool, expired bool, owner name, access_policy text,
               created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- RETURN QUERY, not assignments: an OUT column named found would be plpgsql's FOUND.
    RETURN QUERY SELECT r.found, r.expired, r.owner::name, r.access_policy,
                        r.created_at, r.expires_at
                   FROM vault.head_impl($1, $2) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE OR REPLACE FUNCTION vault_set_retention_policy(
    purpose text,
    max_retention_days int,
    default_ttl_days int,
    purge_method text DEFAULT 'physical-delete',
    require_purge_proof bool DEFAULT true,
    description text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.set_retention_policy_impl($1, $2, $3, $4, $5, $6) r;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_grant_purpose(purpose text, role name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.grant_purpose_impl($1, $2::text) r;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_revoke_purpose(purpose text, role name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.revoke_purpose_impl($1, $2::text) r;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_protect_table(tbl regclass, chains int DEFAULT 16) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.protect_table_impl($1::oid, $2) r;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_checkpoint() RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.checkpoints FROM vault.checkpoint_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_rotate_signing_key() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.key_id FROM vault.rotate_signing_key_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_verify_audit(tbl regclass DEFAULT NULL)
RETURNS TABLE (table_name text, chain int, rows_checked bigint, first_bad_seq bigint, ok bool,
               detail text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.table_name, r.chain, r.rows_checked, r.first_bad_seq, r.ok, r.detail
                   FROM vault.verify_audit_impl($1::oid) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE OR REPLACE FUNCTION vault_export_audit(tbl regclass, from_seq bigint DEFAULT 0) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.line
                   FROM vault.export_audit_impl($1::oid, $2) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE OR REPLACE FUNCTION vault_export_checkpoints() RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.line
                   FROM vault.export_checkpoints_impl() r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE OR REPLACE FUNCTION vault_delete(purpose text, external_id text, reason text DEFAULT 'manual')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.purge_id FROM vault.delete_impl($1, $2, $3) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_purge_sweep(max_entries int DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.purged FROM vault.purge_sweep_impl($1) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_verify_purge_proof(id bigint) RETURNS bool
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.ok FROM vault.verify_purge_proof_impl($1) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_export_purge_proofs(from_id bigint DEFAULT 0) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.line
                   FROM vault.export_purge_proofs_impl($1) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE OR REPLACE FUNCTION vault_sync_exclude(tbl regclass, col name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.sync_scope_impl($1::oid, $2::text, true) r;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_sync_include(tbl regclass, col name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.sync_scope_impl($1::oid, $2::text, false) r;
END
$fn$;

CREATE OR REPLACE FUNCTION vault_scope_report() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.report::jsonb FROM vault.scope_report_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_compliance_report() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.report::jsonb FROM vault.compliance_report_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE OR REPLACE FUNCTION vault_metrics() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.metrics FROM vault.metrics_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE  FUNCTION vault."forget_missing_table_impl"(
	"identity" TEXT /* Option < & str > */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT  /* Option < String > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'forget_missing_table_impl_wrapper';

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

-- A granted get whose caller stopped waiting after its record was written: it returned no data
-- and is taken off the entry's max_retrievals count.
CREATE INDEX access_log_entry_not_returned ON vault.access_log (entry_id)
    WHERE operation = 'get_not_returned';

-- Caller identity behind connection pools (vsql_vault.on_behalf_of). NULL in old rows: the row
-- hash leaves NULL columns out, so every old hash stays valid (docs/audit-format.md, section 3).
ALTER TABLE vault.access_log ADD COLUMN on_behalf_of text;
-- Of each day's counted calls, those made with an identity (0 for the days before).
ALTER TABLE vault.access_daily ADD COLUMN identified bigint NOT NULL DEFAULT 0;
CREATE OR REPLACE FUNCTION vault.count_access() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    INSERT INTO vault.access_daily AS d (day, role_name, purpose, operation, granted, calls,
                                         identified)
    SELECT (n.logged_at AT TIME ZONE 'UTC')::date, n.role_name, coalesce(n.purpose, ''),
           n.operation, n.granted, count(*), count(n.on_behalf_of)
      FROM new_rows n
     GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (day, role_name, purpose, operation, granted)
    DO UPDATE SET calls = d.calls + EXCLUDED.calls, identified = d.identified + EXCLUDED.identified;
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE VIEW vault.access_summary AS
SELECT d.day, d.role_name, nullif(d.purpose, '') AS purpose, d.operation,
       coalesce(sum(d.calls) FILTER (WHERE d.granted), 0)::bigint AS granted,
       coalesce(sum(d.calls) FILTER (WHERE NOT d.granted), 0)::bigint AS denied,
       coalesce(sum(d.identified), 0)::bigint AS identified
  FROM vault.access_daily d
 GROUP BY d.day, d.role_name, d.purpose, d.operation;
CREATE OR REPLACE VIEW vault.access_denials AS
SELECT l.id AS log_id, l.logged_at, l.role_name, l.session_user_name, l.application_name,
       l.client_addr, l.operation, l.purpose, l.external_id, l.sqlstate, l.reason, l.on_behalf_of
  FROM vault.access_log l
 WHERE NOT l.granted;

-- An access policy can require the end user or service a call is made for (require_identity):
-- a column of its own (false for existing policies), and a parameter of vault_set_access_policy.
ALTER TABLE vault.access_policies ADD COLUMN require_identity bool NOT NULL DEFAULT false;
DROP FUNCTION vault_set_access_policy(text, name[], name[], name[], int, text);
DROP FUNCTION vault.set_access_policy_impl(text, text[], text[], text[], int, text);
CREATE  FUNCTION vault."set_access_policy_v2_impl"(
	"name" TEXT, /* Option < & str > */
	"store_roles" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"retrieve_roles" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"purge_roles" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"max_retrievals" INT, /* Option < i32 > */
	"description" TEXT, /* Option < & str > */
	"require_identity" bool /* Option < bool > */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT  /* Option < String > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_access_policy_v2_impl_wrapper';
CREATE FUNCTION vault_set_access_policy(
    name text,
    store_roles name[],
    retrieve_roles name[],
    purge_roles name[],
    max_retrievals int DEFAULT NULL,
    description text DEFAULT NULL,
    require_identity bool DEFAULT false
) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.set_access_policy_v2_impl($1, $2::text[], $3::text[], $4::text[], $5, $6, $7) r;
END
$fn$;

-- vault_list pages (keyset: after, max_rows); vault_list(purpose) still works, as its first page.
DROP FUNCTION vault_list(text);
DROP FUNCTION vault.list_impl(text);
CREATE  FUNCTION vault."list_page_impl"(
	"purpose" TEXT, /* Option < & str > */
	"after" TEXT, /* Option < & str > */
	"max_rows" INT /* Option < i32 > */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT,  /* Option < String > */
	"external_id" TEXT,  /* Option < String > */
	"owner" TEXT,  /* Option < String > */
	"algorithm_hint" TEXT,  /* Option < String > */
	"key_ref" TEXT,  /* Option < String > */
	"metadata" TEXT,  /* Option < String > */
	"access_policy" TEXT,  /* Option < String > */
	"created_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"expires_at" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'list_page_impl_wrapper';
-- One keyset page: at most max_rows entries with external_id > after, ordered by external_id.
CREATE FUNCTION vault_list(purpose text, after text DEFAULT NULL, max_rows int DEFAULT 1000)
RETURNS TABLE (external_id text, owner name, algorithm_hint text, key_ref text, metadata jsonb,
               access_policy text, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.external_id, r.owner::name, r.algorithm_hint, r.key_ref,
                        r.metadata::jsonb, r.access_policy, r.created_at, r.expires_at
                   FROM vault.list_page_impl($1, $2, $3) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

-- Name-based helpers of 0.1.0, replaced by the OID-based ones above.
DROP FUNCTION vault.protected_gone();
DROP FUNCTION vault.is_protected_name(text);
DROP FUNCTION vault.forget_table(text);
DROP FUNCTION vault.ddl_target(oid, oid);

-- The owner of the vault's tables (see the end of the install script): created here, or reused,
-- and kept without any attribute that reaches beyond them.
DO $owner_role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vault_owner') THEN
        CREATE ROLE vault_owner NOLOGIN;
    END IF;
    ALTER ROLE vault_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
        NOINHERIT;
END
$owner_role$;

-- Ownership. The vault's tables, sequences and views, and its SECURITY DEFINER helpers, belong to
-- vault_owner, a role with no attribute at all (no superuser, no login), not to the superuser
-- who ran CREATE EXTENSION. The API switches to that owner for its own queries, so any user code
-- a missed case might reach while switched runs with the rights over the vault's tables and
-- nothing more. The C functions and the event triggers stay with the superuser (PostgreSQL
-- requires a superuser for both); none of them runs user code. (tests/attacks.rs)
-- What the API calls while switched to the owner that PUBLIC may not call.
GRANT EXECUTE ON FUNCTION vault.role_allowed(name[], oid, name, text), vault.replication_kek_ids()
    TO vault_owner;
DO $owner$
DECLARE o record;
BEGIN
    FOR o IN
        SELECT c.oid, CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END AS kind
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                                     AND d.objid = c.oid AND d.deptype = 'e'
          JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'
         WHERE c.relkind IN ('r', 'S', 'v')
         ORDER BY c.relkind = 'S', c.oid
    LOOP
        -- A table takes its serial sequences along; those cannot be given away on their own.
        IF (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = o.oid)
           <> 'vault_owner'::pg_catalog.regrole THEN
            EXECUTE pg_catalog.format('ALTER %s %s OWNER TO vault_owner', o.kind, o.oid::pg_catalog.regclass);
        END IF;
    END LOOP;
    FOR o IN
        SELECT p.oid FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                                     AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'
         WHERE p.prosecdef
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO vault_owner', o.oid::pg_catalog.regprocedure);
    END LOOP;
END
$owner$;

-- The access log gets a second chain for the records written in callers' own transactions
-- (break-glass commands, this update's own record once the chain exists), so that such an open
-- transaction never blocks the audit writer on chain 0 (issue 15, item 9). A new, empty chain:
-- every existing row keeps its chain and link.
UPDATE vault.protected_tables SET chains = 2
 WHERE relid = 'vault.access_log'::regclass AND chains < 2;
INSERT INTO vault.chain_heads (identity, chain_id)
SELECT identity, 1 FROM vault.protected_tables WHERE relid = 'vault.access_log'::regclass
ON CONFLICT (identity, chain_id) DO NOTHING;

-- A plain pg_dump / pg_restore works without vsql_vault.restore_mode (issue 15, item 8): the
-- evidence tables are dumped in chain order, so that their rows arrive in the order in which
-- they link to their chains (src/chain/restore.rs).
SELECT pg_catalog.pg_extension_config_dump('vault.access_log', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.audit_checkpoints', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.purge_log', 'ORDER BY chain_id, chain_seq');

-- Issue 15, item 6 (keys fail loudly): vault_health().
CREATE  FUNCTION vault."health_impl"() RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT,  /* Option < String > */
	"component" TEXT,  /* Option < String > */
	"status" TEXT,  /* Option < String > */
	"detail" TEXT  /* Option < String > */
)
STRICT VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'health_impl_wrapper';

-- One row per component with a status (ok, warning, failing) and a detail; for auditors, admins
-- and pg_monitor, like vault_metrics() (which exports the same rows as vsql_vault_health_status).
CREATE FUNCTION vault_health() RETURNS TABLE (component text, status text, detail text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.component, r.status, r.detail FROM vault.health_impl() r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

-- Issue 15, item 7: vault.signing_keys is append-only and chained, and every key after the first
-- carries a rotation statement signed by the previous key. The keys of 0.1.0 carry none: chained
-- here first, they are the trust roots.
ALTER TABLE vault.signing_keys ADD COLUMN previous_key_id text,
    ADD COLUMN signed_at_us bigint, ADD COLUMN rotation_signature bytea;
SELECT vault.protect_builtin('vault.signing_keys'::regclass::oid, 1);
UPDATE vault.protected_tables SET builtin = true WHERE relid = 'vault.signing_keys'::regclass;
-- Dumped in chain order like the other evidence tables (a plain restore, src/chain/restore.rs).
SELECT pg_catalog.pg_extension_config_dump('vault.signing_keys', 'ORDER BY chain_id, chain_seq');

-- Retention and purge evidence (issue 15, items 1-4; the block of the `retention` branch).
-- require_purge_proof: every destruction writes a signed proof whatever the column said, so a
-- policy of 0.1.0 that stored false never had what false promised. It is set to what always
-- applied, and false is refused from now on (docs/compliance.md, 2.1).
UPDATE vault.retention_policies SET require_purge_proof = true WHERE NOT require_purge_proof;
ALTER TABLE vault.retention_policies
    ADD CONSTRAINT retention_policies_require_purge_proof CHECK (require_purge_proof);
-- A purge proof's displayed times: vault.purge_evidence computes them from the signed *_us
-- values, and vault_verify_purge_proof fails a proof whose timestamptz columns differ from them
-- or whose batch is inconsistent (its unsigned sweep_id); the index serves that batch check.
CREATE INDEX purge_log_batch ON vault.purge_log (batch_id);
CREATE OR REPLACE VIEW vault.purge_evidence AS
SELECT g.id AS proof_id,
       '2000-01-01 00:00:00+00'::timestamptz + g.purged_at_us * interval '1 microsecond' AS purged_at,
       g.purpose, g.external_id, g.owner, g.entry_id,
       '2000-01-01 00:00:00+00'::timestamptz + g.created_at_us * interval '1 microsecond' AS created_at,
       '2000-01-01 00:00:00+00'::timestamptz + g.expires_at_us * interval '1 microsecond' AS expires_at,
       g.purge_method, g.max_retention_days, g.default_ttl_days, g.reason,
       g.purged_by, g.sweep_id, g.batch_id, g.tree_size, g.key_id,
       encode(g.merkle_root, 'hex') AS merkle_root, encode(g.entry_hash, 'hex') AS entry_hash
  FROM vault.purge_log g;

-- Key governance (issue 18; the block of the `keygov` branch): vault.key_directives,
-- vault_key_directive / vault_revoke_directive and vault.reencryption_queue, as sql/governance.sql
-- creates them, then owned by vault_owner and protected like the fresh install does.
CREATE  FUNCTION vault."key_directive_impl"(
	"kind" TEXT, /* Option < & str > */
	"target" TEXT, /* Option < & str > */
	"effective_at" timestamp with time zone, /* Option < TimestampWithTimeZone > */
	"grace" interval, /* Option < Interval > */
	"reason" TEXT, /* Option < & str > */
	"max_age" interval /* Option < Interval > */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT,  /* Option < String > */
	"id" bigint  /* Option < i64 > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_directive_impl_wrapper';

CREATE  FUNCTION vault."revoke_directive_impl"(
	"id" bigint, /* Option < i64 > */
	"reason" TEXT /* Option < & str > */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT  /* Option < String > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'revoke_directive_impl_wrapper';


-- One row per directive, and one per revocation (kind 'revoke', `revokes` = the directive's id):
-- nothing is ever updated. target: a key_ref, a prefix pattern ending in '*' (retire-key,
-- cryptoperiod), or an algorithm_hint (deny-algorithm, compared case-insensitively).
-- max_age: a cryptoperiod's length. New data under a governed key or algorithm is refused
-- (VV426) from effective_at + grace; during the grace period it is stored with a WARNING.
CREATE  FUNCTION vault."apply_directive_impl"(
	"signed" TEXT /* Option < & str > */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT,  /* Option < String > */
	"id" bigint  /* Option < i64 > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'apply_directive_impl_wrapper';

CREATE  FUNCTION vault."key_status_impl"() RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT,  /* Option < String > */
	"status" TEXT  /* Option < String > */
)
STRICT VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_status_impl_wrapper';

CREATE TABLE vault.key_directives (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL
        CHECK (kind IN ('retire-key', 'deny-algorithm', 'cryptoperiod', 'revoke')),
    target       text NOT NULL,
    max_age      interval CHECK ((kind = 'cryptoperiod') = (max_age IS NOT NULL)),
    effective_at timestamptz NOT NULL,
    grace        interval,
    reason       text,
    revokes      bigint REFERENCES vault.key_directives (id)
        CHECK ((kind = 'revoke') = (revokes IS NOT NULL)),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   name NOT NULL,
    -- A directive applied from a document signed by a governance authority
    -- (vault_apply_directive): the authority's key id, the document's nonce (applied once) and
    -- the whole signed document, so an auditor can show where the rule came from.
    authority_key_id text,
    nonce        text UNIQUE,
    document     jsonb
);
-- A directive is revoked at most once; the index also finds a directive's revocation.
CREATE UNIQUE INDEX key_directives_revokes ON vault.key_directives (revokes)
    WHERE revokes IS NOT NULL;
REVOKE ALL ON vault.key_directives FROM PUBLIC;
GRANT SELECT ON vault.key_directives TO vault_auditor, vault_admin;
SELECT pg_catalog.pg_extension_config_dump('vault.key_directives', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.key_directives_id_seq', '');

-- What the queue and the put's cryptoperiod check read: live entries by key reference (exact,
-- or a prefix range: text_pattern_ops compares bytes, so a prefix is one index range) with the
-- age of their ciphertext, and by algorithm, case-insensitively.
CREATE INDEX entries_key_ref ON vault.entries (key_ref text_pattern_ops, updated_at)
    WHERE purged_at IS NULL;
CREATE INDEX entries_algorithm_hint ON vault.entries (lower(algorithm_hint))
    WHERE purged_at IS NULL;

CREATE FUNCTION vault_key_directive(
    kind text,
    target text,
    effective_at timestamptz DEFAULT now(),
    grace interval DEFAULT NULL,
    reason text DEFAULT NULL,
    max_age interval DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.id FROM vault.key_directive_impl($1, $2, $3, $4, $5, $6) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

-- A directive document signed by a governance authority (docs/key-governance.md): verified
-- against vsql_vault.directive_public_keys, refused when expired or replayed, stored whole.
CREATE FUNCTION vault_apply_directive(signed jsonb) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.id FROM vault.apply_directive_impl($1::text) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_revoke_directive(id bigint, reason text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.revoke_directive_impl($1, $2) r;
END
$fn$;

-- Every live entry governed by a directive in force: under a retired key, a denied algorithm,
-- or a key past its cryptoperiod (its oldest live ciphertext older than max_age), one row per
-- directive, whether the directive is in effect yet or not. Each directive is one index range
-- of entries_key_ref or entries_algorithm_hint, never a scan of the entries. Internal: read by
-- vault.reencryption_queue (which filters by caller), vault_key_status(), the compliance report
-- and vault_metrics(), all as the vault's owner.
CREATE VIEW vault.key_directive_matches AS
SELECT e.id AS entry_id, e.purpose, e.external_id, e.owner, e.key_ref, e.algorithm_hint,
       e.updated_at, d.id AS directive_id, d.kind AS directive_kind, d.target AS directive_target,
       d.effective_at, d.effective_at + coalesce(d.grace, interval '0') AS deadline
  FROM (SELECT d.*,
               -- A pattern 'p*' is the byte range [p, p with its last character incremented);
               -- an exact key_ref k the range [k, k || chr(1)), which holds k alone.
               CASE WHEN right(d.target, 1) = '*' THEN left(d.target, -1) ELSE d.target END AS lo,
               CASE WHEN right(d.target, 1) = '*'
                    THEN left(d.target, -2) || chr(ascii(right(left(d.target, -1), 1)) + 1)
                    ELSE d.target || chr(1) END AS hi
          FROM vault.key_directives d
         WHERE d.kind <> 'revoke'
           AND NOT EXISTS (SELECT 1 FROM vault.key_directives r WHERE r.revokes = d.id)) d
  CROSS JOIN LATERAL (
      SELECT k.id, k.purpose, k.external_id, k.owner, k.key_ref, k.algorithm_hint, k.updated_at
        FROM vault.entries k
       WHERE d.kind IN ('retire-key', 'cryptoperiod') AND k.purged_at IS NULL
         AND k.key_ref ~>=~ d.lo AND k.key_ref ~<~ d.hi
         AND (d.kind = 'retire-key'
              OR EXISTS (SELECT 1 FROM vault.entries o
                          WHERE o.key_ref = k.key_ref AND o.purged_at IS NULL
                            AND o.updated_at < now() - d.max_age))
      UNION ALL
      SELECT a.id, a.purpose, a.external_id, a.owner, a.key_ref, a.algorithm_hint, a.updated_at
        FROM vault.entries a
       WHERE d.kind = 'deny-algorithm' AND a.purged_at IS NULL
         AND lower(a.algorithm_hint) = lower(d.target)) e;
REVOKE ALL ON vault.key_directive_matches FROM PUBLIC;

-- What must be re-encrypted, and by when? vault.key_directive_matches for the caller: owners
-- see their own entries, vault_admin and vault_auditor all of them (as vault_list). deadline =
-- effective_at + grace; overdue once it has passed. security_barrier: a caller's own functions
-- in a WHERE clause see only rows the caller may see.
CREATE VIEW vault.reencryption_queue WITH (security_barrier) AS
SELECT m.purpose, m.external_id, m.owner, m.key_ref, m.algorithm_hint, m.directive_id,
       m.directive_kind, m.directive_target, m.deadline, now() >= m.deadline AS overdue
  FROM vault.key_directive_matches m
 WHERE m.owner = current_user
    OR (SELECT pg_has_role('vault_admin', 'USAGE') OR pg_has_role('vault_auditor', 'USAGE'));
COMMENT ON VIEW vault.reencryption_queue IS
    'What must be re-encrypted, under which key directive, and by when? (owners see their own entries)';
REVOKE ALL ON vault.reencryption_queue FROM PUBLIC;
GRANT SELECT ON vault.reencryption_queue TO vault_app, vault_auditor, vault_admin;
-- The key status reported up to the governance authority: every key_ref and algorithm_hint in
-- use, the directives and what they govern, the vault's signing keys and KEK versions; signed
-- like the compliance report (vsql-vault verify-report). For vault_auditor and vault_admin.
CREATE FUNCTION vault_key_status() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.status::jsonb FROM vault.key_status_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;
ALTER TABLE vault.key_directives OWNER TO vault_owner;
ALTER VIEW vault.key_directive_matches OWNER TO vault_owner;
ALTER VIEW vault.reencryption_queue OWNER TO vault_owner;
SELECT vault.protect_builtin('vault.key_directives'::regclass::oid, 1);
UPDATE vault.protected_tables SET builtin = true WHERE relid = 'vault.key_directives'::regclass;

-- Replication exclusions bound to the column's identity (relid, attnum) instead of its name
-- (issue 16, item 1). Existing rows are bound to the column of their name; a row whose column no
-- longer has that name (renamed or dropped since; 0.1.0 no longer excluded it) gets an attnum
-- below -1000, which matches no column (system columns are -1 to -7), and the scope report lists
-- it as unbound.
ALTER TABLE vault.sync_exclusions ADD COLUMN attnum smallint;
UPDATE vault.sync_exclusions x SET attnum = a.attnum
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = x.relid AND a.attname = x.column_name AND a.attnum > 0 AND NOT a.attisdropped;
UPDATE vault.sync_exclusions x SET attnum = -1000 - u.n
  FROM (SELECT ctid, row_number() OVER (PARTITION BY relid ORDER BY column_name) AS n
          FROM vault.sync_exclusions WHERE attnum IS NULL) u
 WHERE x.ctid = u.ctid;
ALTER TABLE vault.sync_exclusions ALTER COLUMN attnum SET NOT NULL;
ALTER TABLE vault.sync_exclusions DROP CONSTRAINT sync_exclusions_pkey, ADD PRIMARY KEY (relid, attnum);

-- Exclusions survive pg_dump/pg_restore: dumped with the extension, and rebound on restore by the
-- names they carry (the new cluster has other OIDs and, after dropped columns, other attnums).
SELECT pg_catalog.pg_extension_config_dump('vault.sync_exclusions', '');

-- Keeps table_name and column_name current after a rename of the column, its table or schema,
-- so a dump carries the names a restore finds. Dropped columns keep their last name.
CREATE FUNCTION vault.sync_exclusions_names() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    UPDATE vault.sync_exclusions x
       SET table_name = c.oid::regclass::text, column_name = a.attname
      FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
     WHERE c.oid = x.relid AND a.attnum = x.attnum AND NOT a.attisdropped
       AND (x.table_name IS DISTINCT FROM c.oid::regclass::text OR x.column_name IS DISTINCT FROM a.attname);
    -- The allow-list (vault.sync_published) likewise; the table exists from 0.2.0 on.
    IF pg_catalog.to_regclass('vault.sync_published') IS NOT NULL THEN
        UPDATE vault.sync_published p SET table_name = c.oid::regclass::text
          FROM pg_class c
         WHERE c.oid = p.relid AND p.table_name IS DISTINCT FROM c.oid::regclass::text;
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION vault.sync_exclusions_names() FROM PUBLIC;
-- Like every SECURITY DEFINER helper, owned by vault_owner (sql/compliance.sql, at the end of a
-- fresh install; this part of the upgrade comes after the ownership pass above).
ALTER FUNCTION vault.sync_exclusions_names() OWNER TO vault_owner;
CREATE EVENT TRIGGER vault_sync_exclusions_names ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA', 'ALTER INDEX', 'ALTER VIEW', 'ALTER MATERIALIZED VIEW',
                 'ALTER FOREIGN TABLE', 'ALTER TYPE')
    EXECUTE FUNCTION vault.sync_exclusions_names();
ALTER EVENT TRIGGER vault_sync_exclusions_names ENABLE ALWAYS;

-- A row whose (relid, attnum) does not denote the column it names comes from a dump of another
-- cluster: bind it to the column of that name now. A row naming no existing column is a dropped
-- column or table (nothing of it left to publish): it is not restored, with a warning.
CREATE FUNCTION vault.sync_exclusions_rebind() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    rel oid;
    att smallint;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute a
                WHERE a.attrelid = NEW.relid AND a.attnum = NEW.attnum
                  AND (a.attisdropped OR (a.attname = NEW.column_name
                                          AND a.attrelid::regclass::text = NEW.table_name))) THEN
        RETURN NEW;
    END IF;
    rel := to_regclass(NEW.table_name);
    SELECT a.attnum INTO att FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = NEW.column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF att IS NULL THEN
        RAISE WARNING 'vsql_vault: exclusion of %.% not restored: no such column', NEW.table_name, NEW.column_name;
        RETURN NULL;
    END IF;
    NEW.relid := rel;
    NEW.attnum := att;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER sync_exclusions_rebind BEFORE INSERT ON vault.sync_exclusions
    FOR EACH ROW EXECUTE FUNCTION vault.sync_exclusions_rebind();

-- The allow-list of the output plugin (issue 16, item 6). The vault's own tables (schema vault)
-- never leave the server unless a vault_admin publishes them here; with the superuser-only
-- setting vsql_vault.sync_allow_list_required on, no table leaves unless it is listed here.
-- A user catalog table, read by decoding under each change's historic snapshot, like
-- vault.sync_exclusions; dumped, and rebound on restore by its table name.
CREATE TABLE vault.sync_published (
    relid        oid PRIMARY KEY,
    table_name   text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    published_by name NOT NULL
) WITH (user_catalog_table = true);
REVOKE ALL ON vault.sync_published FROM PUBLIC;
GRANT SELECT ON vault.sync_published TO vault_auditor, vault_admin;
SELECT pg_catalog.pg_extension_config_dump('vault.sync_published', '');

CREATE FUNCTION vault.sync_published_rebind() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    rel oid;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = NEW.relid AND c.oid::regclass::text = NEW.table_name) THEN
        RETURN NEW;
    END IF;
    rel := to_regclass(NEW.table_name);
    IF rel IS NULL THEN
        RAISE WARNING 'vsql_vault: publication of % not restored: no such table', NEW.table_name;
        RETURN NULL;
    END IF;
    NEW.relid := rel;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER sync_published_rebind BEFORE INSERT ON vault.sync_published
    FOR EACH ROW EXECUTE FUNCTION vault.sync_published_rebind();

CREATE  FUNCTION vault."sync_publish_impl"(
	"tbl" oid, /* Option < pg_sys :: Oid > */
	"publish" bool /* bool */
) RETURNS TABLE (
	"sqlstate" TEXT,  /* Option < String > */
	"message" TEXT  /* Option < String > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'sync_publish_impl_wrapper';

CREATE FUNCTION vault_sync_publish(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.sync_publish_impl($1::oid, true) r;
END
$fn$;

CREATE FUNCTION vault_sync_unpublish(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.sync_publish_impl($1::oid, false) r;
END
$fn$;
-- Owned by vault_owner like every vault table (sql/compliance.sql, at the end of a fresh
-- install; this part of the upgrade comes after the ownership pass above).
ALTER TABLE vault.sync_published OWNER TO vault_owner;

-- Audited reads on a hot standby (issue 17): the role a standby's connection to the primary uses,
-- and the function it hands the records over with.
DO $forwarder$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vault_forwarder') THEN
        CREATE ROLE vault_forwarder NOLOGIN;
    END IF;
END
$forwarder$;
CREATE  FUNCTION vault."accept_forwarded_record"(
	"standby" TEXT, /* & str */
	"record" TEXT /* & str */
) RETURNS TEXT /* alloc :: string :: String */
STRICT VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'accept_forwarded_record_wrapper';
-- Hot standbys hand the records of the reads they serve to the primary through this function;
-- only vault_forwarder may call it (README, "High availability and read replicas").
REVOKE ALL ON FUNCTION vault.accept_forwarded_record(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault.accept_forwarded_record(text, text) TO vault_forwarder;

-- Sweeps resume each batch after the last (expires_at, id) of the one before (issue 14): the
-- index of expiring entries gains id. An index only, rebuilt from the table; no evidence moves.
DROP INDEX IF EXISTS vault.entries_expires_at;
CREATE INDEX IF NOT EXISTS entries_expiry ON vault.entries (expires_at, id) WHERE purged_at IS NULL;

-- Table digests (issue 16, docs/table-digest.md; sql/digest.sql): the functions' C entry points,
-- then the same SQL functions as a fresh install. New functions only; nothing is changed.
CREATE  FUNCTION vault."table_digest_bucket"(
	"key" bytea, /* & [u8] */
	"buckets" INT /* i32 */
) RETURNS INT /* i32 */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'table_digest_bucket_wrapper';

CREATE  FUNCTION vault."table_digest_buckets"(
	"tbl" oid, /* Option < pg_sys :: Oid > */
	"columns" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"buckets" INT /* Option < i32 > */
) RETURNS TABLE (
	"bucket" INT,  /* i32 */
	"first_key" jsonb,  /* Option < JsonB > */
	"last_key" jsonb,  /* Option < JsonB > */
	"rows" bigint,  /* i64 */
	"root" bytea  /* Vec < u8 > */
)
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'table_digest_buckets_wrapper';

CREATE  FUNCTION vault."table_digest_export_query"(
	"tbl" oid, /* Option < pg_sys :: Oid > */
	"columns" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"buckets" INT, /* Option < i32 > */
	"bucket" INT /* Option < i32 > */
) RETURNS TEXT /* String */
VOLATILE PARALLEL UNSAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'table_digest_export_query_wrapper';

CREATE  FUNCTION vault."table_digest_key"(
	"names" TEXT[], /* Vec < Option < String > > */
	"record" anyelement /* AnyElement */
) RETURNS bytea /* Vec < u8 > */
STRICT STABLE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'table_digest_key_wrapper';

CREATE  FUNCTION vault."table_digest_row"(
	"names" TEXT[], /* Vec < Option < String > > */
	"record" anyelement /* AnyElement */
) RETURNS bytea /* Vec < u8 > */
STRICT STABLE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'table_digest_row_wrapper';

CREATE  FUNCTION vault."table_digest_line"(
	"key" bytea, /* & [u8] */
	"row" bytea, /* & [u8] */
	"keyless" bool /* bool */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'table_digest_line_wrapper';

CREATE FUNCTION vault_table_digest(tbl regclass, columns text[] DEFAULT NULL) RETURNS bytea
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.root FROM vault.table_digest_buckets($1::oid, $2, 1) r);
END
$fn$;

CREATE FUNCTION vault_table_digest_ranges(tbl regclass, buckets integer, columns text[] DEFAULT NULL)
RETURNS TABLE (bucket integer, first_key jsonb, last_key jsonb, rows bigint, root bytea)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.bucket, r.first_key, r.last_key, r.rows, r.root
                   FROM vault.table_digest_buckets($1::oid, $3, coalesce($2, 0)) r;
END
$fn$;

-- With buckets and bucket: only the rows of that bucket of vault_table_digest_ranges(tbl, buckets).
CREATE FUNCTION vault_table_digest_export(tbl regclass, columns text[] DEFAULT NULL,
                                          buckets integer DEFAULT NULL, bucket integer DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY EXECUTE vault.table_digest_export_query($1::oid, $2, $3, $4);
END
$fn$;

-- Puts at the speed of one durable commit (issue 13). A granted put's record is written in the
-- caller's own transaction, atomic with the entry, on one of the access log's caller chains
-- 1-16; a re-put's superseded-version proof takes one of the purge log's caller chains 1-16.
-- Chain 0 of each stays its batch writer's. New, empty chains: every existing row keeps its
-- chain and link.
UPDATE vault.protected_tables SET chains = 17
 WHERE relid IN ('vault.access_log'::regclass, 'vault.purge_log'::regclass) AND chains < 17;
INSERT INTO vault.chain_heads (identity, chain_id)
SELECT p.identity, c FROM vault.protected_tables p, pg_catalog.generate_series(1, 16) c
 WHERE p.relid IN ('vault.access_log'::regclass, 'vault.purge_log'::regclass)
ON CONFLICT (identity, chain_id) DO NOTHING;
-- The daily counters: one row per chain as well (derived data, rebuilt by the same trigger).
ALTER TABLE vault.access_daily ADD COLUMN chain int NOT NULL DEFAULT 0;
ALTER TABLE vault.access_daily DROP CONSTRAINT access_daily_pkey;
ALTER TABLE vault.access_daily ADD PRIMARY KEY (day, role_name, purpose, operation, granted, chain);
CREATE OR REPLACE FUNCTION vault.count_access() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    INSERT INTO vault.access_daily AS d (day, role_name, purpose, operation, granted, chain,
                                         calls, identified)
    SELECT (n.logged_at AT TIME ZONE 'UTC')::date, n.role_name, coalesce(n.purpose, ''),
           n.operation, n.granted, coalesce(n.chain_id, 0), count(*), count(n.on_behalf_of)
      FROM new_rows n
     GROUP BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, role_name, purpose, operation, granted, chain)
    DO UPDATE SET calls = d.calls + EXCLUDED.calls, identified = d.identified + EXCLUDED.identified;
    RETURN NULL;
END
$fn$;

-- The daily counters of records a caller's transaction writes itself (a granted put) are added
-- by that transaction once, at its commit (src/access_log/daily.rs); the trigger asks first.
CREATE FUNCTION vault."access_counted_by_caller"() RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'access_counted_by_caller_wrapper';
CREATE OR REPLACE FUNCTION vault.count_access() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- A record a caller's transaction writes itself is counted by that transaction, once, at its
    -- commit (src/access_log/daily.rs): counted here, a transaction of many puts updated one row
    -- once per put, each update lengthening the version chain the next one walks.
    IF vault.access_counted_by_caller() THEN
        RETURN NULL;
    END IF;
    INSERT INTO vault.access_daily AS d (day, role_name, purpose, operation, granted, chain,
                                         calls, identified)
    SELECT (n.logged_at AT TIME ZONE 'UTC')::date, n.role_name, coalesce(n.purpose, ''),
           n.operation, n.granted, coalesce(n.chain_id, 0), count(*), count(n.on_behalf_of)
      FROM new_rows n
     GROUP BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, role_name, purpose, operation, granted, chain)
    DO UPDATE SET calls = d.calls + EXCLUDED.calls, identified = d.identified + EXCLUDED.identified;
    RETURN NULL;
END
$fn$;

-- vault.chain_row() runs per inserted row and vault.chain_flush() per statement: their queries
-- pin search_path where they switch to the owner (AsOwner) instead of a SET clause per call.
ALTER FUNCTION vault.chain_row() RESET search_path;
ALTER FUNCTION vault.chain_flush() RESET search_path;
