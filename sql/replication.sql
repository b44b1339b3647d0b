-- Encrypted replication: source-side column exclusion and the scope report.

-- Columns that never leave the server through the vsql_vault output plugin, not even encrypted.
-- A user catalog table, so decoding reads it under the historic snapshot of each change: an
-- exclusion applies exactly to the changes committed after it.
CREATE TABLE vault.sync_exclusions (
    relid       oid NOT NULL,
    column_name name NOT NULL,
    table_name  text NOT NULL,
    excluded_at timestamptz NOT NULL DEFAULT now(),
    excluded_by name NOT NULL,
    PRIMARY KEY (relid, column_name)
) WITH (user_catalog_table = true);
REVOKE ALL ON vault.sync_exclusions FROM PUBLIC;
GRANT SELECT ON vault.sync_exclusions TO vault_auditor, vault_admin;

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
