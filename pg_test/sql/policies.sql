-- Retention policies, access policies and purpose grants: who may change them, what is valid.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
SET ROLE admin1;
SELECT vault_set_retention_policy('card', 365, 90);
SELECT vault_set_retention_policy('health.record', 3650, 365, 'crypto-shred', true, 'Patient records');
SELECT vault_set_retention_policy('session', 1, 1, 'retention-expire', true);
-- Changing a policy replaces it.
SELECT vault_set_retention_policy('session', 2, 1, 'retention-expire');
-- Purge proofs cannot be turned off: false is refused, and the policy stays as it was.
SELECT vault_set_retention_policy('session', 3, 1, 'retention-expire', false);
\echo :SQLSTATE
-- Invalid input: each refused with its SQLSTATE, nothing stored.
SELECT vault_set_retention_policy('card2', 0, 1);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card2', 10, 0);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card2', -5, -5);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card2', 30, 31);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card2', 30, 10, 'shred');
\echo :SQLSTATE
SELECT vault_set_retention_policy('Card2', 30, 10);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card 2', 30, 10);
\echo :SQLSTATE
SELECT vault_set_retention_policy(NULL, 30, 10);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card2', NULL, 10);
\echo :SQLSTATE
SELECT vault_set_retention_policy('card2', 30, 10, NULL);
\echo :SQLSTATE
RESET ROLE;
-- Only vault_admin members change policies.
SET ROLE app_a;
SELECT vault_set_retention_policy('card3', 30, 10);
\echo :SQLSTATE
RESET ROLE;
SELECT purpose, max_retention_days, default_ttl_days, purge_method, require_purge_proof,
       description, updated_by
  FROM vault.retention_policies ORDER BY purpose;

-- Custom access policies.
SET ROLE admin1;
SELECT vault_set_access_policy('two-reads', '{vault_app}', '{@owner}', '{@owner}', 2,
                               'The owner reads it twice, then never again');
SELECT vault_set_access_policy('team-b', '{app_a}', '{app_b,@owner}', '{vault_admin}');
SELECT vault_set_access_policy('bad', '{no_such_role}', '{@owner}', '{@owner}');
\echo :SQLSTATE
SELECT vault_set_access_policy('bad', '{vault_app}', '{@owner}', '{@owner}', 0);
\echo :SQLSTATE
SELECT vault_set_access_policy('owner-only', '{vault_app}', '{vault_app}', '{@owner}');
\echo :SQLSTATE
SELECT vault_set_access_policy('Bad Name', '{vault_app}', '{@owner}', '{@owner}');
\echo :SQLSTATE
SELECT vault_set_access_policy('bad', NULL, '{@owner}', '{@owner}');
\echo :SQLSTATE
SELECT vault_set_access_policy('bad', '{vault_app,NULL}', '{@owner}', '{@owner}');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_a;
SELECT vault_set_access_policy('mine', '{vault_app}', '{vault_app}', '{@owner}');
\echo :SQLSTATE
RESET ROLE;
SELECT name, store_roles, retrieve_roles, purge_roles, max_retrievals, builtin
  FROM vault.access_policies ORDER BY name;

-- Purpose grants.
SET ROLE admin1;
SELECT vault_grant_purpose('health.record', 'app_b');
SELECT vault_grant_purpose('health.record', 'app_c');
SELECT vault_revoke_purpose('health.record', 'app_c');
SELECT vault_grant_purpose('no.policy', 'app_b');
\echo :SQLSTATE
SELECT vault_grant_purpose('health.record', 'nobody_here');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_b;
SELECT vault_grant_purpose('health.record', 'app_b');
\echo :SQLSTATE
RESET ROLE;
SELECT purpose, role_name, granted_by FROM vault.purpose_grants ORDER BY 1, 2;

-- Every change and every refused attempt is in the access log.
SELECT role_name, operation, purpose, details->>'name' AS policy, details->>'role' AS role,
       granted, sqlstate
  FROM vault.access_log ORDER BY id;
