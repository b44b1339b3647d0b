-- Objects of the storage scenarios (run by benches/run.sh as the superuser, after CREATE EXTENSION).

CREATE ROLE bench LOGIN IN ROLE vault_app, vault_admin;
SELECT vault_set_retention_policy('bench', 365, 90);
SELECT vault_set_retention_policy('bench.sweep', 365, 1);

-- Peer (a): a plain table read and written by key.
CREATE TABLE plain_kv (id int PRIMARY KEY, v bytea NOT NULL, metadata jsonb NOT NULL DEFAULT '{}');
INSERT INTO plain_kv SELECT g, '\xdeadbeefdeadbeefdeadbeefdeadbeef' FROM generate_series(1, 10000) g;

CREATE TABLE events_plain (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL);
CREATE TABLE events_chained (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL);
GRANT ALL ON plain_kv, events_plain, events_chained, events_plain_id_seq, events_chained_id_seq TO bench;
SELECT vault_protect_table('events_chained', 16);

-- Peer (b): the same plain SELECT, logged by pgaudit. pgaudit.log is set for this role only, so
-- no other scenario is audited.
CREATE EXTENSION pgaudit;
CREATE ROLE bench_audited LOGIN;
GRANT SELECT ON plain_kv TO bench_audited;
ALTER ROLE bench_audited SET pgaudit.log = 'read';

-- Peer (c): what a careful user writes by hand: a get that reads the row by key and appends a
-- hash-chained audit row (sha256 over the previous hash and the row) under a lock on the chain
-- head (one row, SELECT ... FOR UPDATE), in the caller's transaction.
CREATE TABLE hand_rolled_head (
    one       bool PRIMARY KEY DEFAULT true CHECK (one),
    seq       bigint NOT NULL,
    head_hash bytea NOT NULL
);
INSERT INTO hand_rolled_head VALUES (true, 0, decode(repeat('00', 32), 'hex'));
CREATE TABLE hand_rolled_audit (
    seq       bigint PRIMARY KEY,
    logged_at timestamptz NOT NULL,
    role_name name NOT NULL,
    operation text NOT NULL,
    key       int NOT NULL,
    found     bool NOT NULL,
    prev_hash bytea NOT NULL,
    row_hash  bytea NOT NULL
);
CREATE FUNCTION hand_rolled_get(k int) RETURNS bytea
LANGUAGE plpgsql AS $fn$
DECLARE
    val bytea;
    h   hand_rolled_head;
    at  timestamptz := clock_timestamp();
    rh  bytea;
BEGIN
    SELECT p.v INTO val FROM plain_kv p WHERE p.id = k;
    SELECT * INTO h FROM hand_rolled_head FOR UPDATE;
    rh := sha256(h.head_hash || convert_to(
              concat_ws('|', h.seq + 1, at, current_user, 'get', k, val IS NOT NULL), 'UTF8'));
    INSERT INTO hand_rolled_audit VALUES (h.seq + 1, at, current_user, 'get', k, val IS NOT NULL,
                                          h.head_hash, rh);
    UPDATE hand_rolled_head SET seq = h.seq + 1, head_hash = rh;
    RETURN val;
END
$fn$;
GRANT SELECT, UPDATE ON hand_rolled_head TO bench;
GRANT SELECT, INSERT ON hand_rolled_audit TO bench;
