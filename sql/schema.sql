-- vsql_vault schema: roles, tables, append-only protection and privileges.
-- Runs first in CREATE EXTENSION (bootstrap). Hand-written so the layout reads as documentation.

-- Group roles are cluster-wide: a second database that installs the extension reuses them.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vault_app') THEN
        CREATE ROLE vault_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vault_auditor') THEN
        CREATE ROLE vault_auditor NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vault_admin') THEN
        CREATE ROLE vault_admin NOLOGIN;
    END IF;
    -- The role a hot standby's connection to the primary uses (vsql_vault.primary_conninfo) to
    -- hand over the access records of the reads it serves (vault.accept_forwarded_record).
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'vault_forwarder') THEN
        CREATE ROLE vault_forwarder NOLOGIN;
    END IF;
END
$roles$;

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

CREATE SCHEMA IF NOT EXISTS vault;
REVOKE ALL ON SCHEMA vault FROM PUBLIC;
-- USAGE lets callers reach the API's helper functions; every table keeps its own privileges.
GRANT USAGE ON SCHEMA vault TO PUBLIC;

CREATE TABLE vault.retention_policies (
    purpose             text PRIMARY KEY CHECK (purpose ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    max_retention_days  int NOT NULL CHECK (max_retention_days > 0),
    default_ttl_days    int NOT NULL CHECK (default_ttl_days > 0),
    purge_method        text NOT NULL
        CHECK (purge_method IN ('physical-delete', 'crypto-shred', 'retention-expire')),
    -- Every destruction writes a signed purge proof; false was never honoured and is refused
    -- (vault_set_retention_policy: 22023), so the column cannot say otherwise.
    require_purge_proof bool NOT NULL DEFAULT true
        CONSTRAINT retention_policies_require_purge_proof CHECK (require_purge_proof),
    description         text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    updated_by          name NOT NULL,
    CHECK (default_ttl_days <= max_retention_days)
);

CREATE TABLE vault.access_policies (
    name           text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    store_roles    name[] NOT NULL,
    retrieve_roles name[] NOT NULL,
    purge_roles    name[] NOT NULL,
    max_retrievals int CHECK (max_retrievals > 0),
    description    text,
    builtin        bool NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    updated_by     name NOT NULL,
    -- Calls under this policy must state the end user or service they act for
    -- (vsql_vault.on_behalf_of), or are refused with 28000. Last, as 0.2.0's ALTER TABLE put it.
    require_identity bool NOT NULL DEFAULT false
);

-- '@owner' is the entry's owner, '@purpose' any role granted the entry's purpose.
INSERT INTO vault.access_policies
    (name, store_roles, retrieve_roles, purge_roles, description, builtin, updated_by)
VALUES
    ('owner-only', '{vault_app,vault_admin}', '{@owner}', '{@owner}',
     'Only the role that stored the entry retrieves it (default).', true, current_user),
    ('same-purpose', '{vault_app,vault_admin}', '{@owner,@purpose}', '{@owner}',
     'The owner and any role granted the purpose retrieve it.', true, current_user),
    ('open-retrieve', '{vault_app,vault_admin}', '{@owner,vault_app}', '{@owner}',
     'Any vault_app member retrieves it.', true, current_user),
    ('admin-only', '{vault_admin}', '{vault_admin}', '{vault_admin}',
     'Only vault_admin members store and retrieve it.', true, current_user);

CREATE TABLE vault.purpose_grants (
    purpose    text NOT NULL REFERENCES vault.retention_policies (purpose),
    role_name  name NOT NULL,
    granted_by name NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (purpose, role_name)
);

CREATE TABLE vault.entries (
    id              bigserial PRIMARY KEY,
    purpose         text NOT NULL REFERENCES vault.retention_policies (purpose),
    external_id     text NOT NULL,
    encrypted_value bytea NOT NULL,
    algorithm_hint  text,
    key_ref         text,
    metadata        jsonb NOT NULL DEFAULT '{}',
    access_policy   text NOT NULL REFERENCES vault.access_policies (name),
    owner           name NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    purged_at       timestamptz,
    UNIQUE (purpose, external_id)
);
-- Ciphertext does not compress; storing it out of line uncompressed saves the attempt.
ALTER TABLE vault.entries ALTER COLUMN encrypted_value SET STORAGE EXTERNAL;
-- Sweeps take expired entries in (expires_at, id) order, each batch resuming after the last
-- entry of the one before (src/retention/destroy.rs, sweep_batch).
CREATE INDEX entries_expiry ON vault.entries (expires_at, id) WHERE purged_at IS NULL;

-- One row per decision the vault made, granted or denied. Rows are written by the audit writer
-- (a background worker) in its own transactions, so they survive the caller's ROLLBACK.
CREATE TABLE vault.access_log (
    id                bigserial PRIMARY KEY,
    logged_at         timestamptz NOT NULL,
    role_name         name NOT NULL,
    session_user_name name NOT NULL,
    application_name  text,
    client_addr       inet,
    backend_pid       int NOT NULL,
    operation         text NOT NULL,
    purpose           text,
    external_id       text,
    entry_id          bigint,
    granted           bool NOT NULL,
    sqlstate          text,
    reason            text,
    details           jsonb,
    caller_xid        xid8,
    -- Chain fields, filled by the tamper-evident audit layer (hash chain and signed checkpoints).
    chain_id          int,
    chain_seq         bigint,
    prev_hash         bytea,
    row_hash          bytea,
    -- vsql_vault.on_behalf_of: the end user or service the application said it acted for (not
    -- authenticated; NULL when unset). Last, as ALTER TABLE ADD COLUMN put it in 0.1.0 databases.
    on_behalf_of      text
);
CREATE INDEX access_log_logged_at ON vault.access_log (logged_at);
CREATE INDEX access_log_entry_gets ON vault.access_log (entry_id) WHERE operation = 'get' AND granted;
-- A granted get whose caller stopped waiting after its record was written: it returned no data
-- and is taken off the entry's max_retrievals count.
CREATE INDEX access_log_entry_not_returned ON vault.access_log (entry_id)
    WHERE operation = 'get_not_returned';
-- The evidence queries an auditor runs against a log of millions of rows: recent denials, and the
-- last verification of the chains.
CREATE INDEX access_log_denials ON vault.access_log (logged_at) WHERE NOT granted;
CREATE INDEX access_log_verifications ON vault.access_log (id) WHERE operation = 'verify_audit' AND granted;

-- Decisions counted per UTC day, role, purpose, operation and outcome, so access summaries and
-- metrics never scan the log. Derived data: a statement trigger adds each insert's rows (the
-- audit writer inserts a whole batch in one statement), and a restore rebuilds it the same way.
CREATE TABLE vault.access_daily (
    day       date NOT NULL,
    role_name name NOT NULL,
    purpose   text NOT NULL,
    operation text NOT NULL,
    granted   bool NOT NULL,
    calls     bigint NOT NULL,
    -- Of these, calls made with vsql_vault.on_behalf_of set.
    identified bigint NOT NULL DEFAULT 0,
    -- The access-log chain the rows were appended to: records written in callers' own
    -- transactions (a granted put) count on their chain's row, which only that chain's holder
    -- updates, so concurrent puts do not wait for each other's commit here. Readers sum.
    chain     int NOT NULL DEFAULT 0,
    PRIMARY KEY (day, role_name, purpose, operation, granted, chain)
);
REVOKE ALL ON vault.access_daily FROM PUBLIC;

