-- Compliance evidence on a known data set: the signed report, the auditor views and the metrics.
-- Earlier files left entries, purges, denials and a tampered purge proof behind; the figures
-- below include them.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
SET ROLE admin1;
SELECT vault_set_retention_policy('med', 100, 30, 'crypto-shred', description => 'health records');
SELECT vault_set_retention_policy('tmp', 10, 5, 'physical-delete');
RESET ROLE;
SET ROLE app_a;
SELECT count(vault_put('med', 'm' || g, '\x0a', key_ref => 'kek-2024')) AS stored
  FROM generate_series(1, 3) g;
SELECT vault_put('med', 'm4', '\x0b', key_ref => 'kek-2026') IS NOT NULL AS stored;
SELECT vault_put('tmp', 't1', '\x0c', key_ref => 'kek-2026') IS NOT NULL AS stored;
SELECT vault_put('tmp', 't2', '\x0d', expires_at => now() + interval '9 days') IS NOT NULL AS stored;
RESET ROLE;
-- A refused read, and a refused report.
SET ROLE app_c;
SELECT * FROM vault_get('med', 'm1');
\echo :SQLSTATE
SELECT vault_compliance_report();
\echo :SQLSTATE
SELECT vault_metrics();
\echo :SQLSTATE
SELECT count(*) FROM vault.retention_compliance;
\echo :SQLSTATE
RESET ROLE;
-- Time passes for m1, m2 and t1; then the maximum of 'tmp' is lowered below t2's expiry.
UPDATE vault.entries SET expires_at = now() - interval '1 day'
 WHERE (purpose, external_id) IN (('med', 'm1'), ('med', 'm2'), ('tmp', 't1'));
SET ROLE admin1;
SELECT vault_set_retention_policy('tmp', 3, 2, 'physical-delete');
RESET ROLE;

-- Before the sweep: the expired entries and the one beyond its policy show up.
SET ROLE auditor1;
SELECT purpose, external_id, finding, overdue_by IS NOT NULL AS overdue,
       beyond_maximum_by IS NOT NULL AS beyond_maximum, max_retention_days, purge_method
  FROM vault.retention_compliance WHERE purpose IN ('med', 'tmp') ORDER BY 1, 2;
RESET ROLE;
SET ROLE admin1;
SELECT vault_purge_sweep() >= 3 AS swept;
RESET ROLE;

SET ROLE auditor1;
-- After it only the entry beyond its policy's maximum remains (it is not expired yet).
SELECT purpose, external_id, finding FROM vault.retention_compliance ORDER BY 1, 2;
-- Purge evidence: m1 and m2 crypto-shredded, t1 deleted, each with a proof that verifies.
SELECT purpose, external_id, purge_method, reason, purged_by, vault_verify_purge_proof(proof_id) AS proof_ok
  FROM vault.purge_evidence WHERE purpose IN ('med', 'tmp') ORDER BY 1, 2;
-- Crypto-shredded entries keep a tombstone (the ciphertext is gone, see the retention test).
SELECT purpose, external_id, purged_at IS NOT NULL AS tombstone
  FROM vault.entries WHERE purpose = 'med' AND purged_at IS NOT NULL ORDER BY 2;
-- Denials: who was refused what, and why.
SELECT role_name, operation, purpose, external_id, sqlstate, reason
  FROM vault.access_denials WHERE role_name = 'app_c' AND operation IN ('get', 'compliance_report', 'metrics')
 ORDER BY log_id DESC LIMIT 3;
-- Access by role, purpose and operation.
SELECT role_name, purpose, operation, sum(granted) AS granted, sum(denied) AS denied
  FROM vault.access_summary WHERE purpose IN ('med', 'tmp') OR operation = 'compliance_report'
 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
-- The summary agrees with the log it is counted from.
SELECT (SELECT sum(granted + denied) FROM vault.access_summary) = (SELECT count(*) FROM vault.access_log)
       AS summary_matches_log;
-- Keys: kek-2024 protects one live entry now (m3), kek-2026 one (m4; t1 was deleted). Identifiers
-- only: no key material is readable anywhere.
SELECT kind, key_id, purposes, entries FROM vault.key_inventory
 WHERE kind = 'application key_ref' AND key_id LIKE 'kek-%' ORDER BY key_id;
SELECT kind, count(*) >= 1 AS listed FROM vault.key_inventory GROUP BY kind ORDER BY kind;
-- Audit integrity: the purge proof altered in the retention test is caught and shown per chain.
SELECT table_name, bool_and(ok) AS all_ok FROM vault_verify_audit() GROUP BY 1 ORDER BY 1;
-- (Per table: which of the purge log's caller chains took the altered proof depends on the
-- session's pid.)
SELECT table_name, count(*) AS chains, bool_and(last_verified_at IS NOT NULL) AS verified,
       count(*) FILTER (WHERE NOT last_verification_ok) AS failed_chains
  FROM vault.audit_integrity GROUP BY table_name ORDER BY table_name;

-- The signed report, field by field (times and the signature change with every run).
SELECT r->'summary' AS summary FROM (SELECT vault_compliance_report() AS r) x;
SELECT key, value FROM jsonb_each((SELECT vault_compliance_report()->'by_purpose'))
 WHERE key IN ('med', 'tmp') ORDER BY key;
SELECT r->'retention_findings' AS findings,
       r->'purge_compliance'->'entries_purged_last_sweep' AS purged_last_sweep,
       r->'purge_compliance'->'purge_proof_available' AS proofs_available,
       r->'purge_compliance'->'purge_sweep_last_run' IS NOT NULL AS sweep_time_shown,
       r->'audit_integrity'->'last_verification'->'ok' AS last_verification_ok,
       jsonb_path_query_array(r->'audit_integrity'->'last_verification'->'failed',
                              '$[*] ? (@.chain >= 0 && @.first_bad_seq >= 1).table') AS failed_tables,
       r->'access_summary'->'denied_accesses_last_30_days' =
           to_jsonb((SELECT count(*) FROM vault.access_log WHERE NOT granted)) AS denied_count_matches,
       jsonb_path_query_array(r->'key_staleness', '$[*].key_ref') AS key_refs,
       r->'signing_key_id' = to_jsonb((SELECT key_id FROM vault.signing_keys WHERE retired_at IS NULL))
           AS signed_by_current_key,
       length(r->>'signature') AS signature_hex_chars,
       r->>'extension_version' AS version
  FROM (SELECT vault_compliance_report() AS r) x;
-- Metrics: one line per family member, in the Prometheus text format.
SELECT line FROM regexp_split_to_table(vault_metrics(), E'\n') AS line
 WHERE line ~ '^vsql_vault_(entries\{purpose="(med|tmp)"|expired_pending|last_verification_ok|purge_proofs|operations_total\{operation="compliance_report")'
 ORDER BY line;
RESET ROLE;
