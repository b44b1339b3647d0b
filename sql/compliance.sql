-- Compliance evidence: the signed compliance report, Prometheus metrics, and the views an auditor
-- queries with psql. Runs last in CREATE EXTENSION. Each view answers one question (its comment
-- says which); docs/compliance.md maps them to PCI DSS, SOC 2, ISO 27001 and HIPAA.

CREATE FUNCTION vault_compliance_report() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.report::jsonb FROM vault.compliance_report_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_metrics() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.metrics FROM vault.metrics_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

-- One row per component with a status (ok, warning, failing) and a detail; for auditors, admins
-- and pg_monitor, like vault_metrics() (which exports the same rows as vsql_vault_health_status).
CREATE FUNCTION vault_health() RETURNS TABLE (component text, status text, detail text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.component, r.status, r.detail FROM vault.health_impl() r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

-- Functions in a view run with the privileges of whoever queries it: the key inventory's
-- readers may list KEK identifiers (never key material).
REVOKE ALL ON FUNCTION vault.replication_kek_ids() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault.replication_kek_ids() TO vault_auditor, vault_admin;

-- Is anything kept longer than its policy allows? Entries past their expiry that are not destroyed
-- yet (normal for at most one vsql_vault.sweep_interval), and entries whose expiry lies beyond
-- their purpose's maximum retention counted from when they were stored (possible only after the
-- maximum was lowered): the second kind must be empty.
CREATE VIEW vault.retention_compliance AS
SELECT e.id AS entry_id, e.purpose, e.external_id, e.owner, e.updated_at AS stored_at, e.expires_at,
       rp.max_retention_days, rp.purge_method,
       CASE WHEN e.expires_at <= now() THEN 'past expiry, not purged'
            ELSE 'expiry beyond policy maximum' END AS finding,
       CASE WHEN e.expires_at <= now() THEN now() - e.expires_at END AS overdue_by,
       CASE WHEN e.expires_at > e.updated_at + make_interval(days => rp.max_retention_days)
            THEN e.expires_at - (e.updated_at + make_interval(days => rp.max_retention_days))
       END AS beyond_maximum_by
  FROM vault.entries e
  JOIN vault.retention_policies rp ON rp.purpose = e.purpose
 WHERE e.purged_at IS NULL
   AND (e.expires_at <= now()
        OR e.expires_at > e.updated_at + make_interval(days => rp.max_retention_days));
COMMENT ON VIEW vault.retention_compliance IS
    'Is anything kept longer than its policy allows? (entries past expiry not purged; entries whose expiry exceeds the policy maximum: must be none)';

-- Who used the vault, for what, and how often was it refused? Per UTC day, role, purpose and
-- operation, from counters the access log keeps as it grows. identified: how many of the calls
-- (granted or denied) stated an end user or service (vsql_vault.on_behalf_of).
CREATE VIEW vault.access_summary AS
SELECT d.day, d.role_name, nullif(d.purpose, '') AS purpose, d.operation,
       coalesce(sum(d.calls) FILTER (WHERE d.granted), 0)::bigint AS granted,
       coalesce(sum(d.calls) FILTER (WHERE NOT d.granted), 0)::bigint AS denied,
       coalesce(sum(d.identified), 0)::bigint AS identified
  FROM vault.access_daily d
 GROUP BY d.day, d.role_name, d.purpose, d.operation;
COMMENT ON VIEW vault.access_summary IS
    'Who used the vault, for which purpose and operation, per UTC day, and how often was it refused?';

-- Who was refused what, when, from where, and why? on_behalf_of: the end user or service the
-- application said it acted for.
CREATE VIEW vault.access_denials AS
SELECT l.id AS log_id, l.logged_at, l.role_name, l.session_user_name, l.application_name,
       l.client_addr, l.operation, l.purpose, l.external_id, l.sqlstate, l.reason, l.on_behalf_of
  FROM vault.access_log l
 WHERE NOT l.granted;
COMMENT ON VIEW vault.access_denials IS
    'Who was refused what, when, from where, and why? (check one with vault_verify_audit)';

-- What was destroyed, when, by whom, under which policy, and where is the proof?
-- vault_verify_purge_proof(proof_id) checks one; vault_export_purge_proofs() exports them all.
-- The times shown are computed from the signed *_us values, not read from the log's timestamptz
-- columns: one source of truth (vault_verify_purge_proof also fails a proof whose columns differ).
CREATE VIEW vault.purge_evidence AS
SELECT g.id AS proof_id,
       '2000-01-01 00:00:00+00'::timestamptz + g.purged_at_us * interval '1 microsecond' AS purged_at,
       g.purpose, g.external_id, g.owner, g.entry_id,
       '2000-01-01 00:00:00+00'::timestamptz + g.created_at_us * interval '1 microsecond' AS created_at,
       '2000-01-01 00:00:00+00'::timestamptz + g.expires_at_us * interval '1 microsecond' AS expires_at,
       g.purge_method, g.max_retention_days, g.default_ttl_days, g.reason,
       g.purged_by, g.sweep_id, g.batch_id, g.tree_size, g.key_id,
       encode(g.merkle_root, 'hex') AS merkle_root, encode(g.entry_hash, 'hex') AS entry_hash
  FROM vault.purge_log g;
