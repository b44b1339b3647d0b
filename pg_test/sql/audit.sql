-- Tamper-evident audit: protecting a table, what is refused, verification, checkpoints, export.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
CREATE SCHEMA tenant AUTHORIZATION app_a;
GRANT USAGE ON SCHEMA tenant TO PUBLIC;
SET ROLE app_a;
CREATE TABLE tenant.audit_log (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL);
INSERT INTO tenant.audit_log (tenant, event) VALUES ('acme', 'before protection');
-- The table's owner may protect it (one chain here, so sequence numbers are predictable);
-- rows already there are chained too.
SELECT vault_protect_table('tenant.audit_log', 1);
INSERT INTO tenant.audit_log (tenant, event) VALUES ('acme', 'login'), ('acme', 'export');
SELECT id, tenant, event, chain_seq IS NOT NULL AS chained, length(row_hash) AS hash_bytes,
       length(prev_hash) AS prev_bytes
  FROM tenant.audit_log ORDER BY id;
-- Append-only, and the protection cannot be taken off, by the owner...
UPDATE tenant.audit_log SET event = 'x';
\echo :SQLSTATE
DELETE FROM tenant.audit_log;
\echo :SQLSTATE
TRUNCATE tenant.audit_log;
\echo :SQLSTATE
ALTER TABLE tenant.audit_log DISABLE TRIGGER vault_append_only;
\echo :SQLSTATE
ALTER TABLE tenant.audit_log RENAME TO renamed;
\echo :SQLSTATE
ALTER TABLE tenant.audit_log SET SCHEMA public;
\echo :SQLSTATE
DROP TRIGGER vault_chain ON tenant.audit_log;
\echo :SQLSTATE
DROP TABLE tenant.audit_log;
\echo :SQLSTATE
RESET ROLE;
-- ...nor by a superuser (also under session_replication_role = replica).
UPDATE tenant.audit_log SET event = 'x';
\echo :SQLSTATE
SET session_replication_role = replica;
DELETE FROM tenant.audit_log;
\echo :SQLSTATE
RESET session_replication_role;
ALTER TABLE tenant.audit_log DISABLE TRIGGER ALL;
\echo :SQLSTATE
ALTER SCHEMA tenant RENAME TO tenant2;
\echo :SQLSTATE
DROP TABLE tenant.audit_log;
\echo :SQLSTATE
SELECT count(*) AS rows_kept FROM tenant.audit_log;
SELECT table_name, identity, chains, builtin FROM vault.protected_tables ORDER BY id;

-- Who may do what.
SET ROLE app_b;
SELECT vault_protect_table('tenant.audit_log');
\echo :SQLSTATE
SELECT vault_checkpoint();
\echo :SQLSTATE
SELECT * FROM vault_verify_audit();
\echo :SQLSTATE
SELECT * FROM vault_export_audit('tenant.audit_log');
\echo :SQLSTATE
RESET ROLE;
SET ROLE admin1;
SELECT vault_rotate_signing_key();
\echo :SQLSTATE
SELECT vault_checkpoint() > 0 AS signed;
RESET ROLE;
SET ROLE auditor1;
SELECT table_name, sum(rows_checked) AS rows_checked, bool_and(ok) AS ok
  FROM vault_verify_audit('tenant.audit_log') GROUP BY 1;
-- Exporting rows takes SELECT on the table: the auditor's role alone does not open it.
SELECT count(*) AS exported_lines FROM vault_export_audit('tenant.audit_log');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_a;
GRANT SELECT ON tenant.audit_log TO auditor1;
RESET ROLE;
SET ROLE auditor1;
SELECT count(*) AS exported_lines FROM vault_export_audit('tenant.audit_log');
SELECT count(*) AS exported_from_seq_2 FROM vault_export_audit('tenant.audit_log', 2);
SELECT bool_and(ok) AS everything_intact FROM vault_verify_audit();
SELECT count(*) > 0 AS checkpoints, bool_and(length(signature) = 64) AS ed25519_signatures
  FROM vault.audit_checkpoints;
SELECT count(*) AS active_keys, bool_and(length(public_key) = 64) AS hex_public_keys
  FROM vault.signing_keys WHERE retired_at IS NULL;
RESET ROLE;

-- Bad input.
SELECT vault_protect_table(NULL);
\echo :SQLSTATE
SELECT vault_protect_table('tenant.audit_log', 0);
\echo :SQLSTATE
SELECT vault_protect_table('tenant.audit_log', 257);
\echo :SQLSTATE
CREATE VIEW tenant.not_a_table AS SELECT 1 AS x;
SELECT vault_protect_table('tenant.not_a_table');
\echo :SQLSTATE
SELECT * FROM vault_verify_audit('pg_catalog.pg_class');
\echo :SQLSTATE
SELECT * FROM vault_export_audit(NULL);
\echo :SQLSTATE
-- Every one of these calls is in the access log.
SELECT operation, role_name, granted, sqlstate FROM vault.access_log
 WHERE operation IN ('protect_table', 'checkpoint', 'verify_audit', 'export_audit', 'rotate_signing_key', 'break_glass')
 ORDER BY id;
