-- The access log: durable whatever the caller's transaction does, identity recorded,
-- append-only for every role.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
SELECT max(id) AS last_id FROM vault.access_log \gset

-- A granted get inside a rolled-back transaction stays logged.
SET ROLE app_a;
BEGIN;
SELECT encrypted_value FROM vault_get('card', 'p1');
ROLLBACK;
-- A denied call raises an error and still leaves its row.
BEGIN;
SELECT vault_put('nopolicy', 'z', '\x01');
\echo :SQLSTATE
ROLLBACK;
RESET ROLE;
SELECT role_name, session_user_name, operation, purpose, external_id, granted, sqlstate,
       backend_pid = pg_backend_pid() AS this_backend
  FROM vault.access_log WHERE id > :last_id ORDER BY id;

-- The caller's effective role is recorded (SET ROLE), with session user and application name.
SET application_name = 'golden-test';
SET ROLE app_b;
SELECT encrypted_value FROM vault_get('card', 'b1');
RESET ROLE;
RESET application_name;
SELECT role_name, session_user_name, application_name, operation, granted
  FROM vault.access_log WHERE id > :last_id AND application_name = 'golden-test';

-- A granted put's record commits with the put, in the caller's transaction: a rolled-back put
-- leaves neither entry nor record.
SET ROLE app_a;
BEGIN;
SELECT vault_put('card', 'rolled-back', '\x01') IS NOT NULL AS stored;
ROLLBACK;
SELECT vault_put('card', 'committed', '\x01') IS NOT NULL AS stored;
RESET ROLE;
SELECT external_id, pg_xact_status(caller_xid) AS caller_transaction
  FROM vault.access_log WHERE id > :last_id AND operation = 'put' AND granted ORDER BY id;
SELECT count(*) AS rolled_back_entries FROM vault.entries WHERE external_id = 'rolled-back';

-- Reads do not turn the caller's transaction into a writer (no xid, no commit flush of its own).
SET ROLE app_a;
BEGIN;
SELECT count(*) AS got FROM vault_get('card', 'p1');
SELECT count(*) AS listed FROM vault_list('card');
SELECT txid_current_if_assigned() IS NULL AS still_read_only;
ROLLBACK;
RESET ROLE;
SELECT count(*) AS reads_with_xid FROM vault.access_log
 WHERE id > :last_id AND operation IN ('get', 'head', 'list') AND caller_xid IS NOT NULL;

-- Append-only: UPDATE, DELETE and TRUNCATE are refused, for the superuser too.
UPDATE vault.access_log SET granted = true WHERE id = 1;
\echo :SQLSTATE
DELETE FROM vault.access_log WHERE id = 1;
\echo :SQLSTATE
TRUNCATE vault.access_log;
\echo :SQLSTATE
SET session_replication_role = replica;
UPDATE vault.access_log SET granted = true WHERE id = 1;
\echo :SQLSTATE
DELETE FROM vault.access_log WHERE id = 1;
\echo :SQLSTATE
RESET session_replication_role;
SELECT count(*) > 0 AS rows_kept FROM vault.access_log WHERE id = 1;

-- Nobody reads or writes the tables directly except as granted.
SET ROLE app_a;
SELECT count(*) FROM vault.entries;
\echo :SQLSTATE
SELECT count(*) FROM vault.access_log;
\echo :SQLSTATE
INSERT INTO vault.access_log (logged_at, role_name, session_user_name, backend_pid, operation, granted)
VALUES (now(), 'app_a', 'app_a', 1, 'get', true);
\echo :SQLSTATE
RESET ROLE;
SET ROLE auditor1;
SELECT count(*) > 0 AS auditor_reads_log FROM vault.access_log;
SELECT count(*) > 0 AS auditor_reads_metadata FROM (SELECT purpose, external_id, owner FROM vault.entries) m;
SELECT encrypted_value FROM vault.entries LIMIT 1;
\echo :SQLSTATE
SELECT * FROM vault_get('card', 'p1');
\echo :SQLSTATE
RESET ROLE;
SET ROLE admin1;
SELECT encrypted_value FROM vault.entries LIMIT 1;
\echo :SQLSTATE
RESET ROLE;
