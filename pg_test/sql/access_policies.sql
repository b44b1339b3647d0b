-- Each built-in access policy and a custom one, granting and denying.
-- owner-only: covered in put_get (app_b denied on app_a's entry).
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never

-- same-purpose: the owner and roles granted the purpose (app_b was granted health.record).
SET ROLE app_a;
SELECT vault_put('health.record', 'h1', '\x4801', access_policy => 'same-purpose') IS NOT NULL AS stored;
RESET ROLE;
SET ROLE app_b;
SELECT encrypted_value FROM vault_get('health.record', 'h1');
RESET ROLE;
SET ROLE app_c;
SELECT encrypted_value FROM vault_get('health.record', 'h1');
\echo :SQLSTATE
RESET ROLE;

-- open-retrieve: any vault_app member; not an outsider, not an admin who is not a vault_app member.
SET ROLE app_a;
SELECT vault_put('card', 'open1', '\x0f', access_policy => 'open-retrieve') IS NOT NULL AS stored;
RESET ROLE;
SET ROLE app_c;
SELECT encrypted_value FROM vault_get('card', 'open1');
RESET ROLE;
SET ROLE admin1;
SELECT encrypted_value FROM vault_get('card', 'open1');
\echo :SQLSTATE
RESET ROLE;

-- admin-only: vault_app members neither store nor retrieve; admins do both.
SET ROLE app_a;
SELECT vault_put('card', 'adm1', '\xad', access_policy => 'admin-only');
\echo :SQLSTATE
RESET ROLE;
SET ROLE admin1;
SELECT vault_put('card', 'adm1', '\xad', access_policy => 'admin-only') IS NOT NULL AS stored;
SELECT encrypted_value FROM vault_get('card', 'adm1');
RESET ROLE;
SET ROLE app_a;
SELECT encrypted_value FROM vault_get('card', 'adm1');
\echo :SQLSTATE
RESET ROLE;

-- Custom: team-b lets only app_a store and app_b retrieve.
SET ROLE app_c;
SELECT vault_put('card', 't1', '\x71', access_policy => 'team-b');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_a;
SELECT vault_put('card', 't1', '\x71', access_policy => 'team-b') IS NOT NULL AS stored;
RESET ROLE;
SET ROLE app_b;
SELECT encrypted_value FROM vault_get('card', 't1');
RESET ROLE;
SET ROLE app_c;
SELECT encrypted_value FROM vault_get('card', 't1');
\echo :SQLSTATE
RESET ROLE;

-- max_retrievals: two successful reads, then denied, also when the reads were rolled back.
SET ROLE app_a;
SELECT vault_put('card', 'r2', '\x72', access_policy => 'two-reads') IS NOT NULL AS stored;
BEGIN;
SELECT encrypted_value FROM vault_get('card', 'r2');
ROLLBACK;
SELECT encrypted_value FROM vault_get('card', 'r2');
SELECT encrypted_value FROM vault_get('card', 'r2');
\echo :SQLSTATE
-- head does not count as a retrieval
SELECT found FROM vault_head('card', 'r2');
RESET ROLE;
SELECT operation, granted, sqlstate, reason FROM vault.access_log
 WHERE external_id = 'r2' ORDER BY id;
