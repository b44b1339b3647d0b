-- vault_put / vault_get / vault_head / vault_list: the rules and their SQLSTATEs.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
-- A refusal naming a time that changes with every run shows only its SQLSTATE (VERBOSITY
-- sqlstate); a query on LAST_ERROR_MESSAGE then shows the message with that time masked as
-- <timestamp> and checks the time. Times are written in ISO format, in UTC.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, MDY';
SET ROLE app_a;
SELECT vault_put('card', 'p1', '\xc1a55e', 'aes-256-gcm', 'kms://keys/1', '{"last4": "4242"}')
       BETWEEN now() + interval '90 days' - interval '1 minute' AND now() + interval '90 days' AS default_ttl_applied;
SELECT encrypted_value, algorithm_hint, key_ref, metadata, owner,
       expires_at > now() + interval '89 days' AS expiry_ok
  FROM vault_get('card', 'p1');
SELECT found, expired, owner, access_policy FROM vault_head('card', 'p1');
SELECT found, expired, owner FROM vault_head('card', 'nope');
-- An explicit expiry beyond the purpose's maximum is refused; one within it is kept as given.
\set VERBOSITY sqlstate
SELECT vault_put('card', 'p2', '\x01', expires_at => '2030-01-01 00:00:00+00');
\set VERBOSITY default
SELECT replace(:'LAST_ERROR_MESSAGE', t[1], '<timestamp>') AS message,
       t[1]::timestamptz BETWEEN now() + interval '365 days' - interval '1 minute' AND now() + interval '365 days'
           AS until_365_days_from_now
  FROM regexp_match(:'LAST_ERROR_MESSAGE', ' until (.+)\)$') AS t;
SELECT vault_put('card', 'p2', '\x01', expires_at => now() + interval '10 days') = (SELECT expires_at FROM vault_get('card', 'p2')) AS explicit_expiry_kept;
-- Replacing an entry: the owner may; the new value is returned.
SELECT vault_put('card', 'p1', '\xc1a55f', metadata => '{"last4": "4243"}') IS NOT NULL AS replaced;
SELECT encrypted_value, metadata FROM vault_get('card', 'p1');
RESET ROLE;
-- Another role cannot replace it.
SET ROLE app_b;
SELECT vault_put('card', 'p1', '\x0bad');
\echo :SQLSTATE
RESET ROLE;
SELECT count(*) AS entries_p1, min(encode(encrypted_value, 'hex')) AS value FROM vault.entries WHERE external_id = 'p1';

-- Errors: each with its SQLSTATE, nothing stored.
SET ROLE app_a;
SELECT vault_put('nopolicy', 'x1', '\x01');
\echo :SQLSTATE
\set VERBOSITY sqlstate
SELECT vault_put('card', 'x1', '\x01', expires_at => now() + interval '366 days');
SELECT replace(replace(:'LAST_ERROR_MESSAGE', t[1], '<timestamp>'), t[2], '<timestamp>') AS message,
       t[2]::timestamptz BETWEEN now() + interval '365 days' - interval '1 minute' AND now() + interval '365 days'
           AS until_365_days_from_now,
       t[1]::timestamptz - t[2]::timestamptz = interval '1 day' AS one_day_beyond
  FROM regexp_match(:'LAST_ERROR_MESSAGE', '^expires_at (.+) is beyond .* until (.+)\)$') AS t;
SELECT vault_put('card', 'x1', '\x01', expires_at => 'infinity');
SELECT replace(:'LAST_ERROR_MESSAGE', t[1], '<timestamp>') AS message,
       t[1]::timestamptz BETWEEN now() + interval '365 days' - interval '1 minute' AND now() + interval '365 days'
           AS until_365_days_from_now
  FROM regexp_match(:'LAST_ERROR_MESSAGE', ' until (.+)\)$') AS t;
