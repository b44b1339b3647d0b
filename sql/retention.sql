-- Retention enforcement: sweep runs and signed purge proofs. Runs last in CREATE EXTENSION.

-- Microseconds since 2000-01-01 UTC: the time unit of every canonical encoding.
CREATE FUNCTION vault.to_us(ts timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT (extract(epoch FROM ts - '2000-01-01 00:00:00+00'::timestamptz) * 1000000)::bigint
$fn$;

CREATE TABLE vault.sweep_runs (
    id             bigserial PRIMARY KEY,
    started_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at    timestamptz,
    started_by     text NOT NULL,
    entries_purged bigint NOT NULL DEFAULT 0,
    batches        int NOT NULL DEFAULT 0,
    errors         text
);

CREATE SEQUENCE vault.purge_batch_seq;

-- One row per destroyed entry: what existed, when it was destroyed and under which policy,
-- with the inclusion path of its statement in its batch's Merkle tree and the batch root's
-- Ed25519 signature. Append-only and chained like the access log.
CREATE TABLE vault.purge_log (
    id                 bigserial PRIMARY KEY,
    purged_at          timestamptz NOT NULL,
    purged_at_us       bigint NOT NULL,
    purpose            text NOT NULL,
    external_id        text NOT NULL,
    owner              name NOT NULL,
    entry_id           bigint NOT NULL,
    created_at_us      bigint NOT NULL,
    expires_at_us      bigint NOT NULL,
    created_at         timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    max_retention_days int NOT NULL,
    default_ttl_days   int NOT NULL,
    purge_method       text NOT NULL,
    access_policy      text NOT NULL,
    reason             text NOT NULL,
    purged_by          text NOT NULL,
    entry_hash         bytea NOT NULL,
    sweep_id           bigint,
    batch_id           bigint NOT NULL,
    leaf_index         bigint NOT NULL,
    tree_size          bigint NOT NULL,
    inclusion_path     bytea[] NOT NULL,
    merkle_root        bytea NOT NULL,
    signed_at_us       bigint NOT NULL,
    key_id             text NOT NULL,
    signature          bytea NOT NULL
);
CREATE INDEX purge_log_entry ON vault.purge_log (purpose, external_id);
CREATE INDEX purge_log_purged_at ON vault.purge_log (purged_at);
CREATE INDEX purge_log_sweep ON vault.purge_log (sweep_id) WHERE sweep_id IS NOT NULL;
-- vault_verify_purge_proof checks each proof's batch as a whole (its unsigned sweep_id).
CREATE INDEX purge_log_batch ON vault.purge_log (batch_id);

REVOKE ALL ON vault.sweep_runs, vault.purge_log FROM PUBLIC;
GRANT SELECT ON vault.sweep_runs, vault.purge_log TO vault_auditor, vault_admin;

-- Chain 0 is the retention worker's; callers' proofs (a re-put's superseded version,
-- vault_delete, vault_purge_sweep) take chains 1-16 with SKIP LOCKED (src/chain/head.rs).
SELECT vault.protect_builtin('vault.purge_log'::regclass::oid, 17);
UPDATE vault.protected_tables SET builtin = true WHERE relid = 'vault.purge_log'::regclass;

SELECT pg_catalog.pg_extension_config_dump('vault.sweep_runs', '');
SELECT pg_catalog.pg_extension_config_dump('vault.sweep_runs_id_seq', '');
-- Dumped in chain order, the order in which a restore's rows link to their chains
-- (src/chain/restore.rs); pg_dump places the condition after FROM.
SELECT pg_catalog.pg_extension_config_dump('vault.purge_log', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.purge_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('vault.purge_batch_seq', '');

CREATE FUNCTION vault_delete(purpose text, external_id text, reason text DEFAULT 'manual')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.purge_id FROM vault.delete_impl($1, $2, $3) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_purge_sweep(max_entries int DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.purged FROM vault.purge_sweep_impl($1) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_verify_purge_proof(id bigint) RETURNS bool
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.ok FROM vault.verify_purge_proof_impl($1) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_export_purge_proofs(from_id bigint DEFAULT 0) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.line
                   FROM vault.export_purge_proofs_impl($1) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;