CREATE FUNCTION vault.count_access() RETURNS trigger
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
CREATE TRIGGER access_log_count AFTER INSERT ON vault.access_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION vault.count_access();
ALTER TABLE vault.access_log ENABLE ALWAYS TRIGGER access_log_count;

CREATE FUNCTION vault.refuse_modification() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'VV403',
        MESSAGE = format('%s on %I.%I is refused: the table is append-only',
                         TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME);
END
$fn$;

CREATE TRIGGER access_log_append_only BEFORE UPDATE OR DELETE ON vault.access_log
    FOR EACH ROW EXECUTE FUNCTION vault.refuse_modification();
CREATE TRIGGER access_log_no_truncate BEFORE TRUNCATE ON vault.access_log
    FOR EACH STATEMENT EXECUTE FUNCTION vault.refuse_modification();
-- ALWAYS: also under session_replication_role = replica.
ALTER TABLE vault.access_log ENABLE ALWAYS TRIGGER access_log_append_only;
ALTER TABLE vault.access_log ENABLE ALWAYS TRIGGER access_log_no_truncate;

-- Nobody but the owner (vault_owner, from the end of the install script on) touches the tables
-- directly; the API functions switch to the owner internally after recording who called them.
REVOKE ALL ON vault.retention_policies, vault.access_policies, vault.purpose_grants,
              vault.entries, vault.access_log FROM PUBLIC;
