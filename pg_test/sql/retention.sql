-- Retention enforcement: sweeps, the three purge methods, vault_delete, and signed purge proofs.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
SET ROLE admin1;
SELECT vault_set_retention_policy('otp', 7, 1, 'physical-delete');
SELECT vault_set_retention_policy('pan', 30, 7, 'crypto-shred');
SELECT vault_set_retention_policy('log', 30, 7, 'retention-expire');
SELECT vault_set_access_policy('team-purge', '{vault_app}', '{@owner}', '{app_b}');
RESET ROLE;
SET ROLE app_a;
SELECT count(vault_put('otp', 'o' || g, '\x0a')) AS stored FROM generate_series(1, 3) g;
SELECT vault_put('pan', 'p1', '\x0b') IS NOT NULL AS stored;
SELECT vault_put('log', 'l1', '\x0c') IS NOT NULL AS stored;
SELECT vault_put('otp', 'keep', '\x0d') IS NOT NULL AS stored;
RESET ROLE;
-- Time passes (for all but 'keep').
UPDATE vault.entries SET expires_at = now() - interval '1 second'
 WHERE purpose IN ('otp', 'pan', 'log') AND external_id <> 'keep';

-- Only an admin runs a sweep by hand.
SET ROLE app_a;
SELECT vault_purge_sweep();
\echo :SQLSTATE
RESET ROLE;
SET ROLE admin1;
SELECT vault_purge_sweep(0);
\echo :SQLSTATE
SELECT vault_purge_sweep(2) AS purged_first;
SELECT vault_purge_sweep() AS purged_rest;
SELECT vault_purge_sweep() AS nothing_left;
RESET ROLE;

-- physical-delete and retention-expire remove the row; crypto-shred overwrites the ciphertext
-- and keeps a tombstone.
SELECT purpose, external_id, length(encrypted_value) AS bytes, purged_at IS NOT NULL AS purged
  FROM vault.entries WHERE purpose IN ('otp', 'pan', 'log') ORDER BY 1, 2;
SELECT purpose, external_id, owner, purge_method, reason, purged_by, tree_size,
       length(entry_hash) AS hash_bytes, length(signature) AS sig_bytes
  FROM vault.purge_log ORDER BY purpose, external_id;
SELECT started_by, entries_purged, finished_at IS NOT NULL AS finished, errors
  FROM vault.sweep_runs ORDER BY id;

-- Afterwards a get answers VV410 (gone), whatever the method.
SET ROLE app_a;
SELECT * FROM vault_get('otp', 'o1');
\echo :SQLSTATE
SELECT * FROM vault_get('pan', 'p1');
\echo :SQLSTATE
SELECT * FROM vault_get('log', 'l1');
\echo :SQLSTATE
SELECT encrypted_value FROM vault_get('otp', 'keep');
RESET ROLE;

-- vault_delete: the owner, a role in the policy's purge roles, or an admin; nobody else.
SET ROLE app_a;
SELECT vault_put('otp', 'd1', '\x01') IS NOT NULL, vault_put('otp', 'd2', '\x02', access_policy => 'team-purge') IS NOT NULL,
       vault_put('otp', 'd3', '\x03') IS NOT NULL;
RESET ROLE;
SET ROLE app_c;
SELECT vault_delete('otp', 'd1');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_a;
SELECT vault_delete('otp', 'd1', 'customer asked to be forgotten') > 0 AS deleted_by_owner;
RESET ROLE;
SET ROLE app_b;
SELECT vault_delete('otp', 'd2') > 0 AS deleted_by_purge_role;
RESET ROLE;
SET ROLE admin1;
SELECT vault_delete('otp', 'd3', 'incident 42') > 0 AS deleted_by_admin;
SELECT vault_delete('otp', 'd3');
\echo :SQLSTATE
SELECT vault_delete('otp', 'never-was');
\echo :SQLSTATE
SELECT vault_delete(NULL, 'x');
\echo :SQLSTATE
SELECT vault_delete('otp', NULL);
\echo :SQLSTATE
SELECT vault_delete('otp', 'x', NULL);
\echo :SQLSTATE
SELECT vault_delete('OTP', 'x');
\echo :SQLSTATE
RESET ROLE;
SELECT external_id, reason, purged_by, tree_size FROM vault.purge_log
 WHERE external_id IN ('d1', 'd2', 'd3') ORDER BY external_id;

-- Every proof verifies; the log of proofs is itself chained.
SET ROLE auditor1;
SELECT count(*) AS proofs, bool_and(vault_verify_purge_proof(id)) AS all_verify FROM vault.purge_log;
SELECT count(*) AS exported FROM vault_export_purge_proofs();
SELECT table_name, sum(rows_checked) AS rows_checked, bool_and(ok) AS ok
  FROM vault_verify_audit('vault.purge_log') GROUP BY 1;
SELECT vault_verify_purge_proof(999999);
\echo :SQLSTATE
SELECT vault_verify_purge_proof(NULL);
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_a;
SELECT vault_verify_purge_proof(1);
\echo :SQLSTATE
RESET ROLE;

-- A proof altered behind the triggers no longer verifies (and the chain says which row).
SET vsql_vault.break_glass = on;
ALTER TABLE vault.purge_log DISABLE TRIGGER vault_append_only;
UPDATE vault.purge_log SET reason = 'expired long ago' WHERE external_id = 'd1';
ALTER TABLE vault.purge_log ENABLE ALWAYS TRIGGER vault_append_only;
RESET vsql_vault.break_glass;
SELECT external_id, vault_verify_purge_proof(id) AS verifies FROM vault.purge_log
 WHERE external_id IN ('d1', 'd2') ORDER BY 1;
-- (Per table: the chain that took the proof depends on the session's pid.)
SELECT table_name, bool_and(ok) AS ok,
       count(*) FILTER (WHERE NOT ok AND first_bad_seq IS NOT NULL) AS chains_naming_the_row,
       min(detail) FILTER (WHERE NOT ok) AS detail
  FROM vault_verify_audit('vault.purge_log') GROUP BY table_name;
