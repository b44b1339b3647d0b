-- Tamper-evident audit: chain bookkeeping, signing keys, checkpoints, and the protection of the
-- extension's own append-only tables. Runs last in CREATE EXTENSION.

-- Tables whose rows are hash-chained and append-only (vault_protect_table).
CREATE TABLE vault.protected_tables (
    table_name   text PRIMARY KEY,
    chains       int NOT NULL CHECK (chains BETWEEN 1 AND 256),
    builtin      bool NOT NULL DEFAULT false,
    protected_at timestamptz NOT NULL DEFAULT now(),
    protected_by name NOT NULL DEFAULT current_user
);

-- The current head of every chain. Not evidence itself (verification recomputes everything from
-- the rows and the signed checkpoints); it is where writers find the link for the next row.
CREATE TABLE vault.chain_heads (
    table_name text NOT NULL,
    chain_id   int NOT NULL,
    seq        bigint NOT NULL DEFAULT 0,
    head_hash  bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
    PRIMARY KEY (table_name, chain_id)
);

-- Public halves of the Ed25519 keys that signed checkpoints; private keys never enter SQL.
CREATE TABLE vault.signing_keys (
    key_id     text PRIMARY KEY,
    public_key text NOT NULL,
    source     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);

-- Signed chain heads. Itself append-only and chained.
CREATE TABLE vault.audit_checkpoints (
    id              bigserial PRIMARY KEY,
    checkpointed_at timestamptz NOT NULL,
    table_name      text NOT NULL,
    chain           int NOT NULL,
    seq             bigint NOT NULL,
    head_hash       bytea NOT NULL,
    signed_at_us    bigint NOT NULL,
    key_id          text NOT NULL,
    signature       bytea NOT NULL
);

REVOKE ALL ON vault.protected_tables, vault.chain_heads, vault.signing_keys, vault.audit_checkpoints
    FROM PUBLIC;
GRANT SELECT ON vault.protected_tables, vault.chain_heads, vault.signing_keys, vault.audit_checkpoints
    TO vault_auditor, vault_admin;

-- The chain trigger runs as the inserting role; its queries switch to the owner, so its
-- search_path is pinned like the API's.
ALTER FUNCTION vault.chain_row() SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION vault.protect_builtin(oid, int) FROM PUBLIC;

-- The issue-2 append-only triggers of the access log give way to the uniform protection.
DROP TRIGGER access_log_append_only ON vault.access_log;
DROP TRIGGER access_log_no_truncate ON vault.access_log;
-- One chain each: a single writer (the audit writer, the checkpointer) appends to these.
SELECT vault.protect_builtin('vault.access_log'::regclass::oid, 1);
SELECT vault.protect_builtin('vault.audit_checkpoints'::regclass::oid, 1);
UPDATE vault.protected_tables SET builtin = true;

-- pg_dump keeps user-table registrations, keys and checkpoints; chain heads are rebuilt by the
-- chain trigger while restoring (see vsql_vault.restore_mode).
SELECT pg_catalog.pg_extension_config_dump('vault.protected_tables', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('vault.signing_keys', '');
SELECT pg_catalog.pg_extension_config_dump('vault.audit_checkpoints', '');
SELECT pg_catalog.pg_extension_config_dump('vault.audit_checkpoints_id_seq', '');

CREATE FUNCTION vault_protect_table(tbl regclass, chains int DEFAULT 16) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.protect_table_impl($1::oid, $2);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
END
$fn$;

CREATE FUNCTION vault_checkpoint() RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.checkpoint_impl();
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
    RETURN r.checkpoints;
END
$fn$;

CREATE FUNCTION vault_rotate_signing_key() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.rotate_signing_key_impl();
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
    RETURN r.key_id;
END
$fn$;

CREATE FUNCTION vault_verify_audit(tbl regclass DEFAULT NULL)
RETURNS TABLE (table_name text, chain int, rows_checked bigint, first_bad_seq bigint, ok bool,
               detail text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    FOR r IN SELECT * FROM vault.verify_audit_impl($1::oid) LOOP
        IF r.sqlstate IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
        END IF;
        RETURN QUERY SELECT r.table_name, r.chain, r.rows_checked, r.first_bad_seq, r.ok, r.detail;
    END LOOP;
END
$fn$;

CREATE FUNCTION vault_export_audit(tbl regclass, from_seq bigint DEFAULT 0) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    FOR r IN SELECT * FROM vault.export_audit_impl($1::oid, $2) LOOP
        IF r.sqlstate IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
        END IF;
        RETURN NEXT r.line;
    END LOOP;
END
$fn$;

CREATE FUNCTION vault_export_checkpoints() RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    FOR r IN SELECT * FROM vault.export_checkpoints_impl() LOOP
        IF r.sqlstate IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
        END IF;
        RETURN NEXT r.line;
    END LOOP;
END
$fn$;