SELECT vault_put('card', 'x1', '\x01', expires_at => now() - interval '1 second');
SELECT replace(:'LAST_ERROR_MESSAGE', t[1], '<timestamp>') AS message,
       t[1]::timestamptz BETWEEN now() - interval '1 minute' AND now() - interval '1 second' AS one_second_ago
  FROM regexp_match(:'LAST_ERROR_MESSAGE', '^expires_at (.+) is in the past$') AS t;
\set VERBOSITY default
SELECT vault_put('card', 'x1', '\x01', expires_at => '-infinity');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', access_policy => 'no-such-policy');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', access_policy => 'admin-only');
\echo :SQLSTATE
SELECT vault_put(NULL, 'x1', '\x01');
\echo :SQLSTATE
SELECT vault_put('card', NULL, '\x01');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', NULL);
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', metadata => NULL);
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', access_policy => NULL);
\echo :SQLSTATE
SELECT vault_put('Card', 'x1', '\x01');
\echo :SQLSTATE
SELECT vault_put('card; drop table vault.entries', 'x1', '\x01');
\echo :SQLSTATE
SELECT vault_put(repeat('a', 300), 'x1', '\x01');
\echo :SQLSTATE
SELECT vault_put(E'ca\u202Erd', 'x1', '\x01');
\echo :SQLSTATE
SELECT vault_put('card', '', '\x01');
\echo :SQLSTATE
SELECT vault_put('card', repeat('x', 257), '\x01');
\echo :SQLSTATE
SELECT vault_put('card', E'x\n1', '\x01');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', metadata => '[1, 2]');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', metadata => '"text"');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01', metadata => jsonb_build_object('k', repeat('m', 70000)));
\echo :SQLSTATE
RESET ROLE;
SET vsql_vault.max_value_bytes = 4;
SET ROLE app_a;
SELECT vault_put('card', 'x1', '\x0102030405');
\echo :SQLSTATE
SELECT vault_put('card', 'x1', '\x01020304') IS NOT NULL AS four_bytes_ok;
RESET ROLE;
RESET vsql_vault.max_value_bytes;
-- Only x1 (the last, valid put) was stored.
SELECT external_id FROM vault.entries ORDER BY external_id;
-- A role outside vault_app and vault_admin may not use the API at all.
SET ROLE outsider;
SELECT vault_put('card', 'o1', '\x01');
\echo :SQLSTATE
SELECT * FROM vault_get('card', 'p1');
\echo :SQLSTATE
SELECT * FROM vault_list('card');
\echo :SQLSTATE
RESET ROLE;

-- Retrieval errors.
SET ROLE app_a;
SELECT * FROM vault_get('card', 'does-not-exist');
\echo :SQLSTATE
SELECT * FROM vault_get(NULL, 'p1');
\echo :SQLSTATE
SELECT * FROM vault_get('card', NULL);
\echo :SQLSTATE
SELECT * FROM vault_get('CARD', 'p1');
\echo :SQLSTATE
RESET ROLE;
SET ROLE app_b;
SELECT * FROM vault_get('card', 'p1');
\echo :SQLSTATE
SELECT * FROM vault_head('card', 'p1');
\echo :SQLSTATE
RESET ROLE;
-- Expired and purged entries are gone (VV410); head still reports them.
UPDATE vault.entries SET expires_at = now() - interval '1 second' WHERE external_id = 'p2';
UPDATE vault.entries SET purged_at = now() WHERE external_id = 'x1';
SET ROLE app_a;
SELECT * FROM vault_get('card', 'p2');
\echo :SQLSTATE
SELECT * FROM vault_get('card', 'x1');
\echo :SQLSTATE
SELECT found, expired FROM vault_head('card', 'p2');
-- vault_list shows metadata only, of entries the caller may retrieve, never purged ones.
SELECT external_id, owner, metadata, access_policy FROM vault_list('card');
RESET ROLE;
SET ROLE app_b;
SELECT vault_put('card', 'b1', '\x0b') IS NOT NULL AS stored;
SELECT external_id, owner FROM vault_list('card');
RESET ROLE;
SET ROLE admin1;
SELECT external_id, owner FROM vault_list('card');
RESET ROLE;