COMMENT ON VIEW vault.purge_evidence IS
    'What was destroyed, when, by whom, under which policy, and where is its signed proof? (vault_verify_purge_proof(proof_id))';

-- Which keys protect what? The application's key references (which purposes, how many live
-- entries, how old the oldest ciphertext is: stale keys show), the Ed25519 keys that sign the
-- evidence, and the key-encryption keys of the replication stream. Identifiers only: no key
-- material is readable through SQL.
CREATE VIEW vault.key_inventory AS
SELECT 'application key_ref'::text AS kind, e.key_ref AS key_id,
       array_agg(DISTINCT e.purpose ORDER BY e.purpose) AS purposes, count(*) AS entries,
       min(e.updated_at) AS oldest_use, max(e.updated_at) AS newest_use,
       now() - min(e.updated_at) AS oldest_age, NULL::timestamptz AS retired_at
  FROM vault.entries e
 WHERE e.purged_at IS NULL
 GROUP BY e.key_ref
UNION ALL
SELECT 'evidence signing key', k.key_id, NULL, NULL, k.created_at, NULL, now() - k.created_at,
       k.retired_at
  FROM vault.signing_keys k
UNION ALL
SELECT 'replication KEK', x.id, NULL, NULL, NULL, NULL, NULL, NULL
  FROM unnest(vault.replication_kek_ids()) AS x(id);
COMMENT ON VIEW vault.key_inventory IS
    'Which keys protect what, and how old is the oldest ciphertext under each? (identifiers only)';

-- Is the audit trail intact? For every chain of every protected table: how far it reaches, the
-- last signed checkpoint and what has been appended since, and the last vault_verify_audit that
-- covered it with its verdict.
CREATE VIEW vault.audit_integrity AS
SELECT t.table_name, t.identity AS table_identity, h.chain_id AS chain, h.seq AS rows_chained,
       c.checkpointed_at AS last_checkpoint_at, c.seq AS checkpoint_seq,
       h.seq - coalesce(c.seq, 0) AS rows_since_checkpoint, c.key_id AS checkpoint_key_id,
       v.logged_at AS last_verified_at, v.role_name AS last_verified_by,
       CASE WHEN v.logged_at IS NULL THEN NULL
            ELSE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v.details->'failed') f
                              WHERE f->>'table' = t.identity
                                AND (f->>'chain')::int = h.chain_id)
                 AND ((v.details->>'failed_chains')::int <= jsonb_array_length(v.details->'failed')
                      OR (v.details->>'ok')::bool)
       END AS last_verification_ok
  FROM vault.protected_tables t
  JOIN vault.chain_heads h ON h.identity = t.identity
  LEFT JOIN LATERAL (
      SELECT c.checkpointed_at, c.seq, c.key_id FROM vault.audit_checkpoints c
       WHERE c.table_identity = t.identity AND c.chain = h.chain_id
       ORDER BY c.id DESC LIMIT 1) c ON true
  LEFT JOIN LATERAL (
      SELECT l.logged_at, l.role_name, l.details FROM vault.access_log l
       WHERE l.operation = 'verify_audit' AND l.granted
         AND (l.details->>'scope' = 'all' OR l.details->'tables' ? t.identity)
       ORDER BY l.id DESC LIMIT 1) v ON true;
COMMENT ON VIEW vault.audit_integrity IS
    'Is the audit trail intact? Every chain, its last signed checkpoint, and the last verification that covered it.';

REVOKE ALL ON vault.retention_compliance, vault.access_summary, vault.access_denials,
              vault.purge_evidence, vault.key_inventory, vault.audit_integrity FROM PUBLIC;
GRANT SELECT ON vault.retention_compliance, vault.access_summary, vault.access_denials,
                vault.purge_evidence, vault.key_inventory, vault.audit_integrity,
                vault.access_daily
    TO vault_auditor, vault_admin;

-- Hot standbys hand the records of the reads they serve to the primary through this function;
-- only vault_forwarder may call it (README, "High availability and read replicas").
REVOKE ALL ON FUNCTION vault.accept_forwarded_record(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION vault.accept_forwarded_record(text, text) TO vault_forwarder;

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

-- vault.signing_keys (sql/audit.sql) is append-only and chained like the other evidence tables
-- (issue 15, item 7). Protected here, after every other built-in table, so their identities stay
-- what they were in 0.1.0.
SELECT vault.protect_builtin('vault.signing_keys'::regclass::oid, 1);
UPDATE vault.protected_tables SET builtin = true WHERE relid = 'vault.signing_keys'::regclass;

-- vault.key_directives (sql/governance.sql, issue 18): append-only and chained like the other
-- evidence tables; protected last, so every earlier identity stays what it was.
SELECT vault.protect_builtin('vault.key_directives'::regclass::oid, 1);
UPDATE vault.protected_tables SET builtin = true WHERE relid = 'vault.key_directives'::regclass;