GRANT SELECT ON vault.retention_policies, vault.access_policies, vault.purpose_grants,
                vault.access_log TO vault_auditor, vault_admin;
-- Metadata, never the blob.
GRANT SELECT (id, purpose, external_id, algorithm_hint, key_ref, metadata, access_policy, owner,
              created_at, updated_at, expires_at, purged_at)
    ON vault.entries TO vault_auditor, vault_admin;

-- pg_dump keeps the extension's data (built-in policies come back with CREATE EXTENSION).
SELECT pg_catalog.pg_extension_config_dump('vault.retention_policies', '');
SELECT pg_catalog.pg_extension_config_dump('vault.access_policies', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('vault.purpose_grants', '');
SELECT pg_catalog.pg_extension_config_dump('vault.entries', '');
SELECT pg_catalog.pg_extension_config_dump('vault.entries_id_seq', '');
-- Dumped in chain order, the order in which a restore's rows link to their chains
-- (src/chain/restore.rs); pg_dump places the condition after FROM.
SELECT pg_catalog.pg_extension_config_dump('vault.access_log', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.access_log_id_seq', '');

-- True when `caller` may act under a policy role list for an entry of `purpose` owned by `owner`.
-- PL/pgSQL, not SQL: a SQL function with a sub-select is never inlined, so it was parsed and
-- planned again on every call (85% of a vault_get's CPU); PL/pgSQL keeps its plan for the
-- session. Only the owner may execute it, and the API calls it under a pinned search_path.
CREATE FUNCTION vault.role_allowed(roles name[], caller oid, owner name, purpose text)
RETURNS bool LANGUAGE plpgsql STABLE AS $fn$
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM pg_catalog.unnest(roles) AS r(role_name)
        WHERE (r.role_name OPERATOR(pg_catalog.=) '@owner'
               AND owner OPERATOR(pg_catalog.=) (SELECT rolname FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) caller))
           OR (r.role_name OPERATOR(pg_catalog.=) '@purpose'
               AND EXISTS (SELECT 1 FROM vault.purpose_grants g
                           JOIN pg_catalog.pg_roles gr ON gr.rolname OPERATOR(pg_catalog.=) g.role_name
                           WHERE g.purpose OPERATOR(pg_catalog.=) role_allowed.purpose
                             AND pg_catalog.pg_has_role(caller, gr.oid, 'USAGE')))
           OR (pg_catalog.left(r.role_name, 1) OPERATOR(pg_catalog.<>) '@'
               AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles x
                           WHERE x.rolname OPERATOR(pg_catalog.=) r.role_name
                             AND pg_catalog.pg_has_role(caller, x.oid, 'USAGE'))));
END
$fn$;
REVOKE ALL ON FUNCTION vault.role_allowed(name[], oid, name, text) FROM PUBLIC;

-- How the API wrappers raise a failure that a vault.*_impl function reported: pgrx can raise only
-- the SQLSTATEs PostgreSQL defines (a custom code such as VV428 would be lost), so the Rust
-- functions return (sqlstate, message, ...) and each wrapper calls this in its one statement.
-- True when nothing was reported. VOLATILE because it raises; PUBLIC may execute it, since the
-- wrappers run as their caller.
CREATE FUNCTION vault.raise_reported(code text, message text) RETURNS bool
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF code IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
    END IF;
    RETURN true;
END
$fn$;
