-- Key governance (issue 18): directives, their enforcement in vault_put, revocation, the
-- re-encryption queue. A statement expected to fail shows its message, and the \echo :SQLSTATE
-- after it its SQLSTATE.
\set SHOW_CONTEXT never
SET TimeZone = 'UTC';
SET ROLE admin1;
SELECT vault_set_retention_policy('kg', 365, 30);
RESET ROLE;
SET ROLE app_a;
SELECT count(vault_put('kg', 'pay' || g, '\x01', 'AES-256-GCM', 'kms://payments/k1')) AS stored
  FROM generate_series(1, 3) g;
SELECT vault_put('kg', 'bill1', '\x01', 'aes-256-gcm', 'kms://billing/k1') IS NOT NULL AS stored;
SELECT vault_put('kg', 'old1', '\x01', '3DES', 'kms://legacy/k1') IS NOT NULL AS stored;
RESET ROLE;
SET ROLE app_b;
SELECT vault_put('kg', 'payb', '\x01', 'aes-256-gcm', 'kms://payments/k2') IS NOT NULL AS stored;
RESET ROLE;

-- Only vault_admin issues or revokes directives (42501), and the refusal is logged.
SET ROLE app_a;
SELECT vault_key_directive('retire-key', 'kms://payments/*');
\echo :SQLSTATE
SELECT vault_revoke_directive(1, 'no');
\echo :SQLSTATE
RESET ROLE;
SET ROLE auditor1;
SELECT vault_key_directive('retire-key', 'kms://payments/*');
\echo :SQLSTATE
RESET ROLE;
SELECT operation, granted, sqlstate FROM vault.access_log
 WHERE operation IN ('key_directive', 'revoke_directive') ORDER BY id;

-- Bad arguments: 22004 for NULL, 22023 for a bad value; nothing stored.
SET ROLE admin1;
SELECT vault_key_directive(NULL, 'k');
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', NULL);
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', 'k', NULL);
\echo :SQLSTATE
SELECT vault_key_directive('rotate-key', 'k');
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', '*');
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', 'kms://*/k1');
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', '');
\echo :SQLSTATE
SELECT vault_key_directive('deny-algorithm', 'AES*');
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', 'k', grace => interval '-1 day');
\echo :SQLSTATE
SELECT vault_key_directive('cryptoperiod', 'kms://*');
\echo :SQLSTATE
SELECT vault_key_directive('cryptoperiod', 'kms://*', max_age => interval '0');
\echo :SQLSTATE
SELECT vault_key_directive('retire-key', 'k', max_age => interval '1 day');
\echo :SQLSTATE
SELECT vault_revoke_directive(NULL, 'r');
\echo :SQLSTATE
SELECT vault_revoke_directive(1, NULL);
\echo :SQLSTATE
SELECT vault_revoke_directive(999, 'no such directive');
\echo :SQLSTATE
RESET ROLE;
SELECT count(*) AS directives_stored FROM vault.key_directives;

-- retire-key by prefix pattern: refused with VV426 after effective_at, naming the directive,
-- in the put's record too; other keys, and the key's reads, are unaffected.
SET ROLE admin1;
SELECT vault_key_directive('retire-key', 'kms://payments/*', reason => 'KMS migration') AS retire_payments;
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'pay9', '\x02', 'aes-256-gcm', 'kms://payments/k1');
\echo :SQLSTATE
SELECT vault_put('kg', 'pay9', '\x02', 'aes-256-gcm', 'kms://payments-eu/k1') IS NOT NULL AS outside_pattern_stored;
SELECT encrypted_value, key_ref FROM vault_get('kg', 'pay1');
RESET ROLE;
SELECT granted, sqlstate, reason FROM vault.access_log
 WHERE operation = 'put' AND external_id = 'pay9' ORDER BY id;
-- The queue: every live entry under the retired keys, overdue; owners see their own.
SELECT external_id, owner, key_ref, directive_id, directive_kind, overdue,
       deadline = (SELECT effective_at FROM vault.key_directives WHERE id = 1) AS deadline_is_effective_at
  FROM vault.reencryption_queue ORDER BY external_id;
SET ROLE app_b;
SELECT external_id, owner FROM vault.reencryption_queue ORDER BY external_id;
RESET ROLE;
SET ROLE auditor1;
SELECT count(*) AS auditor_sees FROM vault.reencryption_queue;
RESET ROLE;
SET ROLE outsider;
SELECT count(*) FROM vault.reencryption_queue;
\echo :SQLSTATE
RESET ROLE;
-- A re-put under a compliant key is allowed, keeps created_at, and leaves the queue.
CREATE TEMP TABLE before AS SELECT external_id, created_at FROM vault.entries WHERE external_id = 'pay1';
SET ROLE app_a;
SELECT vault_put('kg', 'pay1', '\x03', 'aes-256-gcm', 'kms://payments-v2/k1') IS NOT NULL AS re_encrypted;
RESET ROLE;
SELECT e.created_at = b.created_at AS created_at_kept, e.key_ref
  FROM vault.entries e JOIN before b USING (external_id);
