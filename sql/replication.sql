-- Encrypted replication: source-side column exclusion and the scope report.

-- Columns that never leave the server through the vsql_vault output plugin, not even encrypted.
-- A user catalog table, so decoding reads it under the historic snapshot of each change: an
-- exclusion applies exactly to the changes committed after it.
-- Bound to the column's identity (relid, attnum): renames of the column, table or schema keep it,
-- and a dropped column stays excluded. table_name and column_name are the current names, kept
-- so by vault.sync_exclusions_names() after every rename; a restore rebinds by them
-- (vault.sync_exclusions_rebind()), as OIDs and attnums differ there.
CREATE TABLE vault.sync_exclusions (
    relid       oid NOT NULL,
    column_name name NOT NULL,
    table_name  text NOT NULL,
    excluded_at timestamptz NOT NULL DEFAULT now(),
    excluded_by name NOT NULL,
    attnum      smallint NOT NULL,
    PRIMARY KEY (relid, attnum)
) WITH (user_catalog_table = true);
REVOKE ALL ON vault.sync_exclusions FROM PUBLIC;
GRANT SELECT ON vault.sync_exclusions TO vault_auditor, vault_admin;

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

CREATE FUNCTION vault_sync_exclude(tbl regclass, col name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.sync_scope_impl($1::oid, $2::text, true) r;
END
$fn$;

CREATE FUNCTION vault_sync_include(tbl regclass, col name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.sync_scope_impl($1::oid, $2::text, false) r;
END
$fn$;

CREATE FUNCTION vault_scope_report() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.report::jsonb FROM vault.scope_report_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;