SELECT external_id FROM vault.reencryption_queue ORDER BY external_id;
-- Revoked: puts under the key are allowed again; the revocation is a new row, nothing updated.
SET ROLE admin1;
SELECT vault_revoke_directive(1, 'migration postponed');
SELECT vault_revoke_directive(1, 'twice');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'pay10', '\x02', 'aes-256-gcm', 'kms://payments/k1') IS NOT NULL AS stored_after_revoke;
RESET ROLE;
SELECT id, kind, target, reason, revokes FROM vault.key_directives ORDER BY id;
SELECT count(*) AS queue_after_revoke FROM vault.reencryption_queue;

-- Grace: allowed with a WARNING and the directive in the record; refused once it has passed.
SET ROLE admin1;
SELECT vault_key_directive('retire-key', 'kms://billing/k1', now(), interval '30 days') AS grace_directive;
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'bill2', '\x02', 'aes-256-gcm', 'kms://billing/k1') IS NOT NULL AS stored_in_grace;
RESET ROLE;
SELECT granted, details->'key_directive_grace'->0->'directive_id' AS grace_directive
  FROM vault.access_log WHERE operation = 'put' AND external_id = 'bill2';
SELECT external_id, overdue, deadline - (SELECT effective_at FROM vault.key_directives WHERE id = 3) AS grace
  FROM vault.reencryption_queue WHERE directive_id = 3 ORDER BY external_id;
-- Once the grace period has passed: refused.
SET ROLE admin1;
SELECT vault_key_directive('retire-key', 'kms://billing/k2', now() - interval '2 days', interval '1 day') AS grace_over;
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'bill3', '\x02', 'aes-256-gcm', 'kms://billing/k2');
\echo :SQLSTATE
RESET ROLE;
SET ROLE admin1;
SELECT vault_revoke_directive(4, 'test over');
RESET ROLE;
-- A directive effective in the future does nothing yet.
SET ROLE admin1;
SELECT vault_key_directive('retire-key', 'kms://future/k1', now() + interval '1 day') AS future_directive;
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'fut1', '\x02', key_ref => 'kms://future/k1') IS NOT NULL AS stored_before_effective;
RESET ROLE;

-- deny-algorithm, case-insensitive.
SET ROLE admin1;
SELECT vault_key_directive('deny-algorithm', '3des', reason => 'NIST SP 800-131A') AS deny_3des;
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'old2', '\x02', '3DES', 'kms://legacy/k2');
\echo :SQLSTATE
SELECT vault_put('kg', 'old2', '\x02', '3des', 'kms://legacy/k2');
\echo :SQLSTATE
SELECT vault_put('kg', 'old2', '\x02', 'AES-256-GCM', 'kms://legacy/k2') IS NOT NULL AS other_algorithm_stored;
RESET ROLE;
SELECT external_id, algorithm_hint, directive_kind FROM vault.reencryption_queue
 WHERE directive_id = 7 ORDER BY external_id;
SET ROLE admin1;
SELECT vault_revoke_directive(7, 'advisory withdrawn');
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'old3', '\x02', '3DES', 'kms://legacy/k2') IS NOT NULL AS stored_after_revoke;
RESET ROLE;

-- cryptoperiod: a key whose oldest live ciphertext is older than max_age takes no new data.
SET ROLE admin1;
SELECT vault_key_directive('cryptoperiod', 'kms://legacy/*', max_age => interval '30 days') AS cryptoperiod;
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'old4', '\x02', 'aes-256-gcm', 'kms://legacy/k1') IS NOT NULL AS young_key_stored;
RESET ROLE;
-- Time passes for old1 (under kms://legacy/k1).
UPDATE vault.entries SET updated_at = now() - interval '31 days' WHERE external_id = 'old1';
SET ROLE app_a;
SELECT vault_put('kg', 'old5', '\x02', 'aes-256-gcm', 'kms://legacy/k1');
\echo :SQLSTATE
SELECT vault_put('kg', 'old5', '\x02', 'aes-256-gcm', 'kms://legacy/k3') IS NOT NULL AS other_key_stored;
RESET ROLE;
SELECT external_id, key_ref, directive_kind FROM vault.reencryption_queue
 WHERE directive_id = 9 ORDER BY external_id;
SET ROLE admin1;
SELECT vault_revoke_directive(9, 'cryptoperiod extended');
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('kg', 'old5', '\x02', 'aes-256-gcm', 'kms://legacy/k1') IS NOT NULL AS stored_after_revoke;
RESET ROLE;

-- The directives are append-only and chained evidence.
UPDATE vault.key_directives SET reason = 'x' WHERE id = 1;
\echo :SQLSTATE
DELETE FROM vault.key_directives WHERE id = 1;
\echo :SQLSTATE
SELECT count(*) AS chained FROM vault.key_directives WHERE row_hash IS NOT NULL;
SELECT table_name, ok FROM vault_verify_audit('vault.key_directives'::regclass);
SELECT operation, granted, sqlstate, count(*) FROM vault.access_log
 WHERE operation IN ('key_directive', 'revoke_directive') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
